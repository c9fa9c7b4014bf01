"""The HTTP server end to end: a real uvicorn on a loopback port, driven through the official
`openai` client and raw HTTP (httpx). A tiny random model (full vocabulary) answers, so texts are
gibberish; what is checked is the protocol, the accounting and that memory comes back."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import openai
import pytest
from serving_testing import LiveServer, tiny_model, wait_until

from llama3hp.data.tokenizer import ChatFormat
from llama3hp.inference.engine import EngineConfig, LLMEngine
from llama3hp.inference.server import build_app

pytestmark = pytest.mark.xdist_group("inference_server")

NAME = "tiny-test"


def start(tokenizer, **cfg):
    engine = LLMEngine(tiny_model(), EngineConfig(**{"num_blocks": 512, **cfg}))
    app = build_app(engine, tokenizer, NAME)
    return engine, app, LiveServer(app)


@pytest.fixture(scope="module")
def live(tokenizer):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine, app, server = start(tokenizer)
    yield engine, app, server
    server.close()
    torch.set_num_threads(threads)


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live[2].url + "/v1", api_key="none", max_retries=0)


def idle(engine) -> bool:
    return engine.kv_blocks_used == 0 and not engine.has_work()


def sse_events(lines) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def test_models_health_and_metrics(live):
    engine, _, server = live
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME] and models["object"] == "list"
    assert httpx.get(server.url + "/health").status_code == 200
    text = httpx.get(server.url + "/metrics").text
    for name in ("llama3hp_requests_total", "llama3hp_prompt_tokens_total", "llama3hp_generation_tokens_total",
                 "llama3hp_queue_length", "llama3hp_kv_blocks_used", "llama3hp_time_to_first_token_seconds",
                 "llama3hp_time_per_output_token_seconds"):  # fmt: skip
        assert f"# TYPE {name}" in text


def test_completion_text_usage_and_finish_reason(client, tokenizer):
    r = client.completions.create(model=NAME, prompt="The llama", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer.encode("The llama", bos=True))
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    again = client.completions.create(model=NAME, prompt="The llama", max_tokens=7, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    ids = client.completions.create(model=NAME, prompt=tokenizer.encode("The llama", bos=True), max_tokens=7,
                                    temperature=0)  # fmt: skip
    assert ids.choices[0].text == r.choices[0].text  # a prompt of token ids


def test_chat_uses_the_llama3_format(client, tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ChatFormat(tokenizer).encode_dialog_prompt(msgs))
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_streaming_equals_the_whole_answer(client):
    whole = client.completions.create(model=NAME, prompt="abc", max_tokens=9, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt="abc", max_tokens=9, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9


def test_chat_stream_first_chunk_carries_the_role_and_ends_with_done(live):
    url = live[2].url + "/v1/chat/completions"
    body = {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", url, json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-1]["choices"] == []


def test_n_samples_and_seeds(client):
    kw = dict(model=NAME, prompt="Once", max_tokens=6, temperature=1.0, n=3, seed=123)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # the samples differ
    assert a.usage.completion_tokens == 18
    c = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       n=2, seed=1)  # fmt: skip
    assert sorted(ch.index for ch in c.choices) == [0, 1]


def test_stop_strings_cut_the_answer(client):
    free = (
        client.completions.create(model=NAME, prompt="stop test", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    r = client.completions.create(
        model=NAME, prompt="stop test", max_tokens=12, temperature=0, stop=[stop, "§§"]
    )
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == free[: free.find(stop)]
    assert r.usage.completion_tokens < 12
    streamed = client.completions.create(model=NAME, prompt="stop test", max_tokens=12, temperature=0, stop=stop,
                                         stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


@pytest.mark.parametrize(
    "body, status, names",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "x", "temperature": 7}, 400, "temperature"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "x", "max_tokens": 600}, 400, "context"),
        ({"prompt": "x", "logprobs": 3}, 400, "logprobs"),
        ({"prompt": [999_999]}, 400, "token ids"),
        ({"prompt": "x", "model": "gpt-5"}, 404, "gpt-5"),
        ({"max_tokens": 3}, 400, "prompt"),
    ],
    ids=["malformed", "not_object", "wrong_type", "temperature", "n", "top_p", "five_stops", "too_long",
         "logprobs", "bad_ids", "model", "missing_prompt"],
)  # fmt: skip
def test_bad_input_gets_an_error_body(live, body, status, names):
    url = live[2].url + "/v1/completions"
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    resp = httpx.post(url, timeout=30, **kw)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert names in err["message"] and err["type"]
    assert idle(live[0]) or wait_until(lambda: idle(live[0]))


def test_bad_chat_input_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(
            model=NAME, messages=[{"role": "wizard", "content": "x"}], max_tokens=3
        )


def test_a_streaming_client_that_disconnects_is_aborted(live):
    engine, _, server = live
    aborted = engine.stats.requests_aborted
    body = {"prompt": "long", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(g.startswith("data: ") for g in got)
        assert engine.kv_blocks_used > 0
    assert wait_until(lambda: idle(engine) and engine.stats.requests_aborted > aborted)


def test_a_waiting_client_that_disconnects_is_aborted(live):
    engine, _, server = live
    aborted = engine.stats.requests_aborted
    body = {"prompt": "long", "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    assert wait_until(lambda: idle(engine) and engine.stats.requests_aborted > aborted)


def test_a_slow_client_does_not_stall_the_others(live, client):
    """A stream nobody reads keeps generating into its own queue while another request finishes."""
    engine, _, server = live
    body = {"prompt": "slow", "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60):
        assert wait_until(lambda: len(engine.scheduler.running) == 1)
        r = client.completions.create(model=NAME, prompt="fast", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5
        slow = engine.scheduler.running[0]
        assert wait_until(lambda: slow.n_out > 20)  # its tokens were produced without a reader
    assert wait_until(lambda: idle(engine))


def test_200_concurrent_streams_all_finish_and_memory_comes_back(live):
    engine, app, server = live
    state = app.state.llama3hp
    before = (engine.kv_blocks_used, engine.scheduler.allocator.reserved, len(state.async_engine.queues))

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, int]:
        body = {"model": NAME, "prompt": f"request {i}", "max_tokens": 6, "stream": True, "temperature": 0.8,
                "seed": i, "ignore_eos": True}  # fmt: skip
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            events = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
        texts = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
        return events[-1], len(texts)

    async def run():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, i) for i in range(200)))

    results = asyncio.run(run())
    assert all(last == "data: [DONE]" and n >= 1 for last, n in results)
    assert wait_until(lambda: idle(engine))
    after = (engine.kv_blocks_used, engine.scheduler.allocator.reserved, len(state.async_engine.queues))
    assert after == before == (0, 0, 0)


def test_a_full_queue_answers_503(tokenizer):
    engine, _, server = start(tokenizer, max_queued_requests=1)
    gate = threading.Event()  # holds the engine loop so the first request stays queued
    step = engine.step
    engine.step = lambda: (gate.wait(60), step())[1]
    try:
        url = server.url + "/v1/completions"
        first = threading.Thread(
            target=lambda: httpx.post(url, json={"prompt": "a", "max_tokens": 3}, timeout=60)
        )
        first.start()
        assert wait_until(lambda: engine.n_waiting == 1)
        full = httpx.post(url, json={"prompt": "b", "max_tokens": 2}, timeout=60)
        assert full.status_code == 503 and full.json()["error"]["type"] == "server_overloaded"
        gate.set()
        first.join(timeout=60)
        assert wait_until(lambda: idle(engine))
        assert httpx.post(url, json={"prompt": "b", "max_tokens": 2}, timeout=60).status_code == 200
    finally:
        gate.set()
        server.close()
