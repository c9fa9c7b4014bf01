"""What the forward and backward kernels share: the jit helpers that find a program's query rows and
keys, and the launchers' output buffers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path works without triton
    triton = None

_LOG2E = 1.4426950408889634


def _new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer every element of which a kernel writes. Both launchers call it as
    `common._new_output`, so the tests swap in NaN-filled buffers here, in one place."""
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


if triton is not None:

    @triton.jit
    def _doc_keys(CU_K, doc):
        """(first key token, Lk) of key document `doc`."""
        # int64 token offsets: Nk * Hk * D overflows int32 past ~2M tokens at 8 x 128.
        k_start = tl.load(CU_K + doc).to(tl.int64)
        seqlen_k = (tl.load(CU_K + doc + 1) - k_start).to(tl.int32)
        return k_start, seqlen_k

    @triton.jit
    def _segment_queries(CU_Q, Q_POS, seg, seqlen_k, HAS_Q_POS: tl.constexpr):
        """(first query token, Lq, position of the first query in its document) of query segment `seg`."""
        # int64 token offsets: Nq * Hq * D overflows int32 past ~500K tokens at 32 x 128.
        q_start = tl.load(CU_Q + seg).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + seg + 1) - q_start).to(tl.int32)
        if HAS_Q_POS:
            q_off = tl.load(Q_POS + seg)
        else:
            q_off = seqlen_k - seqlen_q
        return q_start, seqlen_q, q_off

    @triton.jit
    def _query_block(
        CU_Q,
        CU_K,
        Q_DOC,
        Q_POS,
        HAS_Q_DOC: tl.constexpr,
        HAS_Q_POS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """The query rows and key ranges of this program of a (query block, segment, q head) grid
        (the forward and dQ kernels).

        Returns (m_block, tok, row_ok, q_pos, doc, k_start, seqlen_k, full_end, hi): m_block < 0 when the
        segment has fewer blocks than the grid (the program has nothing to do); tok, row_ok, q_pos
        [BLOCK_M] the rows' query tokens, which of them lie in the segment, and their positions in
        the document `doc`; its keys start at token k_start and number seqlen_k. Keys [0,
        full_end) are visible to every row of the block: no mask. Keys [full_end, hi), up to the
        last row's position, straddle the diagonal (or the end of the document): masked.
        """
        seg = tl.program_id(1)
        if HAS_Q_DOC:
            doc = tl.load(Q_DOC + seg)
        else:
            doc = seg
        k_start, seqlen_k = _doc_keys(CU_K, doc)
        q_start, seqlen_q, q_off = _segment_queries(CU_Q, Q_POS, seg, seqlen_k, HAS_Q_POS)
        # Longest key loops first (the last query block of a segment sees the most keys), so the
        # tail of the grid is made of short programs.
        m_block = tl.cdiv(seqlen_q, BLOCK_M) - 1 - tl.program_id(0)
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seqlen_q
        q_pos = q_off + offs_m
        first_pos = q_off + m_block * BLOCK_M
        last_pos = q_off + tl.minimum(seqlen_q, (m_block + 1) * BLOCK_M) - 1
        full_end = (tl.maximum(tl.minimum(first_pos + 1, seqlen_k), 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(seqlen_k, last_pos + 1)
        return m_block, q_start + offs_m, row_ok, q_pos, doc, k_start, seqlen_k, full_end, hi

    @triton.jit
    def _prefix_keys(PREFIX, CU_K, doc):
        """(first key token, length) of key document `doc`'s shared prefix, every key of which is
        visible to every query of `doc`; length 0 when it has none (PREFIX[doc] = -1)."""
        p_doc = tl.load(PREFIX + doc)
        p_start, p_len = _doc_keys(CU_K, tl.maximum(p_doc, 0))
        return p_start, tl.where(p_doc >= 0, p_len, 0)
