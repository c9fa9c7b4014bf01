"""Packed pre-training loader: shuffled, blended, data-parallel, resumable, seq_len-changeable.

Shapes: B rows per rank, T = seq_len.

Sampling (Megatron-style, written here). Per dataset and epoch e, the documents are shuffled with a
seeded permutation (`doc_idx`) and concatenated into one token stream. A row is T (input, target)
pairs, pair p being (stream[p], stream[p + 1]); so on a fresh epoch sample i is stream tokens
[i*T, i*T + T + 1), consecutive samples share one token, and every token but the stream's first
is a target exactly once per epoch. Samples are served in a seeded shuffled order (`shuffle_idx`);
`sample_idx` holds each sample's starting (segment position, offset), built by
`indices.build_sample_idx`.

Rounds. The samples of one shuffle are a *round*: a list of pieces (epoch, first pair, end pair)
of epoch streams, resolved into document segments. A fresh round is one new epoch followed by the
previous round's leftover (its last sum(pairs) % T pairs, too few for a row), so nothing is ever
dropped: the leftover is served in the next round.

Changing seq_len (staged context length). The pairs of the current round that are not yet served
(the unserved samples in stream order, plus the leftover) become the pieces of a new round cut
with the new T and reshuffled; adjacent pieces are merged back into contiguous text. Every pair is
therefore still served exactly once: nothing repeats, nothing is skipped. Rows may change between
calls too (batch ramp); global row j is the same whatever the batch sizes.

Rows and documents. A document longer than a row continues into later samples. Each row's
document boundaries are cut at the row start: the continued piece is its own segment for the
attention mask (`cu_seqlens`) and its RoPE positions restart at 0 (`llama3hp.model.rope.document_positions`). Pieces
that are not contiguous in the text (after a seq_len change) also start a new segment.

Data parallel. Global rows are assigned to datasets by the greedy blend; each call takes the next
rows * dp_size global rows and rank r gets the contiguous slice [r*rows, (r+1)*rows).

Resume. `state_dict()` records the global row position, per-dataset counts and the seq_len history;
`load_state_dict()` replays it (cheap: only rounds touched by a seq_len change are built) so the
resumed loader yields exactly the rows the uninterrupted one would. Indices are rebuilt rather
than cached on disk: they are a few numpy passes over the document lengths.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llama3hp.data.batch import Batch
from llama3hp.data.blend import Blend, parse_dataset_spec, resolve_weights
from llama3hp.data.errors import DataError, check_dp_slice
from llama3hp.data.examples import ExampleLoader
from llama3hp.data.indices import DOC_SHUFFLE, SAMPLE_SHUFFLE, build_sample_idx, seeded_permutation
from llama3hp.data.shards import TokenDataset
from llama3hp.data.tokenizer import tokenizer_file_sha256
from llama3hp.errors import ConfigError

__all__ = ["DataConfig", "Batch", "PackedLoader", "build_loader"]

STATE_VERSION = 1


@dataclass
class DataConfig:
    """What the loader reads and how it shuffles."""

    # Prepared dataset directories, each "path" or "path:weight"; weights are normalised, and when
    # none is given the datasets are mixed in proportion to their token counts.
    datasets: list[str] = field(default_factory=list)
    # Seeds every document and sample shuffle; the same seed gives the same rows.
    seed: int = 0
    # Tokenizer the run uses (None: the packaged Llama 3 one); every dataset must have been
    # prepared with it (checked by sha256).
    tokenizer_path: str | None = None
    # Hash every shard on open and compare with the manifest (reads the whole dataset once).
    verify_checksums: bool = False
    # Post-training data (prepared with --format sft|preference; `llama3hp.data.examples`):
    # how a preference pair is packed: "shared_prompt" ([prompt | chosen | rejected], the prompt
    # computed once) or "separate" ([prompt chosen] [prompt rejected]).
    pack_pairs: str = "shared_prompt"
    # An example longer than a row: "truncate" (the conversation, or the longer response) or "drop".
    too_long: str = "truncate"

    def validate(self) -> None:
        for name, value, choices in (
            ("pack_pairs", self.pack_pairs, ("shared_prompt", "separate")),
            ("too_long", self.too_long, ("truncate", "drop")),
        ):
            if value not in choices:
                raise ConfigError(f"data.{name} must be one of {', '.join(choices)}, got '{value}'")


class _Epochs:
    """Seeded document order of each epoch and where each document starts in the epoch's stream."""

    def __init__(self, ds: TokenDataset, seed: int, ds_index: int):
        self.ds, self.seed, self.ds_index = ds, seed, ds_index
        self.n_pairs = ds.n_tokens - 1  # pairs per epoch stream
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(doc_idx int64 [n_docs], starts int64 [n_docs + 1]) of `epoch`."""
        if epoch in self._cache:
            self._cache.move_to_end(epoch)
            return self._cache[epoch]
        doc_idx = seeded_permutation(self.ds.n_docs, self.seed, self.ds_index, DOC_SHUFFLE, epoch)
        starts = np.concatenate([[0], np.cumsum(self.ds.doc_lens[doc_idx])]).astype(np.int64)
        self._cache[epoch] = (doc_idx, starts)
        if len(self._cache) > 3:
            self._cache.popitem(last=False)
        return doc_idx, starts


def _merge(pieces: np.ndarray) -> np.ndarray:
    """Join consecutive pieces (epoch, a, b) that continue each other in the same epoch stream."""
    if len(pieces) < 2:
        return pieces
    cont = (pieces[1:, 0] == pieces[:-1, 0]) & (pieces[1:, 1] == pieces[:-1, 2])
    first = np.concatenate([[True], ~cont])
    out = pieces[first].copy()
    last = np.concatenate([np.flatnonzero(first)[1:] - 1, [len(pieces) - 1]])
    out[:, 2] = pieces[last, 2]
    return out


class _Round:
    """One shuffle's worth of samples over `pieces` int64 [n, 3] = (epoch, first pair, end pair)."""

    def __init__(self, pieces: np.ndarray, seq_len: int, number: int, epochs: _Epochs):
        self.pieces = pieces
        self.seq_len = seq_len
        self.number = number
        self.epochs = epochs
        self.piece_pairs = pieces[:, 2] - pieces[:, 1]
        self.n_pairs = int(self.piece_pairs.sum())
        self.n_samples = self.n_pairs // seq_len
        self._built = False

    def _build(self) -> None:
        # Segments: the pieces resolved into runs of pairs whose input tokens lie in one document.
        pieces = self.pieces
        n = len(pieces)
        k0 = np.empty(n, np.int64)
        k1 = np.empty(n, np.int64)
        for e in np.unique(pieces[:, 0]):
            m = pieces[:, 0] == e
            _, starts = self.epochs.get(int(e))
            k0[m] = np.searchsorted(starts, pieces[m, 1], side="right") - 1
            k1[m] = np.searchsorted(starts, pieces[m, 2] - 1, side="right") - 1
        counts = k1 - k0 + 1
        offsets = np.concatenate([[0], np.cumsum(counts)])
        piece_of = np.repeat(np.arange(n), counts)
        k = k0[piece_of] + np.arange(offsets[-1]) - offsets[piece_of]
        seg_epoch = pieces[piece_of, 0]
        self.seg_doc = np.empty_like(k)
        self.seg_start = np.empty_like(k)
        self.seg_pairs = np.empty_like(k)
        self.seg_next = np.empty_like(k)
        for e in np.unique(seg_epoch):
            m = seg_epoch == e
            doc_idx, starts = self.epochs.get(int(e))
            kk = k[m]
            lo, hi = starts[kk], starts[kk + 1]
            a = np.maximum(pieces[piece_of[m], 1], lo)
            b = np.minimum(pieces[piece_of[m], 2], hi)
            self.seg_doc[m] = doc_idx[kk]
            self.seg_start[m] = a - lo
            self.seg_pairs[m] = b - a
            # The target of a document's last token is the next document's first token.
            self.seg_next[m] = np.where(
                kk + 1 < doc_idx.size, doc_idx[np.minimum(kk + 1, doc_idx.size - 1)], -1
            )
        self.sample_idx = build_sample_idx(self.seg_pairs, self.seq_len)
        self.shuffle_idx = seeded_permutation(
            self.n_samples, self.epochs.seed, self.epochs.ds_index, SAMPLE_SHUFFLE, self.number
        )
        self._built = True

    def fetch(self, i: int, inputs: np.ndarray, targets: np.ndarray) -> list[int]:
        """Fill inputs/targets [T] with shuffled sample i; returns the segment starts inside the row."""
        if not self._built:
            self._build()
        ds = self.epochs.ds
        k, o = (int(x) for x in self.sample_idx[self.shuffle_idx[i]])
        T, pos, starts = self.seq_len, 0, [0]
        while pos < T:
            if pos > 0:
                starts.append(pos)
            doc, first = int(self.seg_doc[k]), int(self.seg_start[k]) + o
            m = min(int(self.seg_pairs[k]) - o, T - pos)
            n_doc = int(ds.doc_lens[doc])
            inputs[pos : pos + m] = ds.doc_tokens(doc, first, first + m)
            if first + m < n_doc:
                targets[pos : pos + m] = ds.doc_tokens(doc, first + 1, first + m + 1)
            else:
                targets[pos : pos + m - 1] = ds.doc_tokens(doc, first + 1, n_doc)
                targets[pos + m - 1] = ds.doc_tokens(int(self.seg_next[k]), 0, 1)[0]
            pos += m
            k, o = k + 1, 0
        return starts

    def slice_pieces(self, ranges: np.ndarray) -> np.ndarray:
        """Pieces covering virtual pair ranges int64 [r, 2] (sorted, disjoint) of this round."""
        if len(ranges) == 0:
            return np.zeros((0, 3), np.int64)
        voff = np.concatenate([[0], np.cumsum(self.piece_pairs)])
        j0 = np.searchsorted(voff, ranges[:, 0], side="right") - 1
        j1 = np.searchsorted(voff, ranges[:, 1] - 1, side="right") - 1
        counts = j1 - j0 + 1
        offsets = np.concatenate([[0], np.cumsum(counts)])
        range_of = np.repeat(np.arange(len(ranges)), counts)
        j = j0[range_of] + np.arange(offsets[-1]) - offsets[range_of]
        a = np.maximum(ranges[range_of, 0], voff[j]) - voff[j] + self.pieces[j, 1]
        b = np.minimum(ranges[range_of, 1], voff[j + 1]) - voff[j] + self.pieces[j, 1]
        out = np.stack([self.pieces[j, 0], a, b], axis=1)
        return _merge(out[b > a])

    def leftover(self) -> np.ndarray:
        """Pieces of the pairs past the last full sample."""
        if self.n_samples * self.seq_len == self.n_pairs:
            return np.zeros((0, 3), np.int64)
        return self.slice_pieces(np.array([[self.n_samples * self.seq_len, self.n_pairs]], np.int64))

    def unserved(self, served: int) -> np.ndarray:
        """Pieces of every pair not yet served after `served` samples, in stream order, leftover included."""
        if served == 0:
            return self.pieces
        if not self._built:
            self._build()
        ids = np.sort(self.shuffle_idx[served:])
        T = self.seq_len
        if ids.size:
            brk = np.flatnonzero(np.diff(ids) != 1) + 1
            run_lo = ids[np.concatenate([[0], brk])]
            run_hi = ids[np.concatenate([brk - 1, [ids.size - 1]])] + 1
            ranges = np.stack([run_lo * T, run_hi * T], axis=1)
        else:
            ranges = np.zeros((0, 2), np.int64)
        if self.n_samples * T < self.n_pairs:
            tail = np.array([[self.n_samples * T, self.n_pairs]], np.int64)
            if len(ranges) and ranges[-1, 1] == tail[0, 0]:
                ranges[-1, 1] = tail[0, 1]
            else:
                ranges = np.concatenate([ranges, tail])
        return self.slice_pieces(ranges.astype(np.int64))


