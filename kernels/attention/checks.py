"""Argument checks shared by the references and the kernel path, and what the kernel takes."""

from __future__ import annotations

import torch

_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"expected q [B, T, Hq, D] and k, v [B, T, Hk, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")


def _check_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    q_doc_idx: torch.Tensor | None,
    q_pos_offsets: torch.Tensor | None,
    doc_prefix: torch.Tensor | None = None,
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
    for name, per_seg in (("q_doc_idx", q_doc_idx), ("q_pos_offsets", q_pos_offsets)):
        if per_seg is not None and (per_seg.dim() != 1 or per_seg.numel() != n_seg):
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
    if doc_prefix is not None:
        _check_doc_prefix(doc_prefix, cu_seqlens_k.numel() - 1)


def _check_doc_prefix(doc_prefix: torch.Tensor, n_docs: int) -> None:
    """doc_prefix [n_docs]: -1, or an EARLIER document (the shared prefix precedes what shares it)."""
    if doc_prefix.dim() != 1 or doc_prefix.numel() != n_docs or doc_prefix.is_floating_point():
        raise ValueError(f"doc_prefix must be a 1-D int tensor with one entry per key document ({n_docs})")
    if doc_prefix.device.type == "cpu":  # values only where they cost no device sync
        own = torch.arange(n_docs)
        if bool(((doc_prefix < -1) | (doc_prefix >= own)).any()):
            raise ValueError(
                f"doc_prefix entries must be -1 or the index of an earlier document, got {doc_prefix.tolist()}"
            )


def _kernel_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs ("auto" falls back to the reference where it does not)."""
    return (
        q.shape[-1] in _SUPPORTED_HEAD_DIMS
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k.dtype == q.dtype == v.dtype
    )
