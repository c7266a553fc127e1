"""LM-Infinite's Λ-shaped attention (attention/lm_infinite.py) against a dense per-query
reference of its own rule, written from the repository's ``lambda_attention`` (global
branch ``n_init``, local branch and distance cap ``n_local``), and at model level."""

from __future__ import annotations

import math

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from infllm_lite import generate
from infllm_lite.attention import make_attention_state
from infllm_lite.attention.full import FullAttentionState
from infllm_lite.attention.lm_infinite import LMInfiniteState
from infllm_lite.attention.streaming import StreamingState
from infllm_lite.memory_config import MemoryConfig
from infllm_lite.models.transformer import Transformer
from infllm_lite.rope import apply_rope
from test_streaming import memory, one_thread, random_layer_run, small_args  # noqa: F401


def reference(q, k, v, rope, n_init, n_local):
    """Dense LM-Infinite, one query at a time. Query i sees the global tokens j < n_init
    (j <= i) and the local ones with 0 <= i - j < n_local; a local key's logit is at its
    true distance (q at i, k at j), a global token's at min(i - j, n_local): q at i and k
    at j below the cap, q at n_local and k at 0 from there. One softmax.
    q: (B, H, N, d); k/v: (B, Hkv, N, d)."""
    B, H, N, d = q.shape
    G = H // k.shape[1]
    kx, vx = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, N, d)

    def rot(x, position):
        return apply_rope(x, *rope(torch.tensor([position]), torch.float32))

    out = torch.empty_like(q)
    for i in range(N):
        visible = [j for j in range(i + 1) if j < n_init or i - j < n_local]
        logits = []
        for j in visible:
            if j < n_init and i - j >= n_local:  # a global token beyond the cap
                qi, kj = rot(q[:, :, i:i + 1], n_local), kx[:, :, j:j + 1]
            else:
                qi, kj = rot(q[:, :, i:i + 1], i), rot(kx[:, :, j:j + 1], j)
            logits.append((qi * kj).sum(-1) / math.sqrt(d))  # (B, H, 1)
        weights = torch.softmax(torch.cat(logits, dim=-1), dim=-1)  # (B, H, |visible|)
        out[:, :, i] = (weights[..., None] * vx[:, :, visible]).sum(2)
    return out


@settings(max_examples=80, deadline=None)
@given(n_init=st.integers(0, 8), n_local=st.integers(1, 40), length=st.integers(1, 120),
       gqa=st.sampled_from([1, 3]), batch=st.integers(1, 2),
       sizes=st.lists(st.one_of(st.just(1), st.integers(1, 90)), min_size=1, max_size=6),
       seed=st.integers(0, 2**16), rows=st.sampled_from([1, 3, 7, 64]))
@example(n_init=4, n_local=6, length=40, gqa=3, batch=2, sizes=[40], seed=0, rows=64)  # one call: mixed rows
@example(n_init=8, n_local=3, length=30, gqa=1, batch=1, sizes=[1], seed=1, rows=64)  # decode steps
@example(n_init=8, n_local=40, length=120, gqa=3, batch=1, sizes=[7, 1, 90], seed=2, rows=7)
def test_matches_its_dense_reference(n_init, n_local, length, gqa, batch, sizes, seed, rows):
    import infllm_lite.attention.streaming as streaming
    before, streaming.SLICE_ROWS = streaming.SLICE_ROWS, rows
    try:
        _, got, (q, k, v), rope = random_layer_run(LMInfiniteState, n_init, n_local, length, gqa, batch, sizes, seed)
        torch.testing.assert_close(got, reference(q, k, v, rope, n_init, n_local), atol=1e-5, rtol=1e-5)
    finally:
        streaming.SLICE_ROWS = before


def test_it_is_not_streamingllm_past_the_window_and_is_causal_attention_before():
    """Up to n_local tokens every mode is causal attention; past n_init + n_local the global
    tokens' distance differs from StreamingLLM's, and so do the outputs."""
    args = small_args(n_heads=6, n_kv_heads=2, n_layers=2)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    ids = torch.randint(0, args.vocab_size, (1, 60))
    cfg = memory(4, 12)
    with torch.inference_mode():
        lmi = model(ids, LMInfiniteState(args, cfg))
        stream = model(ids, StreamingState(args, cfg))
        full = model(ids, FullAttentionState(args, 60))
    torch.testing.assert_close(lmi[:, :12], full[:, :12], atol=1e-5, rtol=1e-5)
    assert (lmi[:, 20:] - stream[:, 20:]).abs().max() > 1e-3


def test_generate_and_the_factory_know_the_mode(tiny):
    model, tok = tiny
    cfg = MemoryConfig(n_init=4, n_local=32, block_size=8, topk=2, repr_topk=2, exc_block_size=16,
                       max_cached_blocks=4)
    assert isinstance(make_attention_state("lm-infinite", model.args, capacity=1, memory=cfg), LMInfiniteState)
    prompt = "The lighthouse keeper counted the ships " * 8
    texts = {size: generate(model, tok, prompt, max_new_tokens=6, attention="lm-infinite", memory=cfg,
                            chunk_size=size) for size in (7, 64)}
    assert texts[7] == texts[64]  # every chunking reads the same memory
