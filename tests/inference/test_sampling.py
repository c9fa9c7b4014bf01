"""The sampler (greedy, temperature, top-k, top-p, seeds) and incremental detokenisation with
stop strings."""

from __future__ import annotations

import pytest
import torch

from llama3hp.inference.detokenize import TextStream
from llama3hp.inference.sampling import SamplingError, SamplingParams, sample


def draws(logits: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    return [sample(logits[None], [params], [gen])[0] for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.randn(5, 100)
    assert sample(logits, [SamplingParams(temperature=0.0)] * 5, [None] * 5) == logits.argmax(-1).tolist()


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    assert set(draws(logits, SamplingParams(temperature=1.0, top_k=2), 300)) == {0, 1}
    p = torch.softmax(logits, -1)  # 0.64, 0.23, 0.09, ...: top_p 0.8 keeps the first two
    assert p[0] < 0.8 < p[0] + p[1]
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.8), 300)) == {0, 1}
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.5), 50)) == {0}  # the first always stays


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    got = (
        torch.bincount(torch.tensor(draws(logits, SamplingParams(temperature=1.0), 4000)), minlength=3) / 4000
    )
    torch.testing.assert_close(got, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


def test_a_seed_gives_the_same_tokens_whatever_the_batch():
    p = SamplingParams(temperature=1.0, seed=42)
    logits = torch.randn(3, 1000)
    alone = sample(logits[1:2], [p], [p.generator(0)])
    mixed = sample(logits, [SamplingParams(temperature=0.7, top_k=5), p, SamplingParams(temperature=0.0)],
                   [torch.Generator().manual_seed(9), p.generator(0), None])  # fmt: skip
    assert mixed[1] == alone[0]
    assert p.generator(0).initial_seed() != p.generator(1).initial_seed()  # samples of one request differ


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", 0), ("temperature", -1.0), ("temperature", 3.0), ("top_p", 0.0), ("top_k", -1), ("n", 0),
     ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""])],
)  # fmt: skip
def test_out_of_range_parameters_are_refused(field, value):
    with pytest.raises(SamplingError, match=field.rstrip("s") if field == "stop" else field):
        SamplingParams(**{field: value}).validate()


def test_detokenising_never_emits_half_a_character(tokenizer):
    text = "naïve 漢字 🦙 done"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.model.decode_single_token_bytes(t) for t in ids]
    assert any(not _is_utf8(p) for p in pieces)  # some token splits a character
    stream = TextStream(tokenizer)
    out = [stream.push(t) for t in ids]
    assert "".join(out) + stream.finish() == text
    assert all("\ufffd" not in o for o in out)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stop_strings_are_held_back_and_not_returned(tokenizer):
    text = "alpha beta<END>gamma"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer, ["<END>", "zeta"])
    released = []
    for t in ids:
        released.append(stream.push(t))
        if stream.stopped:
            break
    assert "".join(released) == "alpha beta" and stream.stopped
    assert not any("<" in r for r in released)  # the partial match was never shown


def test_a_partial_stop_match_is_text_when_generation_ends(tokenizer):
    stream = TextStream(tokenizer, ["<END>"])
    out = "".join(stream.push(t) for t in tokenizer.encode("x <EN"))
    assert out == "x " and stream.finish() == "<EN" and not stream.stopped
