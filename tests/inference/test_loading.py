"""Loading a model to serve from every checkpoint format, and the Hugging Face config forms.

transformers 5 writes `rope_parameters` (θ inside, no top-level rope_theta or rope_scaling);
transformers 4 wrote `rope_theta` and `rope_scaling`. Every form must give the same model (the
logits of transformers' own LlamaForCausalLM), an unknown RoPE setting must be refused, and the
config we export must load in transformers without a warning.
"""

from __future__ import annotations

import copy
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from serving_testing import tiny_model

from benchmarks.hf_peer import import_transformers, load_hf_model
from llama3hp.errors import ConfigError
from llama3hp.inference.loading import checkpoint_format, load_plain_model, load_serving_model
from llama3hp.model.convert import hf_config, load_hf, save_hf, save_meta

FIXTURE = Path(__file__).parents[1] / "train" / "fixtures" / "v0.1-one-process" / "step-00000002"


def tokens(n=21):
    return torch.randint(0, 128_000, (1, n), generator=torch.Generator().manual_seed(4))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits()


@pytest.fixture(scope="module")
def transformers():
    return import_transformers()


class TransformersLog:
    """Records what transformers logs (its warnings go through the `transformers` logger)."""

    def __enter__(self):
        self.buf = io.StringIO()
        self.handler = logging.StreamHandler(self.buf)
        logging.getLogger("transformers").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self.handler)

    @property
    def text(self) -> str:
        return self.buf.getvalue()


@pytest.mark.parametrize("scaling", [True, False], ids=["llama3_scaling", "default_rope"])
def test_a_model_saved_by_transformers_5_imports_as_the_same_model(tmp_path, transformers, scaling):
    kw = {} if scaling else {"rope_scaling": False, "rope_theta": 10000.0}
    ours = tiny_model(**kw)
    save_hf(ours.state_dict(), ours.args, tmp_path / "ours")
    hf = load_hf_model(tmp_path / "ours", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "by_transformers")  # what a user of transformers 5 has on disk
    cfg = json.loads((tmp_path / "by_transformers" / "config.json").read_text())
    assert "rope_parameters" in cfg and "rope_theta" not in cfg and "rope_scaling" not in cfg
    model = load_plain_model(tmp_path / "by_transformers")
    assert model.args.rope_theta == ours.args.rope_theta and model.args.rope_scaling == scaling
    x = tokens()
    with torch.no_grad():
        want = hf(x).logits
    torch.testing.assert_close(logits(model, x), want, rtol=1e-5, atol=1e-5)


def test_every_config_form_gives_the_same_args(tmp_path):
    ours = tiny_model()
    save_hf(ours.state_dict(), ours.args, tmp_path)
    old = json.loads((tmp_path / "config.json").read_text())  # rope_theta + rope_scaling
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {**old["rope_scaling"], "rope_theta": old["rope_theta"]}
    both = {**old, "rope_parameters": new["rope_parameters"]}
    got = []
    for cfg in (old, new, both):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        got.append(load_hf(tmp_path)[0])
    assert got[0] == got[1] == got[2]
    rope = ("rope_theta", "rope_scaling", "rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor",
            "rope_original_max_seq_len", "max_seq_len", "ffn_dim")  # fmt: skip
    assert all(getattr(got[0], f) == getattr(ours.args, f) for f in rope)


@pytest.mark.parametrize(
    "change, match",
    [
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
            "unsupported RoPE type 'yarn'",
        ),
        (
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 5e5,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                    "beta": 1,
                }
            },
            "unrecognised RoPE setting",
        ),  # fmt: skip
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_theta": 5e5}, "rope_theta"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "unsupported RoPE type 'linear'"),
    ],
    ids=["unknown_type", "unknown_key", "disagreeing_theta", "old_form_unknown_type"],
)
def test_an_unrecognised_rope_setting_is_an_error(tmp_path, change, match):
    ours = tiny_model()
    save_hf(ours.state_dict(), ours.args, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_theta")}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConfigError, match=match):
        load_hf(tmp_path)


def test_the_exported_config_loads_in_transformers_without_a_warning(tmp_path, transformers):
    ours = tiny_model()  # context 512 < the Llama 3.1 scaling's original 8192
    save_hf(ours.state_dict(), ours.args, tmp_path)
    with TransformersLog() as log:
        transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert log.text == ""
    args, _ = load_hf(tmp_path)
    assert args.max_seq_len == 512  # the round trip keeps our context length
    cfg = hf_config(ours.args, torch.bfloat16)
    cfg["max_position_embeddings"] = ours.args.max_seq_len  # what was written before the fix
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with TransformersLog() as log:
        transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert "original_max_position_embeddings" in log.text  # the control: transformers does warn


@pytest.mark.parametrize("fmt", ["hf", "meta", "llama3hp"])
def test_serving_loads_every_format_to_the_same_logits(tmp_path, fmt):
    model = tiny_model()
    ref = copy.deepcopy(model)
    sd = model.state_dict()
    if fmt == "hf":
        save_hf(sd, model.args, tmp_path, dtype=torch.float32)
    elif fmt == "meta":
        save_meta(sd, model.args, tmp_path, dtype=torch.float32)
    else:
        import dataclasses

        from llama3hp.train.checkpoint import save_checkpoint

        save_checkpoint(tmp_path, 0, model_state=sd, optim_state=None,
                        train_state={"model_args": dataclasses.asdict(model.args)})  # fmt: skip
    assert checkpoint_format(tmp_path) == fmt
    served = load_serving_model(tmp_path, device=torch.device("cpu"))
    x = tokens()
    torch.testing.assert_close(logits(served, x), logits(ref, x), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_written_before_serving_existed_loads(tmp_path):
    """The one-process training checkpoint committed with the trainer tests (an older layout)."""
    model = load_plain_model(FIXTURE)
    assert model.args.dim == 32 and model.args.vocab_size == 256
    served = load_serving_model(FIXTURE, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert served.output.weight.dtype == torch.bfloat16 and served.inv_freq.dtype == torch.float32
    x = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(logits(served, x).float(), logits(model, x), rtol=0.05, atol=0.05)


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_serving_model(tmp_path / "nope")
