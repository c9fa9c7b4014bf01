"""The OpenAI-compatible HTTP server: FastAPI on uvicorn, Server-Sent Events through sse-starlette.

Endpoints: POST /v1/completions, POST /v1/chat/completions (the Llama 3 chat format with its
header and <|eot_id|> tokens, `llama3hp.data.tokenizer.ChatFormat`), GET /v1/models, /health and
/metrics (Prometheus text).

Threads: the engine loop (`AsyncEngine`) runs on a thread of its own and only moves token ids: it
takes requests and aborts from a thread-safe inbox and hands each step's tokens to the asyncio
loop in one call. Tokenising, detokenising, stop strings and writing to sockets happen in the
request handlers on the event loop, so a slow client or a long prompt to tokenise never stalls the
batch; a client's tokens wait in its own unbounded queue.

Semantics (OpenAI's): streamed answers are `data: {json}` events ending with `data: [DONE]`; the
first chat chunk of each choice carries the role; `finish_reason` is "stop" (an end-of-turn token
or a stop string, which is never returned) or "length"; `stream_options.include_usage` adds a last
chunk with the usage; every non-streamed answer has `usage`. Errors are `{"error": {...}}`: 400
for malformed JSON, a field of the wrong type or out of range, an unsupported option, or a prompt
that cannot fit the context or the KV cache; 404 for another model's name; 503 when the waiting
queue is full. A client that disconnects, streamed or not, has its request aborted: the engine
frees its KV blocks at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama3hp.data.tokenizer import ChatFormat, Tokenizer
from llama3hp.errors import UserError
from llama3hp.inference.detokenize import TextStream
from llama3hp.inference.engine import LLMEngine, QueueFull, TokenOutput
from llama3hp.inference.protocol import (
    ChatRequest,
    CompletionRequest,
    error_body,
    new_id,
    now,
    usage,
)
from llama3hp.inference.sampling import SamplingParams

DISCONNECT_POLL_S = 0.05  # how often a non-streamed request checks that its client is still there


class AsyncEngine:
    """`LLMEngine` on its own thread (module docstring); handlers `submit`, `abort` and read the
    per-request queues filled by `_dispatch` on the event loop."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.queues: dict[str, asyncio.Queue] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="llama3hp-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                if not engine.has_work():
                    self._wake.wait(0.01)
                    self._wake.clear()
                    continue
                try:
                    outs = engine.step()
                except Exception:  # noqa: BLE001 - a bug must fail its requests, not the server
                    traceback.print_exc()
                    outs = []
                    for req in engine.scheduler.requests():
                        for seq in engine.scheduler.abort(req.id):
                            outs.append(TokenOutput(req.id, seq.index, -1, "error", True))
                if outs and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._dispatch, outs)
        finally:
            engine.shutdown()  # release the tensor-parallel ranks from the engine's own thread

    def _dispatch(self, outs: list[TokenOutput]) -> None:
        by_request: dict[str, list[TokenOutput]] = {}
        for out in outs:
            by_request.setdefault(out.request_id, []).append(out)
        for rid, items in by_request.items():
            q = self.queues.get(rid)
            if q is not None:
                q.put_nowait(items)

    def submit(self, rid: str, prompt: list[int], params: SamplingParams, q: asyncio.Queue) -> None:
        self.queues[rid] = q
        try:
            self.engine.add_request(rid, prompt, params)
        except BaseException:
            self.queues.pop(rid, None)
            raise
        self._wake.set()

    def abort(self, rid: str, index: int | None = None) -> None:
        self.engine.abort(rid, index)
        self._wake.set()

    def forget(self, rid: str) -> None:
        self.queues.pop(rid, None)


