"""Post-training data: chat-format rows with token roles, prepare --format sft|preference, the
whole-example loader (shared-prompt packing, truncation, resume, data parallelism) and the demo set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llama3hp.cli import main
from llama3hp.data import ChatFormat, DataError, Tokenizer, prepare
from llama3hp.data.chat import CONTEXT, FORMAT, RESPONSE, encode_preference, encode_sft
from llama3hp.data.demo import Function, demo_rows
from llama3hp.data.examples import ExampleLoader
from llama3hp.data.shards import TokenDataset

SFT_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
                  {"role": "assistant", "content": "Goodbye"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]  # fmt: skip
PREF_ROWS = [
    {"prompt": "Say hi", "chosen": "Hello there!", "rejected": "Go away.", "edited": "Hello!"},
    {"messages": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5, I think, or maybe 6"},
    {"prompt": "Name a colour", "chosen": "Blue", "rejected": "A number"},
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pref_dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pref")
    prepare([_jsonl(tmp / "p.jsonl", PREF_ROWS * 4)], tmp / "ds", format="preference", workers=1)
    return TokenDataset(tmp / "ds")


def test_sft_roles_train_the_assistant_text_and_eot_only(tok: Tokenizer):
    t = encode_sft(ChatFormat(tok), SFT_ROWS[0], "x line 1")
    trained = [i for i, r in zip(t.ids, t.roles) if r != CONTEXT]
    assert tok.decode(trained) == "Hello there<|eot_id|>Goodbye<|eot_id|>"
    assert [tok.decode([i]) for i, r in zip(t.ids, t.roles) if r == FORMAT] == ["<|eot_id|>"] * 2
    assert len(t.ids) == len(t.roles) and t.ids[0] == tok.bos_id


def test_prompt_and_responses_are_tokenised_apart(tok: Tokenizer):
    """A pair is prompt + chosen + rejected, each encoded alone: the response ids are exactly the
    tokenizer's ids of its text, so no BPE merge crosses the prompt/response boundary."""
    chat = ChatFormat(tok)
    p = encode_preference(chat, PREF_ROWS[0], "x line 1")
    assert p.prompt.ids == chat.encode_dialog_prompt([{"role": "user", "content": "Say hi"}])
    assert tok.decode(p.prompt.ids[-4:]) == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    for part, text in ((p.chosen, "Hello there!"), (p.rejected, "Go away."), (p.edited, "Hello!")):
        assert part is not None and part.ids == tok.encode(text) + [tok.eot_id]
        assert part.roles == [RESPONSE] * (len(part.ids) - 1) + [FORMAT]
    multi = encode_preference(chat, {"prompt": "q", "chosen": "a", "rejected": [
        {"role": "assistant", "content": "b"}, {"role": "ipython", "content": "out"},
        {"role": "assistant", "content": "c"}]}, "x line 2")  # fmt: skip
    roles = dict(zip(("b", "out", "c"), (RESPONSE, CONTEXT, RESPONSE)))
    for i, r in zip(multi.rejected.ids, multi.rejected.roles):
        if tok.decode([i]) in roles:
            assert r == roles[tok.decode([i])]
    # Formatting inside the response: the assistant turns' two eots and the second one's header (4
    # tokens); the tool turn (its header and eot included) is context.
    assert multi.rejected.roles.count(FORMAT) == 2 + 4


def test_prepare_preference_writes_roles_and_the_pair_index(pref_dataset):
    ds = pref_dataset
    assert ds.kind == "preference" and ds.manifest["version"] == 2 and ds.pairs is not None
    assert ds.pairs[:, 0].tolist() == list(range(ds.n_docs))  # sample id = the pair's document
    sid, P, C, R = ds.pairs[0].tolist()
    roles = ds.doc_roles(0)
    assert not roles[:P].any() and roles[P : P + C].all() and roles[P + C : P + C + R].all()
    assert ds.doc_lens[0] > P + C + R  # row 0 has an edited response too


def test_version_1_datasets_still_load(tmp_path):
    from llama3hp.data import write_token_dataset

    write_token_dataset(
        [np.arange(5), np.arange(7)], tmp_path / "old", tokenizer_sha256="f" * 64, vocab_size=10
    )
    m = json.loads((tmp_path / "old/manifest.json").read_text())
    m["version"] = 1
    del m["kind"]
    (tmp_path / "old/manifest.json").write_text(json.dumps(m))
    ds = TokenDataset(tmp_path / "old")
    assert ds.kind == "pretrain" and ds.n_docs == 2 and ds.pairs is None


@pytest.mark.parametrize(
    ("fmt", "line", "match"),
    [
        ("preference", "{not json", "line 2 is not valid JSON"),
        ("preference", json.dumps({"prompt": "q", "chosen": "a"}), "line 2: preference row is missing rejected"),
        ("preference", json.dumps({"chosen": "a", "rejected": "b"}), "missing prompt"),
        ("preference", json.dumps({"prompt": "q", "chosen": "  ", "rejected": "b"}), "line 2: chosen has an empty"),
        ("sft", json.dumps({"messages": [{"role": "assistant", "content": "a"}]}), "line 2: messages\\[0\\] role "
                                                                                   "'assistant' out of order"),
        ("sft", json.dumps({"messages": [{"role": "user", "content": "q"}]}), "line 2: messages ends with 'user'"),
        ("sft", json.dumps({"text": "plain"}), "line 2: an SFT row needs a 'messages' list"),
    ],
)  # fmt: skip
def test_bad_rows_are_one_line_errors_naming_file_and_line(tmp_path, fmt, line, match):
    good = PREF_ROWS[0] if fmt == "preference" else SFT_ROWS[1]
    src = _jsonl(tmp_path / "in.jsonl", [good, line])
    with pytest.raises(DataError, match=match) as e:
        prepare([src], tmp_path / "out", format=fmt, workers=1)
    assert str(src) in str(e.value) and "\n" not in str(e.value)


