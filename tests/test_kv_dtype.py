"""A half-size memory store (``MemoryConfig.kv_dtype``): InfLLM's formed blocks and
StreamingLLM's / LM-Infinite's sinks and window are stored in bfloat16 or float16, half
the bytes, read back as exactly the rounded values, attention still in float32."""

from __future__ import annotations

import pytest
import torch

from infllm_lite import InfLLMLiteError, MemoryConfig, generate
from infllm_lite.attention import make_attention_state
from infllm_lite.attention.base import attend_in_calls
from infllm_lite.attention.footprint import state_bytes
from infllm_lite.memory_config import memory_estimate
from infllm_lite.rope import RotaryEmbedding
from infllm_lite.snapshot import load_snapshot, save_snapshot

CFG = MemoryConfig(n_init=4, n_local=32, block_size=8, topk=2, repr_topk=2, exc_block_size=16, max_cached_blocks=4)


def test_a_bad_kv_dtype_is_refused():
    with pytest.raises(InfLLMLiteError, match="kv_dtype must be one of float32, bfloat16, float16 or None, got 'int8'"):
        MemoryConfig(kv_dtype="int8")


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_infllm_blocks_are_stored_rounded_and_read_back_exactly(tiny, kind):
    model, _ = tiny
    args = model.args
    rope = RotaryEmbedding(args)
    g = torch.Generator().manual_seed(0)
    L, H, Hkv, d = 200, args.n_heads, args.n_kv_heads, args.head_dim
    q, k, v = (torch.randn(1, n, L, d, generator=g) for n in (H, Hkv, Hkv))
    states = {name: make_attention_state("infllm", args, capacity=1, memory=cfg, kernel="window-eager")
              for name, cfg in (("float32", CFG), (kind, MemoryConfig(**{**CFG.to_dict(), "kv_dtype": kind})))}
    outs = {name: attend_in_calls(s, q, k, v, [37, 1, 90, 1, 1, 70], rope) for name, s in states.items()}
    full, half = (states[n].layers[0].pool for n in ("float32", kind))
    assert half.dtype == getattr(torch, kind) and half.n_blocks == full.n_blocks > CFG.max_cached_blocks
    assert half.host_bytes * 2 == full.host_bytes
    blocks = list(range(full.n_blocks))
    for a, b in zip(half._gather_slow(blocks), full._gather_slow(blocks)):
        assert torch.equal(a, b.to(a.dtype))  # the float32 block, rounded once
    diff = (outs[kind] - outs["float32"]).abs().max()
    assert 0 < diff < 5e-2  # rounding moved the output a little


def test_generation_with_a_half_size_store_does_not_depend_on_the_chunking(tiny):
    model, tok = tiny
    prompt = "The lighthouse keeper counted the ships in the bay " * 8
    for mode in ("infllm", "streaming", "lm-infinite"):
        cfg = MemoryConfig(**{**CFG.to_dict(), "kv_dtype": "bfloat16"})
        texts = {size: generate(model, tok, prompt, max_new_tokens=6, attention=mode, memory=cfg, chunk_size=size,
                                attention_kernel="window-eager") for size in (16, 48)}
        assert texts[16] == texts[48], mode


def test_the_footprints_count_the_store(tiny):
    model, _ = tiny
    args = model.args
    half = MemoryConfig(**{**CFG.to_dict(), "kv_dtype": "bfloat16"})
    for mode in ("streaming", "lm-infinite"):
        state = make_attention_state(mode, args, capacity=1, memory=half)
        assert state.layers[0].k_sink.dtype == state.layers[0].v_ring.dtype == torch.bfloat16
        assert 2 * state_bytes(mode, args, 1000, half) == state_bytes(mode, args, 1000, CFG)
    assert 2 * memory_estimate(args, half, 5000)["slow"] == memory_estimate(args, CFG, 5000)["slow"]
    assert memory_estimate(args, half, 5000)["fast"] == memory_estimate(args, CFG, 5000)["fast"]


def test_a_snapshot_keeps_its_store_and_refuses_another(tiny, tmp_path):
    model, _ = tiny
    half = MemoryConfig(**{**CFG.to_dict(), "kv_dtype": "bfloat16"})
    state = make_attention_state("infllm", model.args, capacity=1, memory=half, kernel="window-eager")
    with torch.inference_mode():
        model(torch.randint(3, 1000, (1, 120)), state)
    save_snapshot(tmp_path / "m.snap", state, model=model, mode="infllm", memory=half, tokens=list(range(120)))
    snap = load_snapshot(tmp_path / "m.snap", model, kernel="window-eager")
    assert snap.state.layers[0].pool.dtype == torch.bfloat16
    with pytest.raises(InfLLMLiteError, match="kv_dtype='bfloat16' there, kv_dtype='float32' given"):
        load_snapshot(tmp_path / "m.snap", model, memory=MemoryConfig(**{**CFG.to_dict(), "kv_dtype": "float32"}))
