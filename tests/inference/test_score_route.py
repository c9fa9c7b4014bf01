"""POST /v1/score: a reward model served beside the policy (`serve --reward`), through a real uvicorn
and raw HTTP; the scores are the scorer's own, the errors are OpenAI-style bodies."""

from __future__ import annotations

import httpx
import pytest
from serving_testing import LiveServer, tiny_model

from llama3hp.inference.engine import EngineConfig, LLMEngine
from llama3hp.inference.scoring import RewardScorer
from llama3hp.inference.server import build_app

pytestmark = pytest.mark.xdist_group("inference_server")


@pytest.fixture(scope="module")
def scored(tokenizer):
    scorer = RewardScorer(tiny_model(seed=3, head="reward"), tokenizer)
    engine = LLMEngine(tiny_model(), EngineConfig(num_blocks=64))
    server = LiveServer(build_app(engine, tokenizer, "policy", scorer, "rm"))
    yield scorer, server
    server.close()


def test_scores_over_http_are_the_scorers(scored):
    scorer, server = scored
    responses = ["def f():\n    return 1", "pass", ""]
    body = {"model": "rm", "prompt": "Write f.", "responses": responses, "system": "Be brief."}
    resp = httpx.post(server.url + "/v1/score", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    want = scorer.score([("Write f.", responses)], system="Be brief.")[0]
    assert [d["index"] for d in out["data"]] == [0, 1, 2] and out["model"] == "rm"
    assert [d["score"] for d in out["data"]] == pytest.approx(want, abs=1e-6)
    assert out["usage"]["prompt_tokens"] > 0
    # A chat prompt (the messages before the reply) scores as the same string prompt does.
    chat = {"prompt": [{"role": "user", "content": "Write f."}], "responses": responses[:1]}
    got = httpx.post(server.url + "/v1/score", json=chat, timeout=60).json()["data"][0]["score"]
    assert got == pytest.approx(scorer.score([("Write f.", responses[:1])])[0][0], abs=1e-6)


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"prompt": "x", "responses": []}, 400, "responses"),
        ({"prompt": "x"}, 400, "responses"),
        ({"prompt": 3, "responses": ["a"]}, 400, "prompt"),
        ({"model": "other", "prompt": "x", "responses": ["a"]}, 404, "is not served here"),
    ],
)
def test_bad_score_requests_get_an_error_body(scored, body, status, needle):
    resp = httpx.post(scored[1].url + "/v1/score", json=body, timeout=30)
    assert resp.status_code == status and needle in resp.json()["error"]["message"], resp.text


def test_a_server_without_a_reward_model_says_how_to_start_one(tokenizer):
    engine = LLMEngine(tiny_model(), EngineConfig(num_blocks=64))
    server = LiveServer(build_app(engine, tokenizer, "policy"))
    try:
        resp = httpx.post(server.url + "/v1/score", json={"prompt": "x", "responses": ["a"]}, timeout=30)
        assert resp.status_code == 404 and "serve --reward" in resp.json()["error"]["message"]
    finally:
        server.close()
