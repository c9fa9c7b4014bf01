"""Post-training rows in the Llama 3 chat format: SFT conversations and preference pairs.

Input rows (JSONL, one object a line):
- SFT: `{"messages": [{"role", "content"}, ...]}`: an optional system message first, then user and
  assistant turns (tool results as "ipython"/"tool" after an assistant turn), ending with the
  assistant; every assistant turn is trained.
- Preferences: `{"prompt": str or messages, "chosen": ..., "rejected": ...}` (or "messages" for the
  prompt), each response a string (the assistant's reply) or a list of messages starting with the
  assistant; optionally `"edited"` (edited > chosen > rejected, for a reward model).

Every token gets a role, stored beside it in the shards (`llama3hp.data.shards`): CONTEXT (not
trained: the prompt, user/system/tool turns, the header that opens an assistant turn), RESPONSE
(assistant text) or FORMAT (formatting inside a response: <|eot_id|>, headers of later turns),
which SFT trains and DPO leaves out of its sums by default. The prompt and each response are
tokenised separately and concatenated, so no BPE merge ever crosses the boundary between them.

Every error is a one-line `DataError` naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llama3hp.data.errors import DataError
from llama3hp.data.tokenizer import ChatFormat

CONTEXT, RESPONSE, FORMAT = 0, 1, 2  # token roles (uint8 in the shards)
TOOL_ROLES = ("ipython", "tool")
ROLES = ("system", "user", "assistant", *TOOL_ROLES)


@dataclass
class Tokens:
    """Token ids and their roles (same length)."""

    ids: list[int]
    roles: list[int]

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.ids + other.ids, self.roles + other.roles)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PreferencePair:
    """A prompt (with the assistant header that opens the reply) and its ranked responses."""

    prompt: Tokens
    chosen: Tokens
    rejected: Tokens
    edited: Tokens | None = None


def _messages(value: Any, field: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{field}' must be a non-empty list of messages")
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {field}[{i}] has role '{m['role']}'; use one of {', '.join(ROLES)}")
    return value


def _check_order(
    messages: list[dict], field: str, where: str, *, ends: tuple[str, ...], after: str | None = None
) -> None:
    """system only first; user after system/assistant/start; assistant after user or a tool result;
    a tool result after the assistant; the last message's role in `ends`. `after`: the role before
    the first message (a response continues its prompt's user turn)."""
    allowed_after: dict[str | None, tuple[str, ...]] = {
        None: ("system", "user"),
        "system": ("user",),
        "user": ("assistant",),
        "assistant": ("user", *TOOL_ROLES),
        **{t: ("assistant",) for t in TOOL_ROLES},
    }
    prev = after
    for i, m in enumerate(messages):
        if m["role"] not in allowed_after[prev]:
            before = f"after '{prev}'" if prev else "first"
            raise DataError(f"{where}: {field}[{i}] role '{m['role']}' out of order ({before}); expected one of "
                            f"{', '.join(allowed_after[prev])}")  # fmt: skip
        prev = m["role"]
    if prev not in ends:
        raise DataError(f"{where}: {field} ends with '{prev}', expected {' or '.join(ends)}")


def _turn(
    chat: ChatFormat, message: dict, *, header: bool, header_role: int, where: str, field: str
) -> Tokens:
    """One message: [header] text <|eot_id|>. The assistant's text is RESPONSE and its <|eot_id|>
    FORMAT; another role's turn is all CONTEXT; the header gets `header_role`."""
    tok = chat.tokenizer
    ids = tok.encode(message["content"].strip())
    assistant = message["role"] == "assistant"
    if assistant and not ids:
        raise DataError(f"{where}: {field} has an empty assistant response; give it text or drop the row")
    head = chat.encode_header(message["role"]) if header else []
    return (
        Tokens(head, [header_role if assistant else CONTEXT] * len(head))
        + Tokens(ids, [RESPONSE if assistant else CONTEXT] * len(ids))
        + Tokens([tok.eot_id], [FORMAT if assistant else CONTEXT])
    )


def encode_sft(chat: ChatFormat, row: Any, where: str) -> Tokens:
    """<|begin_of_text|> + every turn; the assistant turns' text and <|eot_id|> are trained (the
    header opening a turn is context: at inference it is the generation prompt)."""
    if not isinstance(row, dict) or "messages" not in row:
        raise DataError(f"{where}: an SFT row needs a 'messages' list")
    messages = _messages(row["messages"], "messages", where)
    _check_order(messages, "messages", where, ends=("assistant",))
    out = Tokens([chat.tokenizer.bos_id], [CONTEXT])
    for m in messages:
        out = out + _turn(chat, m, header=True, header_role=CONTEXT, where=where, field="messages")
    return out


def _response(chat: ChatFormat, value: Any, field: str, where: str) -> Tokens:
    """A reply after the prompt's open assistant header: its text and <|eot_id|>, then any further
    turns with their headers (FORMAT in an assistant turn) and tool results (CONTEXT)."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    messages = _messages(value, field, where)
    _check_order(messages, field, where, ends=("assistant",), after="user")
    out = Tokens([], [])
    for i, m in enumerate(messages):
        out = out + _turn(chat, m, header=i > 0, header_role=FORMAT, where=where, field=field)
    return out


def encode_preference(chat: ChatFormat, row: Any, where: str) -> PreferencePair:
    """The prompt (bos, its turns, the open assistant header) and each response, tokenised apart."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a preference row must be a JSON object")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing or ("prompt" not in row and "messages" not in row):
        need = missing + ([] if "prompt" in row or "messages" in row else ["prompt (or messages)"])
        raise DataError(f"{where}: preference row is missing {', '.join(need)}")
    prompt = row.get("prompt", row.get("messages"))
    field = "prompt" if "prompt" in row else "messages"
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: empty prompt")
        prompt = [{"role": "user", "content": prompt}]
    messages = _messages(prompt, field, where)
    _check_order(messages, field, where, ends=("user", *TOOL_ROLES))
    ids, _ = chat.encode_dialog_with_mask(messages, add_generation_prompt=True)
    return PreferencePair(
        Tokens(ids, [CONTEXT] * len(ids)),
        _response(chat, row["chosen"], "chosen", where),
        _response(chat, row["rejected"], "rejected", where),
        _response(chat, row["edited"], "edited", where) if row.get("edited") is not None else None,
    )
