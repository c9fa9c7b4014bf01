"""FP8 serving as the paper does it (llama3hp/fp8/inference.py), on the emulated CPU path: which
layers are quantized, the 1200 bound on activation scales, logits and perplexity against bf16."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from serving_testing import HELD_OUT, greedy_by_recompute, tiny_model

from llama3hp.fp8.inference import Fp8InferenceLinear, apply_fp8_inference, serving_fp8_config
from llama3hp.inference.engine import EngineConfig, LLMEngine
from llama3hp.inference.loading import load_serving_model
from llama3hp.inference.sampling import SamplingParams

pytestmark = pytest.mark.xdist_group("inference_trained")  # one worker trains the checkpoints


def test_only_the_inner_blocks_feed_forward_linears_are_quantized():
    model = tiny_model()  # 4 blocks
    fqns = apply_fp8_inference(model)
    assert sorted(fqns) == [f"layers.{i}.feed_forward.{w}" for i in (1, 2) for w in ("w1", "w2", "w3")]
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8InferenceLinear)}
    assert fp8 == set(fqns)
    for name, m in model.named_modules():  # attention, first/last blocks, embedding, head: as they were
        if name.startswith(("layers.0.", "layers.3.")) or ".attention." in name:
            assert not isinstance(m, Fp8InferenceLinear), name
    w1 = model.get_submodule("layers.1.feed_forward.w1")
    assert isinstance(w1, Fp8InferenceLinear)
    assert w1.weight.dtype == torch.float8_e4m3fn and w1.weight_scale_inv.shape == (w1.out_features,)


def test_weights_are_quantized_once_per_output_channel():
    lin = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight[3] *= 100  # one channel's scale must not touch the others
    q = Fp8InferenceLinear.from_linear(lin, serving_fp8_config())
    deq = q.weight.float() * q.weight_scale_inv[:, None]
    rel = (deq - lin.weight).norm(dim=1) / lin.weight.norm(dim=1)
    assert rel.max() < 0.04  # E4M3: a few percent per channel, outlier channel included
    torch.testing.assert_close(q.weight_scale_inv[3], lin.weight[3].abs().max() / 448, rtol=1e-6, atol=0)


def test_an_activation_outlier_of_1e4_saturates_at_the_1200_bound():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(2, 32) * 0.5
    x[0, 5] = 1e4  # one outlier in token 0
    bounded = Fp8InferenceLinear.from_linear(lin, serving_fp8_config(activation_scale_ub=1200.0))
    unbounded = Fp8InferenceLinear.from_linear(lin, serving_fp8_config(activation_scale_ub=None))
    with torch.no_grad():
        clipped = x.clone()
        clipped[0, 5] = 1200.0  # the outlier saturates at ±448 in E4M3 with scale 448/1200
        want = clipped @ lin.weight.T
        y = bounded(x)
    torch.testing.assert_close(y[0], want[0], rtol=0.05, atol=0.05 * want[0].abs().max().item())
    torch.testing.assert_close(y[1], want[1], rtol=0.1, atol=0.05)  # token 1 has its own scale
    with torch.no_grad():
        assert (unbounded(x)[0] - x[0] @ lin.weight.T).abs().max() < 0.05 * 1e4 * lin.weight.abs().max()


def _held_out_tokens(tokenizer, n: int = 1024) -> torch.Tensor:
    text = open(os.path.join(os.path.dirname(os.__file__), HELD_OUT)).read()
    return torch.tensor(tokenizer.encode(text)[: n + 1])


def _perplexity(model, ids: torch.Tensor, row: int = 256) -> float:
    n = (ids.numel() - 1) // row * row
    x, y = ids[:n].view(-1, row), ids[1 : n + 1].view(-1, row)
    with torch.no_grad():
        return math.exp(float(model(x, targets=y, reduction="mean")))


def test_fp8_logits_and_held_out_perplexity_match_bf16(trained, tokenizer):
    """The trained tiny model in bf16 against the same with the paper's FP8 recipe: logits cosine
    >= 0.999 on every position, and perplexity on a stdlib file it never saw within 1%."""
    bf16 = load_serving_model(trained["fp32"], device=torch.device("cpu"), dtype=torch.bfloat16)
    fp8 = load_serving_model(trained["fp32"], device=torch.device("cpu"), dtype=torch.bfloat16, fp8=True)
    assert sum(isinstance(m, Fp8InferenceLinear) for m in fp8.modules()) == 6
    ids = _held_out_tokens(tokenizer)
    with torch.no_grad():
        a = bf16(ids[None, :512]).logits()[0].float()
        b = fp8(ids[None, :512]).logits()[0].float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() >= 0.999, cos.min()
    ppl_bf16, ppl_fp8 = _perplexity(bf16, ids), _perplexity(fp8, ids)
    assert ppl_bf16 < 20_000  # trained: far below the 128,256 of a uniform guess
    assert abs(ppl_fp8 / ppl_bf16 - 1) <= 0.01, (ppl_bf16, ppl_fp8)


def test_fp8_serving_generates_with_the_cache_what_its_forward_says():
    model = tiny_model()
    apply_fp8_inference(model)
    ref = copy.deepcopy(model)
    engine = LLMEngine(model, EngineConfig(num_blocks=64))
    prompt = torch.randint(0, 128_000, (19,), generator=torch.Generator().manual_seed(2)).tolist()
    (r,) = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert r.token_ids == greedy_by_recompute(ref, prompt, 8)
