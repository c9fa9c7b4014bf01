"""The serving engine: requests in, one token per running sequence out, every step.

    engine = LLMEngine(model, EngineConfig(...))     # adds the paged KV cache to the model
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=64, temperature=0))
    while engine.has_work():
        for out in engine.step(): ...                # TokenOutput: request, sample, token, finish

A step (`step`): take the requests and aborts that arrived (thread-safe inbox: an HTTP server
adds and aborts from its own thread), schedule (`scheduler.py`: decode tokens + prefill chunks,
admission by reserved KV blocks), run the model once (`runner.py`), sample (`sampling.py`) and
advance the sequences. Detokenisation and stop strings are the consumer's (`detokenize.py`), so
this loop only moves token ids. `generate` is the offline form: prompts in, texts out.

Numbers it keeps for /metrics: requests, prompt and generated tokens, queue length, KV blocks in
use, time to first token and per output token.
"""

from __future__ import annotations

import math
import queue
import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from llama3hp.errors import UserError
from llama3hp.inference.attention import apply_kv_cache
from llama3hp.inference.detokenize import TextStream
from llama3hp.inference.kv_cache import BlockAllocator, KVCache, bytes_per_block
from llama3hp.inference.runner import ModelRunner, build_inputs
from llama3hp.inference.sampling import SamplingParams, sample
from llama3hp.inference.scheduler import Request, Scheduler, SchedulerConfig, sample_rows
from llama3hp.model.llama import Transformer

# <|end_of_text|>, <|eom_id|>, <|eot_id|> of the Llama 3 tokenizer (`Tokenizer.stop_tokens`).
LLAMA3_STOP_TOKENS = frozenset({128001, 128008, 128009})


class PromptTooLong(UserError, ValueError):
    """The prompt plus max_tokens exceed the model's context or the KV cache (HTTP 400)."""


class QueueFull(UserError, RuntimeError):
    """Too many requests wait for admission (HTTP 503)."""


@dataclass
class EngineConfig:
    """How the engine batches and how much memory its KV cache takes."""

    max_num_seqs: int = 256  # sequences decoding at once
    max_num_batched_tokens: int = 2048  # tokens per step; longer prompts are prefilled in chunks
    kv_memory_gib: float | None = None  # KV cache size (None: 90% of free GPU memory, 1 GiB on CPU)
    num_blocks: int | None = None  # or the number of 16-token blocks (overrides kv_memory_gib)
    max_model_len: int | None = None  # longest prompt + generation (None: the model's max_seq_len)
    max_queued_requests: int = 1024  # waiting requests beyond which add_request raises QueueFull
    cuda_graphs: bool = True  # capture decode steps in CUDA graphs (CUDA only)
    amp_dtype: torch.dtype | None = None  # run under autocast (the training forward's precision)
    stop_token_ids: frozenset[int] = LLAMA3_STOP_TOKENS


@dataclass
class TokenOutput:
    """One generated token of one sample, and whether the sample finished with it."""

    request_id: str
    index: int  # which of the request's n samples
    token: int
    finish_reason: str | None  # None, "stop", "length" or "abort"
    is_stop_token: bool  # an end-of-turn/-text token: counted, never shown as text


@dataclass
class EngineStats:
    requests_total: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    # Latest 100,000 requests: time to first token, and per output token after the first.
    ttft_s: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    tpot_s: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))


