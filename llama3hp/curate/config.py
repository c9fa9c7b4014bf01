"""Curation settings: one dataclass per stage, read from TOML with `key=value` overrides.

    [minhash]
    threshold = 0.7
    [filters]
    min_words = 20

or `llama3hp curate in/ --out out/ minhash.threshold=0.7 lines.enabled=false`. Unknown keys and
values of the wrong type are rejected with a one-line `DataError` (with the closest valid key).
Defaults follow the Llama 3 paper where it gives numbers (lines seen more than 6 times per
bucket) and Gopher's published rules (Rae et al. 2021) for the heuristic thresholds it leaves out.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama3hp.data.errors import DataError

__all__ = [
    "CurateConfig",
    "UrlConfig",
    "ExactConfig",
    "MinHashConfig",
    "LinesConfig",
    "FiltersConfig",
    "load_config",
    "config_to_dict",
]


@dataclass
class UrlConfig:
    """Stage 1: documents whose normalised `url` matches an earlier one's."""

    enabled: bool = True
    keep: str = "first"  # "first" (in input order) or "longest" (most bytes; ties to the first)


@dataclass
class ExactConfig:
    """Stage 2: documents whose bytes hash (BLAKE2b-128) like an earlier one's."""

    enabled: bool = True


@dataclass
class MinHashConfig:
    """Stage 3: near-duplicates by MinHash LSH; each cluster keeps its first document.

    Shingles are `n_gram` consecutive words (lower-cased ASCII, digit runs folded to 0,
    punctuation and `_` as separators) or Llama 3 tokens. Two documents are candidates when
    all `rows` signature values of one of `bands` bands agree, and duplicates when the share
    of equal values over all `bands * rows` (their estimated Jaccard) is >= `threshold`.

    20 x 10 = 200 permutations: the estimate's standard deviation at Jaccard 0.86 (a copy with
    5% of its words rewritten a sentence at a time) is 0.024, so 99% of such copies clear 0.8;
    with datatrove's 14 x 8 = 112 it is 0.033 and only 95% do (measured, tests/curate). A pair
    with Jaccard 0.86 becomes a candidate with probability 0.994 (0.9999 at 0.9).
    """

    enabled: bool = True
    shingle: str = "word"  # "word" or "token"
    n_gram: int = 5
    bands: int = 20
    rows: int = 10
    threshold: float = 0.8
    seed: int = 1  # draws the permutations; the same seed gives the same signatures


@dataclass
class LinesConfig:
    """Stage 4: lines seen more than `max_count` times in a bucket of `bucket_docs` documents.

    The paper uses buckets of 30M documents out of a crawl of billions; 1M keeps one bucket's
    line hashes (8 bytes a line) to a few hundred MB on a small machine, and makes a corpus of
    up to a million documents one bucket. Lines are compared with surrounding whitespace
    stripped; blank lines and lines shorter than `min_chars` are never counted or removed.
    """

    enabled: bool = True
    bucket_docs: int = 1_000_000
    max_count: int = 6
    min_chars: int = 1


@dataclass
class FiltersConfig:
    """Stage 5: heuristic document filters; a threshold of 0 (or an empty list) turns one off."""

    enabled: bool = True
    min_words: int = 50  # fewer words than this: too short (Gopher: 50)
    min_mean_line_chars: float = 10.0  # mean non-blank line shorter than this: lists, menus
    max_mean_line_chars: float = 1000.0  # longer: minified or one-line dumps
    min_alpha_fraction: float = 0.5  # share of non-space characters that are letters
    max_ellipsis_line_fraction: float = 0.3  # share of lines ending in "..." or "…" (Gopher: 0.3)
    # Duplicated n-gram coverage: share of word characters inside word n-grams that occur more
    # than once, per n (Gopher's 5..10 -> 0.15..0.10); finds logs and repeated error messages.
    dup_ngram_max_fraction: dict[str, float] = field(
        default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10}
    )
    words_file: str | None = None  # a word list (one a line, none shipped): the "dirty word" counter
    max_word_list_fraction: float = 0.01  # share of words on that list above which a document goes
    # Token-distribution KL divergence (nats) of a document's Llama 3 token histogram against the
    # corpus's; documents full of outlier tokens (tables, encoded blobs) score high. 0 = off.
    max_token_kl: float = 4.0
    tokenizer: str | None = None  # tokenizer.model for the KL filter (default: the packaged Llama 3)


