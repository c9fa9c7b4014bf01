"""MinHash near-duplicate detection: signatures, LSH bands spilled to disk, merge, union-find.

Shapes: n documents, P = bands * rows permutations, B = bands.

1. `signatures(texts) -> uint32 [n, P]`: per document, the minimum over its shingles of P
   multiply-shift hashes (C++ `llama3hp._C.minhash_signatures` when built, the numpy
   `signatures_numpy` otherwise: the same values bit for bit; the hashing is written in
   `csrc/minhash.h`). Token shingles (Llama 3 ids) always take the numpy path.
2. `band_runs(sig) -> (keys uint64 [B, n], docs int32 [B, n])`: each band's `rows` values folded
   to one key, sorted per band. Written to disk per shard by the scan pass.
3. `find_clusters(...)`: per band, a k-way merge of every shard's sorted run in blocks (memory
   bounded by the block size, not the corpus); equal keys are candidate pairs (each document with
   its group's first and its predecessor); a pair is a duplicate when the share of equal
   signature values is >= threshold; union-find (vectorised label propagation) joins them and
   each cluster keeps its lowest document number (the first in input order).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

try:
    from llama3hp import _C  # type: ignore[attr-defined]  # the compiled extension
except ImportError:  # the extension is optional: numpy fallback below
    _C = None

__all__ = [
    "permutations",
    "signatures",
    "signatures_numpy",
    "band_runs",
    "merge_runs",
    "find_clusters",
    "connected_components",
]

FOLD_SEED = np.uint64(0x9E3779B97F4A7C15)
FOLD_PRIME = np.uint64(0x100000001B3)
_MIX = np.uint64(0xD6E8FEB86659FD93)
_S32 = np.uint64(32)
_DIGITS = re.compile(rb"[0-9]+")
_WORDS = re.compile(rb"[a-z0-9\x80-\xff]+")
_CHUNK = 2048  # shingles per numpy block: [CHUNK, P] uint64 is 1.8 MB at P = 112


def permutations(n_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) uint64 [P]: odd multipliers and offsets of the multiply-shift hashes."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x6D696E68])))
    a = rng.integers(0, 2**64, size=n_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**64, size=n_perm, dtype=np.uint64)
    return a, b


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> _S32)
    x = x * _MIX
    return x ^ (x >> _S32)


def fold(values: np.ndarray, n: int) -> np.ndarray:
    """uint64 [len - n + 1]: the mixed fold of every n consecutive values (see csrc/minhash.h)."""
    m = values.size - n + 1
    x = np.full(m, FOLD_SEED, dtype=np.uint64)
    v = values.astype(np.uint64)
    for j in range(n):
        x = (x ^ v[j : j + m]) * FOLD_PRIME
    return _mix64(x)


def word_hashes(text: bytes) -> np.ndarray:
    """uint32 CRC-32 of each normalised word (lower-cased ASCII, digit runs as '0')."""
    words = _WORDS.findall(_DIGITS.sub(b"0", text.lower()))
    return np.fromiter(map(zlib.crc32, words), dtype=np.uint32, count=len(words))


def _signature(shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mins = np.full(a.size, np.iinfo(np.uint64).max, dtype=np.uint64)
    for i in range(0, shingles.size, _CHUNK):
        x = shingles[i : i + _CHUNK, None]
        np.minimum(mins, ((x * a + b) >> _S32).min(axis=0), out=mins)
    return mins.astype(np.uint32)


def signatures_numpy(
    items: Sequence[bytes] | Sequence[np.ndarray], n_gram: int, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 [n, P], shingle counts int64 [n]) of UTF-8 texts or of token-id arrays."""
    sig = np.full((len(items), a.size), 0xFFFFFFFF, dtype=np.uint32)
    counts = np.zeros(len(items), dtype=np.int64)
    for d, item in enumerate(items):
        units = word_hashes(item) if isinstance(item, bytes) else np.asarray(item)
        if units.size >= n_gram:
            shingles = fold(units, n_gram)
            sig[d] = _signature(shingles, a, b)
            counts[d] = shingles.size
    return sig, counts


