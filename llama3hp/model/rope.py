"""RoPE inverse frequencies with Llama 3.1's frequency scaling, and the positions they rotate by."""

from __future__ import annotations

import math

import torch

import llama3hp.kernels as K
from llama3hp.model.args import ModelArgs


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """inv_freq [head_dim/2] fp32: theta^(-2i/d), with Llama 3.1 scaling when args.rope_scaling.

    Scaling (per frequency f, wavelength w = 2*pi/f, original context L):
    w < L/high_factor: kept; w > L/low_factor: f/scale_factor; in between a linear blend with
    smooth = (L/w - low_factor) / (high_factor - low_factor): (1 - smooth) * f/scale + smooth * f.
    Computed in float64 and rounded once to fp32.
    """
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if args.rope_scaling:
        L = args.rope_original_max_seq_len
        lo, hi, scale = args.rope_low_freq_factor, args.rope_high_freq_factor, args.rope_scale_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (L / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv_freq / scale + smooth * inv_freq
        inv_freq = torch.where(
            wavelen < L / hi, inv_freq, torch.where(wavelen > L / lo, inv_freq / scale, blended)
        )
    return inv_freq.to(device=device, dtype=torch.float32)


def document_positions(
    cu_seqlens: torch.Tensor | None, B: int, T: int, device, doc_prefix: torch.Tensor | None = None
) -> torch.Tensor:
    """RoPE positions int64 [B, T]: restart at 0 at each segment start of cu_seqlens (over the
    flattened B*T tokens; None: 0..T-1 in every row); a segment with a shared prefix (doc_prefix
    [n_segments], -1 for none) continues after it: the prefix's length is its first position, so a
    response after a shared prompt sits where it would right after that prompt. The one place
    positions are built."""
    if cu_seqlens is None:
        return torch.arange(T, device=device).expand(B, T)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    doc = K.document_ids(cu, B * T)
    pos = torch.arange(B * T, device=device, dtype=torch.int64) - cu[doc]
    if doc_prefix is not None:
        lens = cu[1:] - cu[:-1]
        pre = doc_prefix.to(device=device, dtype=torch.int64)
        pos = pos + torch.where(pre >= 0, lens[pre.clamp(min=0)], 0)[doc]
    return pos.view(B, T)
