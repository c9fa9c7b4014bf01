"""Hugging Face transformers as a peer: importing it from this repository, and loading our weights.

transformers 5 depends on the PyPI package `kernels` (Hugging Face's hub kernels) and imports it
when present; run from the repository root, Python finds this repository's `kernels/` folder
first (the current directory leads sys.path) and the import fails. `import_transformers` imports
transformers with the repository root off sys.path, so the real `kernels` package is the one
cached; llama3hp's own kernels are `llama3hp.kernels` and are not affected.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def import_transformers() -> ModuleType:
    """`transformers`, with LlamaForCausalLM and LlamaConfig loaded (ImportError if not installed)."""
    shadow = [p for p in sys.path if Path(p or ".").resolve() == REPO]
    ours = sys.modules.get("kernels")
    if ours is not None and Path(getattr(ours, "__file__", "") or "").resolve().parent == REPO / "kernels":
        del sys.modules["kernels"]
    for p in shadow:
        sys.path.remove(p)
    try:
        transformers = importlib.import_module("transformers")
        _ = transformers.LlamaForCausalLM, transformers.LlamaConfig  # resolve the lazy imports now
    finally:
        sys.path[:0] = shadow
    return transformers


def load_hf_model(folder: str | Path, dtype=None):
    """LlamaForCausalLM from a folder written by `llama3hp export --format hf` (or transformers),
    in eval mode, with the eager attention (the same math as ours, no SDPA kernel choice)."""
    transformers = import_transformers()
    model = transformers.LlamaForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation="eager"
    )
    return model.eval()
