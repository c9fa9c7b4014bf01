"""Paged-attention decode (kernels/paged_attention.py) against a float64 reference.

The Triton kernel runs under the interpreter on CPU (fp16/fp32; the interpreter has no bf16) on
caches whose pages are shuffled (a sequence's pages are never adjacent), with odd context
lengths, partly filled last pages, GQA 8:1 and 4:1, and both the one-pass and the split
(flash-decoding) paths. Outputs start as NaN (`poison_empty`), so a row the kernel forgets fails.
Tolerance: the kernel's error against float64 is at most twice PyTorch's own (the reference run
in the same dtype) plus an atol of a few ulps (tests/kernels/kernel_checks.py).
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close_to_ref

from llama3hp.kernels.paged_attention import (
    paged_attention_decode,
    paged_attention_decode_ref,
    pick_num_splits,
)

PAGE = 16


def make_case(context_lens: list[int], hq: int, hk: int, d: int, dtype: torch.dtype, seed: int = 0):
    """A cache holding each sequence's keys in randomly placed pages, plus page 0 left as garbage
    (the engine's padding page): (q, k_cache, v_cache, block_tables, context_lens)."""
    g = torch.Generator().manual_seed(seed)
    widths = [-(-n // PAGE) for n in context_lens]
    n_pages = 1 + sum(widths)
    k_cache = torch.randn(n_pages, PAGE, hk, d, generator=g).to(dtype)
    v_cache = torch.randn(n_pages, PAGE, hk, d, generator=g).to(dtype)
    order = (torch.randperm(n_pages - 1, generator=g) + 1).tolist()
    table = torch.zeros(len(context_lens), max(widths) + 1, dtype=torch.int32)  # one spare column
    for s, w in enumerate(widths):
        table[s, :w] = torch.tensor(order[:w], dtype=torch.int32)
        order = order[w:]
    q = torch.randn(len(context_lens), hq, d, generator=g).to(dtype)
    return q, k_cache, v_cache, table, torch.tensor(context_lens, dtype=torch.int32)


CASES = {
    # context lengths: odd, a single token, exactly one page, partly filled last pages
    "gqa8_odd": ([37, 1, 16, 50], 8, 1, 32),
    "gqa4_partial_pages": ([5, 33, 47], 8, 2, 16),
    "mha": ([21, 3], 2, 2, 64),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("num_splits", [1, 3])
def test_kernel_matches_float64_reference(case, dtype, num_splits, poison_empty):
    lens, hq, hk, d = CASES[case]
    q, kc, vc, table, cl = make_case(lens, hq, hk, d, dtype)
    out = paged_attention_decode(
        q, kc, vc, table, cl, max_context_len=max(lens), num_splits=num_splits, block_n=32, backend="triton"
    )
    ref64 = paged_attention_decode_ref(q.double(), kc.double(), vc.double(), table, cl)
    torch_out = paged_attention_decode_ref(q, kc, vc, table, cl)
    assert_close_to_ref(out, ref64, torch_out, name=f"{case} {dtype} splits={num_splits}", atol_ulps=4)


def test_reference_equals_attention_over_the_gathered_tokens():
    """The reference against plain softmax attention over each sequence's tokens, in order."""
    lens = [19, 1, 32]
    q, kc, vc, table, cl = make_case(lens, 8, 2, 16, torch.float64, seed=3)
    out = paged_attention_decode_ref(q, kc, vc, table, cl)
    for s, n in enumerate(lens):
        pages = table[s, : -(-n // PAGE)].long()
        k = kc[pages].reshape(-1, 2, 16)[:n].repeat_interleave(4, dim=1)  # [n, Hq, D]
        v = vc[pages].reshape(-1, 2, 16)[:n].repeat_interleave(4, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[s], k) / 4.0, dim=-1)
        torch.testing.assert_close(out[s], torch.einsum("hn,nhd->hd", p, v), rtol=1e-12, atol=1e-12)


def test_a_larger_max_context_len_changes_nothing(poison_empty):
    """A CUDA graph passes its capacity as max_context_len: extra (empty) splits must weigh nothing."""
    q, kc, vc, table, cl = make_case([9, 30], 8, 1, 32, torch.float32)
    tight = paged_attention_decode(q, kc, vc, table, cl, max_context_len=30, num_splits=1, block_n=32,
                                   backend="triton")  # fmt: skip
    loose = paged_attention_decode(q, kc, vc, table, cl, max_context_len=48, num_splits=3, block_n=16,
                                   backend="triton")  # fmt: skip
    torch.testing.assert_close(loose, tight, rtol=1e-5, atol=1e-6)


def test_num_splits_fill_the_gpu_but_stay_long():
    assert pick_num_splits(1, 8, 8192) == 32  # batch 1 of an 8B model: 8 programs -> 256
    assert pick_num_splits(64, 8, 8192) == 1  # 512 programs already
    assert pick_num_splits(1, 8, 100) == 1  # a short context is never split


def test_bad_shapes_fail_with_one_line():
    q, kc, vc, table, cl = make_case([5], 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of the cache's kv heads"):
        paged_attention_decode(q[:, :3], kc, vc, table, cl, max_context_len=5, backend="torch")
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_decode(q, kc, vc, table[:, 0], cl, max_context_len=5, backend="torch")
