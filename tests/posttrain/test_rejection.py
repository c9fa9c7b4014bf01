"""`llama3hp rejection-sample` end to end on tiny random checkpoints (full vocabulary, so the real
tokenizer's ids fit): one SFT row per prompt with the reward model's best sample, resume after a kill
never writing a prompt twice, and each bad input's one-line error."""

from __future__ import annotations

import json

import pytest
import torch

from llama3hp.cli import main
from llama3hp.model import ModelArgs, Transformer
from llama3hp.posttrain import rejection
from llama3hp.posttrain.rejection import RejectionConfig, RejectionError, rejection_sample
from llama3hp.train import checkpoint as ckpt

PROMPTS = [
    {"prompt": "Say hi", "id": "a"},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    {"prompt": [{"role": "user", "content": "Name a colour"}], "chosen": "Blue", "rejected": "A number"},
]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _checkpoint(folder, head: str, vocab: int = 128256, seed: int = 0):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab, multiple_of=32,
                     ffn_dim_multiplier=None, max_seq_len=256, head=head)  # fmt: skip
    model = Transformer(args)
    model.init_weights(seed)
    import dataclasses

    ckpt.save_model_checkpoint(folder, 1, model, None, train_state={"model_args": dataclasses.asdict(args)})
    return str(folder)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rs")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return {
        "policy": _checkpoint(tmp / "policy", "lm"), "reward": _checkpoint(tmp / "reward", "reward", seed=1),
        "prompts": str(prompts),
    }  # fmt: skip


def _cfg(ckpts, out, **kw):
    base = dict(k=4, max_tokens=6, kv_memory_gib=0.02, device="cpu", prompts_per_batch=2)
    base.update(kw)
    return RejectionConfig(ckpts["policy"], ckpts["reward"], ckpts["prompts"], str(out), **base)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_writes_one_sft_row_per_prompt_with_the_best_sample(ckpts, tmp_path):
    out = tmp_path / "out.jsonl"
    s = rejection_sample(_cfg(ckpts, out, keep_candidates=True, system="Answer briefly."), progress=False)
    rows = _rows(out)
    assert [r["prompt_index"] for r in rows] == [0, 1, 2] and s.prompts == 3 and s.responses == 12
    assert rows[0]["id"] == "a" and rows[1]["id"] == 1
    for r in rows:
        msgs = r["messages"]
        assert msgs[0] == {"role": "system", "content": "Answer briefly."} and msgs[-1]["role"] == "assistant"
        assert msgs[-2]["role"] == "user"  # the SFT row's own reply was dropped from the prompt
        cands = r["candidates"]
        assert len(cands) == 4
        best = max(c["reward"] for c in cands if c["text"].strip())
        assert r["reward"] == best and msgs[-1]["content"] == next(
            c["text"].strip() for c in cands if c["reward"] == best
        )
    assert s.mean_reward_best >= s.mean_reward_random and s.kv_blocks_peak > 0
    # The rows are SFT data as they are.
    from llama3hp.data import prepare

    m = prepare([out], tmp_path / "sft", format="sft", workers=1)
    assert m["n_docs"] == 3


def test_shared_and_separate_prompts_write_the_same_kind_of_rows(ckpts, tmp_path):
    s = rejection_sample(_cfg(ckpts, tmp_path / "o.jsonl", share_prompt=False, limit=2), progress=False)
    assert s.prompts == 2 and s.responses == 8


