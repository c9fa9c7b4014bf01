"""What the forward and backward launchers share: the jit helper that finds a query segment's tokens
and keys, the output buffers, and base-2 scaling."""

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
