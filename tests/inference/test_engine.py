"""The engine end to end on CPU (fp32): the KV-cache path against recomputing the full forward,
continuous batching, chunked prefill, n samples sharing their prompt's blocks, and every block
back in the pool afterwards."""

from __future__ import annotations

import copy

import pytest
import torch
from serving_testing import greedy_by_recompute, tiny_model

from llama3hp.inference.engine import EngineConfig, LLMEngine, PromptTooLong, QueueFull
from llama3hp.inference.kv_cache import BLOCK_SIZE
from llama3hp.inference.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128_000, (n,), generator=g).tolist() for n in lengths]


def engine_for(model, **cfg) -> LLMEngine:
    return LLMEngine(model, EngineConfig(**{"num_blocks": 128, **cfg}))


@pytest.mark.parametrize(
    "cfg",
    [
        {},  # several prompts packed in one prefill step
        {"max_num_batched_tokens": 24, "max_num_seqs": 4},  # long prompts in chunks, late admission
    ],
    ids=["packed", "chunked"],
)
def test_greedy_with_the_cache_equals_recomputing_the_forward(cfg):
    model = tiny_model()
    ref = copy.deepcopy(model)
    engine = engine_for(model, **cfg)
    ps = prompts([5, 37, 16, 1, 50])  # a page exactly, partly filled pages, a one-token prompt
    results = engine.generate(ps, GREEDY)
    for p, (r,) in zip(ps, results):
        assert r.token_ids == greedy_by_recompute(ref, p, 12)
        assert r.finish_reason == "length"
    assert engine.kv_blocks_used == 0 and engine.scheduler.allocator.reserved == 0


def test_prefill_logits_equal_the_training_forward():
    """The last-token logits of a prefill (packed with others, and in chunks) are the forward's."""
    model = tiny_model()
    ref = copy.deepcopy(model)
    engine = engine_for(model, max_num_batched_tokens=20, max_num_seqs=4)
    from llama3hp.inference.runner import build_inputs
    from llama3hp.inference.scheduler import Request, sample_rows

    ps = prompts([7, 30])
    for i, p in enumerate(ps):
        engine.scheduler.add(Request(str(i), p, GREEDY))
    seen = {}
    while len(seen) < 2:
        plan = engine.scheduler.schedule()
        rows, params, gens = sample_rows(plan)
        logits = engine.runner.execute(build_inputs(plan, rows))
        done = [ch.seq.request.id for ch in plan.chunks if ch.completes]
        for rid, row in zip(done, logits[len(plan.decode) :]):
            seen[rid] = row
        engine.scheduler.update(plan, [0] * len(rows), set(), 512)
    for i, p in enumerate(ps):
        want = ref(torch.tensor([p])).logits()[0, -1]
        torch.testing.assert_close(seen[str(i)], want, rtol=1e-5, atol=1e-5)


def test_n_samples_share_the_prompt_blocks_and_copy_on_write():
    model = tiny_model()
    engine = engine_for(model)
    p = prompts([37])[0]  # 2 full blocks + a partly filled one, shared by the samples
    params = SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=7, ignore_eos=True)
    engine.add_request("r", p, params)
    engine.step()  # prefill + first token of each sample (the fork)
    seqs = engine.scheduler.running
    assert len(seqs) == 3 and all(s.blocks[:2] == seqs[0].blocks[:2] for s in seqs)
    assert engine.scheduler.allocator.refs[seqs[0].blocks[0]] == 3
    engine.step()  # each sample writes into the shared partial block: copy-on-write for 2 of 3
    last = [s.blocks[2] for s in seqs]
    assert len(set(last)) == 3
    assert engine.kv_blocks_used == 2 + 3
    while engine.has_work():
        engine.step()
    assert engine.kv_blocks_used == 0 and engine.scheduler.allocator.reserved == 0


def test_samples_after_copy_on_write_match_separate_requests():
    """Sample i of an n=3 request draws from generator (seed, i) and sees its own tokens only: it
    equals the same sample generated alone, whatever shares its batch."""
    model = tiny_model()
    p = prompts([21])[0]
    together = engine_for(copy.deepcopy(model)).generate(
        [p, *prompts([9, 40], seed=1)],
        SamplingParams(max_tokens=8, temperature=0.9, n=3, seed=11, ignore_eos=True),
    )[0]
    alone = engine_for(model).generate(
        [p], SamplingParams(max_tokens=8, temperature=0.9, n=3, seed=11, ignore_eos=True)
    )[0]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in alone}) > 1  # the samples differ


