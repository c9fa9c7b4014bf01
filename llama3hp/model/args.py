"""Model configuration: the Llama 3 architecture's hyper-parameters and the published presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from llama3hp.errors import ConfigError
from llama3hp.kernels.dispatch import check_backend

HEADS = ("lm", "reward")


@dataclass
class KernelConfig:
    """Which implementation each fused op uses: "auto" (Triton on CUDA), "triton" or "torch"."""

    rmsnorm: str = "auto"
    rope: str = "auto"
    swiglu: str = "auto"
    attention: str = "auto"
    cross_entropy: str = "auto"

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            try:
                check_backend(getattr(self, f.name))
            except ValueError as e:
                raise ConfigError(f"model.kernels.{f.name}: {e}") from None


@dataclass
class ModelArgs:
    """Llama 3 hyper-parameters. Defaults are Llama 3.1 8B."""

    dim: int = 4096  # model (residual stream) width
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int = 8  # key/value heads (grouped-query attention)
    vocab_size: int = 128256  # 128,000 BPE ranks + 256 special tokens
    multiple_of: int = 1024  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = 1.3  # scales Llama's 8/3*dim FFN rule
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 500000.0  # RoPE base frequency
    rope_scaling: bool = True  # Llama 3.1 frequency scaling (long context)
    rope_scale_factor: float = 8.0  # low frequencies are divided by this
    rope_low_freq_factor: float = 1.0  # wavelengths above original_len/low are fully scaled
    rope_high_freq_factor: float = 4.0  # wavelengths below original_len/high are kept
    rope_original_max_seq_len: int = 8192  # context length the frequencies were trained at
    max_seq_len: int = 131072  # longest sequence the model is meant for
    doc_positions: bool = True  # RoPE positions restart at 0 in every packed document
    tie_embeddings: bool = False  # share the output head with the token embedding (Llama 3.2 1B/3B)
    init_std: float = 0.02  # std of the normal initialisation
    # "lm": the output head projects to the vocabulary; "reward": a scalar value head (one row, D
    # weights: `output.score`) read at the last token of each response (a reward model)
    head: str = "lm"
    kernels: KernelConfig = field(default_factory=KernelConfig)  # fused-op implementations

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Llama's SwiGLU hidden size: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def validate(self) -> ModelArgs:
        checks = [
            (
                self.dim > 0 and self.n_layers > 0 and self.n_heads > 0,
                "dim, n_layers and n_heads must be positive",
            ),
            (self.dim % self.n_heads == 0, f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})"),
            (
                self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
            ),
            (self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for RoPE"),
            (self.vocab_size > 0 and self.multiple_of > 0, "vocab_size and multiple_of must be positive"),
            (self.head in HEADS, f"head must be one of {', '.join(HEADS)}, got '{self.head}'"),
            (self.head == "lm" or not self.tie_embeddings, "a reward head cannot tie to the embedding"),
            (
                not self.rope_scaling or self.rope_high_freq_factor > self.rope_low_freq_factor,
                "rope_high_freq_factor must exceed rope_low_freq_factor",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"invalid model config: {msg}")
        self.kernels.validate()
        return self


def llama3_8b() -> ModelArgs:
    """Llama 3.1 8B: 8.03B parameters."""
    return ModelArgs()


def llama3_70b() -> ModelArgs:
    """Llama 3.1 70B: 70.6B parameters."""
    return ModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3
    )


def llama3_405b() -> ModelArgs:
    """Llama 3.1 405B: 126 layers, dim 16,384, 128 heads, FFN 53,248; 405.9B parameters."""
    return ModelArgs(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2
    )


def llama3_2_1b() -> ModelArgs:
    """Llama 3.2 1B (tied embeddings, RoPE scale factor 32): 1.24B parameters."""
    return ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        multiple_of=256,
        ffn_dim_multiplier=1.5,
        rope_scale_factor=32.0,
        tie_embeddings=True,
    )


def llama3_2_3b() -> ModelArgs:
    """Llama 3.2 3B (tied embeddings, RoPE scale factor 32): 3.21B parameters."""
    return ModelArgs(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        multiple_of=256,
        ffn_dim_multiplier=1.0,
        rope_scale_factor=32.0,
        tie_embeddings=True,
    )


def llama3_1b_8k() -> ModelArgs:
    """A Llama-3-architecture 1B with an untied head, used for single-GPU end-to-end benchmarks at 8K."""
    return ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        multiple_of=256,
        ffn_dim_multiplier=1.5,
        max_seq_len=8192,
    )


def tiny() -> ModelArgs:
    """Debug model that trains on two CPU cores in minutes; the full 128K vocabulary keeps it a real Llama 3."""
    return ModelArgs(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        multiple_of=256,
        ffn_dim_multiplier=None,
        max_seq_len=2048,
    )


PRESETS = {
    "tiny": tiny,
    "llama3_8b": llama3_8b,
    "llama3_70b": llama3_70b,
    "llama3_405b": llama3_405b,
    "llama3.2_1b": llama3_2_1b,
    "llama3.2_3b": llama3_2_3b,
    "llama3_1b": llama3_1b_8k,
}


def get_model_args(name: str) -> ModelArgs:
    """A fresh ModelArgs for a preset name (see PRESETS)."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; choose one of {', '.join(PRESETS)}"
        raise ConfigError(f"unknown model preset {name!r}{hint}")
    return PRESETS[name]()
