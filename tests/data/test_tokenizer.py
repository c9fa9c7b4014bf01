"""Llama 3 tokenizer ids, specials, round trips (incl. chunked long inputs) and the chat format."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest

from llama3hp.data import ChatFormat, Tokenizer
from llama3hp.data.tokenizer import LLAMA3_TOKENIZER_SHA256, MAX_RUN_CHARS, split_for_encoding


def test_known_ids_and_vocab(tok: Tokenizer):
    assert tok.encode("Hello world") == [9906, 1917]
    assert tok.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]
    assert tok.n_words == 128_256 and tok.sha256 == LLAMA3_TOKENIZER_SHA256
    assert Tokenizer.load() is tok, "loaded once per file"


def test_special_tokens(tok: Tokenizer):
    sp = tok.special_tokens
    assert len(sp) == 256
    assert sp["<|begin_of_text|>"] == 128000 and sp["<|end_of_text|>"] == 128001
    assert sp["<|reserved_special_token_0|>"] == 128002 and sp["<|reserved_special_token_1|>"] == 128003
    assert sp["<|finetune_right_pad_id|>"] == 128004 and sp["<|reserved_special_token_2|>"] == 128005
    assert sp["<|start_header_id|>"] == 128006 and sp["<|end_header_id|>"] == 128007
    assert sp["<|eom_id|>"] == 128008 and sp["<|eot_id|>"] == 128009 and sp["<|python_tag|>"] == 128010
    assert sp["<|reserved_special_token_3|>"] == 128011 and sp["<|reserved_special_token_247|>"] == 128255
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (128000, 128001, 128009)
    # Special strings in text are plain text unless asked for.
    assert 128009 not in tok.encode("say <|eot_id|> now")
    assert tok.encode("<|eot_id|>", allow_special=True) == [128009]
    assert tok.decode([128000, 9906, 128009]) == "<|begin_of_text|>Hello<|eot_id|>"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "def f(x):\n    return x ** 2  # square\n\n\n",
        "Ünïcödé façade — naïve café; 東京は晴れ。 Привет, мир! 🙂🚀 שלום مرحبا",
        "tabs\tand\r\nwindows\r\nlines   trailing   \n",
        "numbers 1234567890 3.14159 -42 1e-9",
        "it's they're we've I'm you'll he'd IT'S",
        "<|begin_of_text|> is literal text here",
    ],
)
def test_round_trip(tok: Tokenizer, text: str):
    assert tok.decode(tok.encode(text)) == text


def test_chunked_long_inputs_round_trip(tok: Tokenizer):
    for text in (" " * 1_000_000, "x" * 1_000_000, "a b" * 10 + "\n" * 300_000 + "é" * 100_000):
        pieces = split_for_encoding(text)
        assert "".join(pieces) == text and len(pieces) > 1
        assert max(len(p) for p in pieces) <= 400_000
        assert tok.decode(tok.encode(text)) == text
    # Ordinary long text: chunk cuts fall where the pre-tokenizer splits anyway, so ids are unchanged.
    words = ["hello", "world", "déjà", "vu", "🙂", "123456", "foo.bar()", "\n", "\n\n", "  ", "\t", "x=1;"]
    text = " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(120_000))
    assert len(split_for_encoding(text)) > 1
    assert tok.encode(text) == tok.model.encode_ordinary(text)


def test_long_run_splitting_is_bounded():
    text = "ab " * 10 + " " * (3 * MAX_RUN_CHARS + 7) + "z" * (2 * MAX_RUN_CHARS + 1) + " tail"
    pieces = split_for_encoding(text)
    assert "".join(pieces) == text
    too_long = re.compile(rf"\s{{{MAX_RUN_CHARS + 1}}}|\S{{{MAX_RUN_CHARS + 1}}}")
    assert len(pieces) >= 6 and not any(too_long.search(p) for p in pieces)


def test_ten_megabyte_input_round_trips(tok: Tokenizer):
    text = ("The quick brown fox, 1234 jumps!\n" * 320_000)[:10_000_000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_chat_format_tokens_and_masks(tok: Tokenizer):
    chat = ChatFormat(tok)
    assert chat.encode_header("user") == [128006, 882, 128007, 271]
    msg = chat.encode_message({"role": "assistant", "content": "  Hello there \n"})
    assert msg == [128006, 78191, 128007, 271, 9906, 1070, 128009]
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
    ]
    prompt = chat.encode_dialog_prompt(dialog)
    assert prompt[0] == 128000 and prompt[-4:] == [128006, 78191, 128007, 271]
    tokens, mask = chat.encode_dialog_with_mask(dialog)
    assert tokens == prompt[:-4] and len(mask) == len(tokens)
    F, C, A = ChatFormat.FORMAT, ChatFormat.CONTENT, ChatFormat.ASSISTANT
    specials = {128000, 128006, 128007, 128009}
    for t, m in zip(tokens, mask):
        if t in specials:
            assert m == F
    assert [t for t, m in zip(tokens, mask) if m == A] == [9906, 1070]
    assert tok.decode([t for t, m in zip(tokens, mask) if m == C]) == "Be brief.Hi"
    # Formatting = bos + per message (start, role, end, "\n\n", eot).
    assert mask.count(F) == 1 + 3 * 5


def test_long_run_probe_agrees_with_the_regex():
    """The probe that skips the full regex scan says True exactly when a run is too long."""
    from llama3hp.data.tokenizer import _LONG_RUN_RE, _may_have_long_run

    rng = random.Random(0)
    M = MAX_RUN_CHARS
    for trial in range(200):
        parts = []
        for k in range(rng.randint(1, 10)):
            n = rng.choice([1, 7, M - 1, M, M + 1, 2 * M + 3, rng.randint(1, 3 * M)])
            parts.append(("w" if k % 2 == 0 else rng.choice([" ", "\n", "\u3000"])) * n)
        text = "".join(parts)
        assert _may_have_long_run(text) == (_LONG_RUN_RE.search(text) is not None), trial


def test_import_data_does_not_import_torch():
    code = "import sys, llama3hp.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