class _Cursor:
    """One dataset's position in its sequence of rounds."""

    def __init__(self, ds: TokenDataset, seed: int, ds_index: int):
        if ds.n_tokens < 2:
            raise DataError(
                f"dataset {ds.path} has fewer than 2 tokens; it cannot supply (input, target) pairs"
            )
        self.epochs = _Epochs(ds, seed, ds_index)
        self.seq_len: int | None = None
        self.round: _Round | None = None
        self.served = 0  # samples of `round` already taken
        self.next_epoch = 0
        self.round_no = -1
        self.total = 0  # samples taken over the cursor's life (the blend's per-dataset count)

    def _new_round(self, pieces: np.ndarray) -> None:
        assert self.seq_len is not None
        self.round_no += 1
        self.round = _Round(pieces, self.seq_len, self.round_no, self.epochs)
        self.served = 0

    def _advance_round(self) -> None:
        fresh = np.array([[self.next_epoch, 0, self.epochs.n_pairs]], np.int64)
        self.next_epoch += 1
        leftover = self.round.leftover() if self.round is not None else np.zeros((0, 3), np.int64)
        self._new_round(np.concatenate([fresh, leftover]))

    def set_seq_len(self, seq_len: int) -> None:
        if seq_len == self.seq_len:
            return
        old, self.seq_len = self.round, seq_len
        if old is not None:
            self._new_round(old.unserved(self.served))

    def take(self, n: int, keep: bool = True) -> list[tuple[_Round, int]]:
        """The next n samples as (round, shuffled index) references (none kept if not `keep`)."""
        refs: list[tuple[_Round, int]] = []
        self.total += n
        while n > 0:
            if self.round is None or self.served == self.round.n_samples:
                self._advance_round()
                continue
            k = min(n, self.round.n_samples - self.served)
            if keep:
                refs.extend((self.round, i) for i in range(self.served, self.served + k))
            self.served += k
            n -= k
        return refs


