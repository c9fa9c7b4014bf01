"""Fp8Linear forward and gradients against fp32, apply_fp8 conversion rules, and the 50-step
emulated-FP8 training run against fp32."""

import dataclasses

import pytest
import torch
from torch import nn

from llama3hp.fp8 import BLOCK_LINEARS, Fp8Config, Fp8Gemms, Fp8Linear, apply_fp8, select_fp8_linears
from llama3hp.model import OutputHead, Transformer, get_model_args


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run(linear, x, dy):
    x = x.clone().requires_grad_(True)
    y = linear(x)
    y.backward(dy)
    return y.detach(), x.grad, linear.weight.grad, None if linear.bias is None else linear.bias.grad


def _pair(cfg, bias=False, K=64, N=48):
    ref = nn.Linear(K, N, bias=bias)
    fp8 = Fp8Linear.from_linear(nn.Linear(K, N, bias=bias), cfg)
    with torch.no_grad():
        fp8.weight.copy_(ref.weight)
        if bias:
            fp8.bias.copy_(ref.bias)
    return ref, fp8


@pytest.mark.parametrize("grad_dtype", ["e4m3", "e5m2"])
@pytest.mark.parametrize("bias", [False, True])
def test_emulated_linear_forward_and_grads_within_fp8_tolerance(grad_dtype, bias):
    cfg = Fp8Config(recipe="emulated", grad_dtype=grad_dtype)
    ref, fp8 = _pair(cfg, bias)
    x, dy = torch.randn(4, 8, 64), torch.randn(4, 8, 48)
    out_ref, out = _run(ref, x, dy), _run(fp8, x, dy)
    # E4M3 operands carry ~2-3% RMS error each; an E5M2 gradient twice that.
    bounds = (0.05, 0.08 if grad_dtype == "e4m3" else 0.12, 0.08 if grad_dtype == "e4m3" else 0.12)
    for name, a, b, bound in zip(("y", "dx", "dW"), out[:3], out_ref[:3], bounds, strict=True):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        assert _rel(a, b) < bound, f"{name}: relative error {_rel(a, b):.3g} >= {bound}"
    if bias:
        torch.testing.assert_close(out[3], out_ref[3])


def test_triton_path_matches_emulated(poison_empty):
    """Triton quantization + Triton GEMM (interpreter) follow the emulated recipe to fp32 rounding."""
    emu, tri = (
        Fp8Config(recipe="emulated"),
        Fp8Config(recipe="rowwise", quant_backend="triton", gemm="triton"),
    )
    _, a = _pair(emu, K=64, N=48)
    b = Fp8Linear.from_linear(nn.Linear(64, 48, bias=False), tri)
    with torch.no_grad():
        b.weight.copy_(a.weight)
    x, dy = torch.randn(2, 16, 64), torch.randn(2, 16, 48)
    for ta, tb in zip(_run(a, x, dy)[:3], _run(b, x, dy)[:3], strict=True):
        torch.testing.assert_close(tb, ta, rtol=1e-4, atol=1e-4 * ta.abs().max().item())


@pytest.mark.parametrize(
    "cfg",
    [Fp8Config(recipe="emulated"), Fp8Config(recipe="rowwise", quant_backend="triton", gemm="triton")],
    ids=["emulated", "triton"],
)
def test_fp8_gemms_are_the_linear_gemms_and_split_by_token_chunks(cfg):
    """Fp8Gemms (what the overlapped TP paths run chunk by chunk) gives the Fp8Linear's y, dx and dW,
    and a GEMM cut into token chunks gives the rows of the whole one: per-token scales are row-local."""
    _, fp8 = _pair(cfg, K=64, N=48)
    x, dy = torch.randn(32, 64), torch.randn(32, 48)
    y, dx, dw, _ = _run(fp8, x, dy)
    gemms, w = Fp8Gemms(cfg), fp8.weight.detach()
    exact = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gemms.fprop(x, w, torch.float32), y, **exact)
    torch.testing.assert_close(gemms.dgrad(dy, w, torch.float32), dx, **exact)
    torch.testing.assert_close(gemms.wgrad(dy, x, torch.float32), dw, **exact)
    chunks = [gemms.fprop(c, w, torch.float32) for c in x.split([5, 16, 11])]
    torch.testing.assert_close(torch.cat(chunks), y, **exact)
    chunks = [gemms.dgrad(c, w, torch.float32) for c in dy.split([7, 25])]
    torch.testing.assert_close(torch.cat(chunks), dx, **exact)
    assert _rel(y, x @ w.T) > 1e-3  # it did quantize


