"""Paged-attention decode: one new query token per sequence against its keys in a paged KV cache.

The cache (`llama3hp.inference.kv_cache`) stores K and V per layer as pages of PAGE tokens:
k_cache, v_cache [n_pages, PAGE, Hk, D]. A sequence's tokens live in the pages its block table
lists, in order: token t of sequence s sits at page block_tables[s, t // PAGE], row t % PAGE.
The query is the sequence's newest token, whose K/V were written to the cache before the call,
so it attends to all of its context_lens[s] cached tokens (no causal mask inside a decode step).

Kernel (`_paged_attn_decode_kernel`): grid (sequence, kv head, split). One program handles ALL
the Hq/Hk query heads of one KV group, so under GQA each K/V page is read from memory once per
group instead of once per query head (8 times fewer bytes at 8:1). The group's G query rows are
padded to a tile of at least 16 rows (what `tl.dot` takes); each step loads BLOCK_N tokens
(several pages) through the block table, scores them with one `tl.dot`, and runs the online
softmax in base 2 with fp32 accumulators. With NUM_SPLITS > 1 (flash-decoding: long contexts at
small batch would leave most of the GPU idle with only S * Hk programs) each split covers a slice
of the context and writes its unnormalised partial (acc, max, sum); `_paged_attn_reduce_kernel`
merges the splits. No backward: decoding runs under inference mode.

`paged_attention_decode_ref` is the same math in plain PyTorch (the pages gathered, one masked
SDPA), what CPU serving runs and what the tests compare against.

Shape legend: S sequences, Hq/Hk query/kv heads, G = Hq/Hk, D head dim, P pages per sequence
(block-table width), PAGE tokens per page.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llama3hp.kernels.dispatch import check_backend, use_triton

# Tokens per step of the key loop: 4 pages of 16. Decode is bandwidth-bound; 64 keys x D = 128 in
# bf16 is a 16 KiB tile per operand, enough in flight per program without spilling.
BLOCK_N = 64
# A program per (sequence, kv head) gives 8 programs at batch 1 on an 8B model: fewer than the
# 132 SMs of an H100. Splits are added until about this many programs run (flash-decoding).
TARGET_PROGRAMS = 264
MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more in the merge than it saves


@triton.jit
def _paged_attn_decode_kernel(
    Q, K_CACHE, V_CACHE, BLOCK_TABLES, CONTEXT_LENS,
    O, PART_ACC, PART_M, PART_L,
    qk_scale,  # softmax scale * log2(e)
    split_tokens,  # tokens of context per split (a multiple of BLOCK_N)
    stride_qs, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_bs,
    stride_os, stride_oh,
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two >= 16
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots (tf32 would cost them their precision)
):  # fmt: skip
    s = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(CONTEXT_LENS + s)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    g_ok = g < GROUP
    q = tl.load(Q + s * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    lo = split * split_tokens
    hi = tl.minimum(lo + split_tokens, ctx)
    n = tl.arange(0, BLOCK_N)
    # Every step holds at least one visible token (start < hi <= ctx), so m_new is finite.
    for start in range(lo, hi, BLOCK_N):
        tok = start + n
        ok = tok < hi
        page = tl.load(BLOCK_TABLES + s * stride_bs + tok // PAGE, mask=ok, other=0).to(tl.int64)
        row = (tok % PAGE).to(tl.int64)
        k_off = page * stride_kp + row * stride_kt + kvh * stride_kh
        v_off = page * stride_vp + row * stride_vt + kvh * stride_vh
        kt = tl.load(K_CACHE + k_off[None, :] + d[:, None], mask=ok[None, :], other=0.0)  # [D, BLOCK_N]
        v = tl.load(V_CACHE + v_off[:, None] + d[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_N, D]
        if IEEE:
            qk = tl.dot(q, kt, input_precision="ieee")
        else:
            qk = tl.dot(q, kt)
        qk = tl.where(ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = O + s * stride_os + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=g_ok[:, None])
    else:
        # Partials [S, Hq, NUM_SPLITS] (and [..., D] for acc), contiguous fp32.
        hq = tl.num_programs(1) * GROUP
        base = (s * hq + heads) * NUM_SPLITS + split
        tl.store(PART_M + base, m_i, mask=g_ok)
        tl.store(PART_L + base, l_i, mask=g_ok)
        tl.store(PART_ACC + base[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _paged_attn_reduce_kernel(
    PART_ACC, PART_M, PART_L, O,
    stride_os, stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    hq = tl.num_programs(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    sp_ok = sp < NUM_SPLITS
    base = (s * hq + h) * NUM_SPLITS
    m = tl.load(PART_M + base + sp, mask=sp_ok, other=float("-inf"))
    l = tl.load(PART_L + base + sp, mask=sp_ok, other=0.0)
    acc = tl.load(PART_ACC + (base + sp)[:, None] * HEAD_DIM + d[None, :], mask=sp_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    # Splits past the context hold m = -inf: weight 0 (the first split always holds a token).
    w = tl.where(m > float("-inf"), tl.math.exp2(m - m_max), 0.0)
    denom = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(O + s * stride_os + h * stride_oh + d, out.to(O.dtype.element_ty))


def _check(q, k_cache, v_cache, block_tables, context_lens) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [S, Hq, D] and k_cache, v_cache [pages, PAGE, Hk, D], got {tuple(q.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    S, Hq, D = q.shape
    if k_cache.shape[3] != D or Hq % k_cache.shape[2]:
        raise ValueError(
            f"q heads ({Hq}) must be a multiple of the cache's kv heads ({k_cache.shape[2]}) and head dims "
            f"must match ({D} vs {k_cache.shape[3]})"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != S or context_lens.shape != (S,):
        raise ValueError(
            f"expected block_tables [S, P] and context_lens [S] for S={S}, got "
            f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )
    if block_tables.is_floating_point() or context_lens.is_floating_point():
        raise ValueError("block_tables and context_lens must be integer tensors")


def paged_attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch paged decode attention (semantics in the module docstring).

    q [S, Hq, D]; k_cache, v_cache [pages, PAGE, Hk, D]; block_tables int [S, P]; context_lens int [S]
    (>= 1); max_context_len: the largest context length (None: read from context_lens, a sync).
    The pages are gathered into [S, Hk, L, D] and one SDPA runs with the tokens past each context
    masked; math in the input dtype (float64 inputs give a float64 reference). Returns [S, Hq, D].
    """
    _check(q, k_cache, v_cache, block_tables, context_lens)
    S, Hq, D = q.shape
    page = k_cache.shape[1]
    L = int(context_lens.max()) if max_context_len is None else int(max_context_len)
    L = min(L, block_tables.shape[1] * page)
    if S == 0 or L == 0:
        return torch.zeros_like(q)
    n_pages = -(-L // page)
    pages = block_tables[:, :n_pages].long()
    k = k_cache[pages].flatten(1, 2)[:, :L].transpose(1, 2)  # [S, Hk, L, D]
    v = v_cache[pages].flatten(1, 2)[:, :L].transpose(1, 2)
    visible = torch.arange(L, device=q.device)[None, :] < context_lens.to(q.device)[:, None]  # [S, L]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=visible[:, None, None, :], scale=softmax_scale,
        enable_gqa=Hq != k.shape[1],
    )  # fmt: skip
    return out[:, :, 0, :]


