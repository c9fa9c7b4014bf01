"""Import and export of Llama 3 weights: Hugging Face `LlamaForCausalLM` (safetensors) and Meta's
`consolidated.*.pth` layout.

Our rotary layout is the half-split one (kernels/rope.py), the same as Hugging Face's, so HF
tensors map by name only. Meta's checkpoints rotate interleaved pairs (x[2i], x[2i+1]); their
wq/wk rows are permuted on the way in and out so that the three layouts compute the same model.
Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from llama3hp.errors import ConfigError, MissingFileError
from llama3hp.model.args import ModelArgs

BOS_ID, EOS_ID = 128000, 128001

# our name (with {i} for the layer) -> HF name
_HF_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_HF_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _atomic_write(path: Path, write) -> None:
    """Calls write(tmp_path), then renames tmp_path to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def _half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from half-split rotary order to Meta's interleaved order (per head)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _check_keys(sd: dict, args: ModelArgs, what: str) -> None:
    expected = {"tok_embeddings.weight", "norm.weight"} | (
        set() if args.tie_embeddings else {"output.weight"}
    )
    expected |= {f"layers.{i}.{k}" for i in range(args.n_layers) for k in _HF_LAYER}
    missing, extra = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or extra:
        raise ConfigError(
            f"{what}: state dict does not match the config (missing {missing[:3]}, unexpected {extra[:3]})"
        )


# ---------------------------------------------------------------- Hugging Face


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        m = _LAYER_RE.match(k)
        out[f"model.layers.{m[1]}.{_HF_LAYER[m[2]]}" if m else _HF_TOP[k]] = v
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inv_layer = {v: k for k, v in _HF_LAYER.items()}
    inv_top = {v: k for k, v in _HF_TOP.items()}
    out = {}
    for k, v in hf.items():
        m = _HF_LAYER_RE.match(k)
        if m and m[2] in inv_layer:
            out[f"layers.{m[1]}.{inv_layer[m[2]]}"] = v
        elif k in inv_top:
            out[inv_top[k]] = v
        elif k.endswith("rotary_emb.inv_freq"):  # older HF checkpoints store this buffer
            continue
        else:
            raise ConfigError(
                f"unexpected tensor {k!r} in the Hugging Face checkpoint: is it a LlamaForCausalLM?"
            )
    return out


def hf_max_position_embeddings(args: ModelArgs) -> int:
    """max_position_embeddings for config.json. transformers warns unless the Llama 3.1 scaling's
    original_max_position_embeddings (8192) is below it, and the tiny preset's context is 2048: then
    the context the scaling stretches the original window to (factor x 8192) is written. HF's Llama
    reads the value only in that check, so the model computes the same."""
    if args.rope_scaling and args.max_seq_len <= args.rope_original_max_seq_len:
        return int(args.rope_scale_factor * args.rope_original_max_seq_len)
    return args.max_seq_len


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": hf_max_position_embeddings(args),
        # Our own context length, read back by the importer when max_position_embeddings had to be
        # raised (transformers keeps unknown keys silently).
        "llama3hp_max_seq_len": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": args.init_std,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "rope_scaling": None,
    }
    if args.rope_scaling:
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": args.rope_scale_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max_seq_len,
        }
    return cfg


_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
}  # fmt: skip


