"""RoPE is exact at any position: a window of queries and keys at offset 1,000,000 gives
the logits it gives at offset 0 (every rotation in the package comes from
``RotaryEmbedding``: the model's, StreamingLLM's re-assigned positions, InfLLM's far angle
and its restored keys)."""

import pytest
import torch

from infllm_lite.config import ModelArgs
from infllm_lite.rope import RotaryEmbedding, apply_rope


def rope_1m(head_dim: int = 64) -> RotaryEmbedding:
    return RotaryEmbedding(ModelArgs(vocab_size=8, dim=head_dim * 2, n_layers=1, n_heads=2, n_kv_heads=2,
                                     intermediate_size=8, head_dim=head_dim, rope_theta=1e6,
                                     max_position_embeddings=8192))


def window_logits(rope, q, k, offset: int) -> torch.Tensor:
    """(T, T) attention logits (scaled by 1/√d) of queries and keys (T, d) at positions
    offset + 0 … T-1."""
    positions = torch.arange(q.shape[0]) + offset
    cos, sin = rope(positions, torch.float32)
    return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).T / q.shape[-1] ** 0.5


@pytest.mark.parametrize("offset", [1_000_000, 1_048_575, 10_000_000])
def test_a_window_far_out_has_the_logits_it_has_at_offset_0(offset):
    g = torch.Generator().manual_seed(offset)
    q, k = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)  # unit variance
    rope = rope_1m()
    torch.testing.assert_close(window_logits(rope, q, k, offset), window_logits(rope, q, k, 0),
                               atol=1e-5, rtol=0)


def test_float32_angles_would_not_be():
    """The test above can fail: angles rounded to float32 (as transformers forms them) move
    a logit at offset 1,000,000 by far more than 1e-5."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
    rope = rope_1m()

    def rounded(positions, dtype):
        angles = positions.float()[..., None] * rope.inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    exact = window_logits(rope, q, k, 0)
    assert (window_logits(rounded, q, k, 1_000_000) - exact).abs().max() > 1e-2
