"""Checkpoint files, manifest, atomicity, pruning and averaging on a small stand-in module."""

import json
import random

import numpy as np
import pytest
import torch

from llama3hp.train import checkpoint as ckpt
from llama3hp.train.average import average_checkpoints, average_state_dicts


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True)
    m(torch.randn(5, 8)).square().sum().backward()
    opt.step()
    opt.zero_grad()
    return m, opt


def _save(folder, step, m, opt, keep=0):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(m, opt)
    return ckpt.save_checkpoint(
        folder,
        step,
        model_state=msd,
        optim_state=osd,
        train_state={"tokens_seen": step * 10},
        rng=ckpt.rng_state(),
        keep=keep,
    )


def test_save_load_roundtrip_restores_model_optimizer_and_rng(tmp_path):
    m, opt = _model_and_opt(0)
    path = _save(tmp_path, 3, m, opt)
    assert path.name == "step-00000003"
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"
    files = json.loads((path / ckpt.MANIFEST).read_text())["files"]
    assert {".metadata", ckpt.TRAIN_STATE, ckpt.RNG_STATE} <= set(files)
    m2, opt2 = _model_and_opt(1)
    state = ckpt.load_checkpoint(tmp_path, m2, opt2)
    assert state["step"] == 3 and state["tokens_seen"] == 30 and state["kind"] == "full"
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in s1:
        assert torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"])
    rng = ckpt.read_rng_state(path)
    ckpt.set_rng_state(rng)
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(rng)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_flipped_byte_is_reported_with_the_file_name(tmp_path):
    m, opt = _model_and_opt()
    path = _save(tmp_path, 1, m, opt)
    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"corrupted.*\.distcp"):
        ckpt.load_checkpoint(path, *_model_and_opt())


def test_crash_before_rename_leaves_latest_on_previous(tmp_path, monkeypatch):
    m, opt = _model_and_opt()
    _save(tmp_path, 1, m, opt)

    def crash(tmp, final):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(ckpt, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, m, opt)
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-00000001"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    monkeypatch.undo()
    _save(tmp_path, 2, m, opt)  # the stale .tmp folder is replaced
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-00000002"
    assert not list(tmp_path.glob("*.tmp"))


def test_keep_prunes_old_checkpoints(tmp_path):
    m, opt = _model_and_opt()
    for step in range(1, 5):
        _save(tmp_path, step, m, opt, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_missing_and_incomplete_checkpoints(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)
    (tmp_path / "step-00000001").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.verify_checkpoint(tmp_path / "step-00000001")


def test_shape_mismatch_is_one_clear_line(tmp_path):
    m, opt = _model_and_opt()
    _save(tmp_path, 1, m, opt)
    other = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 4))
    with pytest.raises(ckpt.CheckpointError, match=r"shape \(16, 8\).*\(32, 8\)"):
        ckpt.load_checkpoint(tmp_path, other)


def test_average_equals_the_elementwise_mean(tmp_path):
    states = []
    for step in range(1, 4):
        m, opt = _model_and_opt(seed=step)
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        _save(tmp_path / "ckpts", step, m, opt)
    out = average_checkpoints([tmp_path / "ckpts"], tmp_path / "avg", last=2)
    avg = ckpt.load_model_state(out)
    assert out.name == "step-00000003"
    assert ckpt.read_train_state(out)["kind"] == "weights"
    for k in states[0]:
        torch.testing.assert_close(avg[k], (states[1][k] + states[2][k]) / 2, rtol=0, atol=1e-7)
    full = average_state_dicts(states)
    for k in states[0]:
        torch.testing.assert_close(full[k], sum(s[k] for s in states) / 3, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="shape"):
        average_state_dicts([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}])
