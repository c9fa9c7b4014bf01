"""Causal attention with a document mask over packed rows, grouped-query heads.

Documents are given as `cu_seqlens`: int32 offsets [n_docs + 1] into the B*T flattened tokens of
the batch (0, len_0, len_0 + len_1, ..., B*T); a document never crosses a row. A token attends
to the tokens of its own document up to itself, never across documents. `cu_seqlens=None`
means one document per row (plain causal attention).

Varlen form (`attention_varlen`, what context parallelism calls). Tensors are packed tokens:
q [Nq, Hq, D], k/v [Nk, Hk, D]. Keys come in key documents `cu_seqlens_k` [Dk + 1] (cumulative
over the Nk keys; a key at index i of its document has position i). Queries come in query
segments `cu_seqlens_q` [S + 1] (cumulative over the Nq queries); segment s belongs to key
document `q_doc_idx[s]` (default s) and its j-th query has position `q_pos_offsets[s] + j` in that
document (default Lk - Lq: bottom-right aligned, i.e. 0 for self-attention). A query at position
p attends to the keys of its document at positions <= p. Several segments may share one key
document: a context-parallel rank holding chunks i and 2cp-1-i of a sequence passes both as
segments of the same document over the all-gathered keys
(`llama3hp.parallel.context.build_cp_query_segments`).

Kernels (FlashAttention-2 style, fp32 accumulators, `tl.dot` on the input dtype):
- `_attn_fwd_kernel`: grid (query block, segment, q head); online softmax in base 2; the key loop
  runs over [0, min(Lk, last query position + 1)) only, so work grows with sum(L^2) over documents,
  and only the key blocks that straddle the diagonal evaluate the causal mask.
- `_attn_bwd_preprocess_kernel`: delta = rowsum(dO * O) (minus dLSE when the LSE has a gradient).
- `_attn_bwd_dkdv_kernel`: grid (key block, key document, kv head); loops over every query
  segment of its document and every q head of its GQA group, so dK/dV for a kv head are summed in
  registers (no expanded K/V, no atomics). With ATOMIC_DQ it also adds dS @ K into an fp32 dQ
  buffer with atomics (5 GEMMs per tile instead of 7; order-dependent rounding).
- `_attn_bwd_dq_kernel`: grid like the forward; recomputes P and dP to form dQ without atomics
  (`deterministic=True`: bit-identical gradients run to run).

Shape legend: Nq/Nk packed query/key tokens, Hq/Hk query/kv heads, D head dim, S query segments,
Dk key documents. LSE is the natural-log log-sum-exp of the scaled scores, fp32 [Hq, Nq].
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llama3hp.kernels.dispatch import check_backend, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path works without triton
    triton = None

# Up to this row length the reference builds a [B, 1, T, T] boolean mask (one SDPA call, fast on
# CPU); beyond it, it runs SDPA per document so memory stays linear in T.
DENSE_MASK_MAX_T = 2048

_LOG2E = 1.4426950408889634
_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


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
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask[:, None], scale=softmax_scale, enable_gqa=gqa
        )
        return out.transpose(1, 2)
    # Long rows: one SDPA call per document on the flattened tokens.
    qf, kf, vf = (t.reshape(B * T, t.shape[2], D).transpose(0, 1) for t in (q, k, v))  # [H, N, D]
    bounds = cu_seqlens.tolist()
    outs = [
        F.scaled_dot_product_attention(
            qf[None, :, s:e],
            kf[None, :, s:e],
            vf[None, :, s:e],
            is_causal=True,
            scale=softmax_scale,
            enable_gqa=gqa,
        )[0]
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=1).transpose(0, 1).reshape(B, T, Hq, D)


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    q_doc_idx: torch.Tensor | None = None,
    q_pos_offsets: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch varlen attention (semantics in the module docstring), one segment at a time.

    q: [Nq, Hq, D]; k, v: [Nk, Hk, D]; cu_seqlens_q int [S + 1]; cu_seqlens_k int [Dk + 1];
    q_doc_idx, q_pos_offsets int [S] or None. Math in fp32 (fp64 for fp64 inputs).
    Returns (out [Nq, Hq, D] in q's dtype, lse fp32 [Hq, Nq], natural log; -inf where no key is visible).
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, q_doc_idx, q_pos_offsets)
    Nq, Hq, D = q.shape
    group = Hq // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    docs = q_doc_idx.tolist() if q_doc_idx is not None else list(range(len(cq) - 1))
    offs = q_pos_offsets.tolist() if q_pos_offsets is not None else None
    out = torch.zeros(Nq, Hq, D, dtype=cdt, device=q.device)
    lse = torch.full((Hq, Nq), float("-inf"), dtype=cdt, device=q.device)
    for s, d in enumerate(docs):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[d], ck[d + 1]
        if q1 == q0 or k1 == k0:
            continue
        off = offs[s] if offs is not None else (k1 - k0) - (q1 - q0)
        qs = q[q0:q1].to(cdt).transpose(0, 1)  # [Hq, Lq, D]
        ks = k[k0:k1].to(cdt).transpose(0, 1).repeat_interleave(group, 0)  # [Hq, Lk, D]
        vs = v[k0:k1].to(cdt).transpose(0, 1).repeat_interleave(group, 0)
        scores = (qs @ ks.transpose(1, 2)) * scale  # [Hq, Lq, Lk]
        q_pos = off + torch.arange(q1 - q0, device=q.device)
        visible = torch.arange(k1 - k0, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        seg_lse = torch.logsumexp(scores, dim=-1)  # [Hq, Lq]
        probs = torch.exp(scores - seg_lse[..., None]).nan_to_num(0.0)
        out[q0:q1] = (probs @ vs).transpose(0, 1)
        lse[:, q0:q1] = seg_lse
    return out.to(q.dtype), lse.float()


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the kernel path and the reference.


def _check_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    q_doc_idx: torch.Tensor | None,
    q_pos_offsets: torch.Tensor | None,
) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"expected q [Nq, Hq, D] and k, v [Nk, Hk, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.dim() != 1 or t.numel() < 2 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{name} must be a 1-D int32 tensor of [n + 1] offsets, got {t.dtype} {tuple(t.shape)}"
            )
    n_seg = cu_seqlens_q.numel() - 1
    if q_doc_idx is None and cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"cu_seqlens_q has {n_seg} segments but cu_seqlens_k has {cu_seqlens_k.numel() - 1} documents: "
            "pass q_doc_idx to map segments to key documents"
        )
    for name, t in (("q_doc_idx", q_doc_idx), ("q_pos_offsets", q_pos_offsets)):
        if t is not None and (t.dim() != 1 or t.numel() != n_seg):
            raise ValueError(f"{name} must be a 1-D int tensor with one entry per query segment ({n_seg})")
    # Value checks cost a device sync on CUDA, so only run where the offsets already live on the host.
    if cu_seqlens_q.device.type == "cpu" and cu_seqlens_k.device.type == "cpu":
        for name, t, n in (
            ("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
            ("cu_seqlens_k", cu_seqlens_k, k.shape[0]),
        ):
            if t[0] != 0 or t[-1] != n or bool((t[1:] < t[:-1]).any()):
                raise ValueError(f"{name} must be non-decreasing offsets from 0 to {n}, got {t.tolist()}")
        if q_doc_idx is not None and bool(((q_doc_idx < 0) | (q_doc_idx >= cu_seqlens_k.numel() - 1)).any()):
            raise ValueError(f"q_doc_idx entries must index the {cu_seqlens_k.numel() - 1} key documents")
        if q_pos_offsets is not None and bool((q_pos_offsets < 0).any()):
            raise ValueError("q_pos_offsets must be >= 0 (positions of each segment's first query)")


# ---------------------------------------------------------------------------------------------
# Triton kernels.

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _seq_bucket(max_seqlen: int) -> int:
    """Autotune key: the next power of two of the longest document (configs differ by length)."""
    return 1 << max(int(max_seqlen) - 1, 1).bit_length()


if triton is not None:
    # (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for H100 per kernel and head-dim class
    # ("64": D <= 64, "128": D <= 128, "256": larger), and for dK/dV whether dQ is accumulated
    # atomically in the same kernel. Chosen from the sm_90 compile report
    # (`python -m benchmarks.aot_compile`, benchmarks/results/aot-sm90/): each compiles with at most
    # 64 bytes of register spill and fits the 227 KiB of shared memory, with GQA (GROUP > 1). At
    # D = 128 the first lists had 4-warp tiles spilling 300-2,500 bytes per thread in the dK/dV
    # loop. The autotuner times the candidates of the launch's class on the GPU, picks per (head
    # dim, length bucket[, atomic dQ]) and caches the choice on disk (cache_results).
    _CANDIDATES = {
        "fwd": {
            "64": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 8, 3)],
            "128": [
                (128, 64, 8, 3),
                (128, 64, 8, 2),
                (64, 64, 8, 3),
                (64, 128, 8, 2),
                (128, 32, 8, 3),
                (64, 64, 4, 2),
            ],
            "256": [(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 1)],
        },
        "dkdv_atomic": {
            "64": [
                (16, 64, 8, 3),
                (32, 64, 8, 3),
                (16, 128, 8, 2),
                (32, 128, 8, 3),
                (64, 32, 8, 2),
                (16, 64, 4, 3),
            ],
            "128": [(16, 64, 8, 3), (64, 32, 8, 3), (64, 32, 8, 2), (16, 128, 8, 3), (16, 64, 8, 2)],
            "256": [(16, 32, 8, 2), (16, 64, 8, 1)],
        },
        "dkdv": {
            "64": [
                (32, 64, 8, 3),
                (64, 64, 8, 3),
                (32, 128, 8, 3),
                (64, 128, 8, 3),
                (64, 32, 8, 3),
                (16, 64, 8, 3),
            ],
            "128": [(16, 64, 8, 3), (16, 128, 8, 2), (16, 128, 8, 3), (64, 32, 8, 2), (64, 32, 8, 3)],
            "256": [(16, 32, 8, 2), (16, 64, 8, 1)],
        },
        "dq": {
            "64": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 8, 3), (128, 32, 8, 3)],
            "128": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (32, 128, 8, 2)],
            "256": [(64, 32, 8, 2), (32, 32, 4, 2)],
        },
    }

    def _head_dim_class(head_dim: int) -> str:
        return "64" if head_dim <= 64 else "128" if head_dim <= 128 else "256"

    def _all_configs(kernels: tuple[str, ...]) -> list[triton.Config]:
        """Every candidate of `kernels` (the autotuner's list; _prune keeps the launch's class). The
        interpreter runs one config with small tiles: ~0.5 ms per program, and a 64x64 tl.dot is slow there."""
        if _INTERPRET:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
        seen = dict.fromkeys(c for k in kernels for lst in _CANDIDATES[k].values() for c in lst)
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in seen]

    def _pruner(kernel: str):
        """early_config_prune keeping the candidates of the launch's head-dim class (and dQ mode)."""

        def prune(configs, named_args, **kwargs):
            if _INTERPRET:
                return configs
            args = {**named_args, **kwargs}
            name = "dkdv_atomic" if kernel == "dkdv" and args.get("ATOMIC_DQ") else kernel
            keep = set(_CANDIDATES[name][_head_dim_class(int(args["HEAD_DIM"]))])
            chosen = [
                c
                for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep
            ]
            return chosen or configs

        return {"early_config_prune": prune}

    _FWD_CONFIGS = _all_configs(("fwd",))
    _DKDV_CONFIGS = _all_configs(("dkdv", "dkdv_atomic"))
    _DQ_CONFIGS = _all_configs(("dq",))
    _CACHE = not _INTERPRET

    @triton.jit
    def _segment_bounds(CU_Q, CU_K, Q_DOC, Q_POS, seg, HAS_Q_DOC: tl.constexpr, HAS_Q_POS: tl.constexpr):
        """(first query, Lq, first key, Lk, position of the first query) of query segment `seg`."""
        # int64 token offsets: Nq * Hq * D overflows int32 past ~500K tokens at 32 x 128.
        q_start = tl.load(CU_Q + seg).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + seg + 1) - q_start).to(tl.int32)
        if HAS_Q_DOC:
            doc = tl.load(Q_DOC + seg)
        else:
            doc = seg
        k_start = tl.load(CU_K + doc).to(tl.int64)
        seqlen_k = (tl.load(CU_K + doc + 1) - k_start).to(tl.int32)
        if HAS_Q_POS:
            q_off = tl.load(Q_POS + seg)
        else:
            q_off = seqlen_k - seqlen_q
        return q_start, seqlen_q, k_start, seqlen_k, q_off

    @triton.jit
    def _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        q_pos,
        seqlen_k,
        lo,
        hi,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]  # [D, BLOCK_N]
            v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]  # [BLOCK_N, D]
            if MASKED:
                col_ok = cols < seqlen_k
                kt = tl.load(kt_ptrs, mask=col_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
            else:
                kt = tl.load(kt_ptrs)
                v = tl.load(v_ptrs)
            qk = tl.dot(q, kt) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
            if MASKED:
                visible = (cols[None, :] <= q_pos[:, None]) & col_ok[None, :]
                qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return acc, l_i, m_i

    @triton.autotune(
        configs=_FWD_CONFIGS,
        key=["HEAD_DIM", "SEQ_BUCKET"],
        prune_configs_by=_pruner("fwd"),
        cache_results=_CACHE,
    )
    @triton.jit
    def _attn_fwd_kernel(
        Q,
        K,
        V,
        O,
        LSE,
        CU_Q,
        CU_K,
        Q_DOC,
        Q_POS,
        qk_scale,
        stride_qn,
        stride_qh,
        stride_kn,
        stride_kh,
        stride_vn,
        stride_vh,
        stride_on,
        stride_oh,
        n_q_tokens,
        GROUP,
        SEQ_BUCKET,
        HEAD_DIM: tl.constexpr,
        HAS_Q_DOC: tl.constexpr,
        HAS_Q_POS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One (query block, segment, q head). Q/O [Nq, Hq, D]; K/V [Nk, Hk, D]; LSE fp32 [Hq, Nq]."""
        seg = tl.program_id(1)
        head = tl.program_id(2)
        q_start, seqlen_q, k_start, seqlen_k, q_off = _segment_bounds(
            CU_Q, CU_K, Q_DOC, Q_POS, seg, HAS_Q_DOC, HAS_Q_POS
        )
        # Longest key loops first (the last query block of a segment sees the most keys), so the
        # tail of the grid is made of short programs.
        m_block = tl.cdiv(seqlen_q, BLOCK_M) - 1 - tl.program_id(0)
        if m_block < 0:
            return
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seqlen_q
        q_ptrs = Q + (q_start + offs_m)[:, None] * stride_qn + head * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        kv_head = head // GROUP
        k_base = K + k_start * stride_kn + kv_head * stride_kh
        v_base = V + k_start * stride_vn + kv_head * stride_vh

        q_pos = q_off + offs_m
        first_pos = q_off + m_block * BLOCK_M
        last_pos = q_off + tl.minimum(seqlen_q, (m_block + 1) * BLOCK_M) - 1
        # Keys [0, full_end) are visible to every row of the block: no mask. Keys up to the last
        # row's position straddle the diagonal (or the end of the document): masked.
        full_end = (tl.maximum(tl.minimum(first_pos + 1, seqlen_k), 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(seqlen_k, last_pos + 1)

        # A finite floor keeps exp2(m_old - m_new) at 1 (not NaN) while a row has seen no key.
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, seqlen_k, 0, full_end, qk_scale,
            HEAD_DIM, BLOCK_N, False,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, seqlen_k, full_end, hi, qk_scale,
            HEAD_DIM, BLOCK_N, True,
        )  # fmt: skip

        has_keys = l_i > 0.0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(
            has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf")
        )
        o_ptrs = O + (q_start + offs_m)[:, None] * stride_on + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + head.to(tl.int64) * n_q_tokens + q_start + offs_m, lse, mask=row_ok)

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        O,
        DO,
        DLSE,
        DELTA,
        stride_on,
        stride_oh,
        stride_don,
        stride_doh,
        n_q_tokens,
        HEAD_DIM: tl.constexpr,
        HAS_DLSE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """delta[h, i] = sum_d dO[i, h, d] * O[i, h, d] - dLSE[h, i]. O/DO [Nq, Hq, D]; DELTA fp32 [Hq, Nq]."""
        head = tl.program_id(1)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        ok = offs < n_q_tokens
        o = tl.load(
            O + offs[:, None] * stride_on + head * stride_oh + offs_d[None, :], mask=ok[:, None], other=0.0
        )
        do = tl.load(
            DO + offs[:, None] * stride_don + head * stride_doh + offs_d[None, :], mask=ok[:, None], other=0.0
        )
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if HAS_DLSE:
            # d lse / d s_ij = p_ij, so an LSE gradient enters dS as p * (dP - delta + dlse).
            delta -= tl.load(DLSE + head.to(tl.int64) * n_q_tokens + offs, mask=ok, other=0.0)
        tl.store(DELTA + head.to(tl.int64) * n_q_tokens + offs, delta, mask=ok)

    @triton.jit
    def _dkdv_inner(
        dk,
        dv,
        k,
        v,
        Q,
        DO,
        LSE,
        DELTA,
        DQ_ACC,
        stride_qn,
        stride_don,
        stride_dqn,
        q_start,
        seqlen_q,
        q_off,
        key_pos,
        lo,
        hi,
        qk_scale,
        sm_scale,
        n_q_tokens,
        head,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        MASKED: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
    ):
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < seqlen_q
            tok = q_start + rows
            q = tl.load(Q + tok[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + tok[:, None] * stride_don + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + head.to(tl.int64) * n_q_tokens + tok, mask=row_ok, other=float("inf"))
            # Rows outside the segment and rows that saw no key (lse = -inf) get P = 0.
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            delta = tl.load(DELTA + head.to(tl.int64) * n_q_tokens + tok, mask=row_ok, other=0.0)
            qk_t = tl.dot(k, tl.trans(q))  # [BLOCK_N, BLOCK_M]
            p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
            if MASKED:
                p_t = tl.where(key_pos[:, None] <= (q_off + rows)[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))  # [BLOCK_N, BLOCK_M]
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q)
            if ATOMIC_DQ:
                # Key columns past the document were loaded as zeros, so they add nothing here.
                dq = tl.dot(tl.trans(ds_t).to(k.dtype), k) * sm_scale  # [BLOCK_M, D]
                tl.atomic_add(
                    DQ_ACC + tok[:, None] * stride_dqn + offs_d[None, :],
                    dq,
                    mask=row_ok[:, None],
                    sem="relaxed",
                )
        return dk, dv

    @triton.autotune(
        configs=_DKDV_CONFIGS,
        key=["HEAD_DIM", "SEQ_BUCKET", "ATOMIC_DQ"],
        prune_configs_by=_pruner("dkdv"),
        reset_to_zero=["DQ_ACC"],
        cache_results=_CACHE,
    )
    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DK,
        DV,
        DQ_ACC,
        CU_Q,
        CU_K,
        Q_POS,
        SEG_ORDER,
        DOC_SEG_PTR,
        qk_scale,
        sm_scale,
        stride_qn,
        stride_qh,
        stride_kn,
        stride_kh,
        stride_vn,
        stride_vh,
        stride_don,
        stride_doh,
        stride_dkn,
        stride_dkh,
        stride_dvn,
        stride_dvh,
        stride_dqn,
        stride_dqh,
        n_q_tokens,
        GROUP,
        SEQ_BUCKET,
        HEAD_DIM: tl.constexpr,
        HAS_Q_POS: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One (key block, key document, kv head): dK, dV summed over the document's query segments
        (SEG_ORDER[DOC_SEG_PTR[d]:DOC_SEG_PTR[d + 1]]) and the GROUP q heads of the kv head."""
        n_block = tl.program_id(0)
        doc = tl.program_id(1)
        kv_head = tl.program_id(2)
        k_start = tl.load(CU_K + doc).to(tl.int64)
        seqlen_k = (tl.load(CU_K + doc + 1) - k_start).to(tl.int32)
        start_n = n_block * BLOCK_N
        if start_n >= seqlen_k:
            return
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        col_ok = offs_n < seqlen_k
        tok_k = k_start + offs_n
        k = tl.load(
            K + tok_k[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :],
            mask=col_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            V + tok_k[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :],
            mask=col_ok[:, None],
            other=0.0,
        )
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        last_key = start_n + BLOCK_N - 1
        for t in range(tl.load(DOC_SEG_PTR + doc), tl.load(DOC_SEG_PTR + doc + 1)):
            seg = tl.load(SEG_ORDER + t)
            q_start = tl.load(CU_Q + seg).to(tl.int64)
            seqlen_q = (tl.load(CU_Q + seg + 1) - q_start).to(tl.int32)
            if HAS_Q_POS:
                q_off = tl.load(Q_POS + seg)
            else:
                q_off = seqlen_k - seqlen_q
            # Query rows j see this block once q_off + j >= start_n; rows with q_off + j >= last_key
            # see all of it (no mask).
            lo = (tl.maximum(start_n - q_off, 0) // BLOCK_M) * BLOCK_M
            mask_end = tl.minimum(
                tl.maximum(tl.cdiv(tl.maximum(last_key - q_off, 0), BLOCK_M) * BLOCK_M, lo), seqlen_q
            )
            for g in range(GROUP):
                head = kv_head * GROUP + g
                q_h = Q + head * stride_qh
                do_h = DO + head * stride_doh
                dq_h = DQ_ACC + head * stride_dqh
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_h, do_h, LSE, DELTA, dq_h, stride_qn, stride_don, stride_dqn,
                    q_start, seqlen_q, q_off, offs_n, lo, mask_end, qk_scale, sm_scale, n_q_tokens, head,
                    HEAD_DIM, BLOCK_M, True, ATOMIC_DQ,
                )  # fmt: skip
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_h, do_h, LSE, DELTA, dq_h, stride_qn, stride_don, stride_dqn,
                    q_start, seqlen_q, q_off, offs_n, mask_end, seqlen_q, qk_scale, sm_scale, n_q_tokens, head,
                    HEAD_DIM, BLOCK_M, False, ATOMIC_DQ,
                )  # fmt: skip
        dk *= sm_scale
        tl.store(
            DK + tok_k[:, None] * stride_dkn + kv_head * stride_dkh + offs_d[None, :],
            dk.to(DK.dtype.element_ty),
            mask=col_ok[:, None],
        )
        tl.store(
            DV + tok_k[:, None] * stride_dvn + kv_head * stride_dvh + offs_d[None, :],
            dv.to(DV.dtype.element_ty),
            mask=col_ok[:, None],
        )

    @triton.jit
    def _dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        q_pos,
        seqlen_k,
        lo,
        hi,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :]  # [BLOCK_N, D]
            vt_ptrs = v_base + cols[None, :] * stride_vn + offs_d[:, None]  # [D, BLOCK_N]
            if MASKED:
                col_ok = cols < seqlen_k
                k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
                vt = tl.load(vt_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs)
                vt = tl.load(vt_ptrs)
            qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N]
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
            if MASKED:
                p = tl.where((cols[None, :] <= q_pos[:, None]) & col_ok[None, :], p, 0.0)
            dp = tl.dot(do, vt)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        return dq

    @triton.autotune(
        configs=_DQ_CONFIGS,
        key=["HEAD_DIM", "SEQ_BUCKET"],
        prune_configs_by=_pruner("dq"),
        cache_results=_CACHE,
    )
    @triton.jit
    def _attn_bwd_dq_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DQ,
        CU_Q,
        CU_K,
        Q_DOC,
        Q_POS,
        qk_scale,
        sm_scale,
        stride_qn,
        stride_qh,
        stride_kn,
        stride_kh,
        stride_vn,
        stride_vh,
        stride_don,
        stride_doh,
        stride_dqn,
        stride_dqh,
        n_q_tokens,
        GROUP,
        SEQ_BUCKET,
        HEAD_DIM: tl.constexpr,
        HAS_Q_DOC: tl.constexpr,
        HAS_Q_POS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One (query block, segment, q head): dQ by recomputing P and dP (no atomics)."""
        seg = tl.program_id(1)
        head = tl.program_id(2)
        q_start, seqlen_q, k_start, seqlen_k, q_off = _segment_bounds(
            CU_Q, CU_K, Q_DOC, Q_POS, seg, HAS_Q_DOC, HAS_Q_POS
        )
        m_block = tl.cdiv(seqlen_q, BLOCK_M) - 1 - tl.program_id(0)
        if m_block < 0:
            return
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < seqlen_q
        tok = q_start + offs_m
        q = tl.load(
            Q + tok[:, None] * stride_qn + head * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0
        )
        do = tl.load(
            DO + tok[:, None] * stride_don + head * stride_doh + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        lse = tl.load(LSE + head.to(tl.int64) * n_q_tokens + tok, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + head.to(tl.int64) * n_q_tokens + tok, mask=row_ok, other=0.0)
        kv_head = head // GROUP
        k_base = K + k_start * stride_kn + kv_head * stride_kh
        v_base = V + k_start * stride_vn + kv_head * stride_vh

        q_pos = q_off + offs_m
        first_pos = q_off + m_block * BLOCK_M
        last_pos = q_off + tl.minimum(seqlen_q, (m_block + 1) * BLOCK_M) - 1
        full_end = (tl.maximum(tl.minimum(first_pos + 1, seqlen_k), 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(seqlen_k, last_pos + 1)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, q_pos, seqlen_k, 0, full_end, qk_scale,
            HEAD_DIM, BLOCK_N, False,
        )  # fmt: skip
        dq = _dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, q_pos, seqlen_k, full_end, hi, qk_scale,
            HEAD_DIM, BLOCK_N, True,
        )  # fmt: skip
        dq *= sm_scale
        tl.store(
            DQ + tok[:, None] * stride_dqn + head * stride_dqh + offs_d[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=row_ok[:, None],
        )


# ---------------------------------------------------------------------------------------------
# Launchers and the autograd Function.


def _new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer every element of which a kernel writes (tests swap in NaN-filled ones)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _attn_fwd(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Nq, Hq, D]; k, v [Nk, Hk, D] -> (out [Nq, Hq, D], lse fp32 [Hq, Nq])."""
    Nq, Hq, D = q.shape
    n_seg = cu_q.numel() - 1
    out = _new_output(q.shape, q.dtype, q.device)
    lse = _new_output((Hq, Nq), torch.float32, q.device)
    if Nq == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), n_seg, Hq)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k,
        q_doc if q_doc is not None else cu_q, q_pos if q_pos is not None else cu_q,
        scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        Nq, Hq // k.shape[1], _seq_bucket(max(max_seqlen_q, max_seqlen_k)),
        HEAD_DIM=D, HAS_Q_DOC=q_doc is not None, HAS_Q_POS=q_pos is not None,
    )  # fmt: skip
    return out, lse