class LLMEngine:
    """Continuous-batching generation over `model` (module docstring). The model is changed in
    place: its attention modules are swapped for cache-aware ones (`apply_kv_cache`)."""

    def __init__(
        self,
        model: Transformer,
        config: EngineConfig | None = None,
        *,
        group: dist.ProcessGroup | None = None,
    ):
        self.config = config = config or EngineConfig()
        args = model.args
        tp = 1 if group is None else dist.get_world_size(group)
        self.device = model.norm.weight.device if model.norm is not None else torch.device("cpu")
        dtype = config.amp_dtype or (model.norm.weight.dtype if model.norm is not None else torch.float32)
        self.max_model_len = min(config.max_model_len or args.max_seq_len, args.max_seq_len)
        n_kv = args.n_kv_heads // tp
        n_blocks = config.num_blocks or self._blocks_for_memory(args, n_kv, dtype)
        self.cache = KVCache(args.n_layers, n_blocks, n_kv, args.head_dim, dtype, self.device)
        apply_kv_cache(model, self.cache)
        self.model = model
        self.runner = ModelRunner(
            model, self.cache, self.device, max_model_len=self.max_model_len, amp_dtype=config.amp_dtype,
            cuda_graphs=config.cuda_graphs, group=group,
        )  # fmt: skip
        self.scheduler = Scheduler(
            BlockAllocator(n_blocks), SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens)
        )
        self.stop_ids = set(config.stop_token_ids)
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # requests in the inbox or waiting for admission (read by other threads)

    def _blocks_for_memory(self, args, n_kv: int, dtype: torch.dtype) -> int:
        per_block = bytes_per_block(args.n_layers, n_kv, args.head_dim, dtype)
        gib = self.config.kv_memory_gib
        if gib is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(0.9 * free)
        else:
            budget = int((gib if gib is not None else 1.0) * 2**30)
        return max(2, budget // per_block)

    # ---------------------------------------------------------------- requests (any thread)

    def check_request(self, prompt: Seq[int], params: SamplingParams) -> None:
        """The one-line reason a request can never run (PromptTooLong), or nothing."""
        params.validate()
        if not prompt:
            raise PromptTooLong("the prompt is empty: give at least one token")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLong(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) is {total} tokens, "
                f"more than the model's context of {self.max_model_len}: shorten the prompt or lower max_tokens"
            )
        req = Request("", list(prompt), params)
        need, have = req.blocks_needed(), self.scheduler.allocator.usable
        if need > have:
            raise PromptTooLong(
                f"the prompt plus max_tokens for n={params.n} needs {need} KV blocks of 16 tokens and the "
                f"cache holds {have}: lower max_tokens or n, or start the server with more --kv-memory-gib"
            )

    def add_request(self, request_id: str, prompt: Seq[int], params: SamplingParams) -> None:
        """Queue a request (thread-safe). Raises PromptTooLong, SamplingError or QueueFull."""
        self.check_request(prompt, params)
        if self._pending >= self.config.max_queued_requests:
            raise QueueFull(f"{self._pending} requests are waiting: try again later")
        self._pending += 1
        self._inbox.put(("add", Request(request_id, list(prompt), params)))

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (or one of its samples) at the next step and free its KV blocks (thread-safe)."""
        self._inbox.put(("abort", request_id, index))

    def has_work(self) -> bool:
        return not self._inbox.empty() or self.scheduler.has_work()

    @property
    def n_waiting(self) -> int:
        return self._pending

    @property
    def kv_blocks_used(self) -> int:
        return self.scheduler.allocator.n_used

    # ---------------------------------------------------------------- the loop (one thread)

    def _drain_inbox(self) -> list[TokenOutput]:
        outs: list[TokenOutput] = []
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return outs
            if msg[0] == "add":
                self.scheduler.add(msg[1])
                self.stats.requests_total += 1
                self.stats.prompt_tokens += msg[1].n_prompt
            else:
                _, rid, index = msg
                for seq in self.scheduler.abort(rid, index):
                    outs.append(TokenOutput(rid, seq.index, -1, "abort", True))
                if index is None:
                    self.stats.requests_aborted += 1

    def step(self) -> list[TokenOutput]:
        """Run one step; the tokens it produced (and the aborts it applied)."""
        outs = self._drain_inbox()
        plan = self.scheduler.schedule()
        self._pending = self._inbox.qsize() + self.scheduler.n_waiting
        if not plan:
            return outs
        rows, params, gens = sample_rows(plan)
        distinct = sorted(set(rows))
        logits = self.runner.execute(build_inputs(plan, distinct))
        if len(distinct) != len(rows):
            where = {r: i for i, r in enumerate(distinct)}
            logits = logits.index_select(0, torch.tensor([where[r] for r in rows], device=logits.device))
        tokens = sample(logits, params, gens)
        now = time.monotonic()
        for seq in self.scheduler.update(plan, tokens, self.stop_ids, self.max_model_len):
            tok = seq.tokens[-1]
            outs.append(TokenOutput(seq.request.id, seq.index, tok, seq.finish_reason, tok in self.stop_ids))
            self.stats.generation_tokens += 1
            req = seq.request
            if seq.n_out == 1 and seq.index == 0 and req.first_token_time is not None:
                self.stats.ttft_s.append(req.first_token_time - req.arrival)
            if seq.finished and seq.n_out > 1 and req.first_token_time is not None:
                self.stats.tpot_s.append((now - req.first_token_time) / (seq.n_out - 1))
            if (
                seq.finished
                and not req.reported
                and len(req.seqs) == req.params.n
                and all(s.finished for s in req.seqs)
            ):
                req.reported = True
                self.stats.requests_finished += 1
        self._pending = self._inbox.qsize() + self.scheduler.n_waiting
        return outs

    def shutdown(self) -> None:
        """Release the other tensor-parallel ranks (a no-op on one process)."""
        self.runner.stop_workers()

    # ---------------------------------------------------------------- offline use

    def generate(
        self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams], tokenizer=None
    ) -> list[list[GenerationResult]]:
        """Run prompts (token ids) to completion; per prompt, its n samples' results. With a
        `tokenizer` the results carry text, and stop strings end generation."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        results: dict[tuple[str, int], GenerationResult] = {}
        for i, (prompt, p) in enumerate(zip(prompts, plist)):
            self.add_request(f"gen-{i}", prompt, p)
            for j in range(p.n):
                results[f"gen-{i}", j] = GenerationResult(
                    [], None, TextStream(tokenizer, p.stop) if tokenizer is not None else None
                )
        while self.has_work():
            for out in self.step():
                res = results[out.request_id, out.index]
                res.consume(out, self)
        return [[results[f"gen-{i}", j] for j in range(p.n)] for i, p in enumerate(plist)]


@dataclass
class GenerationResult:
    """One sample of an offline `generate`: its tokens, text and why it ended."""

    token_ids: list[int]
    finish_reason: str | None
    stream: TextStream | None = None
    text: str = ""

    def consume(self, out: TokenOutput, engine: LLMEngine) -> None:
        if self.finish_reason is not None:
            return
        if out.token >= 0:
            self.token_ids.append(out.token)
        if self.stream is not None and not out.is_stop_token:
            self.text += self.stream.push(out.token)
            if self.stream.stopped:
                self.finish_reason = "stop"
                engine.abort(out.request_id, out.index)
                return
        self.finish_reason = out.finish_reason
        if self.finish_reason is not None and self.stream is not None:
            self.text += self.stream.finish()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values, nearest rank; nan for none."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]