@dataclass
class CurateConfig:
    """The whole curation job: the readers' settings, the pool, and each stage in order."""

    text_field: str = "text"  # JSONL field holding the text (`url` and `id` are read when present)
    extensions: list[str] = field(default_factory=lambda: [".py", ".txt", ".md", ".rst"])
    workers: int = 2  # processes; the output bytes do not depend on it
    shard_mb: float = 2.0  # input shard size: the unit of parallel work, resume and output files
    examples: int = 3  # example removals kept per reason in the report
    url: UrlConfig = field(default_factory=UrlConfig)
    exact: ExactConfig = field(default_factory=ExactConfig)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    lines: LinesConfig = field(default_factory=LinesConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise DataError(f"curate config: {what}")

        need(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        need(self.shard_mb > 0, f"shard_mb must be > 0, got {self.shard_mb}")
        need(
            self.url.keep in ("first", "longest"),
            f"url.keep must be 'first' or 'longest', got {self.url.keep!r}",
        )
        m = self.minhash
        need(m.shingle in ("word", "token"), f"minhash.shingle must be 'word' or 'token', got {m.shingle!r}")
        need(m.n_gram >= 1 and m.bands >= 1 and m.rows >= 1, "minhash.n_gram, bands and rows must be >= 1")
        need(0.0 < m.threshold <= 1.0, f"minhash.threshold must be in (0, 1], got {m.threshold}")
        need(self.lines.bucket_docs >= 1, f"lines.bucket_docs must be >= 1, got {self.lines.bucket_docs}")
        need(self.lines.max_count >= 1, f"lines.max_count must be >= 1, got {self.lines.max_count}")
        for n, frac in self.filters.dup_ngram_max_fraction.items():
            need(
                n.isdigit() and int(n) >= 1,
                f"filters.dup_ngram_max_fraction keys are n-gram sizes, got {n!r}",
            )
            need(0.0 <= frac <= 1.0, f"filters.dup_ngram_max_fraction[{n}] must be in [0, 1], got {frac}")
        if self.filters.words_file is not None and not Path(self.filters.words_file).is_file():
            raise DataError(
                f"curate config: filters.words_file {self.filters.words_file} does not exist; "
                "give a word list file (one word a line)"
            )


def _leaf_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        keys += (
            _leaf_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
        )
    return keys


def _unknown(key: str, root: CurateConfig) -> DataError:
    close = difflib.get_close_matches(key, _leaf_keys(root), n=1)
    hint = f"; did you mean {close[0]}?" if close else "; see `llama3hp curate --help` for the keys"
    return DataError(f"curate config: unknown key {key!r}{hint}")


def _coerce(value: Any, current: Any, key: str) -> Any:
    """`value` (TOML value or override text) as the type of the field's current value."""
    kind = type(current)
    if isinstance(value, str) and kind is not str and current is not None:
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise DataError(
                f"curate config: {key}={value!r} is not a valid {kind.__name__}; give one"
            ) from None
    if current is None:  # optional paths
        ok = value is None or isinstance(value, str)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is dict:
        ok = isinstance(value, dict) and all(isinstance(v, int | float) for v in value.values())
        value = {str(k): float(v) for k, v in value.items()} if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise DataError(f"curate config: {key} must be of type {kind.__name__}, got {value!r}")
    return value


def _set(root: CurateConfig, key: str, value: Any) -> None:
    *path, name = key.split(".")
    obj: Any = root
    for part in path:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            raise _unknown(key, root)
        obj = getattr(obj, part)
    names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
    if name not in names or dataclasses.is_dataclass(getattr(obj, name)):
        raise _unknown(key, root)
    setattr(obj, name, _coerce(value, getattr(obj, name), key))


def _flatten(table: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    pairs = []
    for k, v in table.items():
        # dup_ngram_max_fraction is a table-valued field, not a section.
        if isinstance(v, dict) and k != "dup_ngram_max_fraction":
            pairs += _flatten(v, f"{prefix}{k}.")
        else:
            pairs.append((prefix + k, v))
    return pairs


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CurateConfig:
    """Defaults, then the TOML file `path` (if any), then `key=value` overrides; validated."""
    cfg = CurateConfig()
    if path is not None:
        p = Path(path)
        try:
            table = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise DataError(f"curate config file {p} does not exist; pass an existing TOML file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read curate config file {p}: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise DataError(f"curate config file {p} is not valid TOML ({e}); fix it") from None
        for key, value in _flatten(table):
            _set(cfg, key, value)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"curate override {item!r} is not key=value (e.g. minhash.threshold=0.7)")
        _set(cfg, key.strip(), value.strip())
    cfg.validate()
    return cfg


def config_to_dict(cfg: CurateConfig) -> dict[str, Any]:
    """Every setting but `workers`, which changes no output byte (so the report and the resume
    fingerprint do not depend on it)."""
    out = dataclasses.asdict(cfg)
    del out["workers"]
    return out
