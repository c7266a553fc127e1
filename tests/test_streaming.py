"""StreamingLLM attention (attention/streaming.py) against a dense per-query reference, full
attention on short sequences, and generate() at model level."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from infllm_lite import generate
from infllm_lite.attention import make_attention_state
from infllm_lite.attention.full import FullAttentionState
from infllm_lite.attention.streaming import StreamingState
from infllm_lite.config import ModelArgs
from infllm_lite.memory_config import MemoryConfig
from infllm_lite.rope import RotaryEmbedding, apply_rope
from infllm_lite.models.transformer import Transformer

HEAD_DIM = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only add overhead (a lot on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_args(n_heads: int = 6, n_kv_heads: int = 2, n_layers: int = 1, vocab: int = 97) -> ModelArgs:
    return ModelArgs.from_hf_config(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab,
        hidden_size=n_heads * HEAD_DIM, intermediate_size=32, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=100.0))


def streaming_rows() -> int:
    import infllm_lite.attention.streaming as streaming
    return streaming.SLICE_ROWS


def memory(n_init: int, n_local: int) -> MemoryConfig:
    return MemoryConfig(n_init=n_init, n_local=n_local, block_size=1, topk=1, repr_topk=1,
                        exc_block_size=1, max_cached_blocks=1)


def reference(q, k, v, rope, n_init, n_local):
    """Dense StreamingLLM, one query at a time: materialise the visible keys and their
    re-assigned positions, rotate, one softmax. q: (B, H, N, d); k/v: (B, Hkv, N, d)."""
    B, H, N, d = q.shape
    G = H // k.shape[1]
    top = n_init + n_local - 1
    out = torch.empty_like(q)
    for i in range(N):
        p_i = min(i, top)
        visible = [j for j in range(i + 1) if j < n_init or i - j < n_local]
        key_pos = [j if j < n_init else p_i - (i - j) for j in visible]
        qi = apply_rope(q[:, :, i:i + 1], *rope(torch.tensor([p_i]), torch.float32))
        kj = apply_rope(k[:, :, visible], *rope(torch.tensor(key_pos), torch.float32))
        kj, vj = kj.repeat_interleave(G, dim=1), v[:, :, visible].repeat_interleave(G, dim=1)
        weights = torch.softmax(qi @ kj.transpose(-1, -2) / math.sqrt(d), dim=-1)
        out[:, :, i:i + 1] = weights @ vj
    return out


def split(length: int, sizes: list[int]) -> list[int]:
    """Cut ``length`` into calls of the given sizes (cycled), the last one shortened."""
    calls, i = [], 0
    while sum(calls) < length:
        calls.append(min(sizes[i % len(sizes)], length - sum(calls)))
        i += 1
    return calls


def run_layer(state, q, k, v, rope, calls):
    """Feed q/k/v through layer 0 of ``state`` in calls of the given sizes."""
    outs, start = [], 0
    for T in calls:
        positions = state.positions(T)
        cos, sin = rope(positions, torch.float32)
        sl = slice(start, start + T)
        outs.append(state.layers[0].attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], positions, cos, sin, rope))
        state.advance(T)
        start += T
    return torch.cat(outs, dim=2)


@settings(max_examples=120, deadline=None)
@given(n_init=st.integers(0, 8), n_local=st.integers(1, 40), length=st.integers(1, 150),
       gqa=st.sampled_from([1, 3]), batch=st.integers(1, 2),
       sizes=st.lists(st.one_of(st.just(1), st.integers(1, 90)), min_size=1, max_size=6),
       seed=st.integers(0, 2**16), rows=st.sampled_from([1, 3, 7, 64]))
@example(n_init=0, n_local=1, length=23, gqa=3, batch=2, sizes=[5, 1], seed=0, rows=64)  # no sinks, no ring
@example(n_init=3, n_local=1, length=29, gqa=1, batch=1, sizes=[2, 1, 11], seed=1, rows=64)
@example(n_init=8, n_local=40, length=150, gqa=3, batch=2, sizes=[150], seed=2, rows=64)  # one call, 4 slices
@example(n_init=8, n_local=40, length=150, gqa=3, batch=2, sizes=[150], seed=2, rows=7)  # 22 slices
@example(n_init=2, n_local=2, length=19, gqa=1, batch=1, sizes=[4, 1, 6], seed=4, rows=64)
@example(n_init=5, n_local=7, length=131, gqa=3, batch=1, sizes=[3, 1, 1, 17, 1, 90], seed=3, rows=3)
def test_matches_dense_reference(n_init, n_local, length, gqa, batch, sizes, seed, rows):
    """``rows``: queries per slice (the product's 64 would leave these small windows one
    slice of n_local queries each)."""
    import infllm_lite.attention.streaming as streaming
    before, streaming.SLICE_ROWS = streaming.SLICE_ROWS, rows
    try:
        check_matches_dense_reference(n_init, n_local, length, gqa, batch, sizes, seed)
    finally:
        streaming.SLICE_ROWS = before


def random_layer_run(state_cls, n_init, n_local, length, gqa, batch, sizes, seed):
    """Random q/k/v (6 query heads, ``6 // gqa`` KV heads) through layer 0 of a fresh
    ``state_cls`` memory in calls cut by ``sizes``: (state, output, (q, k, v), rope)."""
    args = small_args(n_heads=6, n_kv_heads=6 // gqa)
    rope = RotaryEmbedding(args)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 6, length, HEAD_DIM, generator=g)
    k = torch.randn(batch, 6 // gqa, length, HEAD_DIM, generator=g)
    v = torch.randn(batch, 6 // gqa, length, HEAD_DIM, generator=g)
    state = state_cls(args, memory(n_init, n_local), batch_size=batch)
    return state, run_layer(state, q, k, v, rope, split(length, sizes)), (q, k, v), rope


def check_matches_dense_reference(n_init, n_local, length, gqa, batch, sizes, seed):
    state, got, (q, k, v), rope = random_layer_run(StreamingState, n_init, n_local, length, gqa, batch, sizes, seed)
    torch.testing.assert_close(got, reference(q, k, v, rope, n_init, n_local), atol=1e-5, rtol=1e-5)
    layer = state.layers[0]  # fixed storage: sinks + n_local - 1 window slots
    assert layer.k_sink.shape[2] == n_init and layer.k_ring.shape[2] == n_local - 1
    assert state.length == length
    plan = state._plan  # the last call's plan
    for s in plan.slices:  # scores per head: Q x (sinks + the ring + n_local - 1 + Q) at most
        Q = s.stop - s.start
        bound = n_init + (n_local - 1) * (2 if s.use_ring else 1) + Q
        assert Q <= n_local and s.sink_hidden.shape[1] + s.win_hidden.shape[1] <= bound
        assert Q <= streaming_rows()


@settings(max_examples=15, deadline=None)
@given(n_init=st.integers(0, 6), n_local=st.integers(1, 24), gqa=st.sampled_from([1, 3]),
       batch=st.integers(1, 2), sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4),
       seed=st.integers(0, 2**16), data=st.data())
def test_short_sequences_are_full_causal_attention(n_init, n_local, gqa, batch, sizes, seed, data):
    """Up to n_init + n_local tokens, streaming is ordinary causal attention (model level)."""
    length = data.draw(st.integers(1, n_init + n_local), label="length")
    args = small_args(n_heads=6, n_kv_heads=6 // gqa, n_layers=2)
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    ids = torch.randint(0, args.vocab_size, (batch, length))
    calls = split(length, sizes)
    results = []
    for state in (StreamingState(args, memory(n_init, n_local), batch_size=batch),
                  FullAttentionState(args, length, batch_size=batch)):
        with torch.inference_mode():
            logits, start = [], 0
            for T in calls:
                logits.append(model(ids[:, start:start + T], state))
                start += T
        results.append(torch.cat(logits, dim=1))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


def test_long_sequence_differs_from_full_attention_and_ignores_dropped_tokens():
    """Past n_init + n_local tokens the dropped keys really are gone: changing them does not
    change a later query's output, while full attention sees the change."""
    args = small_args(n_heads=6, n_kv_heads=2)
    rope = RotaryEmbedding(args)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 40, HEAD_DIM, generator=g) for h in (6, 2, 2))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10:20] += 1.0  # neither sinks (n_init=4) nor in the last query's window (12)
    v2[:, :, 10:20] -= 1.0
    a = run_layer(StreamingState(args, memory(4, 12)), q, k, v, rope, [7, 1, 20, 1, 11])
    b = run_layer(StreamingState(args, memory(4, 12)), q, k2, v2, rope, [40])
    torch.testing.assert_close(a[:, :, 32:], b[:, :, 32:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, :, 10:20], b[:, :, 10:20])
    full = run_layer(FullAttentionState(args, 40), q, k, v, rope, [40])
    assert not torch.allclose(a[:, :, 16:], full[:, :, 16:], atol=1e-3)


