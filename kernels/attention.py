"""Causal attention with a document mask over packed rows, grouped-query heads.

Documents are given as `cu_seqlens`: int32 offsets [n_docs + 1] into the B*T flattened tokens of
the batch (0, len_0, len_0 + len_1, ..., B*T); a document never crosses a row. A token attends
to the tokens of its own document up to itself, never across documents. `cu_seqlens=None`
means one document per row (plain causal attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama3hp.kernels.dispatch import check_backend

# Up to this row length the reference builds a [B, 1, T, T] boolean mask (one SDPA call, fast on
# CPU); beyond it, it runs SDPA per document so memory stays linear in T.
DENSE_MASK_MAX_T = 2048


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"expected q [B, T, Hq, D] and k, v [B, T, Hk, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")


def document_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Document index of each of the n_tokens flattened tokens, from cu_seqlens [n_docs + 1]."""
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != n_tokens:
        raise ValueError(f"cu_seqlens must run from 0 to {n_tokens} (B*T), got {cu_seqlens[0]}..{cu_seqlens[-1]}")
    pos = torch.arange(n_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], pos, right=True)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch document-masked causal attention with SDPA.

    q: [B, T, Hq, D]; k, v: [B, T, Hk, D]; cu_seqlens: int32 [n_docs + 1] or None.
    Returns [B, T, Hq, D]; each document's output equals running that document alone.
    """
    _check(q, k, v)
    B, T, Hq, D = q.shape
    gqa = Hq != k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=softmax_scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    if T <= DENSE_MASK_MAX_T:
        doc = document_ids(cu_seqlens, B * T).view(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = (doc[:, :, None] == doc[:, None, :]) & causal  # [B, T, T]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=softmax_scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    # Long rows: one SDPA call per document on the flattened tokens.
    qf, kf, vf = (t.reshape(B * T, t.shape[2], D).transpose(0, 1) for t in (q, k, v))  # [H, N, D]
    bounds = cu_seqlens.tolist()
    outs = [
        F.scaled_dot_product_attention(
            qf[None, :, s:e], kf[None, :, s:e], vf[None, :, s:e], is_causal=True, scale=softmax_scale, enable_gqa=gqa
        )[0]
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=1).transpose(0, 1).reshape(B, T, Hq, D)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Document-masked causal GQA attention (see module docstring). q: [B, T, Hq, D]; k, v: [B, T, Hk, D].

    max_seqlen: the longest document in the batch (the Triton kernel sizes its grid with it).
    """
    check_backend(backend)
    return attention_ref(q, k, v, cu_seqlens, softmax_scale=softmax_scale)
