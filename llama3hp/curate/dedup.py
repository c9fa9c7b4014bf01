"""URL, exact and line-level de-duplication: the hashes the scan pass keeps and the global decisions.

- URLs are normalised before comparison (`normalize_url`): scheme dropped (http and https are
  the same page), host lower-cased without "www." and default ports, fragment dropped, trailing
  "/" removed, query parameters sorted with `utm_*` tracking parameters dropped.
- Exact duplicates: BLAKE2b-128 of the document's UTF-8 bytes.
- Lines: BLAKE2b-64 of each line with surrounding whitespace stripped; blank lines and lines
  shorter than `min_chars` get hash 0 and are never counted or removed.

Every decision keeps the first document in input order (URL: optionally the longest), so the
result does not depend on how the input was sharded or how many workers ran.
"""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np

__all__ = [
    "normalize_url",
    "url_key",
    "content_key",
    "line_keys",
    "first_of_groups",
    "over_threshold_lines",
]

_DEFAULT_PORTS = {"80", "443"}


def normalize_url(url: str) -> str:
    """A canonical form of `url` for comparison (see the module docstring)."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower().removeprefix("www.")
    port = f":{parts.port}" if parts.port is not None and str(parts.port) not in _DEFAULT_PORTS else ""
    path = parts.path.rstrip("/") or "/"
    query = sorted(
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not k.startswith("utm_")
    )
    return f"{host}{port}{path}" + (f"?{urlencode(query)}" if query else "")


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def url_key(url: str | None) -> int:
    """uint64 key of the normalised URL; 0 for a document without one (never a duplicate)."""
    return _h64(normalize_url(url).encode()) | 1 if url else 0


def content_key(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def line_keys(text: str, min_chars: int) -> np.ndarray:
    """uint64 [n_lines]: one key per line of `text` (split on "\\n"); 0 for lines never counted."""
    keys = np.zeros(text.count("\n") + 1, dtype=np.uint64)
    for i, line in enumerate(text.split("\n")):
        s = line.strip()
        if s and len(s) >= min_chars:
            keys[i] = _h64(s.encode()) | 1
    return keys


def first_of_groups(keys: np.ndarray, candidates: np.ndarray, prefer: np.ndarray | None = None) -> np.ndarray:
    """int64 [n]: for each candidate document, the one its group keeps (itself if it is kept).

    keys [n] or [n, c] (c integer columns, one row per document); only rows where `candidates` is
    True take part. The kept one is the first in input order, or the largest `prefer` value (ties
    to the first).
    """
    n = keys.shape[0]
    kept = np.arange(n, dtype=np.int64)
    idx = np.flatnonzero(candidates)
    if idx.size < 2:
        return kept
    k = keys[idx].reshape(idx.size, -1)
    rank = np.zeros(idx.size) if prefer is None else -prefer[idx].astype(np.float64)
    # By key (first column most significant), then preferred, then input order.
    order = np.lexsort((idx, rank, *k.T[::-1]))
    ks = k[order]
    new = np.concatenate([[True], (ks[1:] != ks[:-1]).any(axis=1)])
    head = np.maximum.accumulate(np.where(new, np.arange(idx.size), 0))
    kept[idx[order]] = idx[order][head]
    return kept


def over_threshold_lines(keys: np.ndarray, max_count: int) -> np.ndarray:
    """Sorted uint64 keys seen more than `max_count` times in `keys` (key 0 never)."""
    keys = keys[keys != 0]
    if keys.size == 0:
        return np.zeros(0, dtype=np.uint64)
    uniq, counts = np.unique(keys, return_counts=True)
    return uniq[counts > max_count]
