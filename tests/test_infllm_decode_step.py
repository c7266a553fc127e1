"""The one-query path of InfLLM (attention/decode_step.py: a chunk of exactly one query,
batch 1, i.e. a decode step) held to the chunk path it replaces (``state.one_query =
False``: the kernel's geometry and joint attention) and to the dense reference
(tests/infllm_reference.py), over many decode steps, including steps where a block forms,
with blocks on disk (a small ``max_host_bytes``), evictions, ``lru`` and ``lru-s``, for the
``window``, ``window-eager`` and ``torch`` kernels.

Both paths compute the representative scores in float32 in a different order, so a
near-tie among a block's scores (two tokens within 1e-5) may pick another representative
token and from there another selection; such examples are rejected (``assume``), never
accepted as a difference.
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from infllm_lite.attention import make_attention_state
from infllm_lite.attention.base import attend_in_calls
from infllm_lite.attention.infllm import InfLLMState
from infllm_lite.config import ModelArgs
from infllm_lite.memory_config import MemoryConfig, n_formed_blocks
from infllm_lite.rope import RotaryEmbedding

from infllm_reference import reference_infllm
from test_infllm_layer import near_tie_choices, one_thread  # noqa: F401  (one_thread: an autouse fixture)

TIE_EPS = 1e-5


def model_args(H: int, Hkv: int, d: int) -> ModelArgs:
    return ModelArgs(model_type="llama", vocab_size=16, dim=H * d, n_layers=1, n_heads=H, n_kv_heads=Hkv,
                     head_dim=d, intermediate_size=8, rope_theta=10000.0)


class Watch:
    """Counts a layer's one-query steps, and notes whether a block formed on a near-tie of
    its representative scores (``_form_blocks`` wrapped on the instance)."""

    def __init__(self, layer):
        self.steps, self.near_tie = 0, False
        one_query, form = layer._one_query, layer._form_blocks

        def counted(*args):
            self.steps += 1
            return one_query(*args)

        def checked(e):
            cfg = layer.cfg
            new = n_formed_blocks(cfg, e) - layer.n_blocks
            if new > 0 and cfg.repr_topk < cfg.block_size:
                scores = layer.tail_scores[:, :, :new * cfg.block_size].unflatten(-1, (new, cfg.block_size))
                top = scores.double().sort(dim=-1, descending=True).values
                kth, next_ = top[..., cfg.repr_topk - 1], top[..., cfg.repr_topk]
                self.near_tie |= bool((kth - next_ <= TIE_EPS * kth.abs().clamp(min=1.0)).any())
            return form(e)

        layer._one_query, layer._form_blocks = counted, checked


def run(args, config, q, k, v, calls, kernel, one_query):
    state = InfLLMState(args, config, kernel=kernel)
    state.one_query = one_query
    state.record = True
    layer = state.layers[0]
    watch = Watch(layer)
    with torch.inference_mode():
        out = attend_in_calls(state, q, k, v, calls, RotaryEmbedding(args))
    return out, layer, watch


def assert_same_memory(fast, slow) -> None:
    """The two layers selected, formed and cached the same blocks."""
    assert [(s, e) for s, e, _ in fast.trace] == [(s, e) for s, e, _ in slow.trace]
    for (s, _, a), (_, _, b) in zip(fast.trace, slow.trace):
        assert torch.equal(a, b), (s, a, b)
    assert fast.n_blocks == slow.n_blocks
    torch.testing.assert_close(fast.block_repr[:, :fast.n_blocks], slow.block_repr[:, :slow.n_blocks],
                               atol=1e-5, rtol=1e-5)
    used = fast.state.length - fast.tail_start
    torch.testing.assert_close(fast.tail_scores[:, :, :used], slow.tail_scores[:, :, :used], atol=1e-5, rtol=1e-5)
    assert fast.pool.stats() == slow.pool.stats()
    assert fast.pool.resident() == slow.pool.resident()
    torch.testing.assert_close(fast.pool.slot_score, slow.pool.slot_score, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- small sizes, many cases


@st.composite
def decode_cases(draw):
    n_local = draw(st.integers(4, 24))
    block_size = draw(st.integers(2, 8))
    topk = draw(st.one_of(st.integers(1, 3), st.integers(0, 6)))
    host_blocks = draw(st.one_of(st.none(), st.integers(0, 3)))
    H, Hkv = draw(st.sampled_from([(1, 1), (3, 3), (3, 1), (4, 2)]))
    d = draw(st.sampled_from([4, 8]))
    config = MemoryConfig(n_init=draw(st.integers(0, 6)), n_local=n_local, block_size=block_size, topk=topk,
                          repr_topk=draw(st.integers(1, min(3, block_size))),
                          exc_block_size=draw(st.integers(1, n_local)),
                          max_cached_blocks=max(topk, 1) + draw(st.integers(0, 2)),
                          cache_policy=draw(st.sampled_from(["lru", "lru-s"])),
                          score_decay=draw(st.sampled_from([0.0, 0.1, 0.5])),
                          max_host_bytes=None if host_blocks is None
                          else max(1, host_blocks * 2 * Hkv * block_size * d * 4))
    prefill = draw(st.integers(0, 60))
    steps = draw(st.integers(1, 120))
    head = [prefill] if prefill else []
    middle = draw(st.integers(0, 2 * n_local))  # sometimes a multi-token call between the steps
    calls = head + [1] * (steps // 2) + ([middle] if middle else []) + [1] * (steps - steps // 2)
    return config, calls, H, Hkv, d, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(case=decode_cases(), kernel=st.sampled_from(["window-eager", "torch"]))
def test_one_query_steps_equal_the_chunk_path(case, kernel):
    config, calls, H, Hkv, d, seed = case
    args = model_args(H, Hkv, d)
    g = torch.Generator().manual_seed(seed)
    L = sum(calls)
    q, k, v = torch.randn(1, H, L, d, generator=g), torch.randn(1, Hkv, L, d, generator=g), torch.randn(1, Hkv, L, d, generator=g)
    fast_out, fast, fast_watch = run(args, config, q, k, v, calls, kernel, True)
    slow_out, slow, slow_watch = run(args, config, q, k, v, calls, kernel, False)
    assume(not (fast_watch.near_tie or slow_watch.near_tie))
    assert fast_watch.steps == calls.count(1)  # a call of one token, not a call's last chunk of one
    assert slow_watch.steps == 0
    torch.testing.assert_close(fast_out, slow_out, atol=1e-4, rtol=1e-4)
    assert_same_memory(fast, slow)


@settings(max_examples=30, deadline=None)
@given(case=decode_cases())
def test_one_query_steps_equal_the_dense_reference(case):
    """Outputs of the reference run with the one-query path's selections, each of which is
    a top-k of the reference's own retrieval scores (up to near-ties)."""
    config, calls, H, Hkv, d, seed = case
    args = model_args(H, Hkv, d)
    g = torch.Generator().manual_seed(seed)
    L = sum(calls)
    q, k, v = torch.randn(1, H, L, d, generator=g), torch.randn(1, Hkv, L, d, generator=g), torch.randn(1, Hkv, L, d, generator=g)
    out, layer, _ = run(args, config, q, k, v, calls, "window-eager", True)
    chosen = [[[b for b in sel[0].tolist() if b >= 0]] for _, _, sel in layer.trace]
    ref = reference_infllm(q, k, v, config, calls, RotaryEmbedding(args).inv_freq, force_selected=chosen)
    torch.testing.assert_close(out.double(), ref.out, atol=1e-4, rtol=1e-4)
    for c, scores in enumerate(ref.retrieval_scores):
        if scores is not None:
            assert set(chosen[c][0]) in near_tie_choices(scores[0].tolist(), config.topk), c