def _doc_segment_csr(
    q_doc: torch.Tensor | None, n_seg: int, n_docs: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments grouped by key document: (order int32 [S], ptr int32 [Dk + 1]), built on device without a sync."""
    if q_doc is None:
        idx = torch.arange(n_seg + 1, dtype=torch.int32, device=device)
        return idx[:n_seg], idx
    order = torch.sort(q_doc.long(), stable=True).indices.to(torch.int32)
    ptr = torch.zeros(n_docs + 1, dtype=torch.int32, device=device)
    ptr[1:] = torch.cumsum(torch.bincount(q_doc.long(), minlength=n_docs), 0)
    return order, ptr


def _attn_bwd(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    q_doc: torch.Tensor | None,
    q_pos: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq [Nq, Hq, D], dk, dv [Nk, Hk, D]) from do [Nq, Hq, D] and the saved lse [Hq, Nq]."""
    Nq, Hq, D = q.shape
    Nk, Hk, _ = k.shape
    n_seg, n_docs = cu_q.numel() - 1, cu_k.numel() - 1
    do = _last_dim_contiguous(do)
    dk, dv = _new_output(k.shape, k.dtype, k.device), _new_output(v.shape, v.dtype, v.device)
    if Nq == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    delta = _new_output((Hq, Nq), torch.float32, q.device)
    block = 16 if _INTERPRET else 128
    _attn_bwd_preprocess_kernel[(triton.cdiv(Nq, block), Hq)](
        out, do, dlse if dlse is not None else delta, delta,
        out.stride(0), out.stride(1), do.stride(0), do.stride(1), Nq,
        HEAD_DIM=D, HAS_DLSE=dlse is not None, BLOCK=block,
    )  # fmt: skip
    order, ptr = _doc_segment_csr(q_doc, n_seg, n_docs, q.device)
    if deterministic:
        dq_acc = torch.empty(1, 1, 1, dtype=torch.float32, device=q.device)  # unused by the kernel
    else:
        dq_acc = torch.zeros(Nq, Hq, D, dtype=torch.float32, device=q.device)
    bucket = _seq_bucket(max(max_seqlen_q, max_seqlen_k))
    if Nk > 0:
        grid = lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), n_docs, Hk)
        _attn_bwd_dkdv_kernel[grid](
            q, k, v, do, lse, delta, dk, dv, dq_acc, cu_q, cu_k, q_pos if q_pos is not None else cu_q, order, ptr,
            scale * _LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq_acc.stride(0), dq_acc.stride(1),
            Nq, Hq // Hk, bucket,
            HEAD_DIM=D, HAS_Q_POS=q_pos is not None, ATOMIC_DQ=not deterministic,
        )  # fmt: skip
    if not deterministic:
        return dq_acc.to(q.dtype), dk, dv
    dq = _new_output(q.shape, q.dtype, q.device)
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), n_seg, Hq)
    _attn_bwd_dq_kernel[grid](
        q, k, v, do, lse, delta, dq, cu_q, cu_k,
        q_doc if q_doc is not None else cu_q, q_pos if q_pos is not None else cu_q,
        scale * _LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), Nq, Hq // Hk, bucket,
        HEAD_DIM=D, HAS_Q_DOC=q_doc is not None, HAS_Q_POS=q_pos is not None,
    )  # fmt: skip
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """Varlen document-masked GQA attention: forward saves (q, k, v, out, lse); backward runs
    the delta preprocess, then dK/dV (+ atomic dQ) or dK/dV and a separate dQ kernel."""

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _attn_fwd(q, k, v, cu_q, cu_k, q_doc, q_pos, max_seqlen_q, max_seqlen_k, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, q_doc, q_pos)
        ctx.args = (max_seqlen_q, max_seqlen_k, scale, deterministic)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor, dlse: torch.Tensor | None):
        q, k, v, out, lse, cu_q, cu_k, q_doc, q_pos = ctx.saved_tensors
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
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _kernel_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs ("auto" falls back to the reference where it does not)."""
    return (
        q.shape[-1] in _SUPPORTED_HEAD_DIMS
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k.dtype == q.dtype == v.dtype
    )


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
    softmax_scale: float | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Packed varlen causal GQA attention with position offsets (semantics in the module docstring).

    q: [Nq, Hq, D]; k, v: [Nk, Hk, D] (D in 16, 32, 64, 128, 256; fp16/bf16/fp32).
    cu_seqlens_q: int32 [S + 1] query segments; cu_seqlens_k: int32 [Dk + 1] key documents.
    max_seqlen_q / max_seqlen_k: longest query segment / key document (size the grids; no sync).
    q_doc_idx: int32 [S], key document of each segment (None: segment s uses document s).
    q_pos_offsets: int32 [S] >= 0, position of each segment's first query in its document
    (None: Lk - Lq). deterministic: dQ without atomics (bit-identical run to run, ~1.4x bwd GEMMs).
    Returns out [Nq, Hq, D], and with return_lse also lse fp32 [Hq, Nq] (natural log; it has a
    gradient, so partial results can be merged differentiably).
    """
    check_backend(backend)
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, q_doc_idx, q_pos_offsets)
    if not use_triton(backend, q, k, v) or (backend == "auto" and not _kernel_supports(q, k, v)):
        out, lse = attention_varlen_ref(
            q, k, v, cu_seqlens_q, cu_seqlens_k,
            q_doc_idx=q_doc_idx, q_pos_offsets=q_pos_offsets, softmax_scale=softmax_scale,
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
        int(max_seqlen_q), int(max_seqlen_k), float(scale), bool(deterministic),
    )  # fmt: skip
    return (out, lse) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    deterministic: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Document-masked causal GQA attention (see module docstring). q: [B, T, Hq, D]; k, v: [B, T, Hk, D].

    max_seqlen: the longest document in the batch (the Triton kernel sizes its grid with it; when
    None it is read from cu_seqlens, one device sync). deterministic: see `attention_varlen`.
    """
    check_backend(backend)
    if not use_triton(backend, q, k, v) or (backend == "auto" and not _kernel_supports(q, k, v)):
        return attention_ref(q, k, v, cu_seqlens, softmax_scale=softmax_scale)
    _check(q, k, v)
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
        flat(q), flat(k), flat(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        softmax_scale=softmax_scale, deterministic=deterministic, backend=backend,
    )  # fmt: skip
    return out.view(B, T, Hq, D)
