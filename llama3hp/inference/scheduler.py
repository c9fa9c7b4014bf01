"""Continuous batching: which tokens each step runs, decided again before every step.

Iteration-level scheduling (Orca, vLLM): a step is one forward over a packed batch of
- one decode token for every running sequence (they always run: their memory was reserved when
  they were admitted), then
- prefill chunks of admitted prompts, up to `max_num_batched_tokens` tokens in the step: a prompt
  longer than what is left of the budget is prefilled in chunks over several steps, and several
  short prompts share one step (packed as segments of the varlen attention).
New requests are admitted at every step, first come first served, when their sequences fit under
`max_num_seqs` and the KV blocks of their prompt plus max_tokens (for all n samples) can be
reserved; a request that does not fit waits (no later request overtakes it). Finished and aborted
sequences leave at the step they finish and their blocks are freed at once.

A prompt is prefilled once; when its last chunk runs, its n samples are drawn from the same
logits and it forks into n sequences sharing the prompt's blocks (copy-on-write, kv_cache.py).

Shape legend: N tokens of a step, S decode sequences, P block-table width, C prefill chunks.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from llama3hp.inference.kv_cache import BLOCK_SIZE, BlockAllocator, blocks_for
from llama3hp.inference.sampling import SamplingParams


@dataclass
class Sequence:
    """One sample of a request: its tokens (prompt + generated) and its blocks."""

    request: Request
    index: int
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    n_cached: int = 0  # tokens whose K/V are in the cache
    generator: torch.Generator | None = None
    finish_reason: str | None = None

    @property
    def n_out(self) -> int:
        return len(self.tokens) - self.request.n_prompt

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)  # one until the prompt is prefilled, then n
    reserved: int = 0  # blocks promised to this request and not yet taken
    first_token_time: float | None = None
    aborted: bool = False
    reported: bool = False  # counted as finished in the engine's stats
    generators: list[torch.Generator | None] = field(default_factory=list)  # one per sample

    @property
    def n_prompt(self) -> int:
        return len(self.prompt)

    def blocks_needed(self) -> int:
        """Every block the request can ever hold: the prompt's full blocks (shared by the samples)
        and, per sample, the rest up to prompt + max_tokens (the shared partial block included:
        copy-on-write gives each sample its own)."""
        shared = self.n_prompt // BLOCK_SIZE
        own = blocks_for(self.n_prompt + self.params.max_tokens) - shared
        return shared + self.params.n * own


@dataclass
class Chunk:
    """A prefill chunk: tokens [start, start + length) of a prompt."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes(self) -> bool:
        return self.start + self.length == self.seq.request.n_prompt


@dataclass
class Plan:
    """One step: the decode sequences, the prefill chunks and the copy-on-write block copies to
    make before the forward."""

    decode: list[Sequence]
    chunks: list[Chunk]
    copies: list[tuple[int, int]]

    def __bool__(self) -> bool:
        return bool(self.decode or self.chunks)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256  # sequences decoding at once
    max_num_batched_tokens: int = 2048  # tokens in one step: decode tokens + prefill chunks


