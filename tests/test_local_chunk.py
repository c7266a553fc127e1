"""``local_causal_chunk`` (an InfLLM chunk whose keys are all local) against dense causal
attention written out here: outputs and per-key probability sums, under hypothesis over
batch, GQA, chunk starts, lengths and query tiles (lengths off the tile, one-query tiles,
a chunk shorter than a tile)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infllm_lite.attention.local_chunk import local_causal_chunk


def dense(q, k, v, start):
    """Every query's softmax over the keys at or before its position, head by head."""
    B, H, T, d = q.shape
    G = H // k.shape[1]
    kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, L, d)
    logits = q @ kk.transpose(-1, -2) / d ** 0.5  # (B, H, T, L)
    future = torch.arange(k.shape[2]) > torch.arange(start, start + T)[:, None]
    probs = logits.masked_fill(future, float("-inf")).softmax(-1)
    return probs @ vv, probs.sum(dim=2)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), kv=st.integers(1, 3), G=st.integers(1, 3), T=st.integers(1, 70),
       start=st.integers(0, 40), tile=st.integers(1, 80), seed=st.integers(0, 2 ** 16))
def test_local_chunk_equals_dense_causal_attention(B, kv, G, T, start, tile, seed):
    g = torch.Generator().manual_seed(seed)
    d = 8
    q = torch.randn(B, kv * G, T, d, generator=g)
    k, v = (torch.randn(B, kv, start + T, d, generator=g) for _ in range(2))
    out, sums = local_causal_chunk(q, k, v, start, tile=tile)
    want_out, want_sums = dense(q, k, v, start)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums, want_sums, atol=1e-5, rtol=1e-5)