@dataclass
class Choice:
    """One returned choice: sample `index` of sub-request `rid`, detokenised as it arrives."""

    rid: str
    sample: int
    stream: TextStream
    n_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""
    sent_role: bool = False

    def consume(self, out: TokenOutput, server: AsyncEngine) -> tuple[str, str | None] | None:
        """(new text, finish reason or None) from one token; None when nothing changed."""
        if self.finish_reason is not None:
            return None
        if out.finish_reason in ("abort", "error"):
            self.finish_reason = out.finish_reason
            return "", out.finish_reason
        self.n_tokens += 1
        text = ""
        if not out.is_stop_token:
            text = self.stream.push(out.token)
            if self.stream.stopped:
                self.finish_reason = "stop"
                server.abort(self.rid, self.sample)
                self.text += text
                return text, "stop"
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            text += self.stream.finish()
        self.text += text
        return (text, self.finish_reason) if text or self.finish_reason else None


class ClientGone(Exception):
    pass


@dataclass
class Generation:
    """The sub-requests of one HTTP request (one per prompt) and their n choices each."""

    id: str  # the answer's id (cmpl-... or chatcmpl-...)
    prompts: list[list[int]]
    params: SamplingParams
    choices: list[Choice] = field(default_factory=list)
    rids: list[str] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.n_tokens for c in self.choices)


class ServerState:
    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer, model_name: str):
        self.engine = engine
        self.async_engine = AsyncEngine(engine)
        self.tokenizer = tokenizer
        self.chat = ChatFormat(tokenizer)
        self.model_name = model_name
        self.created = now()
        self.http_requests = 0
        self.http_errors: dict[int, int] = {}

    # ---------------------------------------------------------------- running a generation

    def prepare(self, prompts: list[list[int]], params: SamplingParams, prefix: str) -> Generation:
        """Check every prompt can run (raises UserError: 400) and that the queue has room (503)."""
        for ids in prompts:
            if any(not 0 <= t < self.engine.model.args.vocab_size for t in ids):
                raise UserError(f"prompt token ids must be in [0, {self.engine.model.args.vocab_size})")
            self.engine.check_request(ids, params)
        if self.engine.n_waiting + len(prompts) > self.engine.config.max_queued_requests:
            raise QueueFull(f"{self.engine.n_waiting} requests are waiting: try again later")
        gen = Generation(prefix, prompts, params)
        for i in range(len(prompts)):
            rid = f"{prefix}-{i}"
            gen.rids.append(rid)
            gen.choices += [Choice(rid, j, TextStream(self.tokenizer, params.stop)) for j in range(params.n)]
        return gen

    async def events(
        self, gen: Generation, request: Request
    ) -> AsyncIterator[tuple[Choice, str, str | None]]:
        """Submit the generation's sub-requests and yield (choice, new text, finish reason) until
        every choice is done; aborts whatever is unfinished when the caller stops or the client goes."""
        q: asyncio.Queue = asyncio.Queue()
        ae = self.async_engine
        by_key = {(c.rid, c.sample): c for c in gen.choices}
        try:
            for rid, prompt in zip(gen.rids, gen.prompts):
                ae.submit(rid, prompt, gen.params, q)
            remaining = len(gen.choices)
            checked = time.monotonic()
            while remaining:
                try:
                    outs = await asyncio.wait_for(q.get(), timeout=DISCONNECT_POLL_S)
                except TimeoutError:
                    outs = []
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # tokens may never pause
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise ClientGone
                for out in outs:
                    choice = by_key[out.request_id, out.index]
                    was_done = choice.finish_reason is not None
                    ev = choice.consume(out, ae)
                    if choice.finish_reason is not None and not was_done:
                        remaining -= 1
                    if ev is not None:
                        yield choice, ev[0], ev[1]
        finally:
            for rid in gen.rids:
                ae.forget(rid)
                if any(c.finish_reason is None for c in gen.choices if c.rid == rid):
                    ae.abort(rid)


