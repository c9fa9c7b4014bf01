"""A whole tiny Llama trained 20 AdamW steps with the fused kernels on (Triton, interpreter on CPU)
gives the same losses as with them off (the plain-PyTorch references), in fp32."""

import dataclasses

import pytest
import torch

model_lib = pytest.importorskip("llama3hp.model", reason="llama3hp.model is not importable yet")

STEPS, BATCH, SEQ, VOCAB = 20, 2, 32, 512


def _train(backend: str, attention_backend: str) -> list[float]:
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
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    data = torch.Generator().manual_seed(1234)
    # Packed documents: row 0 holds three documents, row 1 two (documents never cross rows).
    cu_seqlens = torch.tensor([0, 10, 21, 32, 49, 64], dtype=torch.int32)
    losses = []
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=data) for _ in range(2)]
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