def test_admission_waits_for_blocks_and_never_overcommits():
    model = tiny_model()
    engine = engine_for(model, num_blocks=1 + 6)  # 6 usable blocks = 96 tokens
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)  # 20 + 30 tokens: 4 blocks
    for i, p in enumerate(prompts([20, 20])):
        engine.add_request(str(i), p, params)
    engine.step()
    assert len(engine.scheduler.running) == 1 and engine.scheduler.n_waiting == 1  # 4 + 4 > 6
    max_used = 0
    while engine.has_work():
        engine.step()
        max_used = max(max_used, engine.kv_blocks_used)
    assert max_used <= 6 and engine.kv_blocks_used == 0


def test_abort_frees_blocks_at_the_next_step():
    engine = engine_for(tiny_model())
    engine.add_request("a", prompts([40])[0], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.kv_blocks_used > 0
    engine.abort("a")
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "abort")]
    assert engine.kv_blocks_used == 0 and engine.scheduler.allocator.reserved == 0 and not engine.has_work()


def test_requests_that_cannot_fit_are_refused_with_one_line():
    engine = engine_for(tiny_model(), num_blocks=9, max_queued_requests=1)
    with pytest.raises(PromptTooLong, match="context of 512"):
        engine.add_request("a", [1] * 500, SamplingParams(max_tokens=20))
    with pytest.raises(PromptTooLong, match="KV blocks"):
        engine.add_request("b", [1] * 100, SamplingParams(max_tokens=100))
    with pytest.raises(PromptTooLong, match="empty"):
        engine.add_request("c", [], SamplingParams())
    engine.add_request("d", [1, 2], SamplingParams(max_tokens=4))
    with pytest.raises(QueueFull):
        engine.add_request("e", [1, 2], SamplingParams(max_tokens=4))


def rigged_to_say(model, token: int):
    """The model's argmax is `token` at every position: residual dim 0 is +3 for every input (its
    embedding column; the blocks' outputs leave it alone), the final norm keeps only that dim and
    the head maps it to `token` alone."""
    with torch.no_grad():
        model.tok_embeddings.weight[:, 0] = 3.0
        for b in model.blocks():
            b.attention.wo.weight[0] = 0
            b.feed_forward.w2.weight[0] = 0
        model.norm.weight.zero_()
        model.norm.weight[0] = 1.0
        model.output.weight.zero_()
        model.output.weight[token, 0] = 1.0
    return model


@pytest.mark.parametrize("stop_token", [128009, 128008, 128001], ids=["eot", "eom", "end_of_text"])
def test_generation_stops_on_the_end_tokens(stop_token, tokenizer):
    engine = engine_for(rigged_to_say(tiny_model(), stop_token))
    (r,) = engine.generate(prompts([5]), SamplingParams(max_tokens=10, temperature=0.0), tokenizer)[0]
    assert r.token_ids == [stop_token] and r.finish_reason == "stop" and r.text == ""
    (r,) = engine.generate(prompts([5]), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert r.token_ids == [stop_token] * 3 and r.finish_reason == "length"


def test_stop_strings_end_generation_and_are_not_returned(tokenizer):
    model = tiny_model()
    p = prompts([9])[0]
    (free,) = engine_for(copy.deepcopy(model)).generate(
        [p], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), tokenizer
    )[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    (r,) = engine_for(model).generate(
        [p], SamplingParams(max_tokens=12, temperature=0.0, stop=[stop], ignore_eos=True), tokenizer
    )[0]
    assert r.finish_reason == "stop" and r.text == free.text[: free.text.find(stop)]
    assert len(r.token_ids) < 12


def test_block_size_is_the_papers_page():
    assert BLOCK_SIZE == 16


@pytest.mark.gpu  # skipped without CUDA (tests/conftest.py): graphs exist only on a GPU
def test_cuda_graph_decode_equals_eager_decode():
    """On CUDA, pure decode steps replay a graph captured per batch bucket: the tokens must be those
    of eager decoding (bf16 weights, the Triton kernels), and the graphs must really be used."""
    model = tiny_model()
    inv = model.inv_freq
    model = model.to(torch.bfloat16)
    model.inv_freq = inv
    model = model.to("cuda")
    ps = prompts([5, 37, 16])
    runs = {}
    for graphs in (True, False):
        engine = LLMEngine(copy.deepcopy(model), EngineConfig(num_blocks=128, cuda_graphs=graphs))
        runs[graphs] = [r[0].token_ids for r in engine.generate(ps, GREEDY)]
        if graphs:
            assert engine.runner.cuda_graphs and engine.runner._graphs, "no graph was captured"
    assert runs[True] == runs[False]
