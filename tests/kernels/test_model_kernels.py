"""A whole tiny Llama trained 20 AdamW steps with the fused kernels on (Triton, interpreter on CPU)
gives the same losses as with them off (the plain-PyTorch references), in fp32."""

import dataclasses

import pytest
import torch

model_lib = pytest.importorskip("llama3hp.model", reason="llama3hp.model is not importable yet")

STEPS, BATCH, SEQ, VOCAB = 20, 2, 32, 512


def _tiny_model(backend: str, attention_backend: str):
    """The tiny Llama with every fused op on `backend` (attention on its own), initialised, on the
    default device."""
    kernels = model_lib.KernelConfig(
        rmsnorm=backend, rope=backend, swiglu=backend, attention=attention_backend, cross_entropy=backend
    )
    args = dataclasses.replace(
        model_lib.get_model_args("tiny"),
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
        ffn_dim_multiplier=None, max_seq_len=SEQ, kernels=kernels,
    )  # fmt: skip
    with torch.device("meta"):
        model = model_lib.Transformer(args)
    model.to_empty(device=torch.get_default_device())
    model.init_weights(seed=0)
    return model


def _train(backend: str, attention_backend: str) -> list[float]:
    model = _tiny_model(backend, attention_backend)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    data = torch.Generator().manual_seed(1234)
    # Packed documents: row 0 holds three documents, row 1 two (documents never cross rows).
    cu_seqlens = torch.tensor([0, 10, 21, 32, 49, 64], dtype=torch.int32)
    losses = []
    # Drawn on the CPU generator, then moved to the default device (CUDA when a GPU runs this).
    dev = torch.get_default_device()
    batches = [
        torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=data, device="cpu").to(dev) for _ in range(2)
    ]
    for step in range(STEPS):
        tokens = batches[step % 2]  # two batches seen ten times each: the loss must fall
        targets = tokens[:, 1:].clone()
        targets[0, 9] = -100  # the last token of a document predicts nothing
        loss = model(tokens[:, :-1], targets=targets, cu_seqlens=cu_seqlens, max_seqlen=17)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_model_trains_identically_with_kernels_on_and_off():
    on = _train("triton", "torch")
    off = _train("torch", "torch")
    assert on[-1] < on[0] - 0.5  # it memorises the two batches
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=1e-4, atol=1e-5)


# --- GPU mixed precision, emulated on CPU -----------------------------------------------------------
# The trainer runs CUDA steps under torch.autocast(bf16) with fp32 master weights and an fp32
# residual stream, so every kernel meets mixed dtypes there (fp32 hidden states into the fused loss,
# bf16 q/k/v into RoPE and attention). CPU autocast reproduces those dtypes: the kernels run in the
# interpreter on what they would get on the GPU. bf16 runs attention on the reference (the
# interpreter's bf16 tl.dot is broken); fp16 runs every kernel.


def _mixed_precision_step(kernels: str, attention: str, amp: torch.dtype | None):
    from tests.gemm_dtypes import GemmDtypes

    model = _tiny_model(kernels, attention)
    data = torch.Generator().manual_seed(99)
    dev = torch.get_default_device()  # CUDA when a GPU runs this (tests/kernels/conftest.py)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=data, device="cpu").to(dev)
    targets = tokens[:, 1:].clone()
    targets[1, 3] = -100
    cu_seqlens = torch.tensor([0, 10, 21, 32, 49, 64], dtype=torch.int32)
    gemms = GemmDtypes()
    with gemms:
        with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = model(tokens[:, :-1], targets=targets, cu_seqlens=cu_seqlens, max_seqlen=17)
        loss.backward()  # outside autocast, as on CUDA (where backward never sees autocast)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, gemms


@pytest.mark.usefixtures("bf16_round_to_nearest")  # bf16 stores round as on the GPU (conftest)
@pytest.mark.parametrize(
    "amp,attention", [(torch.bfloat16, "torch"), (torch.float16, "triton")], ids=["bf16", "fp16"]
)
def test_kernels_under_autocast_match_the_reference_and_keep_gemms_low_precision(amp, attention):
    ref_loss, ref_grads, _ = _mixed_precision_step("torch", "torch", None)  # fp32 truth
    t_loss, t_grads, _ = _mixed_precision_step("torch", "torch", amp)  # PyTorch's own autocast error
    k_loss, k_grads, gemms = _mixed_precision_step("triton", attention, amp)

    for name, g in k_grads.items():
        assert g is not None and g.dtype == torch.float32, f"{name}: grad {None if g is None else g.dtype}"
    assert k_loss.dtype == torch.float32 and torch.isfinite(k_loss)
    # Every GEMM of forward and backward ran in the autocast dtype (none slipped to fp32).
    assert gemms.records and not gemms.in_dtype(torch.float32), gemms.in_dtype(torch.float32)[:5]

    def err(grads):
        num = sum((grads[n].float() - ref_grads[n]).norm() ** 2 for n in ref_grads) ** 0.5
        return float(num / sum(g.norm() ** 2 for g in ref_grads.values()) ** 0.5)

    # Measured: bf16 4.3e-3 for both (with truncating bf16 casts the kernels' error was 8.9e-3), fp16
    # 5.9e-4 for both. The floor (a tenth of the dtype's epsilon) only matters for tiny errors.
    floor = 8e-4 if amp == torch.bfloat16 else 1e-4
    assert abs(float(k_loss - ref_loss)) <= 2 * abs(float(t_loss - ref_loss)) + floor * float(ref_loss)
    assert err(k_grads) <= 2 * err(t_grads) + floor, (err(k_grads), err(t_grads))
