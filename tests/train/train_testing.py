"""Shared by the trainer tests (a uniquely named module: several test folders have a conftest.py)."""

# A shrunk Llama 3 (dim 64, 2 layers, the full 128K vocabulary) at seq 64, 2 rows per step.
SMALL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.multiple_of=64",
    "training.seq_len=64",
    "training.micro_batch_rows=2",
    "training.global_batch_rows=2",
    "training.warmup_steps=2",
    "training.lr=3e-3",
    "metrics.progress=false",
]