def test_resume_after_a_kill_never_writes_a_prompt_twice(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    real = rejection._loop
    calls = {"n": 0}

    class Killed(BaseException):
        pass

    def scorer_that_dies(scorer):
        score = scorer.score

        def dying(groups):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Killed
            return score(groups)

        scorer.score = dying
        return scorer

    def loop(cfg, todo, engine, scorer, *rest):
        return real(cfg, todo, engine, scorer_that_dies(scorer), *rest)

    monkeypatch.setattr(rejection, "_loop", loop)
    with pytest.raises(Killed):
        rejection_sample(_cfg(ckpts, out, prompts_per_batch=1), progress=False)
    monkeypatch.setattr(rejection, "_loop", real)
    assert [r["prompt_index"] for r in _rows(out)] == [0]
    with open(out, "ab") as f:
        f.write(b'{"messages": [{"role": "us')  # a row cut by the kill
    s = rejection_sample(_cfg(ckpts, out, prompts_per_batch=1), progress=False)
    assert s.skipped_done == 1 and s.prompts == 2
    assert sorted(r["prompt_index"] for r in _rows(out)) == [0, 1, 2]
    s = rejection_sample(_cfg(ckpts, out), progress=False)  # all done: nothing sampled
    assert s.prompts == 0 and s.skipped_done == 3 and len(_rows(out)) == 3


def _cli(capsys, ckpts, out, *extra, policy=None, reward=None, prompts=None):
    code = main(["rejection-sample", "--policy", policy or ckpts["policy"], "--reward", reward or ckpts["reward"],
                 "--prompts", prompts or ckpts["prompts"], "--out", str(out), "--k", "2", "--max-tokens", "4",
                 "--kv-memory-gib", "0.02", "--device", "cpu", *extra])  # fmt: skip
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_end_to_end_and_bad_inputs(ckpts, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    code, err = _cli(capsys, ckpts, out, "--limit", "1")
    assert code == 0 and "1 prompts written" in err and len(_rows(out)) == 1

    def fails(match, *extra, **kw):
        target = kw.pop("out", tmp_path / "new.jsonl")
        code, err = _cli(capsys, ckpts, target, *extra, **kw)
        assert code == 2 and err.startswith("error: ") and "\n" not in err and match in err, err
        assert not (tmp_path / "new.jsonl").exists()  # nothing half-written

    fails("--k must be in [1, 30]", "--k", "0")
    fails("--k must be in [1, 30]", "--k", "31")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "x", oops}\n')
    fails(f"{bad} line 2 is not valid JSON", prompts=str(bad))
    bad.write_text('{"prompt": "ok"}\n\n{"text": "no prompt"}\n')
    fails(f"{bad} line 3", prompts=str(bad))
    fails("is a reward model", policy=ckpts["reward"])
    fails("not a reward model", reward=ckpts["policy"])
    other = _checkpoint(tmp_path / "other_vocab", "reward", vocab=128300)
    fails("different vocabularies", reward=other)
    # Another run's rows (other settings) in the output file.
    code, err = _cli(capsys, ckpts, out, "--limit", "1", "--temperature", "0.7")
    assert code == 2 and "already holds rows of another run" in err
    assert len(_rows(out)) == 1


def test_policy_and_reward_with_different_tokenizers(ckpts, monkeypatch):
    real = rejection.checkpoint_identity

    def ident(path):
        args, tok, h = real(path)
        return args, (tok if path == ckpts["policy"] else "f" * 64), h

    monkeypatch.setattr(rejection, "checkpoint_identity", ident)
    with pytest.raises(RejectionError, match="different tokenizers"):
        rejection.check_pair(ckpts["policy"], ckpts["reward"])


def test_hf_and_meta_identities_come_from_their_configs_not_their_weights(tmp_path, monkeypatch):
    """Checking a policy/reward pair reads config.json / params.json only: an 8B's weights are not loaded."""
    from llama3hp.model import convert

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=64, ffn_dim_multiplier=None,
                     max_seq_len=128)  # fmt: skip
    model = Transformer(args)
    model.init_weights(0)
    convert.save_hf(model.state_dict(), args, tmp_path / "hf")
    convert.save_meta(model.state_dict(), args, tmp_path / "meta")
    want = {
        name: load(tmp_path / name)[0]
        for name, load in (("hf", convert.load_hf), ("meta", convert.load_meta))
    }

    def no_weights(*a, **k):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(convert, "load_hf", no_weights)
    monkeypatch.setattr(convert, "load_meta", no_weights)
    for name in ("hf", "meta"):
        got, _, digest = rejection.checkpoint_identity(tmp_path / name)
        assert got == want[name] and len(digest) == 64