def test_batch_of_two_takes_the_chunk_path_and_agrees_with_batch_one():
    args = model_args(3, 1, 8)
    config = MemoryConfig(n_init=2, n_local=12, block_size=4, topk=2, repr_topk=2, exc_block_size=6,
                          max_cached_blocks=4)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 3, 80, 8, generator=g), torch.randn(2, 1, 80, 8, generator=g), torch.randn(2, 1, 80, 8, generator=g)
    calls = [30] + [1] * 50
    state = InfLLMState(args, config, batch_size=2, kernel="window-eager")
    watch = Watch(state.layers[0])
    with torch.inference_mode():
        both = attend_in_calls(state, q, k, v, calls, RotaryEmbedding(args))
    assert watch.steps == 0
    for row in range(2):
        one, _, one_watch = run(args, config, q[row:row + 1], k[row:row + 1], v[row:row + 1], calls, "window-eager", True)
        assert one_watch.steps == 50
        torch.testing.assert_close(one, both[row:row + 1], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- production sizes

ARGS = ModelArgs(model_type="llama", vocab_size=16, dim=576, n_layers=1, n_heads=9, n_kv_heads=3,
                 head_dim=64, intermediate_size=8, rope_theta=100000.0, max_position_embeddings=8192)
CALLS = [700, 1, 1100] + [1] * 140 + [300] + [1] * 160  # blocks form at several of the steps


@pytest.mark.parametrize("kernel,policy", [("window", "lru"), ("window", "lru-s"), ("window-eager", "lru-s"),
                                           ("torch", "lru")])
def test_decode_steps_at_the_embedded_geometry(kernel, policy):
    """The embedded model's layer shape and default MemoryConfig (n_init 128, n_local 512,
    block 128, topk 4), blocks on disk; the eager kernels with a small cache (evictions)."""
    cache = 32 if kernel == "window" else 6  # the compiled window keeps test_infllm_compiled's shapes
    config = MemoryConfig.for_model(ARGS, cache_policy=policy, max_cached_blocks=cache,
                                    max_host_bytes=4 * 2 * 3 * 128 * 64 * 4)  # 4 blocks a layer in host
    assert n_formed_blocks(config, sum(CALLS)) > config.topk
    g = torch.Generator().manual_seed(0)
    L = sum(CALLS)
    q, k, v = torch.randn(1, 9, L, 64, generator=g), torch.randn(1, 3, L, 64, generator=g), torch.randn(1, 3, L, 64, generator=g)
    fast_out, fast, fast_watch = run(ARGS, config, q, k, v, CALLS, kernel, True)
    slow_out, slow, slow_watch = run(ARGS, config, q, k, v, CALLS, kernel, False)
    assert not (fast_watch.near_tie or slow_watch.near_tie)
    assert fast_watch.steps == CALLS.count(1)
    assert fast.pool.stats().blocks_disk > 0
    if kernel != "window":
        assert fast.pool.stats().evictions > 0
    torch.testing.assert_close(fast_out, slow_out, atol=1e-4, rtol=1e-4)
    assert_same_memory(fast, slow)


# --------------------------------------------------------------------------- the model

SMALL = MemoryConfig(n_init=16, n_local=128, block_size=32, topk=2, repr_topk=4, exc_block_size=64,
                     max_cached_blocks=4)


def greedy(model, ids, memory, kernel, one_query, steps):
    """Greedy decode ``steps`` tokens after ``ids``; the tokens and each step's logits."""
    state = make_attention_state("infllm", model.args, capacity=0, memory=memory, kernel=kernel)
    state.one_query = one_query
    tokens, logits_seen = [], []
    with torch.inference_mode():
        model(ids[:, :-1], state)
        logits = model(ids[:, -1:], state)
        for _ in range(steps):
            logits_seen.append(logits[0, -1])
            token = logits[:, -1].argmax(dim=-1)
            tokens.append(int(token))
            logits = model.step(token[:, None], state.positions(1), state)
            state.advance(1)
    stats = state.stats()
    state.close()
    return tokens, torch.stack(logits_seen), stats


@pytest.mark.parametrize("kernel,policy", [("window", "lru"), ("window-eager", "lru-s")])
def test_greedy_decoding_of_the_model_is_unchanged(smollm, tmp_path, kernel, policy):
    """The embedded model decoding 64 tokens (a block forms every 32) with blocks on disk:
    the same logits (1e-4) and the same greedy tokens whichever path a step takes."""
    model, tok = smollm
    memory = MemoryConfig(**{**SMALL.to_dict(), "cache_policy": policy, "offload_dir": str(tmp_path),
                             "max_host_bytes": 30 * 2 * 2 * 3 * 32 * 64 * 4})  # 2 blocks a layer in host
    ids = torch.tensor([tok.encode("Alice met Bob in Paris in 1999, then moved to Rome. " * 30)])[:, :420]
    fast_tokens, fast_logits, fast_stats = greedy(model, ids, memory, kernel, True, 64)
    slow_tokens, slow_logits, slow_stats = greedy(model, ids, memory, kernel, False, 64)
    assert fast_stats.blocks_disk > 0 and fast_stats.evictions > 0
    torch.testing.assert_close(fast_logits, slow_logits, atol=1e-4, rtol=1e-4)
    assert fast_tokens == slow_tokens
    assert fast_stats == slow_stats