def signatures(
    texts: Sequence[bytes], n_gram: int, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Word-shingle signatures of UTF-8 texts: C++ when built, numpy otherwise (same values)."""
    if _C is None:
        return signatures_numpy(texts, n_gram, a, b)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in texts], out=offsets[1:])
    buf = np.frombuffer(b"".join(texts), dtype=np.uint8)
    return _C.minhash_signatures(buf, offsets, n_gram, a, b)


def band_runs(sig: np.ndarray, bands: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys uint64 [B, n], local doc numbers int32 [B, n]), each band sorted by (key, doc)."""
    n = sig.shape[0]
    keys = np.full((bands, n), FOLD_SEED, dtype=np.uint64)
    v = sig.reshape(n, bands, rows).astype(np.uint64)
    for j in range(rows):
        keys = (keys ^ v[:, :, j].T) * FOLD_PRIME
    keys = _mix64(keys)
    order = np.argsort(keys, axis=1, kind="stable").astype(np.int32)
    return np.take_along_axis(keys, order, axis=1), order


def merge_runs(
    runs: Sequence[tuple[np.ndarray, np.ndarray, int]], block: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of the k-way merge of sorted runs (keys, values, value offset), in key order.

    Runs may be memory maps: each round reads up to `block` entries from every run, emits all
    entries whose key is at most the smallest last key among the runs that still have more (values
    as int64 plus the run's offset), and advances. Every key of a block is <= every key of the
    next, but a block is not sorted inside, and a key's entries may span two blocks: the caller
    sorts each block and joins them.
    """
    pos = [0] * len(runs)
    while True:
        live = [i for i, run in enumerate(runs) if pos[i] < run[0].size]
        if not live:
            return
        limited = [i for i in live if pos[i] + block < runs[i][0].size]
        bound = min(runs[i][0][pos[i] + block - 1] for i in limited) if limited else None
        keys, vals = [], []
        for i in live:
            k, v, offset = runs[i]
            stop = min(pos[i] + block, k.size)
            if bound is not None:
                stop = pos[i] + int(np.searchsorted(k[pos[i] : stop], bound, side="right"))
            keys.append(np.asarray(k[pos[i] : stop]))
            vals.append(np.asarray(v[pos[i] : stop]).astype(np.int64) + offset)
            pos[i] = stop
        yield np.concatenate(keys), np.concatenate(vals)


def _grouped_pairs(keys: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """int64 [m, 2] candidate pairs of sorted (key, doc) entries: each doc with its group's first
    and with its predecessor in the group."""
    if keys.size < 2:
        return np.zeros((0, 2), np.int64)
    new = np.concatenate([[True], keys[1:] != keys[:-1]])
    first = np.maximum.accumulate(np.where(new, np.arange(keys.size), 0))
    rest = np.flatnonzero(~new)
    pairs = np.concatenate(
        [np.stack([docs[first[rest]], docs[rest]], 1), np.stack([docs[rest - 1], docs[rest]], 1)]
    )
    return pairs[pairs[:, 0] != pairs[:, 1]]


def _band_candidates(runs, alive: np.ndarray, block: int) -> np.ndarray:
    out = []
    carry_k, carry_d = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    for keys, docs in merge_runs(runs, block):
        keep = alive[docs]
        keys = np.concatenate([carry_k, keys[keep]])
        docs = np.concatenate([carry_d, docs[keep]])
        if keys.size == 0:
            continue
        order = np.lexsort((docs, keys))
        keys, docs = keys[order], docs[order]
        # Hold the last key back: more of its entries may come in the next block.
        cut = int(np.searchsorted(keys, keys[-1], side="left"))
        out.append(_grouped_pairs(keys[:cut], docs[:cut]))
        carry_k, carry_d = keys[cut:], docs[cut:]
    out.append(_grouped_pairs(carry_k, carry_d))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def connected_components(pairs: np.ndarray, n: int) -> np.ndarray:
    """int64 [n] label of each node 0..n-1: the smallest node of its component (pairs int [m, 2])."""
    label = np.arange(n, dtype=np.int64)
    if len(pairs) == 0:
        return label
    u, v = pairs[:, 0], pairs[:, 1]
    while True:
        m = np.minimum(label[u], label[v])
        before = label.copy()
        np.minimum.at(label, u, m)
        np.minimum.at(label, v, m)
        label = label[label]  # pointer jumping: a chain of length L settles in O(log L) rounds
        if np.array_equal(label, before):
            return label


def find_clusters(
    band_run_of: Callable[[int], Sequence[tuple[np.ndarray, np.ndarray, int]]],
    bands: int,
    alive: np.ndarray,
    signature_rows: Callable[[np.ndarray], np.ndarray],
    threshold: float,
    block: int = 1 << 20,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(label int64 [n] for every document: itself, or its cluster's first document; counts).

    `band_run_of(b)` gives band b's sorted runs (keys uint64, local doc numbers, the shard's first
    global doc number) of every shard; `alive` bool [n] masks documents already removed; `signature_rows(docs)` returns the
    uint32 [len(docs), P] signatures of global document numbers.
    """
    cands = [_band_candidates(band_run_of(b), alive, block) for b in range(bands)]
    pairs = np.concatenate(cands) if cands else np.zeros((0, 2), np.int64)
    pairs = np.unique(np.sort(pairs, axis=1), axis=0) if len(pairs) else pairs
    confirmed = np.zeros(len(pairs), dtype=bool)
    for i in range(0, len(pairs), block):
        chunk = pairs[i : i + block]
        same = (signature_rows(chunk[:, 0]) == signature_rows(chunk[:, 1])).mean(axis=1)
        confirmed[i : i + block] = same >= threshold
    label = connected_components(pairs[confirmed], alive.size)
    return label, {"candidate_pairs": int(len(pairs)), "confirmed_pairs": int(confirmed.sum())}
