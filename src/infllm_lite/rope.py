"""Rotary position embeddings (RoPE), "rotate-half" layout as in Hugging Face checkpoints.

Angles are computed on the fly from the positions of a call (``positions × inv_freq``):
no table to grow, and any position works, which InfLLM needs (it rotates queries and
keys at positions other than their own). The angle is formed in float64 (an integer
times a float32 frequency: exact) before its cos/sin, so attention at position 1,000,000
is as exact as at position 0; float32 angles (as transformers forms them) are rounded by
up to 0.03 rad there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelArgs


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), float32, with the checkpoint's rope scaling."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq  # "default" (validated in ModelArgs)


class RotaryEmbedding(nn.Module):
    """Gives (cos, sin) of shape (..., head_dim) for positions of any shape (..., ): (T,)
    for one sequence, (B, T) for sequences at different positions."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.double()[..., None] * self.inv_freq.double()  # (..., d/2), exact in float64
        emb = torch.cat((angles, angles), dim=-1)  # (..., d)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, d) by the angles of cos/sin (T, d)."""
    return x * cos + rotate_half(x) * sin
