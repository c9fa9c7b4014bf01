"""The backward kernels (delta preprocess, dK/dV with optional atomic dQ, deterministic dQ) and their
launcher."""

from __future__ import annotations

import torch

from llama3hp.kernels.attention import common
from llama3hp.kernels.attention.common import _LOG2E, _last_dim_contiguous
from llama3hp.kernels.attention.tiles import _INTERPRET, _seq_bucket

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path works without triton
    triton = None

if triton is not None:
    from llama3hp.kernels.attention.common import _doc_keys, _prefix_keys, _query_block, _segment_queries
    from llama3hp.kernels.attention.tiles import _CACHE, _DKDV_CONFIGS, _DQ_CONFIGS, _pruner

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
    def _row_stats(LSE, DELTA, head, n_q_tokens, tok, row_ok):
        """(lse in log2 units, delta) [rows] of q head `head` at query tokens `tok`. Rows outside the
        segment and rows that saw no key (lse = -inf) get lse = +inf, so P = exp2(s - lse) = 0."""
        lse = tl.load(LSE + head.to(tl.int64) * n_q_tokens + tok, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + head.to(tl.int64) * n_q_tokens + tok, mask=row_ok, other=0.0)
        return lse, delta

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
            lse, delta = _row_stats(LSE, DELTA, head, n_q_tokens, tok, row_ok)
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
        USER_ORDER,
        USER_PTR,
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
        HAS_PREFIX: tl.constexpr,
        ATOMIC_DQ: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One (key block, key document, kv head): dK, dV summed over the document's query segments
        (SEG_ORDER[DOC_SEG_PTR[d]:DOC_SEG_PTR[d + 1]]) and the GROUP q heads of the kv head; with
        HAS_PREFIX also over every query segment of the documents that use d as their shared prefix
        (USER_ORDER[USER_PTR[d]:USER_PTR[d + 1]]), which see all of d's keys."""
        n_block = tl.program_id(0)
        doc = tl.program_id(1)
        kv_head = tl.program_id(2)
        k_start, seqlen_k = _doc_keys(CU_K, doc)
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
            q_start, seqlen_q, q_off = _segment_queries(CU_Q, Q_POS, seg, seqlen_k, HAS_Q_POS)
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
        if HAS_PREFIX:
            for t in range(tl.load(USER_PTR + doc), tl.load(USER_PTR + doc + 1)):
                user = tl.load(USER_ORDER + t)
                for u in range(tl.load(DOC_SEG_PTR + user), tl.load(DOC_SEG_PTR + user + 1)):
                    seg = tl.load(SEG_ORDER + u)
                    q_start = tl.load(CU_Q + seg).to(tl.int64)
                    seqlen_q = (tl.load(CU_Q + seg + 1) - q_start).to(tl.int32)
                    for g in range(GROUP):  # every query sees every key of the prefix: no mask
                        head = kv_head * GROUP + g
                        dk, dv = _dkdv_inner(
                            dk, dv, k, v, Q + head * stride_qh, DO + head * stride_doh, LSE, DELTA,
                            DQ_ACC + head * stride_dqh, stride_qn, stride_don, stride_dqn, q_start, seqlen_q, 0,
                            offs_n, 0, seqlen_q, qk_scale, sm_scale, n_q_tokens, head, HEAD_DIM, BLOCK_M, False,
                            ATOMIC_DQ,
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
        PREFIX,
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
        HAS_PREFIX: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One (query block, segment, q head): dQ by recomputing P and dP (no atomics)."""
        head = tl.program_id(2)
        m_block, tok, row_ok, q_pos, doc, k_start, seqlen_k, full_end, hi = _query_block(
            CU_Q, CU_K, Q_DOC, Q_POS, HAS_Q_DOC, HAS_Q_POS, BLOCK_M, BLOCK_N
        )
        if m_block < 0:
            return
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            Q + tok[:, None] * stride_qn + head * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0
        )
        do = tl.load(
            DO + tok[:, None] * stride_don + head * stride_doh + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        lse, delta = _row_stats(LSE, DELTA, head, n_q_tokens, tok, row_ok)
        kv_head = head // GROUP
        k_base = K + k_start * stride_kn + kv_head * stride_kh
        v_base = V + k_start * stride_vn + kv_head * stride_vh
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if HAS_PREFIX:  # the shared prefix's keys, all visible (as in the forward)
            p_start, p_len = _prefix_keys(PREFIX, CU_K, doc)
            p_full = (p_len // BLOCK_N) * BLOCK_N
            pk_base = K + p_start * stride_kn + kv_head * stride_kh
            pv_base = V + p_start * stride_vn + kv_head * stride_vh
            dq = _dq_inner(
                dq, q, do, lse, delta, pk_base, pv_base, stride_kn, stride_vn, q_pos + p_len, p_len, 0, p_full,
                qk_scale, HEAD_DIM, BLOCK_N, False,
            )  # fmt: skip
            dq = _dq_inner(
                dq, q, do, lse, delta, pk_base, pv_base, stride_kn, stride_vn, q_pos + p_len, p_len, p_full, p_len,
                qk_scale, HEAD_DIM, BLOCK_N, True,
            )  # fmt: skip
        # Keys [0, full_end) without the mask, then [full_end, hi) with it (see _query_block).
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


def _prefix_user_csr(prefix: torch.Tensor, n_docs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documents using each document as their shared prefix: (order int32 [Dk], ptr int32 [Dk + 1]),
    order[ptr[d]:ptr[d + 1]] the users of d; built on device without a sync (-1 sorts past the end)."""
    key = torch.where(prefix >= 0, prefix.long(), n_docs)
    order = torch.sort(key, stable=True).indices.to(torch.int32)
    ptr = torch.zeros(n_docs + 1, dtype=torch.int32, device=prefix.device)
    ptr[1:] = torch.cumsum(torch.bincount(key, minlength=n_docs + 1)[:n_docs], 0)
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
    prefix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq [Nq, Hq, D], dk, dv [Nk, Hk, D]) from do [Nq, Hq, D] and the saved lse [Hq, Nq];
    prefix int32 [Dk] or None: each key document's shared prefix (see the forward)."""
    Nq, Hq, D = q.shape
    Nk, Hk, _ = k.shape
    n_seg, n_docs = cu_q.numel() - 1, cu_k.numel() - 1
    do = _last_dim_contiguous(do)
    dk, dv = common._new_output(k.shape, k.dtype, k.device), common._new_output(v.shape, v.dtype, v.device)
    if Nq == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    delta = common._new_output((Hq, Nq), torch.float32, q.device)
    block = 16 if _INTERPRET else 128
    _attn_bwd_preprocess_kernel[(triton.cdiv(Nq, block), Hq)](
        out, do, dlse if dlse is not None else delta, delta,
        out.stride(0), out.stride(1), do.stride(0), do.stride(1), Nq,
        HEAD_DIM=D, HAS_DLSE=dlse is not None, BLOCK=block,
    )  # fmt: skip
    order, ptr = _doc_segment_csr(q_doc, n_seg, n_docs, q.device)
    users, user_ptr = _prefix_user_csr(prefix, n_docs) if prefix is not None else (order, ptr)
    if deterministic:
        dq_acc = torch.empty(1, 1, 1, dtype=torch.float32, device=q.device)  # unused by the kernel
    else:
        dq_acc = torch.zeros(Nq, Hq, D, dtype=torch.float32, device=q.device)
    bucket = _seq_bucket(max(max_seqlen_q, max_seqlen_k))
    if Nk > 0:
        grid = lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), n_docs, Hk)
        _attn_bwd_dkdv_kernel[grid](
            q, k, v, do, lse, delta, dk, dv, dq_acc, cu_q, cu_k, q_pos if q_pos is not None else cu_q, order, ptr,
            users, user_ptr, scale * _LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq_acc.stride(0), dq_acc.stride(1),
            Nq, Hq // Hk, bucket,
            HEAD_DIM=D, HAS_Q_POS=q_pos is not None, HAS_PREFIX=prefix is not None, ATOMIC_DQ=not deterministic,
        )  # fmt: skip
    if not deterministic:
        return dq_acc.to(q.dtype), dk, dv
    dq = common._new_output(q.shape, q.dtype, q.device)
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), n_seg, Hq)
    _attn_bwd_dq_kernel[grid](
        q, k, v, do, lse, delta, dq, cu_q, cu_k,
        q_doc if q_doc is not None else cu_q, q_pos if q_pos is not None else cu_q,
        prefix if prefix is not None else cu_k, scale * _LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), Nq, Hq // Hk, bucket,
        HEAD_DIM=D, HAS_Q_DOC=q_doc is not None, HAS_Q_POS=q_pos is not None, HAS_PREFIX=prefix is not None,
    )  # fmt: skip
    return dq, dk, dv