def _rope_from_hf_config(cfg: dict) -> tuple[float, dict | None]:
    """(θ, the Llama 3.1 scaling dict or None) from any of the config forms transformers writes:
    - up to transformers 4: top-level `rope_theta` and `rope_scaling` (None, or {"rope_type": "llama3", ...});
    - transformers 5: `rope_parameters` ({"rope_type": "default" | "llama3", "rope_theta": ..., ...})
      and neither top-level key.
    Every form gives the same model. A RoPE type or key llama3hp does not implement, or two forms
    that disagree, is a ConfigError: a silent default would compute other logits from position 1 on.
    No RoPE setting at all is θ = 10,000 without scaling, as transformers itself reads it."""
    params, scaling, theta = cfg.get("rope_parameters"), cfg.get("rope_scaling"), cfg.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ConfigError(f"unrecognised rope_parameters in config.json: {params!r:.120}")
        if theta is not None and params.get("rope_theta", theta) != theta:
            raise ConfigError(
                f"config.json gives rope_theta {theta} and rope_parameters.rope_theta {params['rope_theta']}"
            )
        if scaling and any(params.get(k) != v for k, v in scaling.items() if k not in ("type", "rope_type")):
            raise ConfigError("config.json's rope_scaling and rope_parameters disagree")
        theta = params.get("rope_theta", theta)
        scaling = params
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"unrecognised rope_scaling in config.json: {scaling!r:.120}")
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in _ROPE_KEYS:
        raise ConfigError(
            f"unsupported RoPE type {rope_type!r} in config.json: llama3hp implements 'default' and "
            "'llama3' (Llama 3.1 scaling)"
        )
    unknown = sorted(set(scaling or {}) - _ROPE_KEYS[rope_type])
    if unknown:
        raise ConfigError(
            f"unrecognised RoPE setting(s) {unknown} for rope_type {rope_type!r} in config.json"
        )
    if theta is None:
        theta = 10000.0
    if not isinstance(theta, int | float) or theta <= 0:
        raise ConfigError(f"rope_theta in config.json must be a positive number, got {theta!r}")
    return float(theta), (scaling if rope_type == "llama3" else None)


def args_from_hf_config(cfg: dict) -> ModelArgs:
    if cfg.get("model_type", "llama") != "llama":
        raise ConfigError(f"config.json is for model_type {cfg.get('model_type')!r}, not 'llama'")
    dim, hidden = cfg["hidden_size"], cfg["intermediate_size"]
    theta, rs = _rope_from_hf_config(cfg)
    args = ModelArgs(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        max_seq_len=cfg.get("llama3hp_max_seq_len", cfg.get("max_position_embeddings", 8192)),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        # HF stores the FFN width itself; express it exactly as Llama's rule with multiple_of = hidden.
        multiple_of=hidden,
        ffn_dim_multiplier=None,
    )
    if args.ffn_dim != hidden:  # the rule rounds up to one multiple of `hidden` only if 8/3*dim <= hidden
        args.ffn_dim_multiplier = hidden / int(2 * 4 * dim / 3)
    args.rope_scaling = rs is not None
    if rs is not None:
        try:
            args.rope_scale_factor = float(rs["factor"])
            args.rope_low_freq_factor = float(rs["low_freq_factor"])
            args.rope_high_freq_factor = float(rs["high_freq_factor"])
            args.rope_original_max_seq_len = int(rs["original_max_position_embeddings"])
        except KeyError as e:
            raise ConfigError(f"config.json's llama3 RoPE scaling lacks {e.args[0]!r}") from None
    if args.ffn_dim != hidden:
        raise ConfigError(f"cannot express intermediate_size {hidden} with Llama's FFN rule for dim {dim}")
    return args.validate()


