"""The OpenAI-compatible request bodies, checked, and the JSON the server answers with.

Bodies are pydantic models: a field of the wrong type or out of range, and malformed JSON, become
a 400 whose `{"error": {...}}` names the field (`server.py` turns FastAPI's validation errors into
that). Fields this server does not implement are accepted only at their defaults (`logprobs`,
penalties, `logit_bias`, `echo`, `best_of`, tools), so a client that relies on them gets a 400,
not a silently different answer; fields it does not know at all are ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from llama3hp.inference.sampling import MAX_STOP_STRINGS, SamplingParams

Number = StrictInt | StrictFloat


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: Number = Field(1.0, ge=0.0, le=2.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0)  # extension (vLLM's name)
    n: StrictInt = Field(1, ge=1, le=128)
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False  # extension: keep generating past end-of-text (benchmarks)
    # Accepted at their defaults only (see the module docstring).
    frequency_penalty: Number = 0.0
    presence_penalty: Number = 0.0
    logit_bias: dict[str, Any] | None = None
    logprobs: Any = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do, or None."""
        checks = {
            "frequency_penalty": self.frequency_penalty != 0,
            "presence_penalty": self.presence_penalty != 0,
            "logit_bias": bool(self.logit_bias),
            "logprobs": self.logprobs not in (None, False, 0),
        }
        return next((k for k, bad in checks.items() if bad), None)

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=float(self.temperature), top_p=float(self.top_p),
            top_k=self.top_k, n=self.n, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos,
        ).validate()  # fmt: skip

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Common):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt | None = Field(16, ge=1)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        extra = {
            "echo": self.echo,
            "best_of": self.best_of not in (None, self.n),
            "suffix": bool(self.suffix),
        }
        return super().unsupported() or next((k for k, bad in extra.items() if bad), None)

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one text, one token list, or a list of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "ipython"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


def dialog(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Checked chat messages as the chat format takes them ({"role", "content"} with text content)."""
    return [{"role": m.role, "content": m.text()} for m in messages]


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: Any = None

    def unsupported(self) -> str | None:
        return super().unsupported() or ("tools" if self.tools else None)

    def dialog(self) -> list[dict[str, str]]:
        return dialog(self.messages)


class ScoreRequest(BaseModel):
    """POST /v1/score (an extension; served when the server has a reward model): the reward model's
    score of each response to one prompt, a user message or the messages before the reply."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[ChatMessage]
    responses: list[str] = Field(min_length=1, max_length=128)
    system: str | None = None

    def prompt_messages(self) -> str | list[dict[str, str]]:
        return self.prompt if isinstance(self.prompt, str) else dialog(self.prompt)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: int = 400):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
