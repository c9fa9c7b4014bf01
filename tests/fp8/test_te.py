"""Transformer Engine recipes: run when transformer_engine imports (on a GPU), skipped with the reason otherwise."""

import dataclasses

import pytest
import torch

from llama3hp.fp8 import Fp8Config, apply_fp8, build_te_recipe, te_available
from llama3hp.model import Transformer, get_model_args

pytestmark = pytest.mark.skipif(not te_available(), reason="transformer_engine is not installed")


@pytest.mark.parametrize("recipe", ["te_delayed", "te_current"])
def test_te_recipe_objects(recipe):
    r = build_te_recipe(Fp8Config(recipe=recipe, amax_history_len=16, margin=1))
    if recipe == "te_delayed":
        assert r.amax_history_len == 16 and r.margin == 1


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["te_delayed", "te_current"])
def test_te_model_trains(recipe):
    args = dataclasses.replace(get_model_args("tiny"), n_layers=2, vocab_size=512)
    model = Transformer(args).cuda()
    model.init_weights(seed=0)
    converted = apply_fp8(model, Fp8Config(recipe=recipe))
    assert len(converted) == 14
    tokens = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens, targets=tokens)
    loss.backward()
    assert torch.isfinite(loss) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
