"""An InfLLM execution chunk whose every visible token is local (SPEC §4, consequence 1):
a chunk ending at or before ``n_local`` has no far token and no block, so its joint
attention is ordinary causal attention, and its representative scores (SPEC §5) are the
probabilities summed per key. Computed as two matmuls and one softmax over the keys the
chunk sees, without the kernel's slot geometry, a tile of queries at a time: a tile reads
only the keys up to its last query (about half the products of the whole square for a
chunk starting at 0), and its logits stay in cache between the matmuls and the softmax.
A short prompt (a chat turn, a server request) reads about twice as fast as through the
window kernel (bench/infllm_prefill.py).
"""

from __future__ import annotations

import torch

QUERY_TILE = 64  # queries per tile: 9 heads x 64 x 512 float32 logits are 1.2 MB (32 to 128 measure alike)


def local_causal_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                       tile: int = QUERY_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the queries at positions ``start + t`` over the keys at
    positions ``0..L-1``, and each key's probabilities summed over the queries.

    q: (B, H, T, d) rotated at their positions; k/v: (B, Hkv, L, d), k rotated, with
    ``L == start + T``; query head ``h`` reads KV head ``h // (H / Hkv)``. Returns the
    output (B, H, T, d) and the sums (B, H, L), both float32."""
    B, H, T, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    qg = (q.float() * d ** -0.5).view(B, Hkv, G, T, d)  # the G heads of a KV head
    k32, v32 = k.float().contiguous(), v.float().contiguous()  # (B, Hkv, L, d)
    out = q.new_empty((B, Hkv, G, T, d), dtype=torch.float32)
    sums = q.new_zeros((B, Hkv, G, L), dtype=torch.float32)
    for t0 in range(0, T, tile):
        t1 = min(T, t0 + tile)
        n, seen = t1 - t0, start + t1  # this tile's queries, and the keys they see
        qt = qg[:, :, :, t0:t1].reshape(B, Hkv, G * n, d)
        logits = torch.matmul(qt, k32[:, :, :seen].transpose(-1, -2)).view(B, Hkv, G, n, seen)
        # only the tile's own keys [start + t0, seen) can lie in a query's future
        own = logits[..., start + t0:]  # (B, Hkv, G, n, n)
        own.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
        probs = logits.softmax(dim=-1)  # (B, Hkv, G, n, seen)
        out[:, :, :, t0:t1] = torch.matmul(probs.view(B, Hkv, G * n, seen), v32[:, :, :seen]).view(B, Hkv, G, n, d)
        sums[..., :seen] += probs.sum(dim=3)
    return out.view(B, H, T, d), sums.view(B, H, L)
