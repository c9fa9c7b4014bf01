"""Post-training loader: whole examples (SFT conversations, preference pairs) packed into rows.

Unlike pre-training's token stream (`llama3hp.data.loader`), an example is never split across rows:
the DPO loss needs each response whole, and SFT trains each reply after its prompt. Per epoch the
examples of every dataset (concatenated in the order given) are shuffled with a seeded permutation
and packed greedily in that order: an example goes into the current row if it fits, else the row is
padded and a new one starts. Each example is one or more segments of `cu_seqlens` (the document
mask keeps them apart) and `loss_mask` marks the targets a masked objective trains (the response
tokens; `format_mask` those of them that are formatting).

Preference pairs (`pack_pairs`):
- "shared_prompt": [prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected] as three segments, the
  two responses naming the first as their shared prefix (`Batch.doc_prefix`): the prompt is
  computed once, the rejected tokens never see the chosen ones, and positions continue after the
  prompt for each response. The prompt's last token (the blank line closing the assistant header)
  starts each response so that it predicts the response's first token;
- "separate": [prompt chosen] and [prompt rejected] as two segments (the prompt computed twice).
`Batch.pairs` holds each pair's (chosen, rejected) segments and `Batch.pair_ids` its sample id.

Rankings (`ranked`, what a reward model reads): a row with an "edited" response is the ranking
edited > chosen > rejected, packed as one example [prompt[:-1] | edited | chosen | rejected] (each
response sharing the prompt, or each after its own copy of it) and expanded into its three ordered
pairs (edited, chosen), (edited, rejected), (chosen, rejected); rows without one stay pairs.

An example longer than a row (`too_long`): "truncate" cuts the conversation at the row length (an
SFT conversation whose kept part trains nothing is dropped) or shortens the longer response of a
pair (the longest response of a ranking, in turn) until it fits, keeping at least one token of each;
"drop" skips it. Either way the
counts are reported once per row length (`too_long_report`).

Data parallelism and resume: the loader packs GLOBAL rows, rank r taking rows [r*rows, (r+1)*rows)
of each step's rows * dp_size; its state is (epoch, next example), so `load_state_dict` resumes on
the next row exactly, whatever the batch shape.

Shapes: B rows per rank, T = seq_len.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llama3hp.data.batch import IGNORE_INDEX, Batch
from llama3hp.data.chat import FORMAT
from llama3hp.data.errors import DataError, check_dp_slice
from llama3hp.data.indices import DOC_SHUFFLE, seeded_permutation
from llama3hp.data.shards import TokenDataset

log = logging.getLogger(__name__)
STATE_VERSION = 1
PACK_PAIRS = ("shared_prompt", "separate")
TOO_LONG = ("truncate", "drop")
PAD_ID = 128004  # <|finetune_right_pad_id|>: padding inputs, never a target


@dataclass
class Segment:
    """One segment of a row: its tokens and roles (uint8) and, for a response, its rank."""

    ids: np.ndarray
    roles: np.ndarray
    prefix: int = -1  # index (within the example) of the segment it shares as prefix
    last_target: int = IGNORE_INDEX  # the target of its last token (the next token, when it continues)
    rank: int = -1  # a response's place in its example's ranking (0 = best); -1: not a response


def response_segments(p_ids, p_roles, responses, shared_prompt: bool) -> list[Segment]:
    """A ranked example's segments (module docstring): [prompt[:-1]], then [prompt[-1] response] for
    each of `responses` (a list of (ids, roles) arrays, best first) with the first segment as their
    shared prefix; or [prompt response] for each. Response i gets rank i."""
    if shared_prompt:
        last_id, last_role = p_ids[-1:], p_roles[-1:]
        return [Segment(p_ids[:-1], p_roles[:-1], last_target=int(p_ids[-1]))] + [
            Segment(np.concatenate([last_id, ids]), np.concatenate([last_role, roles]), prefix=0, rank=i)
            for i, (ids, roles) in enumerate(responses)
        ]
    return [
        Segment(np.concatenate([p_ids, ids]), np.concatenate([p_roles, roles]), rank=i)
        for i, (ids, roles) in enumerate(responses)
    ]


def pair_segments(p_ids, p_roles, c_ids, c_roles, r_ids, r_roles, shared_prompt: bool) -> list[Segment]:
    """A pair's segments: [prompt[:-1]], [prompt[-1] chosen], [prompt[-1] rejected] with the first
    shared by the others, or [prompt chosen], [prompt rejected]. Arrays of ids and roles."""
    return response_segments(p_ids, p_roles, [(c_ids, c_roles), (r_ids, r_roles)], shared_prompt)


def fit_lengths(fixed: int, lengths: list[int], seq_len: int) -> list[int]:
    """Response lengths that fit `fixed` + their sum into seq_len, shortening the longest (the first
    of equals) in turn and keeping at least one token of each; the sum may still not fit."""
    lengths = list(lengths)
    while fixed + sum(lengths) > seq_len and max(lengths) > 1:
        i = lengths.index(max(lengths))
        lengths[i] = max(1, lengths[i] - (fixed + sum(lengths) - seq_len))
    return lengths


class ExampleLoader:
    """Yields this data-parallel rank's rows of whole post-training examples (module docstring)."""

    def __init__(
        self,
        datasets: list[TokenDataset],
        *,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        pack_pairs: str = "shared_prompt",
        too_long: str = "truncate",
        ranked: bool = False,
    ):
        kinds = {ds.kind for ds in datasets}
        if len(kinds) != 1 or kinds & {"pretrain"}:
            raise DataError(
                f"an example loader reads sft or preference datasets of one kind, got {sorted(kinds)}: "
                "prepare them with --format sft|preference"
            )
        if pack_pairs not in PACK_PAIRS or too_long not in TOO_LONG:
            raise DataError(
                f"data.pack_pairs must be one of {PACK_PAIRS} and data.too_long one of {TOO_LONG}"
            )
        self.datasets, self.kind = datasets, kinds.pop()
        self.seed = seed
        self.set_data_parallel(dp_rank, dp_size)
        self.pack_pairs, self.too_long, self.ranked = pack_pairs, too_long, ranked
        # Example e is document local[e] of dataset which[e].
        self.which = np.concatenate([np.full(ds.n_docs, i, np.int64) for i, ds in enumerate(datasets)])
        self.local = np.concatenate([np.arange(ds.n_docs, dtype=np.int64) for ds in datasets])
        self.n_examples = int(self.which.size)
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)
        self.reports: dict[int, dict[str, int]] = {}  # seq_len -> {"truncated", "dropped"}

    # ------------------------------------------------------------------ examples
    def _permutation(self, epoch: int) -> np.ndarray:
        return seeded_permutation(self.n_examples, self.seed, 0, DOC_SHUFFLE, epoch)

    def example(self, e: int, seq_len: int) -> tuple[list[Segment], int | None] | None:
        """Example e as segments fitting seq_len (None: dropped) and its sample id (pairs)."""
        ds, doc = self.datasets[int(self.which[e])], int(self.local[e])
        ids = np.asarray(ds.doc_tokens(doc), dtype=np.int64)
        roles = np.asarray(ds.doc_roles(doc), dtype=np.uint8)
        if self.kind == "sft":
            if ids.size > seq_len:
                if self.too_long == "drop" or not roles[1 : seq_len + 1].any():
                    return None
                ids, roles = ids[: seq_len + 1], roles[: seq_len + 1]
                # Keep seq_len + 1 tokens: the last one is only a target.
                return [Segment(ids[:seq_len], roles[:seq_len], last_target=int(ids[seq_len]))], None
            return [Segment(ids, roles)], None
        sid, P, bounds = self._parts(ds, doc)
        fixed, lengths = self._fixed(P, len(bounds)), [b - a for a, b in bounds]
        if self.too_long == "truncate":
            lengths = fit_lengths(fixed, lengths, seq_len)
        if fixed + sum(lengths) > seq_len:
            return None
        responses = [(ids[a : a + n], roles[a : a + n]) for (a, _), n in zip(bounds, lengths)]
        segs = response_segments(ids[:P], roles[:P], responses, self.pack_pairs == "shared_prompt")
        return segs, sid

    def _parts(self, ds: TokenDataset, doc: int) -> tuple[int, int, list[tuple[int, int]]]:
        """(sample id, prompt length, [(start, end)] of each response best first) of a preference
        document [prompt | chosen | rejected | edited]: (chosen, rejected), or with `ranked` and an
        edited response (edited, chosen, rejected)."""
        assert ds.pairs is not None
        sid, P, C, R = (int(x) for x in ds.pairs[doc])
        E = int(ds.doc_lens[doc]) - P - C - R
        bounds = [(P, P + C), (P + C, P + C + R)]
        if self.ranked and E > 0:
            bounds.insert(0, (P + C + R, P + C + R + E))
        return sid, P, bounds

    def _fixed(self, P: int, k: int) -> int:
        """Tokens of an example of prompt length P and k responses that are not response tokens."""
        return P + 1 if self.pack_pairs == "shared_prompt" else k * P

    def example_length(self, e: int, seq_len: int) -> int | None:
        got = self.example(e, seq_len)
        return None if got is None else sum(s.ids.size for s in got[0])

    def too_long_report(self, seq_len: int) -> dict[str, int]:
        """{"examples", "truncated", "dropped"} at this row length (computed once per length)."""
        if seq_len not in self.reports:
            truncated = dropped = 0
            for e in range(self.n_examples):
                ds, doc = self.datasets[int(self.which[e])], int(self.local[e])
                n = int(ds.doc_lens[doc])
                if self.kind == "preference":
                    _, P, bounds = self._parts(ds, doc)
                    n = self._fixed(P, len(bounds)) + sum(b - a for a, b in bounds)
                if n > seq_len:
                    if self.example(e, seq_len) is None:
                        dropped += 1
                    else:
                        truncated += 1
            self.reports[seq_len] = {"examples": self.n_examples, "truncated": truncated, "dropped": dropped}
        return self.reports[seq_len]

    # ------------------------------------------------------------------ rows
    def _next_example(self) -> int:
        if self.cursor == self.n_examples:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        e = int(self._order[self.cursor])
        self.cursor += 1
        return e

    def _pack_rows(self, n_rows: int, seq_len: int, take) -> tuple[list[list], bool]:
        """n_rows rows of examples drawn from take() (an example index, None when there are no more),
        each row filled greedily up to seq_len. Returns (rows, whether the last example taken did not
        fit and is left for the caller to give back); rows past the end of take() are empty."""
        rows: list[list] = []
        pending, drops = None, 0
        while len(rows) < n_rows:
            row, used = [], 0
            while True:
                if pending is None:
                    e = take()
                    if e is None:
                        break
                    pending = self.example(e, seq_len)
                    if pending is None:  # too long and dropped
                        drops += 1
                        if drops > self.n_examples:
                            raise DataError(
                                f"no example fits a row of {seq_len} tokens: raise training.seq_len or set "
                                "data.too_long=truncate"
                            )
                        continue
                n = sum(s.ids.size for s in pending[0])
                if used + n > seq_len:
                    break
                row.append(pending)
                used += n
                pending = None
            rows.append(row)
        return rows, pending is not None

    def _build(self, rows: list[list], seq_len: int) -> Batch:
        return build_batch(
            rows,
            seq_len,
            preference=self.kind == "preference",
            shared_prompt=self.pack_pairs == "shared_prompt",
        )

    def next_batch(self, rows: int, seq_len: int) -> Batch:
        """This rank's `rows` rows of the next rows * dp_size global rows (epochs roll over)."""
        if rows < 1 or seq_len < 2:
            raise DataError(f"rows must be >= 1 and seq_len >= 2, got rows={rows} seq_len={seq_len}")
        if seq_len not in self.reports:
            r = self.too_long_report(seq_len)
            if self.dp_rank == 0 and (r["truncated"] or r["dropped"]):
                log.warning(
                    "%d of %d examples are longer than a row of %d tokens: %d truncated, %d dropped (data.too_long=%s)",
                    r["truncated"] + r["dropped"], r["examples"], seq_len, r["truncated"], r["dropped"], self.too_long,
                )  # fmt: skip
        packed, left = self._pack_rows(rows * self.dp_size, seq_len, self._next_example)
        if left:  # the example that did not fit starts the next call's rows
            self.cursor -= 1
        return self._build(packed[self.dp_rank * rows : (self.dp_rank + 1) * rows], seq_len)

    def epoch_batches(self, rows: int, seq_len: int, limit: int | None = None) -> list[Batch]:
        """Every example (the first `limit`) once, in dataset order, as this rank's batches of `rows`
        rows (the last global rows padded with empty rows so every rank gets as many batches): for
        held-out evaluation and the reference's pass. Leaves the training position untouched."""
        per_step = rows * self.dp_size
        queue = deque(range(self.n_examples if limit is None else min(limit, self.n_examples)))
        last: list[int] = []

        def take() -> int | None:
            if not queue:
                return None
            last.append(queue.popleft())
            return last[-1]

        all_rows: list[list] = []
        while queue:
            got, left = self._pack_rows(per_step, seq_len, take)
            if left:  # did not fit the last row: it starts the next ones
                queue.appendleft(last[-1])
            all_rows += [r for r in got if r]
        all_rows += [[]] * (-len(all_rows) % per_step)
        return [
            self._build(all_rows[g + self.dp_rank * rows : g + (self.dp_rank + 1) * rows], seq_len)
            for g in range(0, len(all_rows), per_step)
        ]

    def set_data_parallel(self, dp_rank: int, dp_size: int) -> None:
        """Serve another data-parallel slice from the next call on (a mesh re-planned at a stage
        boundary): every rank packs the same global rows, so the position stays exact."""
        check_dp_slice(dp_rank, dp_size)
        self.dp_rank, self.dp_size = dp_rank, dp_size

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "examples", "seed": self.seed, "n_examples": self.n_examples,
                "epoch": self.epoch, "cursor": self.cursor}  # fmt: skip

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if not isinstance(sd, dict) or sd.get("kind") != "examples" or sd.get("version") != STATE_VERSION:
            raise DataError("loader state is not an example loader's: resume with the same data config")
        if sd["seed"] != self.seed or sd["n_examples"] != self.n_examples:
            raise DataError(
                "loader state was saved for other data or another seed; resume with the same data config"
            )
        self.epoch, self.cursor = int(sd["epoch"]), int(sd["cursor"])
        self._order = self._permutation(self.epoch)