def pick_num_splits(n_seqs: int, n_kv_heads: int, max_context_len: int) -> int:
    """How many splits of the context a decode launch uses: enough programs to fill the GPU
    (TARGET_PROGRAMS), never splits shorter than MIN_SPLIT_TOKENS."""
    programs = max(1, n_seqs * n_kv_heads)
    by_occupancy = -(-TARGET_PROGRAMS // programs)
    by_length = max(1, max_context_len // MIN_SPLIT_TOKENS)
    return max(1, min(by_occupancy, by_length))


def _paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len,
                            num_splits, block_n):  # fmt: skip
    S, Hq, D = q.shape
    Hk, page = k_cache.shape[2], k_cache.shape[1]
    if D & (D - 1) or D < 16:
        raise ValueError(f"the paged-attention kernel takes power-of-two head dims >= 16, got {D}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("q and the caches must have a contiguous last (head) dim")
    if block_n % page:
        raise ValueError(f"block_n ({block_n}) must be a multiple of the page size ({page})")
    out = torch.empty_like(q)
    if S == 0:
        return out
    group = Hq // Hk
    splits = num_splits or pick_num_splits(S, Hk, max_context_len)
    # Each split covers a whole number of key steps; the last may be partly (or wholly) empty.
    split_tokens = block_n * max(1, -(-max(max_context_len, 1) // (splits * block_n)))
    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    cl = context_lens if context_lens.dtype == torch.int32 else context_lens.to(torch.int32)
    if splits > 1:
        part_acc = torch.empty((S, Hq, splits, D), dtype=torch.float32, device=q.device)
        part_m = torch.empty((S, Hq, splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty((S, Hq, splits), dtype=torch.float32, device=q.device)
    else:  # unused by the kernel: any fp32 tensors
        part_acc = part_m = part_l = out.new_empty(1, dtype=torch.float32)
    _paged_attn_decode_kernel[(S, Hk, splits)](
        q, k_cache, v_cache, bt, cl, out, part_acc, part_m, part_l,
        scale * 1.4426950408889634, split_tokens,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, PAGE=page,
        BLOCK_N=block_n, NUM_SPLITS=splits, IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    if splits > 1:
        _paged_attn_reduce_kernel[(S, Hq)](
            part_acc, part_m, part_l, out, out.stride(0), out.stride(1),
            HEAD_DIM=D, NUM_SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
        )  # fmt: skip
    return out


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    max_context_len: int,
    softmax_scale: float | None = None,
    num_splits: int | None = None,
    block_n: int = BLOCK_N,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode attention over a paged KV cache (module docstring): q [S, Hq, D] (each sequence's
    newest token, its K/V already in the cache); k_cache, v_cache [pages, PAGE, Hk, D];
    block_tables int32 [S, P]; context_lens int32 [S] (>= 1: cached tokens, the new one included).

    max_context_len: an upper bound on context_lens (sizes the splits without a device sync; a
    CUDA graph passes its capacity). num_splits: None picks by occupancy (`pick_num_splits`).
    Returns [S, Hq, D] in q's dtype. backend: "auto" (Triton on CUDA), "triton", "torch".
    """
    check_backend(backend)
    _check(q, k_cache, v_cache, block_tables, context_lens)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if not use_triton(backend, q, k_cache, v_cache):
        return paged_attention_decode_ref(
            q, k_cache, v_cache, block_tables, context_lens, softmax_scale=scale,
            max_context_len=max_context_len,
        )  # fmt: skip
    return _paged_attention_triton(
        q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len, num_splits, block_n
    )