def test_bfloat16_model_dtype_is_upcast_for_scores():
    args = small_args(n_heads=6, n_kv_heads=2)
    rope = RotaryEmbedding(args)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 50, HEAD_DIM, generator=g) for h in (6, 2, 2))
    state = StreamingState(args, memory(3, 10), batch_size=2, dtype=torch.bfloat16)
    got = run_layer(state, q.bfloat16(), k.bfloat16(), v.bfloat16(), rope, [9, 30, 1, 1, 9])
    assert got.dtype == torch.bfloat16 and state.layers[0].k_ring.dtype == torch.bfloat16
    want = reference(q, k, v, rope, 3, 10)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


MEM = MemoryConfig(n_init=4, n_local=16, block_size=4, topk=1, exc_block_size=8, max_cached_blocks=4)
PROMPT = ("The quick brown fox jumps over the lazy dog. " * 6).strip()


def test_generate_streaming_same_tokens_for_every_chunking(tiny):
    model, tok = tiny
    assert len(tok.encode(PROMPT)) > MEM.n_init + MEM.n_local  # the window really slides
    texts = [generate(model, tok, PROMPT, attention="streaming", memory=MEM, max_new_tokens=30,
                      chunk_size=chunk) for chunk in (1, 5, None)]
    assert texts[0] == texts[1] == texts[2]
    assert len(texts[0]) > 0


def test_memory_stays_bounded_over_a_long_run(tiny):
    model, _ = tiny
    state = make_attention_state("streaming", model.args, capacity=0, memory=MEM)
    assert isinstance(state, StreamingState)
    sizes = [(t.shape, t.data_ptr()) for layer in state.layers
             for t in (layer.k_sink, layer.v_sink, layer.k_ring, layer.v_ring)]
    ids = torch.randint(0, model.args.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for start, T in ((0, 37), (37, 200), (237, 13)):
            model(ids[:, start:start + T], state)
        for i in range(250, 300):  # decode steps
            model(ids[:, i:i + 1], state)
    assert state.length == 300
    after = [(t.shape, t.data_ptr()) for layer in state.layers
             for t in (layer.k_sink, layer.v_sink, layer.k_ring, layer.v_ring)]
    assert after == sizes  # same buffers, never reallocated
    d, hkv = model.args.head_dim, model.args.n_kv_heads
    assert sizes[0][0] == (1, hkv, MEM.n_init, d) and sizes[2][0] == (1, hkv, MEM.n_local - 1, d)