def test_cli_prepare_error_exits_2_with_one_line(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", [{"prompt": "q", "chosen": "a"}])
    assert main(["prepare", str(src), "--out", str(tmp_path / "o"), "--format", "preference"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "in.jsonl line 1" in err and "\n" not in err


def _pair_tokens(b) -> list[tuple[list[int], list[int]]]:
    """(chosen, rejected) response targets of every pair of a batch, as the DPO sums read them."""
    t = b.targets.reshape(-1)
    keep = b.loss_mask.reshape(-1)
    cu = b.cu_seqlens.tolist()
    seg = lambda s: [int(x) for x, k in zip(t[cu[s] : cu[s + 1]], keep[cu[s] : cu[s + 1]]) if k]
    return [(seg(c), seg(r)) for c, r in b.pairs.tolist()]


def test_shared_prompt_packing_scores_the_same_tokens_in_fewer(pref_dataset):
    shared = ExampleLoader([pref_dataset], pack_pairs="shared_prompt").epoch_batches(2, 96)
    apart = ExampleLoader([pref_dataset], pack_pairs="separate").epoch_batches(2, 96)
    pairs_s = {i: p for b in shared for i, p in zip(b.pair_ids.tolist(), _pair_tokens(b))}
    pairs_a = {i: p for b in apart for i, p in zip(b.pair_ids.tolist(), _pair_tokens(b))}
    assert pairs_s == pairs_a and len(pairs_s) == pref_dataset.n_docs  # every pair once, same targets
    used = lambda bs: sum(int((b.inputs != 128004).sum()) for b in bs)
    P = pref_dataset.pairs[:, 1].astype(int)
    assert used(apart) - used(shared) == int((P - 1).sum())  # the prompt once (its last token twice)
    b = shared[0]
    prefix = b.doc_prefix.tolist()
    for c, r in b.pairs.tolist():
        assert prefix[c] == prefix[r] == c - 1 and prefix[c - 1] == -1
        # Each response starts with the prompt's last token, which predicts the response's first token.
        assert b.inputs.reshape(-1)[b.cu_seqlens[c]] == b.inputs.reshape(-1)[b.cu_seqlens[r]]
    from llama3hp.model.rope import document_positions

    pos = document_positions(b.cu_seqlens, *b.inputs.shape, "cpu", b.doc_prefix).reshape(-1)
    c, r = b.pairs[0].tolist()
    n_prompt = int(b.cu_seqlens[c] - b.cu_seqlens[c - 1])
    assert pos[b.cu_seqlens[c]] == pos[b.cu_seqlens[r]] == n_prompt  # positions continue after the prompt


@pytest.mark.parametrize("too_long", ["truncate", "drop"])
def test_too_long_pairs_truncate_or_drop_and_are_counted(pref_dataset, too_long):
    lengths = pref_dataset.pairs[:, 1:].sum(1) + 1  # shared-prompt length of each pair
    seq = int(np.sort(lengths)[len(lengths) // 2])  # about half the pairs are too long
    loader = ExampleLoader([pref_dataset], too_long=too_long)
    report = loader.too_long_report(seq)
    n_long = int((lengths > seq).sum())
    assert report["truncated"] + report["dropped"] == n_long > 0
    assert (report["dropped"] == n_long) == (too_long == "drop")
    kept = sum(b.pairs.shape[0] for b in loader.epoch_batches(1, seq))
    assert kept == pref_dataset.n_docs - report["dropped"]
    assert all(int(b.cu_seqlens[-1]) == seq for b in loader.epoch_batches(1, seq))


def test_resume_and_data_parallel_ranks(pref_dataset):
    a = ExampleLoader([pref_dataset], seed=3)
    first = [a.next_batch(1, 80) for _ in range(3)]
    state = a.state_dict()
    after = [a.next_batch(1, 80) for _ in range(4)]
    b = ExampleLoader([pref_dataset], seed=3)
    b.load_state_dict(json.loads(json.dumps(state)))
    for x, y in zip(after, [b.next_batch(1, 80) for _ in range(4)]):
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.pair_ids, y.pair_ids)
    # Two DP ranks split each step's global rows: together they are the one-rank rows.
    whole = ExampleLoader([pref_dataset], seed=3).next_batch(2, 80)
    ranks = [ExampleLoader([pref_dataset], seed=3, dp_rank=r, dp_size=2).next_batch(1, 80) for r in range(2)]
    assert torch.equal(torch.cat([r.inputs for r in ranks]), whole.inputs)
    assert first[0].pair_ids.numel() > 0


def test_demo_rows_hold_out_whole_modules():
    fs = [
        Function(f"pkg{m}", f"f{i}", f"def f{i}(x):", "Do it.", f'def f{i}(x):\n    """Do it."""\n    y = x + {i}\n'
                 f"    z = y * 2\n    return z", f"    y = x + {i}\n    z = y * 2\n    return z")
        for m in range(30) for i in range(2)
    ]  # fmt: skip
    train, heldout = demo_rows("preference", fs)
    assert train and heldout
    assert not {r["id"].rsplit(".", 1)[0] for r in train} & {r["id"].rsplit(".", 1)[0] for r in heldout}
    for r in train + heldout:
        assert r["chosen"] != r["rejected"] and "def f" in r["rejected"] and "Do it." in r["prompt"]
    sft, _ = demo_rows("sft", fs)
    by_id = {f"{f.module}.{f.name}": f for f in fs}
    assert all(r["messages"][1]["content"] == by_id[r["id"]].source for r in sft)