def save_hf(
    sd: dict[str, torch.Tensor],
    args: ModelArgs,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Writes config.json and model(-0000k-of-0000n).safetensors (+ index) in HF's layout."""
    from safetensors.torch import save_file

    _check_keys(sd, args, "export to Hugging Face")
    out_dir = Path(out_dir)
    hf = {
        k: (v.to(dtype) if dtype else v).detach().cpu().contiguous() for k, v in to_hf_state_dict(sd).items()
    }
    shards: list[dict] = [{}]
    size = 0
    for k in sorted(hf):
        nbytes = hf[k].numel() * hf[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = hf[k]
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards):
        _atomic_write(out_dir / name, lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(v.numel() * v.element_size() for v in hf.values())
        _write_json(
            out_dir / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    dt = dtype or next(iter(hf.values())).dtype
    _write_json(out_dir / "config.json", hf_config(args, dt))
    return out_dir


def load_hf(src: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Reads an HF LlamaForCausalLM folder (config.json + safetensors) into (args, our state dict)."""
    from safetensors.torch import load_file

    src = Path(src)
    if not (src / "config.json").is_file():
        raise MissingFileError(f"no config.json in {src}: point to a Hugging Face LlamaForCausalLM folder")
    args = args_from_hf_config(json.loads((src / "config.json").read_text()))
    index = src / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else sorted(p.name for p in src.glob("*.safetensors"))
    )
    if not files:
        raise MissingFileError(f"no .safetensors files in {src}")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(src / f))
    if args.tie_embeddings:
        hf.pop("lm_head.weight", None)
    sd = from_hf_state_dict(hf)
    _check_keys(sd, args, f"import from {src}")
    return args, sd


# ---------------------------------------------------------------- Meta


def meta_params(args: ModelArgs) -> dict:
    return {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": args.multiple_of,
        "ffn_dim_multiplier": args.ffn_dim_multiplier,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "use_scaled_rope": args.rope_scaling,
        # Meta's params.json has no field for these; written so a round trip keeps them.
        "rope_scale_factor": args.rope_scale_factor,
        "rope_low_freq_factor": args.rope_low_freq_factor,
        "rope_high_freq_factor": args.rope_high_freq_factor,
        "rope_original_max_seq_len": args.rope_original_max_seq_len,
        "tie_embeddings": args.tie_embeddings,
        "max_seq_len": args.max_seq_len,
    }


def args_from_meta_params(p: dict) -> ModelArgs:
    args = ModelArgs(
        dim=p["dim"],
        n_layers=p["n_layers"],
        n_heads=p["n_heads"],
        n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
        vocab_size=p["vocab_size"],
        multiple_of=p.get("multiple_of", 256),
        ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
        norm_eps=p.get("norm_eps", 1e-5),
        rope_theta=p.get("rope_theta", 500000.0),
        rope_scaling=bool(p.get("use_scaled_rope", False)),
        tie_embeddings=bool(p.get("tie_embeddings", False)),
        max_seq_len=p.get("max_seq_len", 131072),
    )
    for key in (
        "rope_scale_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_original_max_seq_len",
    ):
        if key in p:
            setattr(args, key, p[key])
    return args.validate()


def to_meta_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for i in range(args.n_layers):
        out[f"layers.{i}.attention.wq.weight"] = _half_to_interleaved(
            sd[f"layers.{i}.attention.wq.weight"], args.n_heads
        )
        out[f"layers.{i}.attention.wk.weight"] = _half_to_interleaved(
            sd[f"layers.{i}.attention.wk.weight"], args.n_kv_heads
        )
    return out


def from_meta_state_dict(meta: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in meta.items() if k != "rope.freqs"}  # Meta's older checkpoints store freqs
    if args.tie_embeddings:
        out.pop("output.weight", None)
    for i in range(args.n_layers):
        for w, heads in (("wq", args.n_heads), ("wk", args.n_kv_heads)):
            key = f"layers.{i}.attention.{w}.weight"
            if key in out:
                out[key] = _interleaved_to_half(out[key], heads)
    return out


def save_meta(
    sd: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path, *, dtype: torch.dtype | None = None
) -> Path:
    """Writes params.json and consolidated.00.pth (a single model-parallel shard) in Meta's layout."""
    _check_keys(sd, args, "export to Meta")
    out_dir = Path(out_dir)
    meta = {
        k: (v.to(dtype) if dtype else v).detach().cpu().contiguous()
        for k, v in to_meta_state_dict(sd, args).items()
    }
    _atomic_write(out_dir / "consolidated.00.pth", lambda tmp: torch.save(meta, tmp))
    _write_json(out_dir / "params.json", meta_params(args))
    return out_dir


def load_meta(src: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Reads a Meta folder (params.json + consolidated.*.pth) into (args, our state dict).

    Several consolidated.NN.pth files are Meta's model-parallel shards; they are concatenated along
    the dimension each tensor was split on (rows for wq/wk/wv/w1/w3/output, columns for wo/w2
    and the embedding, replicated norms).
    """
    src = Path(src)
    if not (src / "params.json").is_file():
        raise MissingFileError(f"no params.json in {src}: point to a Meta consolidated checkpoint folder")
    args = args_from_meta_params(json.loads((src / "params.json").read_text()))
    files = sorted(src.glob("consolidated.*.pth"))
    if not files:
        raise MissingFileError(f"no consolidated.*.pth in {src}")
    parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    if len(parts) == 1:
        meta = parts[0]
    else:
        meta = {}
        for k in parts[0]:
            if k.endswith("norm.weight") or k == "rope.freqs":
                meta[k] = parts[0][k]
            else:
                col = k.endswith(("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight"))
                meta[k] = torch.cat([p[k] for p in parts], dim=1 if col else 0)
    sd = from_meta_state_dict(meta, args)
    _check_keys(sd, args, f"import from {src}")
    return args, sd
