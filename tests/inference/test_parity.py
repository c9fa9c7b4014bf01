"""Train -> serve parity: a checkpoint trained with each recipe (fp32, bf16 autocast, FP8 row-wise)
serves logits equal to the training forward's on the same tokens, in the same precision, at every
position: the prompt's last token (prefill, packed with another prompt and in chunks) and each
token after it (decode over the paged cache). Layouts: the tensor-parallel case writes its
checkpoint from a TP mesh (test_tp_serving.py); here the one-process checkpoints."""

from __future__ import annotations

import contextlib

import pytest
import torch

from llama3hp.fp8 import Fp8Config, apply_fp8
from llama3hp.inference.engine import EngineConfig, LLMEngine
from llama3hp.inference.loading import load_plain_model
from llama3hp.inference.runner import build_inputs
from llama3hp.inference.sampling import SamplingParams
from llama3hp.inference.scheduler import Request, sample_rows

pytestmark = pytest.mark.xdist_group("inference_trained")  # one worker trains the checkpoints

SEQ = torch.randint(0, 128_000, (2, 40), generator=torch.Generator().manual_seed(5)).tolist()
PROMPT = 23  # tokens of each sequence given as the prompt; the rest are fed one per decode step


def served_logits(engine: LLMEngine) -> dict[int, torch.Tensor]:
    """Run both sequences through the engine, teacher-forced: {sequence: logits [len - PROMPT + 1... , V]}
    for positions PROMPT-1 .. len-2 (the prefill's last token, then every decode step)."""
    params = SamplingParams(max_tokens=len(SEQ[0]) - PROMPT, temperature=0.0, ignore_eos=True)
    for i, seq in enumerate(SEQ):
        engine.scheduler.add(Request(str(i), seq[:PROMPT], params))
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    while engine.scheduler.has_work():
        plan = engine.scheduler.schedule()
        rows, _, _ = sample_rows(plan)
        logits = engine.runner.execute(build_inputs(plan, rows))
        owners = [int(s.request.id) for s in plan.decode] + [
            int(ch.seq.request.id) for ch in plan.chunks if ch.completes
        ]
        forced = []
        for owner, row in zip(owners, logits):
            got[owner].append(row)
            forced.append(SEQ[owner][PROMPT + len(got[owner]) - 1])
        engine.scheduler.update(plan, forced, set(), engine.max_model_len)
    return {k: torch.stack(v) for k, v in got.items()}


def training_logits(model, amp) -> dict[int, torch.Tensor]:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return {i: model(torch.tensor([s])).logits()[0, PROMPT - 1 : -1].float() for i, s in enumerate(SEQ)}


# recipe -> (training autocast, FP8 recipe, relative tolerance on the logits)
RECIPES = {
    "fp32": (False, None, 1e-5),
    "bf16": (True, None, 2e-2),  # bf16 autocast: the attention sums in another order
    "fp8": (
        False,
        "rowwise",
        1e-4,
    ),  # per-token activation scales: a token's row does not depend on its batch
}


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("chunk", [2048, 16], ids=["packed", "chunked"])
def test_served_logits_equal_the_training_forward(trained, recipe, chunk):
    amp, fp8, rtol = RECIPES[recipe]
    model = load_plain_model(trained[recipe]).requires_grad_(False)
    if fp8:
        assert apply_fp8(model, Fp8Config(recipe=fp8))  # as the trainer ran it (emulated GEMMs on CPU)
    want = training_logits(model, amp)
    engine = LLMEngine(model, EngineConfig(num_blocks=64, max_num_batched_tokens=chunk, max_num_seqs=2,
                                           amp_dtype=torch.bfloat16 if amp else None))  # fmt: skip
    got = served_logits(engine)
    for i in want:
        scale = want[i].abs().max().item()
        torch.testing.assert_close(got[i], want[i], rtol=rtol, atol=rtol * scale)
    assert engine.kv_blocks_used == 0