def build_batch(
    rows: list[list[tuple[list[Segment], int | None]]],
    seq_len: int,
    *,
    preference: bool,
    shared_prompt: bool,
    pad_id: int = PAD_ID,
) -> Batch:
    """The Batch of packed rows: each row a list of examples (segments, sample id or None), padded to
    seq_len with pad_id; with preference, each example's responses (the segments with a rank) give
    every ordered pair (better, worse): (chosen, rejected), or the k(k-1)/2 pairs of a ranking."""
    B, T = len(rows), seq_len
    inputs = np.full((B, T), pad_id, np.int64)
    targets = np.full((B, T), IGNORE_INDEX, np.int64)
    loss_mask = np.zeros((B, T), bool)
    format_mask = np.zeros((B, T), bool)
    cu, prefix, pairs, pair_ids = [0], [], [], []
    for r, row in enumerate(rows):
        pos = 0
        for segs, sid in row:
            first = len(cu) - 1
            for s in segs:
                n = s.ids.size
                inputs[r, pos : pos + n] = s.ids
                targets[r, pos : pos + n - 1] = s.ids[1:]
                targets[r, pos + n - 1] = s.last_target
                trained = s.roles[1:] != 0
                loss_mask[r, pos : pos + n - 1] = trained
                format_mask[r, pos : pos + n - 1] = s.roles[1:] == FORMAT
                prefix.append(first + s.prefix if s.prefix >= 0 else -1)
                pos += n
                cu.append(r * T + pos)
            if sid is not None:  # every ordered pair of its responses, (better, worse)
                ranked = sorted((s.rank, first + i) for i, s in enumerate(segs) if s.rank >= 0)
                for i, (_, better) in enumerate(ranked):
                    for _, worse in ranked[i + 1 :]:
                        pairs.append((better, worse))
                        pair_ids.append(sid)
        if pos < T:  # padding: a segment of its own, never trained
            prefix.append(-1)
            cu.append((r + 1) * T)
    cu_arr = np.asarray(cu, dtype=np.int32)
    shared = preference and shared_prompt
    return Batch(
        inputs=torch.from_numpy(inputs),
        targets=torch.from_numpy(targets),
        cu_seqlens=torch.from_numpy(cu_arr),
        max_seqlen=int(np.diff(cu_arr).max()),
        loss_mask=torch.from_numpy(loss_mask),
        doc_prefix=torch.tensor(prefix, dtype=torch.int32) if shared else None,
        format_mask=torch.from_numpy(format_mask),
        pairs=torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2) if preference else None,
        pair_ids=torch.tensor(pair_ids, dtype=torch.int64) if preference else None,
    )
