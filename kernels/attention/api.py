"""The autograd Function that runs the kernels, and the public ops: `attention` (rows [B, T, H, D])
and `attention_varlen` (packed tokens [N, H, D]), which fall back to the references off CUDA."""

from __future__ import annotations

import math

import torch

from llama3hp.kernels.attention.backward import _attn_bwd
from llama3hp.kernels.attention.checks import _SUPPORTED_HEAD_DIMS, _check, _check_varlen, _kernel_supports
from llama3hp.kernels.attention.common import _last_dim_contiguous
from llama3hp.kernels.attention.forward import _attn_fwd
from llama3hp.kernels.attention.reference import attention_ref, attention_varlen_ref
from llama3hp.kernels.dispatch import check_backend, use_triton


class AttentionFunction(torch.autograd.Function):
    """Varlen document-masked GQA attention (with optional shared prefixes): forward saves (q, k, v,
    out, lse); backward runs the delta preprocess, then dK/dV (+ atomic dQ) or dK/dV and a separate
    dQ kernel."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        q_doc: torch.Tensor | None,
        q_pos: torch.Tensor | None,
        max_seqlen_q: int,
        max_seqlen_k: int,
        scale: float,
        deterministic: bool,
        prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _attn_fwd(q, k, v, cu_q, cu_k, q_doc, q_pos, max_seqlen_q, max_seqlen_k, scale, prefix)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, q_doc, q_pos, prefix)
        ctx.args = (max_seqlen_q, max_seqlen_k, scale, deterministic)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor, dlse: torch.Tensor | None):
        q, k, v, out, lse, cu_q, cu_k, q_doc, q_pos, prefix = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, scale, deterministic = ctx.args
        dlse = dlse.contiguous() if dlse is not None else None
        dq, dk, dv = _attn_bwd(
            dout,
            dlse,
            q,
            k,
            v,
            out,
            lse,
            cu_q,
            cu_k,
            q_doc,
            q_pos,
            max_seqlen_q,
            max_seqlen_k,
            scale,
            deterministic,
            prefix,
        )
        return dq, dk, dv, *(None,) * 9


def _as_int32(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=torch.int32).contiguous()


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    q_doc_idx: torch.Tensor | None = None,
    q_pos_offsets: torch.Tensor | None = None,
    doc_prefix: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Packed varlen causal GQA attention with position offsets (semantics in the package docstring,
    kernels/attention/__init__.py).

    q: [Nq, Hq, D]; k, v: [Nk, Hk, D] (D in 16, 32, 64, 128, 256; fp16/bf16/fp32).
    cu_seqlens_q: int32 [S + 1] query segments; cu_seqlens_k: int32 [Dk + 1] key documents.
    max_seqlen_q / max_seqlen_k: longest query segment / key document (size the grids; no sync).
    q_doc_idx: int32 [S], key document of each segment (None: segment s uses document s).
    q_pos_offsets: int32 [S] >= 0, position of each segment's first query in its document
    (None: Lk - Lq). doc_prefix: int32 [Dk], for each key document an earlier key document every key
    of which its queries also see (its shared prefix: a DPO pair's prompt), or -1 (None: none).
    deterministic: dQ without atomics (bit-identical run to run, ~1.4x bwd GEMMs).
    Returns out [Nq, Hq, D], and with return_lse also lse fp32 [Hq, Nq] (natural log; it has a
    gradient, so partial results can be merged differentiably).
    """
    check_backend(backend)
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, q_doc_idx, q_pos_offsets, doc_prefix)
    if not use_triton(backend, q, k, v) or (backend == "auto" and not _kernel_supports(q, k, v)):
        out, lse = attention_varlen_ref(
            q, k, v, cu_seqlens_q, cu_seqlens_k,
            q_doc_idx=q_doc_idx, q_pos_offsets=q_pos_offsets, doc_prefix=doc_prefix, softmax_scale=softmax_scale,
        )  # fmt: skip
        return (out, lse) if return_lse else out
    D = q.shape[-1]
    if D not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"triton attention supports head dims {_SUPPORTED_HEAD_DIMS}, got {D}: use backend='torch'"
        )
    if (
        q.dtype not in (torch.float16, torch.bfloat16, torch.float32)
        or k.dtype != q.dtype
        or v.dtype != q.dtype
    ):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    dev = q.device
    out, lse = AttentionFunction.apply(
        _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v),
        _as_int32(cu_seqlens_q, dev), _as_int32(cu_seqlens_k, dev),
        _as_int32(q_doc_idx, dev), _as_int32(q_pos_offsets, dev),
        int(max_seqlen_q), int(max_seqlen_k), float(scale), bool(deterministic), _as_int32(doc_prefix, dev),
    )  # fmt: skip
    return (out, lse) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    max_seqlen: int | None = None,
    doc_prefix: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Document-masked causal GQA attention (see the package docstring). q: [B, T, Hq, D]; k, v: [B, T, Hk, D].

    doc_prefix: int [n_docs] (needs cu_seqlens): each document's shared prefix, an earlier document of
    its row every token of which it also attends to, or -1. A DPO pair packed as [prompt | chosen |
    rejected] gives both responses the prompt as prefix: the rejected tokens see the prompt and
    themselves, never the chosen ones.

    max_seqlen: the longest document in the batch (the Triton kernel sizes its grid with it; when
    None it is read from cu_seqlens, one device sync). deterministic: see `attention_varlen`.
    """
    check_backend(backend)
    if not use_triton(backend, q, k, v) or (backend == "auto" and not _kernel_supports(q, k, v)):
        return attention_ref(q, k, v, cu_seqlens, doc_prefix=doc_prefix, softmax_scale=softmax_scale)
    _check(q, k, v)
    if doc_prefix is not None and cu_seqlens is None:
        raise ValueError("doc_prefix names documents of cu_seqlens: pass cu_seqlens with it")
    B, T, Hq, D = q.shape
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
        max_seqlen = T
    elif max_seqlen is None:
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != B * T:
            raise ValueError(f"cu_seqlens must run from 0 to {B * T} (B*T), got {bounds[0]}..{bounds[-1]}")
        max_seqlen = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    flat = lambda t: t.reshape(B * T, t.shape[2], D)
    out = attention_varlen(
        flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, doc_prefix=doc_prefix,
        softmax_scale=softmax_scale, deterministic=deterministic, backend=backend,
    )  # fmt: skip
    assert isinstance(out, torch.Tensor)  # no return_lse: the output alone
    return out.view(B, T, Hq, D)
