"""transformers' models with RoPE angles computed exactly (float64), as ours are.

transformers forms ``position · inv_freq`` in float32 before its cos/sin: the angle is
rounded to float32 (at position 4,000 by up to 2e-4 rad, at 1,000,000 by up to 0.03), and
its logits drift from the exact ones by 5e-3 over 4K tokens of the embedded model. Our
``RotaryEmbedding`` forms the angle in float64 (exact: an integer times a float32), so that
local attention stays exact at any position. The parity tests compare with transformers'
models whose rotary modules do the same; everything else in them is transformers' own.
"""

from __future__ import annotations

import torch


def exact_rope(model):
    """Make every rotary-embedding module of the transformers ``model`` form its angles in
    float64 (same frequencies, same attention scaling). Returns the model."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            module.forward = _exact_forward(module)
    return model


def _exact_forward(rotary):
    def forward(x, position_ids):
        freqs = position_ids[..., None].double() * rotary.inv_freq.to(x.device).double()
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rotary.attention_scaling
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)
    return forward
