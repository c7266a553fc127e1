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


def random_qkv(args, L: int) -> tuple[torch.Tensor, ...]:
    """q (1, H, L, d), k and v (1, Hkv, L, d), the same for every test."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, n, L, args.head_dim, generator=g) for n in (args.n_heads, args.n_kv_heads, args.n_kv_heads))


def test_a_bad_kv_dtype_is_refused():
    with pytest.raises(InfLLMLiteError, match="kv_dtype must be one of float32, bfloat16, float16 or None, got 'int8'"):
        MemoryConfig(kv_dtype="int8")


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_infllm_blocks_are_stored_rounded_and_read_back_exactly(tiny, kind):
    model, _ = tiny
    args = model.args
    L = 200
    rope, (q, k, v) = RotaryEmbedding(args), random_qkv(args, L)
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


# ---------------------------------------------------------------- full attention's KV cache
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}  # |x - round(x)| <= u·|x|


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_full_attention_stores_its_cache_rounded_and_attends_within_the_derived_bound(tiny, kind):
    """Each stored key and value is the float32 one rounded once. The bound on the output,
    to first order in the unit roundoff u: rounding a value moves the output (a convex
    combination of values) by at most u·max|v|; rounding key j moves its logit by at most
    u·|q|·|k_j|/√d (RoPE keeps norms), which moves the probabilities by at most twice that
    in L1 (Σ|Δp_j| <= 2·max|Δs|), and so the output by that times max|v|."""
    model, _ = tiny
    args = model.args
    L = 120
    rope, (q, k, v) = RotaryEmbedding(args), random_qkv(args, L)
    states = {name: make_attention_state("full", args, capacity=L, memory=cfg)
              for name, cfg in (("float32", None), (kind, MemoryConfig(kv_dtype=kind)))}
    outs = {name: attend_in_calls(s, q, k, v, [37, 1, 60, 1, 21], rope) for name, s in states.items()}
    full, half = (states[n].layers[0] for n in ("float32", kind))
    assert half.k.dtype == half.v.dtype == getattr(torch, kind) and full.k.dtype == torch.float32
    assert torch.equal(half.k, full.k.to(half.k.dtype)) and torch.equal(half.v, full.v.to(half.v.dtype))
    u = UNIT_ROUNDOFF[kind]
    logit = (q.norm(dim=-1).max() * k.norm(dim=-1).max() / args.head_dim ** 0.5).item()
    bound = u * v.abs().max().item() * (1 + 2 * logit)
    diff = (outs[kind] - outs["float32"]).abs().max().item()
    assert 0 < diff < bound, (diff, bound)


def test_full_attention_with_a_half_size_cache_counts_it_and_does_not_depend_on_the_chunking(tiny):
    model, tok = tiny
    args = model.args
    half = MemoryConfig(kv_dtype="bfloat16")
    assert 2 * state_bytes("full", args, 1000, half) == state_bytes("full", args, 1000)
    assert state_bytes("full", args, 1000, MemoryConfig(kv_dtype="float32")) == state_bytes("full", args, 1000)
    prompt = "The lighthouse keeper counted the ships in the bay " * 4
    texts = {size: generate(model, tok, prompt, max_new_tokens=6, attention="full", memory=half, chunk_size=size)
             for size in (7, 1000)}
    assert texts[7] == texts[1000]


def test_full_attention_half_size_cache_compiled_decodes_as_eager(tiny):
    """``compile=True``: the static cache is bfloat16 too (one compiled generation, a few seconds)."""
    from infllm_lite.generate import generate_ids
    model, tok = tiny
    ids = tok.encode("In a hole in the ground there lived")
    half = MemoryConfig(kv_dtype="bfloat16")
    eager = list(generate_ids(model, ids, max_new_tokens=6, memory=half))
    assert list(generate_ids(model, ids, max_new_tokens=6, memory=half, compile=True)) == eager


def test_the_engine_decodes_full_attention_with_a_half_size_cache_as_alone(tiny):
    """Caches of another dtype than the model's stay out of the engine's arena; several
    decoding together give each one's batch-1 tokens."""
    model, tok = tiny
    half = MemoryConfig(kv_dtype="bfloat16")
    prompts = ["Once upon a time", "The capital of France is a city that"]
    alone = [generate(model, tok, p, max_new_tokens=5, attention="full", memory=half) for p in prompts]
    assert generate(model, tok, prompts, max_new_tokens=5, attention="full", memory=half) == alone


def test_a_full_attention_chat_snapshot_keeps_its_half_size_cache_exactly(tiny, tmp_path):
    from infllm_lite import ChatSession
    model, tok = tiny
    half = MemoryConfig(kv_dtype="bfloat16")
    chat = ChatSession(model, tok, attention="full", memory=half, max_new_tokens=4, capacity=256)
    chat.send("Hello there")
    assert chat.state.layers[0].k.dtype == torch.bfloat16
    chat.save(tmp_path / "c.snap")
    back = ChatSession.load(tmp_path / "c.snap", model, tok, max_new_tokens=4)
    n = chat.state.length
    assert back.state.length == n and back.tokens == chat.tokens
    for a, b in zip(chat.state.layers, back.state.layers):
        assert b.k.dtype == torch.bfloat16 and torch.equal(a.k[:, :, :n], b.k[:, :, :n])
        assert torch.equal(a.v[:, :, :n], b.v[:, :, :n])
    assert back.send("And then?") == chat.send("And then?")
    with pytest.raises(InfLLMLiteError, match="kv_dtype='bfloat16' there, kv_dtype='float32' given"):
        load_snapshot(tmp_path / "c.snap", model, memory=MemoryConfig(kv_dtype="float32"))


def test_the_cli_takes_kv_dtype_for_full_attention(capsys, tiny, tiny_folder):
    from infllm_lite.cli import main
    model, tok = tiny
    expected = generate(model, tok, "Hello", max_new_tokens=5, attention="full", memory=MemoryConfig(kv_dtype="float16"))
    code = main(["generate", "--model", str(tiny_folder), "--prompt", "Hello", "--max-new-tokens", "5",
                 "--attention", "full", "--kv-dtype", "float16"])
    out, err = capsys.readouterr()
    assert code == 0 and out == expected + "\n", err
