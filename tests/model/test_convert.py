"""HF and Meta import/export: exact round trips, and the RoPE permutation is the right one."""

import dataclasses

import pytest
import torch

from llama3hp.kernels import apply_rope_ref
from llama3hp.model import Transformer, get_model_args, rope_inv_freq
from llama3hp.model.convert import (
    _half_to_interleaved,
    _interleaved_to_half,
    load_hf,
    load_meta,
    save_hf,
    save_meta,
)


def build(**kw):
    args = dataclasses.replace(
        get_model_args("tiny"),
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=101,
        multiple_of=32,
        **kw,
    )
    with torch.device("meta"):
        m = Transformer(args)
    m.to_empty(device="cpu")
    m.init_weights(3)
    return args, m


def assert_same_model(args, sd, args2, sd2):
    assert args2.ffn_dim == args.ffn_dim and args2.head_dim == args.head_dim
    for f in (
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "rope_theta",
        "rope_scaling",
        "rope_scale_factor",
        "tie_embeddings",
        "norm_eps",
    ):
        assert getattr(args2, f) == getattr(args, f), f
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k


@pytest.mark.parametrize("tie", [False, True])
def test_hf_round_trip_is_exact(tmp_path, tie):
    args, m = build(tie_embeddings=tie)
    sd = m.state_dict()
    save_hf(sd, args, tmp_path / "hf", max_shard_bytes=200_000)  # forces several shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    args2, sd2 = load_hf(tmp_path / "hf")
    assert_same_model(args, sd, args2, sd2)
    with torch.device("meta"):
        m2 = Transformer(args2)
    m2.to_empty(device="cpu")
    m2.load_state_dict(sd2)
    m2.inv_freq = rope_inv_freq(args2)
    x = torch.randint(0, 101, (1, 9))
    torch.testing.assert_close(m2(x).logits(), m(x).logits(), rtol=0, atol=0)


def test_hf_names(tmp_path):
    args, m = build()
    save_hf(m.state_dict(), args, tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
    } <= keys


def test_meta_round_trip_is_exact(tmp_path):
    args, m = build()
    sd = m.state_dict()
    save_meta(sd, args, tmp_path / "meta")
    args2, sd2 = load_meta(tmp_path / "meta")
    assert_same_model(args, sd, args2, sd2)
    raw = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert not torch.equal(raw["layers.0.attention.wq.weight"], sd["layers.0.attention.wq.weight"])


def test_meta_model_parallel_shards_are_concatenated(tmp_path):
    args, m = build()
    sd = m.state_dict()
    save_meta(sd, args, tmp_path / "one")
    full = torch.load(tmp_path / "one" / "consolidated.00.pth", weights_only=True)
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "params.json").write_text((tmp_path / "one" / "params.json").read_text())
    for r in range(2):
        part = {}
        for k, v in full.items():
            if k.endswith("norm.weight"):
                part[k] = v
            elif k.endswith(("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")):
                part[k] = v.chunk(2, dim=1)[r].clone()
            else:
                part[k] = v.chunk(2, dim=0)[r].clone()
        torch.save(part, tmp_path / "two" / f"consolidated.0{r}.pth")
    _, sd2 = load_meta(tmp_path / "two")
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k


def _rope_interleaved(x, positions, inv_freq):
    """Meta's rotary embedding: complex multiplication of interleaved pairs."""
    angles = positions.float()[..., None] * inv_freq
    rot = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot).flatten(-2)


def test_rope_permutation_makes_meta_and_half_split_layouts_equal():
    """Scores q.k computed Meta's way on permuted weights equal ours: the export is the same model."""
    args, m = build()
    attn = m.layers["0"].attention
    x = torch.randn(1, 7, args.dim)
    pos = torch.arange(7)[None]
    hd = args.head_dim
    q = attn.wq(x).view(1, 7, -1, hd)
    k = attn.wk(x).view(1, 7, -1, hd)
    q_half, k_half = apply_rope_ref(q, k, pos, m.inv_freq)
    wq_meta = _half_to_interleaved(attn.wq.weight, args.n_heads)
    wk_meta = _half_to_interleaved(attn.wk.weight, args.n_kv_heads)
    q_meta = _rope_interleaved((x @ wq_meta.T).view(1, 7, -1, hd), pos, m.inv_freq)
    k_meta = _rope_interleaved((x @ wk_meta.T).view(1, 7, -1, hd), pos, m.inv_freq)
    g = args.n_heads // args.n_kv_heads
    s_half = torch.einsum("bqhd,bkhd->bhqk", q_half, k_half.repeat_interleave(g, 2))
    s_meta = torch.einsum("bqhd,bkhd->bhqk", q_meta, k_meta.repeat_interleave(g, 2))
    torch.testing.assert_close(s_meta, s_half, rtol=1e-5, atol=1e-5)
    assert torch.equal(_interleaved_to_half(wq_meta, args.n_heads), attn.wq.weight)


@pytest.mark.parametrize("fn, msg", [(load_hf, "no config.json"), (load_meta, "no params.json")])
def test_import_from_wrong_folder_fails_clearly(tmp_path, fn, msg):
    with pytest.raises(FileNotFoundError, match=msg):
        fn(tmp_path)
