"""Plain-PyTorch references of document-masked causal GQA attention (semantics in the package
docstring): `attention_ref` is what `attention` runs off CUDA; `attention_varlen_ref` is the varlen
kernel's math segment by segment, in float64 for float64 inputs, that the tests compare against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llama3hp.kernels.attention.checks import _check, _check_doc_prefix, _check_varlen

# Up to this row length the reference builds a [B, 1, T, T] boolean mask (one SDPA call, fast on
# CPU); beyond it, it runs SDPA per document so memory stays linear in T.
DENSE_MASK_MAX_T = 2048


def document_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Document index of each of the n_tokens flattened tokens, from cu_seqlens [n_docs + 1]."""
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != n_tokens:
        raise ValueError(
            f"cu_seqlens must run from 0 to {n_tokens} (B*T), got {cu_seqlens[0]}..{cu_seqlens[-1]}"
        )
    pos = torch.arange(n_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], pos, right=True)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    doc_prefix: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch document-masked causal attention with SDPA.

    q: [B, T, Hq, D]; k, v: [B, T, Hk, D]; cu_seqlens: int32 [n_docs + 1] or None; doc_prefix: int
    [n_docs] or None, each document's shared prefix (an earlier document of its row that it also
    attends to entirely) or -1. Returns [B, T, Hq, D]; each document's output equals running it alone
    after its prefix.
    """
    _check(q, k, v)
    B, T, Hq, D = q.shape
    gqa = Hq != k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=softmax_scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    if doc_prefix is not None:
        _check_doc_prefix(doc_prefix, cu_seqlens.numel() - 1)
    if T <= DENSE_MASK_MAX_T:
        doc = document_ids(cu_seqlens, B * T).view(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = (doc[:, :, None] == doc[:, None, :]) & causal  # [B, T, T]
        if doc_prefix is not None:  # every token of the query's prefix document is visible too
            prefix = doc_prefix.to(device=q.device, dtype=doc.dtype)[doc]
            mask |= prefix[:, :, None] == doc[:, None, :]
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask[:, None], scale=softmax_scale, enable_gqa=gqa
        )
        return out.transpose(1, 2)
    # Long rows: one varlen pass per document on the flattened tokens (memory linear in T).
    flat = lambda t: t.reshape(B * T, t.shape[2], D)
    if doc_prefix is None:
        qf, kf, vf = (flat(t).transpose(0, 1) for t in (q, k, v))  # [H, N, D]
        bounds = cu_seqlens.tolist()
        outs = [
            F.scaled_dot_product_attention(
                qf[None, :, s:e], kf[None, :, s:e], vf[None, :, s:e], is_causal=True, scale=softmax_scale,
                enable_gqa=gqa,
            )[0]
            for s, e in zip(bounds[:-1], bounds[1:])
        ]  # fmt: skip
        return torch.cat(outs, dim=1).transpose(0, 1).reshape(B, T, Hq, D)
    out, _ = attention_varlen_ref(
        flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens, doc_prefix=doc_prefix, softmax_scale=softmax_scale
    )
    return out.view(B, T, Hq, D)


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    q_doc_idx: torch.Tensor | None = None,
    q_pos_offsets: torch.Tensor | None = None,
    doc_prefix: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch varlen attention (semantics in the package docstring), one segment at a time.

    q: [Nq, Hq, D]; k, v: [Nk, Hk, D]; cu_seqlens_q int [S + 1]; cu_seqlens_k int [Dk + 1];
    q_doc_idx, q_pos_offsets int [S] or None; doc_prefix int [Dk] or None (a key document whose
    keys a document's queries all see, or -1). Math in fp32 (fp64 for fp64 inputs).
    Returns (out [Nq, Hq, D] in q's dtype, lse fp32 [Hq, Nq], natural log; -inf where no key is visible).
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, q_doc_idx, q_pos_offsets, doc_prefix)
    Nq, Hq, D = q.shape
    group = Hq // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    docs = q_doc_idx.tolist() if q_doc_idx is not None else list(range(len(cq) - 1))
    offs = q_pos_offsets.tolist() if q_pos_offsets is not None else None
    prefix = doc_prefix.tolist() if doc_prefix is not None else None
    out = torch.zeros(Nq, Hq, D, dtype=cdt, device=q.device)
    lse = torch.full((Hq, Nq), float("-inf"), dtype=cdt, device=q.device)
    for s, d in enumerate(docs):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[d], ck[d + 1]
        p0 = p1 = 0
        if prefix is not None and prefix[d] >= 0:
            p0, p1 = ck[prefix[d]], ck[prefix[d] + 1]
        if q1 == q0 or k1 - k0 + p1 - p0 == 0:
            continue
        off = offs[s] if offs is not None else (k1 - k0) - (q1 - q0)
        keys = torch.cat([torch.arange(p0, p1), torch.arange(k0, k1)]).to(q.device)  # prefix, then own
        qs = q[q0:q1].to(cdt).transpose(0, 1)  # [Hq, Lq, D]
        ks = k[keys].to(cdt).transpose(0, 1).repeat_interleave(group, 0)  # [Hq, Lp + Lk, D]
        vs = v[keys].to(cdt).transpose(0, 1).repeat_interleave(group, 0)
        scores = (qs @ ks.transpose(1, 2)) * scale  # [Hq, Lq, Lp + Lk]
        q_pos = off + torch.arange(q1 - q0, device=q.device)
        causal = torch.arange(k1 - k0, device=q.device)[None, :] <= q_pos[:, None]
        visible = torch.cat([causal.new_ones(q1 - q0, p1 - p0), causal], dim=1)
        scores = scores.masked_fill(~visible, float("-inf"))
        seg_lse = torch.logsumexp(scores, dim=-1)  # [Hq, Lq]
        probs = torch.exp(scores - seg_lse[..., None]).nan_to_num(0.0)
        out[q0:q1] = (probs @ vs).transpose(0, 1)
        lse[:, q0:q1] = seg_lse
    return out.to(q.dtype), lse.float()
