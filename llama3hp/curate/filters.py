"""Heuristic document filters (the paper's list, Gopher's thresholds) and the token KL divergence.

`first_failure(text, cfg, word_list)` measures a document and returns the first filter it fails,
in this order, as (reason, measured value), or None:

- `min_words`: words (runs of non-space characters) fewer than `min_words`.
- `mean_line_chars`: mean length of the non-blank lines outside [min, max].
- `alpha_fraction`: letters over non-space characters below `min_alpha_fraction`.
- `ellipsis_lines`: share of non-blank lines ending in "..." or "…" above the maximum.
- `dup_<n>gram`: share of word characters covered by word n-grams occurring more than once in
  the document, above the maximum for that n (Gopher's duplicated n-gram coverage).
- `word_list`: share of words (lower-cased, outer punctuation stripped) on the user's list.

The KL filter needs the corpus's token distribution first, so it runs after the others:
`token_histogram(ids)` per document, `kl_divergence(hist, log_q)` against the corpus's log
probabilities (the document's own tokens are in the corpus, so q > 0 wherever p > 0).
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np

from llama3hp.curate.config import FiltersConfig
from llama3hp.curate.minhash import fold

__all__ = ["first_failure", "dup_ngram_fraction", "load_word_list", "token_histogram", "kl_divergence"]

_ASCII_LETTERS = string.ascii_letters.encode()
_ASCII_SPACE = b" \t\n\r\x0b\x0c"
_LETTERS = re.compile(r"[^\W\d_]+")
_SPACE = re.compile(r"\s+")
_STRIP = string.punctuation + "“”‘’«»…"


def _alpha_fraction(text: str) -> float:
    if text.isascii():
        raw = text.encode()
        non_space = len(raw.translate(None, _ASCII_SPACE))
        letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
    else:
        non_space = len(_SPACE.sub("", text))
        letters = len(text) - len(_LETTERS.sub("", text))
    return letters / non_space if non_space else 0.0


def dup_ngram_fraction(words: list[str], word_ids: np.ndarray, n: int) -> float:
    """Share of word characters inside word n-grams that occur more than once in the document."""
    if len(words) < n:
        return 0.0
    keys = fold(word_ids, n)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    starts = np.flatnonzero(counts[inverse] > 1)
    if starts.size == 0:
        return 0.0
    edge = np.zeros(len(words) + 1, dtype=np.int64)
    np.add.at(edge, starts, 1)
    np.add.at(edge, starts + n, -1)
    covered = np.cumsum(edge[:-1]) > 0
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    return float(lengths[covered].sum() / lengths.sum())


def load_word_list(path: str | None) -> frozenset[str]:
    if path is None:
        return frozenset()
    return frozenset(
        w.strip().lower() for w in Path(path).read_text(encoding="utf-8").splitlines() if w.strip()
    )


def first_failure(text: str, cfg: FiltersConfig, word_list: frozenset[str]) -> tuple[str, float] | None:
    words = text.split()
    if cfg.min_words and len(words) < cfg.min_words:
        return "min_words", float(len(words))
    lines = [ln for ln in text.split("\n") if ln.strip()]
    mean_line = sum(map(len, lines)) / len(lines) if lines else 0.0
    if (cfg.min_mean_line_chars and mean_line < cfg.min_mean_line_chars) or (
        cfg.max_mean_line_chars and mean_line > cfg.max_mean_line_chars
    ):
        return "mean_line_chars", round(mean_line, 2)
    if cfg.min_alpha_fraction:
        alpha = _alpha_fraction(text)
        if alpha < cfg.min_alpha_fraction:
            return "alpha_fraction", round(alpha, 4)
    if cfg.max_ellipsis_line_fraction and lines:
        ell = sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines)
        if ell > cfg.max_ellipsis_line_fraction:
            return "ellipsis_lines", round(ell, 4)
    if cfg.dup_ngram_max_fraction and words:
        vocab: dict[str, int] = {}
        ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.uint64, count=len(words))
        for n, limit in sorted((int(k), v) for k, v in cfg.dup_ngram_max_fraction.items()):
            if limit:
                frac = dup_ngram_fraction(words, ids, n)
                if frac > limit:
                    return f"dup_{n}gram", round(frac, 4)
    if word_list and words:
        hits = sum(w.strip(_STRIP).lower() in word_list for w in words) / len(words)
        if hits > cfg.max_word_list_fraction:
            return "word_list", round(hits, 4)
    return None


def token_histogram(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(token ids uint32 [u], counts uint32 [u]) of one document."""
    uniq, counts = np.unique(np.asarray(ids, dtype=np.uint32), return_counts=True)
    return uniq, counts.astype(np.uint32)


def kl_divergence(uniq: np.ndarray, counts: np.ndarray, log_q: np.ndarray) -> float:
    """KL(p || q) in nats of a document's token histogram p against log q (float64 [vocab])."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts / total
    return float(np.sum(p * (np.log(p) - log_q[uniq])))