class CountRequests:
    """Counts HTTP requests and error statuses for /metrics. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware wraps `receive`, and a handler behind it never sees its client disconnect."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.state.http_requests += 1

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                errors = self.state.http_errors
                errors[message["status"]] = errors.get(message["status"], 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse(error_body(message, kind, param, status), status_code=status)


def build_app(engine: LLMEngine, tokenizer: Tokenizer, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine` under `model_name`; the engine thread starts with the app."""
    state = ServerState(engine, tokenizer, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.async_engine.start()
        try:
            yield
        finally:
            state.async_engine.stop()

    app = FastAPI(title="llama3hp", lifespan=lifespan)
    app.state.llama3hp = state

    app.add_middleware(CountRequests, state=state)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
        if not loc:
            return _error(400, "the request body must be a JSON object")
        field_name = ".".join(loc) or None
        return _error(400, f"{field_name or 'body'}: {first.get('msg')}", param=field_name)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    def check_common(body) -> JSONResponse | None:
        if body.model is not None and body.model != model_name:
            return _error(
                404,
                f"model {body.model!r} is not served here: use {model_name!r}",
                "not_found_error",
                "model",
            )
        bad = body.unsupported()
        if bad is not None:
            return _error(400, f"{bad} is not supported by this server", param=bad)
        return None

    def user_error(e: UserError) -> JSONResponse:
        if isinstance(e, QueueFull):
            return _error(503, str(e), "server_overloaded")
        return _error(400, str(e))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": state.created, "owned_by": "llama3hp",
                      "max_model_len": engine.max_model_len}],
        }  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    def answer(gen: Generation, body, request: Request, obj: str, piece, preamble=()):
        """The HTTP answer of a prepared generation: SSE chunks built by `piece(choice, text, finish)`
        (after the `preamble` chunks' choices) when body.stream, else the whole JSON of `obj`."""
        cid, created = gen.id, now()

        def chunk(choices: list[dict], usage_: dict | None = None) -> dict:
            out: dict[str, Any] = {"id": cid, "object": f"{obj}.chunk" if obj == "chat.completion" else obj,
                                   "created": created, "model": model_name, "choices": choices}  # fmt: skip
            if body.include_usage:
                out["usage"] = usage_
            return out

        if body.stream:

            async def sse():
                failed = json.dumps(error_body("generation failed on the server", "server_error", code=500))
                try:
                    for choice in preamble:
                        yield {"data": json.dumps(chunk([choice]))}
                    async for choice, text, finish in state.events(gen, request):
                        if finish == "error":
                            yield {"data": failed}
                            return
                        yield {"data": json.dumps(chunk([piece(choice, text, _finish(finish))]))}
                    if body.include_usage:
                        yield {"data": json.dumps(chunk([], usage(gen.prompt_tokens, gen.completion_tokens)))}
                    yield {"data": "[DONE]"}
                except QueueFull as e:
                    yield {"data": json.dumps(error_body(str(e), "server_overloaded", code=503))}

            return EventSourceResponse(sse(), sep="\n", ping=600)
        return None

    async def collect(gen: Generation, request: Request) -> JSONResponse | None:
        """Run a non-streamed generation to its end; the error answer, or None when it finished."""
        try:
            async for _ in state.events(gen, request):
                pass
        except ClientGone:
            return _error(499, "client disconnected")
        except QueueFull as e:
            return user_error(e)
        if any(c.finish_reason == "error" for c in gen.choices):
            return _error(500, "generation failed on the server", "server_error")
        return None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if (err := check_common(body)) is not None:
            return err
        try:
            prompts = [
                tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p) for p in body.prompts()
            ]
            assert body.max_tokens is not None
            gen = state.prepare(prompts, body.sampling(body.max_tokens), new_id("cmpl"))
        except UserError as e:
            return user_error(e)
        order = {(c.rid, c.sample): i for i, c in enumerate(gen.choices)}  # prompt i, sample j -> i * n + j

        def piece(c: Choice, text: str, finish: str | None) -> dict:
            return {"index": order[c.rid, c.sample], "text": text, "logprobs": None, "finish_reason": finish}

        if (streamed := answer(gen, body, request, "text_completion", piece)) is not None:
            return streamed
        if (err := await collect(gen, request)) is not None:
            return err
        return {
            "id": gen.id, "object": "text_completion", "created": now(), "model": model_name,
            "choices": [piece(c, c.text, _finish(c.finish_reason)) for c in gen.choices],
            "usage": usage(gen.prompt_tokens, gen.completion_tokens),
        }  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if (err := check_common(body)) is not None:
            return err
        try:
            prompt = state.chat.encode_dialog_prompt(body.dialog())
            max_tokens = (
                body.max_completion_tokens or body.max_tokens or max(1, engine.max_model_len - len(prompt))
            )
            gen = state.prepare([prompt], body.sampling(max_tokens), new_id("chatcmpl"))
        except UserError as e:
            return user_error(e)

        def piece(c: Choice, text: str, finish: str | None) -> dict:
            delta = {"content": text} if text else {}
            return {"index": c.sample, "delta": delta, "logprobs": None, "finish_reason": finish}

        # The first chunk of every choice carries the role.
        roles = [{"index": c.sample, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for c in gen.choices]  # fmt: skip
        if (streamed := answer(gen, body, request, "chat.completion", piece, roles)) is not None:
            return streamed
        if (err := await collect(gen, request)) is not None:
            return err
        return {
            "id": gen.id, "object": "chat.completion", "created": now(), "model": model_name,
            "choices": [{"index": c.sample, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                         "finish_reason": _finish(c.finish_reason)} for c in gen.choices],
            "usage": usage(gen.prompt_tokens, gen.completion_tokens),
        }  # fmt: skip

    return app


# ---------------------------------------------------------------- /metrics


def _summary(name: str, help_: str, values: deque | list) -> list[str]:
    from llama3hp.inference.engine import percentile

    vals = list(values)
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} summary"]
    for q in (0.5, 0.9, 0.99):
        v = percentile(vals, q * 100)
        lines.append(f'{name}{{quantile="{q}"}} {0.0 if v != v else v:.6f}')
    lines += [f"{name}_sum {sum(vals):.6f}", f"{name}_count {len(vals)}"]
    return lines


