"""llama3hp.posttrain: what a run optimises after pre-training, on every layout.

- `config.py`: `[posttrain]` (objective "next_token" | "sft" | "dpo", DPO's beta/alpha and reference);
- `dpo.py`: the paper's DPO formula (written once) and the `DPOLoss` objective;
- `reference.py`: DPO's frozen reference, precomputed beside the data or co-resident on the layout;
- `build.py`: the objective and the reference from a job config (what the trainer calls);
- `evaluate.py`: held-out metrics of a checkpoint (`llama3hp evaluate`).
SFT is the masked next-token loss (`llama3hp.train.objectives.MaskedNextTokenLoss`) on data prepared
with `llama3hp prepare --format sft`.
"""
