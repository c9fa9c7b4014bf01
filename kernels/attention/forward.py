"""The forward kernel (FlashAttention-2 style, online softmax in base 2) and its launcher."""

from __future__ import annotations

import torch

from llama3hp.kernels.attention import common
from llama3hp.kernels.attention.common import _LOG2E
from llama3hp.kernels.attention.tiles import _seq_bucket

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path works without triton
    triton = None

if triton is not None:
    from llama3hp.kernels.attention.common import _prefix_keys, _query_block
    from llama3hp.kernels.attention.tiles import _CACHE, _FWD_CONFIGS, _pruner

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
        PREFIX,
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
        HAS_PREFIX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One (query block, segment, q head). Q/O [Nq, Hq, D]; K/V [Nk, Hk, D]; LSE fp32 [Hq, Nq];
        PREFIX int32 [Dk] (with HAS_PREFIX): each key document's shared-prefix document or -1."""
        head = tl.program_id(2)
        m_block, tok, row_ok, q_pos, doc, k_start, seqlen_k, full_end, hi = _query_block(
            CU_Q, CU_K, Q_DOC, Q_POS, HAS_Q_DOC, HAS_Q_POS, BLOCK_M, BLOCK_N
        )
        if m_block < 0:
            return
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = Q + tok[:, None] * stride_qn + head * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        kv_head = head // GROUP
        k_base = K + k_start * stride_kn + kv_head * stride_kh
        v_base = V + k_start * stride_vn + kv_head * stride_vh

        # A finite floor keeps exp2(m_old - m_new) at 1 (not NaN) while a row has seen no key.
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if HAS_PREFIX:
            # The shared prefix (a DPO pair's prompt) first: all of its keys are visible, so only
            # the block past its end is masked (q_pos + p_len lies past every prefix key).
            p_start, p_len = _prefix_keys(PREFIX, CU_K, doc)
            p_full = (p_len // BLOCK_N) * BLOCK_N
            pk_base = K + p_start * stride_kn + kv_head * stride_kh
            pv_base = V + p_start * stride_vn + kv_head * stride_vh
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, pk_base, pv_base, stride_kn, stride_vn, q_pos + p_len, p_len, 0, p_full,
                qk_scale, HEAD_DIM, BLOCK_N, False,
            )  # fmt: skip
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, pk_base, pv_base, stride_kn, stride_vn, q_pos + p_len, p_len, p_full, p_len,
                qk_scale, HEAD_DIM, BLOCK_N, True,
            )  # fmt: skip
        # The document's own keys: [0, full_end) without the mask, then [full_end, hi) with it.
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
        o_ptrs = O + tok[:, None] * stride_on + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + head.to(tl.int64) * n_q_tokens + tok, lse, mask=row_ok)


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
    prefix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Nq, Hq, D]; k, v [Nk, Hk, D]; prefix int32 [Dk] or None -> (out [Nq, Hq, D], lse fp32 [Hq, Nq])."""
    Nq, Hq, D = q.shape
    n_seg = cu_q.numel() - 1
    out = common._new_output(q.shape, q.dtype, q.device)
    lse = common._new_output((Hq, Nq), torch.float32, q.device)
    if Nq == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), n_seg, Hq)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k,
        q_doc if q_doc is not None else cu_q, q_pos if q_pos is not None else cu_q,
        prefix if prefix is not None else cu_k, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        Nq, Hq // k.shape[1], _seq_bucket(max(max_seqlen_q, max_seqlen_k)),
        HEAD_DIM=D, HAS_Q_DOC=q_doc is not None, HAS_Q_POS=q_pos is not None, HAS_PREFIX=prefix is not None,
    )  # fmt: skip
    return out, lse