def render_metrics(state: ServerState) -> str:
    """Prometheus text exposition of the engine's counters and latencies."""
    e, st = state.engine, state.engine.stats
    alloc = e.scheduler.allocator
    metric = [
        ("llama3hp_requests_total", "counter", "Generation requests received.", st.requests_total),
        ("llama3hp_requests_finished_total", "counter", "Requests whose every sample finished.", st.requests_finished),
        ("llama3hp_requests_aborted_total", "counter", "Requests aborted (client gone, stop string).", st.requests_aborted),
        ("llama3hp_prompt_tokens_total", "counter", "Prompt tokens received.", st.prompt_tokens),
        ("llama3hp_generation_tokens_total", "counter", "Tokens generated.", st.generation_tokens),
        ("llama3hp_queue_length", "gauge", "Requests waiting for admission.", e.n_waiting),
        ("llama3hp_running_sequences", "gauge", "Sequences decoding.", len(e.scheduler.running)),
        ("llama3hp_kv_blocks_used", "gauge", "KV cache blocks (16 tokens) in use.", alloc.n_used),
        ("llama3hp_kv_blocks_total", "gauge", "KV cache blocks a request can use.", alloc.usable),
        ("llama3hp_http_requests_total", "counter", "HTTP requests served.", state.http_requests),
    ]  # fmt: skip
    lines = []
    for name, kind, help_, value in metric:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += _summary("llama3hp_time_to_first_token_seconds", "Time from arrival to first token.", st.ttft_s)
    lines += _summary(
        "llama3hp_time_per_output_token_seconds", "Time per output token after the first.", st.tpot_s
    )
    return "\n".join(lines) + "\n"


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Run the app under uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