def test_rowwise_on_cpu_falls_back_to_emulated_gemm():
    ref, fp8 = _pair(Fp8Config(recipe="rowwise", quant_backend="torch"))
    _, emu = _pair(Fp8Config(recipe="emulated"))
    with torch.no_grad():
        emu.weight.copy_(fp8.weight)
    x = torch.randn(8, 64)
    torch.testing.assert_close(fp8(x), emu(x), rtol=0, atol=0)


def test_autocast_output_dtype_and_master_weight_grad():
    _, fp8 = _pair(Fp8Config(recipe="emulated"))
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert fp8.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_non_finite_activation_policy():
    _, fp8 = _pair(Fp8Config(recipe="emulated"))
    x = torch.randn(4, 64)
    x[2, 1] = float("inf")
    y = fp8(x)  # default: no sync, the bad row is poisoned
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()
    fp8.fp8_config = Fp8Config(recipe="emulated", check_finite=True)
    with pytest.raises(ValueError, match="inf/NaN"):
        fp8(x)


def _tiny_args(**kw):
    base = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
    return dataclasses.replace(get_model_args("tiny"), **{**base, **kw})


def test_apply_fp8_selection_and_state_dict():
    model = Transformer(_tiny_args())
    model.init_weights(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = apply_fp8(model, Fp8Config(recipe="emulated"))
    assert sorted(converted) == sorted(f"layers.{i}.{s}" for i in range(3) for s in BLOCK_LINEARS)
    assert all(isinstance(model.get_submodule(n), Fp8Linear) for n in converted)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert isinstance(model.tok_embeddings, nn.Embedding) and type(model.output) is OutputHead

    fresh = Transformer(_tiny_args())
    skip = select_fp8_linears(fresh, Fp8Config(skip_first_last_blocks=True))
    assert sorted(skip) == sorted(f"layers.1.{s}" for s in BLOCK_LINEARS)
    ffn = select_fp8_linears(fresh, Fp8Config(include=("layers.*.feed_forward.*",), exclude=("*.w2",)))
    assert ffn == [f"layers.{i}.feed_forward.{w}" for i in range(3) for w in ("w1", "w3")]
    with torch.device("meta"):
        meta = Transformer(_tiny_args(dim=72, n_heads=4, n_kv_heads=2))  # head_dim 18: wq 72 -> 72
    # rowwise leaves linears whose dims are not multiples of 16 (a _scaled_mm requirement) in bf16.
    assert apply_fp8(meta, Fp8Config(recipe="rowwise")) == []
    # ... judged on the shard tensor parallelism leaves: at tp=4, wk/wv (2 KV heads x 16 = 32 outputs)
    # keep 8 output features per rank, wq keeps 16 and wo (row-parallel) 16 inputs.
    with torch.device("meta"):
        meta = Transformer(_tiny_args(n_layers=1))
    tp4 = apply_fp8(meta, Fp8Config(recipe="rowwise"), tp_size=4)
    assert "layers.0.attention.wq" in tp4 and "layers.0.attention.wo" in tp4
    assert "layers.0.attention.wk" not in tp4 and "layers.0.attention.wv" not in tp4


def test_config_errors():
    with pytest.raises(ValueError, match="recipe 'fp4' unknown"):
        Fp8Config(recipe="fp4").validate()
    with pytest.raises(ValueError, match="grad_dtype"):
        Fp8Config(grad_dtype="e3m4").validate()
    with pytest.raises(ValueError, match="activation_scale_ub"):
        Fp8Config(activation_scale_ub=0.0).validate()
    with pytest.raises(ValueError, match="Transformer Engine"):
        apply_fp8(Transformer(_tiny_args()), Fp8Config(recipe="emulated"), sequence_parallel=True)


def _train(fp8: bool, steps: int = 50) -> list[float]:
    torch.manual_seed(0)
    model = Transformer(_tiny_args(n_layers=2))
    model.init_weights(seed=0)
    if fp8:
        assert len(apply_fp8(model, Fp8Config(recipe="emulated"))) == 14
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    # A structured stream: each row is an arithmetic progression mod 256 with a random start and step
    # in 1..4, so the next token is predictable from the previous two and the loss falls fast.
    g = torch.Generator().manual_seed(1)  # a CPU stream; the draws move to the default device (CUDA on a GPU)
    dev = torch.get_default_device()
    losses = []
    for _ in range(steps):
        start = torch.randint(0, 256, (4, 1), generator=g, device="cpu").to(dev)
        step = torch.randint(1, 5, (4, 1), generator=g, device="cpu").to(dev)
        seq = (start + step * torch.arange(33)) % 256
        loss = model(seq[:, :-1], targets=seq[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_model_50_steps_emulated_fp8_within_2_percent_of_fp32():
    # Tiny matmuls: one thread avoids oversubscribing the shared cores (7 s instead of 40 s here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref, fp8 = _train(False), _train(True)
    finally:
        torch.set_num_threads(threads)
    assert ref[-1] < 0.6 * ref[0], f"fp32 run did not learn: {ref[0]:.3f} -> {ref[-1]:.3f}"
    final_ref, final_fp8 = sum(ref[-5:]) / 5, sum(fp8[-5:]) / 5
    assert abs(final_fp8 - final_ref) <= 0.02 * final_ref, f"fp8 {final_fp8:.4f} vs fp32 {final_ref:.4f}"


def _cpu_scaled_mm_available() -> bool:
    try:
        a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn, device="cpu")
        torch._scaled_mm(
            a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16
        )
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real path in test_gemm.py")
@pytest.mark.skipif(not _cpu_scaled_mm_available(), reason="this torch has no CPU torch._scaled_mm")
def test_the_scaled_mm_path_of_all_three_gemms_on_cpu(monkeypatch):
    """The GPU's FP8 path (torch._scaled_mm with row-wise scales) driven on CPU, where torch also
    implements it: forward, dgrad and wgrad each pass _scaled_mm their transposed fp8 copies and
    [M, 1] / [1, N] scales, so a swapped operand or scale layout shows here as a wrong result.
    Compared with the same recipe on the fp32-emulated GEMM (scales drawn non-uniform by the data)."""
    import llama3hp.fp8.linear as fl
    import llama3hp.kernels.fp8_gemm as fg

    monkeypatch.setattr(fg, "scaled_mm_supported", lambda device: True)
    monkeypatch.setattr(fl, "scaled_mm_supported", lambda device: True)
    g = torch.Generator().manual_seed(3)
    M, K, N = 48, 96, 80
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4  # per-token magnitudes differ
    w = torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 0.1  # per-channel too
    dy = torch.randn(M, N, generator=g) * torch.rand(1, N, generator=g)
    outs = {}
    for gemm in ("scaled_mm", "torch"):
        lin = nn.Linear(K, N, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        cfg = Fp8Config(recipe="rowwise", gemm=gemm, quant_backend="torch")
        f = Fp8Linear.from_linear(lin, cfg)
        xx = x.clone().to(torch.bfloat16).requires_grad_(True)
        y = f(xx)
        y.backward(dy.to(y.dtype))
        outs[gemm] = (y.float(), xx.grad.float(), f.weight.grad.float())
    for name, got, want in zip(("y", "dx", "dw"), outs["scaled_mm"], outs["torch"]):
        # _scaled_mm writes bf16: one bf16 rounding of the same fp32-accumulated products.
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item(), msg=name)