class PackedLoader:
    """Yields this data-parallel rank's packed rows of a seeded blend of datasets."""

    def __init__(
        self,
        datasets: list[TokenDataset],
        weights: np.ndarray,
        *,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be a non-negative int, got {seed!r}")
        if len(datasets) != len(weights) or not datasets:
            raise DataError("give at least one dataset and one weight per dataset")
        self.datasets = datasets
        self.weights = np.asarray(weights, dtype=np.float64)
        self.seed = seed
        self.set_data_parallel(dp_rank, dp_size)
        self._reset()

    def _reset(self) -> None:
        self.blend = Blend(self.weights)
        self.cursors = [_Cursor(ds, self.seed, i) for i, ds in enumerate(self.datasets)]
        self.seq_len: int | None = None
        self.history: list[dict[str, Any]] = []  # seq_len changes: {"seq_len", "counts" at the change}

    def set_data_parallel(self, dp_rank: int, dp_size: int) -> None:
        """Serve another data-parallel slice from the next call on (a mesh re-planned at a stage
        boundary): the state is global, so the position stays exact."""
        check_dp_slice(dp_rank, dp_size)
        self.dp_rank, self.dp_size = dp_rank, dp_size

    @property
    def position(self) -> int:
        """Global rows served so far (all ranks)."""
        return self.blend.position

    def _set_seq_len(self, seq_len: int) -> None:
        if seq_len != self.seq_len:
            self.history.append({"seq_len": seq_len, "counts": self.blend.counts.tolist()})
            self.seq_len = seq_len
            for c in self.cursors:
                c.set_seq_len(seq_len)

    def next_batch(self, rows: int, seq_len: int) -> Batch:
        """This rank's `rows` rows of the next rows * dp_size global rows, each seq_len pairs long."""
        if rows < 1 or seq_len < 1:
            raise DataError(f"rows and seq_len must be >= 1, got rows={rows} seq_len={seq_len}")
        self._set_seq_len(seq_len)
        ds_idx, _ = self.blend.take(rows * self.dp_size)
        mine = range(self.dp_rank * rows, (self.dp_rank + 1) * rows)
        refs: list[tuple[_Round, int] | None] = [None] * rows
        for d, cursor in enumerate(self.cursors):
            where = np.flatnonzero(ds_idx == d)
            if where.size == 0:
                continue
            lo = int(np.searchsorted(where, mine.start))
            hi = int(np.searchsorted(where, mine.stop))
            cursor.take(lo, keep=False)
            for slot, ref in zip(where[lo:hi], cursor.take(hi - lo)):
                refs[int(slot) - mine.start] = ref
            cursor.take(where.size - hi, keep=False)
        inputs = np.empty((rows, seq_len), np.int64)
        targets = np.empty((rows, seq_len), np.int64)
        cu: list[int] = []
        for r, slot in enumerate(refs):
            assert slot is not None
            rnd, i = slot
            cu.extend(r * seq_len + s for s in rnd.fetch(i, inputs[r], targets[r]))
        cu.append(rows * seq_len)
        cu_arr = np.asarray(cu, dtype=np.int32)
        return Batch(
            inputs=torch.from_numpy(inputs),
            targets=torch.from_numpy(targets),
            cu_seqlens=torch.from_numpy(cu_arr),
            max_seqlen=int(np.diff(cu_arr).max()),
        )

    def _identity(self) -> list[dict[str, Any]]:
        return [
            {"path": str(ds.path), "weight": float(w), "n_tokens": ds.n_tokens}
            for ds, w in zip(self.datasets, self.weights)
        ]

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-serialisable state: position, per-dataset counts, seq_len history."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "datasets": self._identity(),
            "counts": self.blend.counts.tolist(),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a `state_dict()`; the next rows equal those the saved loader would have yielded."""
        if not isinstance(sd, dict) or sd.get("version") != STATE_VERSION:
            raise DataError(
                f"loader state has version {sd.get('version') if isinstance(sd, dict) else sd!r}, expected {STATE_VERSION}"
            )
        if sd["seed"] != self.seed:
            raise DataError(
                f"loader state was saved with seed {sd['seed']} but this loader uses {self.seed}; use the same seed"
            )
        ident = self._identity()
        saved = sd["datasets"]
        if len(saved) != len(ident) or any(
            a["n_tokens"] != b["n_tokens"] or abs(a["weight"] - b["weight"]) > 1e-12
            for a, b in zip(saved, ident)
        ):
            raise DataError(
                "loader state was saved for different datasets or weights; resume with the same data config"
            )
        self._reset()
        for h in sd["history"]:
            for c, target in zip(self.cursors, h["counts"]):
                c.take(target - c.total, keep=False)
            self.seq_len = int(h["seq_len"])
            for c in self.cursors:
                c.set_seq_len(self.seq_len)
            self.history.append({"seq_len": self.seq_len, "counts": list(h["counts"])})
        for c, target in zip(self.cursors, sd["counts"]):
            c.take(target - c.total, keep=False)
        self.blend = Blend(self.weights, np.asarray(sd["counts"], dtype=np.int64))


def build_loader(
    cfg: DataConfig,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    tokenizer_sha256: str | None = None,
    ranked: bool = False,
) -> PackedLoader | ExampleLoader:
    """Open cfg.datasets (checked against the run's tokenizer) and return this rank's loader: the
    packed token stream for pre-training data, whole examples for post-training data (`kind` in the
    manifest: sft, preference).

    `tokenizer_sha256` defaults to the sha256 of cfg.tokenizer_path (the packaged Llama 3 file when None).
    `ranked`: preference rows with an edited response are read as the ranking edited > chosen >
    rejected (a reward model's data); otherwise as (chosen, rejected).
    """
    if not cfg.datasets:
        raise DataError(
            "DataConfig.datasets is empty; list prepared dataset directories ('path' or 'path:weight')"
        )
    specs = [parse_dataset_spec(s) for s in cfg.datasets]
    expected = tokenizer_sha256 or tokenizer_file_sha256(cfg.tokenizer_path)
    datasets = [TokenDataset(s.path, tokenizer_sha256=expected, verify=cfg.verify_checksums) for s in specs]
    if any(ds.kind != "pretrain" for ds in datasets):
        if any(s.weight is not None for s in specs):
            raise DataError(
                "post-training datasets are read whole, in turn: drop the ':weight' of data.datasets"
            )
        return ExampleLoader(
            datasets, seed=cfg.seed, dp_rank=dp_rank, dp_size=dp_size, pack_pairs=cfg.pack_pairs,
            too_long=cfg.too_long, ranked=ranked,
        )  # fmt: skip
    weights = resolve_weights(specs, [ds.n_tokens for ds in datasets])
    return PackedLoader(datasets, weights, seed=cfg.seed, dp_rank=dp_rank, dp_size=dp_size)