class Scheduler:
    """Waiting requests, prompts being prefilled, running sequences; `schedule` and `update`."""

    def __init__(self, allocator: BlockAllocator, config: SchedulerConfig):
        if config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError(
                "max_num_batched_tokens must be >= max_num_seqs (every running sequence decodes)"
            )
        self.allocator, self.config = allocator, config
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Sequence] = []

    # ---------------------------------------------------------------- state

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def requests(self) -> list[Request]:
        seen: dict[str, Request] = {r.id: r for r in [*self.waiting, *self.prefilling]}
        for s in self.running:
            seen.setdefault(s.request.id, s.request)
        return list(seen.values())

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def abort(self, request_id: str, index: int | None = None) -> list[Sequence]:
        """Finish a request's sequences (all, or sample `index`) as "abort"; frees their blocks now.
        Returns the sequences it finished."""
        done = []
        for req in list(self.waiting):
            if req.id == request_id and index is None:
                self.waiting.remove(req)
                req.aborted = True
        for req in list(self.prefilling):
            if req.id == request_id and index is None:
                self.prefilling.remove(req)
                req.aborted = True
                done += self._finish(req.seqs[0], "abort")
        for seq in list(self.running):
            if seq.request.id == request_id and (index is None or seq.index == index):
                if index is None:
                    seq.request.aborted = True
                done += self._finish(seq, "abort")
        return done

    # ---------------------------------------------------------------- one step

    def schedule(self) -> Plan:
        plan = Plan(list(self.running), [], [])
        for seq in plan.decode:
            self._slot_for_next_token(seq, plan.copies)
        budget = self.config.max_num_batched_tokens - len(plan.decode)
        for req in self.prefilling:
            if budget <= 0:
                break
            budget -= self._chunk(req, budget, plan)
        n_seqs = len(self.running) + sum(r.params.n for r in self.prefilling)
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if n_seqs + req.params.n > self.config.max_num_seqs:
                break
            need = req.blocks_needed()
            if not self.allocator.reserve(need):
                break
            self.waiting.popleft()
            req.reserved = need
            req.generators = [req.params.generator(i) for i in range(req.params.n)]
            req.seqs = [Sequence(req, 0, list(req.prompt), generator=req.generators[0])]
            self.prefilling.append(req)
            n_seqs += req.params.n
            budget -= self._chunk(req, budget, plan)
        return plan

    def _take(self, req: Request) -> int:
        req.reserved -= 1
        return self.allocator.take()

    def _chunk(self, req: Request, budget: int, plan: Plan) -> int:
        seq = req.seqs[0]
        n = min(req.n_prompt - seq.n_cached, budget)
        while len(seq.blocks) < blocks_for(seq.n_cached + n):
            seq.blocks.append(self._take(req))
        plan.chunks.append(Chunk(seq, seq.n_cached, n))
        return n

    def _slot_for_next_token(self, seq: Sequence, copies: list[tuple[int, int]]) -> None:
        """Make the block that the sequence's newest token is written to this step its own."""
        i = (len(seq.tokens) - 1) // BLOCK_SIZE
        if i == len(seq.blocks):
            seq.blocks.append(self._take(seq.request))
        elif self.allocator.refs[seq.blocks[i]] > 1:  # shared with a sibling sample: copy on write
            new = self._take(seq.request)
            copies.append((seq.blocks[i], new))
            self.allocator.decref(seq.blocks[i])
            seq.blocks[i] = new

    def update(self, plan: Plan, tokens: list[int], stop_ids: set[int], max_model_len: int) -> list[Sequence]:
        """Apply a step's sampled tokens: one per decode sequence, then n per completed prompt, in
        `sample_rows` order. Returns the sequences that got a token (finished ones included)."""
        got: list[Sequence] = []
        it = iter(tokens)
        for seq in plan.decode:
            seq.n_cached += 1
            self._append(seq, next(it), stop_ids, max_model_len)
            got.append(seq)
        for ch in plan.chunks:
            ch.seq.n_cached += ch.length
            if not ch.completes:
                continue
            req = ch.seq.request
            self.prefilling.remove(req)
            parent = ch.seq
            for i in range(1, req.params.n):  # fork: the samples share the prompt's blocks
                for b in parent.blocks:
                    self.allocator.incref(b)
                req.seqs.append(Sequence(req, i, list(parent.tokens), list(parent.blocks), parent.n_cached,
                                         req.generators[i]))  # fmt: skip
            req.first_token_time = time.monotonic()
            for seq in req.seqs:
                self.running.append(seq)
                self._append(seq, next(it), stop_ids, max_model_len)
                got.append(seq)
        return got

    def _append(self, seq: Sequence, token: int, stop_ids: set[int], max_model_len: int) -> None:
        seq.tokens.append(token)
        p = seq.request.params
        if token in stop_ids and not p.ignore_eos:
            self._finish(seq, "stop")
        elif seq.n_out >= p.max_tokens or len(seq.tokens) >= max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> list[Sequence]:
        if seq.finished:
            return []
        seq.finish_reason = reason
        for b in seq.blocks:
            self.allocator.decref(b)
        seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)
        req = seq.request
        if all(s.finished for s in req.seqs) and (len(req.seqs) == req.params.n or reason == "abort"):
            self.allocator.release(req.reserved)
            req.reserved = 0
        return [seq]


def sample_rows(plan: Plan) -> tuple[list[int], list[SamplingParams], list[torch.Generator | None]]:
    """Per token to sample this step: the row of the step's packed tokens whose logits it comes
    from, its sampling params and its generator. A row per decode token, then the last token of
    each completed prompt, repeated for its n samples (`Scheduler.update` takes them in this order)."""
    rows: list[int] = list(range(len(plan.decode)))
    params = [s.request.params for s in plan.decode]
    gens = [s.generator for s in plan.decode]
    end = len(plan.decode)
    for ch in plan.chunks:
        end += ch.length
        if ch.completes:
            req = ch.seq.request
            rows += [end - 1] * req.params.n
            params += [req.params] * req.params.n
            gens += req.generators
    return rows, params, gens
