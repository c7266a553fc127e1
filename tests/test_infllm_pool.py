"""InfLLM with its block pool: the attention mass the ``lru-s`` policy records is the
joint attention each selected block received, computed independently here in float64.
(That cache sizes, policies and the disk tier never change the attention is part of the
property tests of test_infllm_layer.py, whose configs draw them.)"""

from __future__ import annotations

import math

import pytest
import torch

from infllm_lite.attention.base import attend_in_calls
from infllm_lite.attention.infllm import InfLLMState
from infllm_lite.config import ModelArgs
from infllm_lite.memory_config import MemoryConfig, n_formed_blocks
from infllm_lite.rope import RotaryEmbedding, apply_rope


@pytest.mark.parametrize("kernel", ["torch", "flex-eager", "window-eager"])
def test_lru_s_records_the_joint_attention_mass_of_each_selected_block(kernel):
    H, Hkv, d, L = 4, 2, 8, 40
    args = ModelArgs(model_type="llama", vocab_size=16, dim=H * d, n_layers=1, n_heads=H, n_kv_heads=Hkv,
                     head_dim=d, intermediate_size=8, rope_theta=10000.0)
    # no initial tokens: the far keys are the selected blocks and the pending remainder
    config = MemoryConfig(n_init=0, n_local=8, block_size=4, topk=2, repr_topk=1, exc_block_size=4,
                          max_cached_blocks=3, cache_policy="lru-s", score_decay=0.0)
    n_blocks = n_formed_blocks(config, L - 1)  # formed when the last query attends
    pending = list(range(n_blocks * config.block_size, L - config.n_local))  # far, not in a block
    assert n_blocks > config.topk and pending
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, H, L, d, generator=g), torch.randn(1, Hkv, L, d, generator=g), torch.randn(1, Hkv, L, d, generator=g)
    state = InfLLMState(args, config, kernel=kernel)
    state.record = True
    rope = RotaryEmbedding(args)
    attend_in_calls(state, q, k, v, [L - 1, 1], rope)  # the last call: one decode query
    layer = state.layers[0]
    selected = [b for b in layer.trace[-1][2][0].tolist() if b >= 0]
    assert len(selected) == config.topk

    # the last query's joint softmax, in float64, from the raw q/k
    q64, k64 = q.double(), k.double()
    cos, sin = rope(torch.arange(L), torch.float64)
    cos_far, sin_far = rope(torch.tensor([config.n_local - 1]), torch.float64)
    q_loc = apply_rope(q64[:, :, -1:], cos[-1:], sin[-1:])[0, :, 0]  # (H, d)
    q_far = apply_rope(q64[:, :, -1:], cos_far, sin_far)[0, :, 0]
    k_rot = apply_rope(k64, cos, sin)[0].repeat_interleave(H // Hkv, 0)  # (H, L, d)
    k_raw = k64[0].repeat_interleave(H // Hkv, 0)
    local = list(range(L - config.n_local, L))
    far = [b * config.block_size + t for b in selected for t in range(config.block_size)] + pending
    logits = torch.cat([(k_rot[:, local] @ q_loc[:, :, None])[..., 0],
                        (k_raw[:, far] @ q_far[:, :, None])[..., 0]], dim=1) / math.sqrt(d)  # (H, n_loc + n_far)
    p_blocks = torch.softmax(logits, dim=1)[:, len(local):len(local) + len(selected) * config.block_size]
    expected = p_blocks.reshape(H, len(selected), config.block_size).sum(dim=(0, 2))  # (topk,)

    slots = layer.pool.slots_of(selected)
    torch.testing.assert_close(layer.pool.slot_score[slots].double(), expected, rtol=1e-5, atol=1e-6)
