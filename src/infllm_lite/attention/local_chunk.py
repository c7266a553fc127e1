"""An InfLLM execution chunk whose every visible token is local (SPEC §4, consequence 1):
a chunk ending at or before ``n_local`` has no far token and no block, so its joint
attention is ordinary causal attention, and its representative scores (SPEC §5) are the
probabilities summed per key. Computed as two matmuls and one softmax over the keys the
chunk sees, without the kernel's slot geometry: a short prompt (a chat turn, a server
request) reads about twice as fast as through the window kernel (bench/infllm_prefill.py).
"""

from __future__ import annotations

import torch


def local_causal_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of the queries at positions ``start + t`` over the keys at
    positions ``0..L-1``, and each key's probabilities summed over the queries.

    q: (B, H, T, d) rotated at their positions; k/v: (B, Hkv, L, d), k rotated, with
    ``L == start + T``; query head ``h`` reads KV head ``h // (H / Hkv)``. Returns the
    output (B, H, T, d) and the sums (B, H, L), both float32."""
    B, H, T, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    qg = (q.float() * d ** -0.5).reshape(B, Hkv, G * T, d)  # the G heads of a KV head as queries
    logits = torch.matmul(qg, k.float().contiguous().transpose(-1, -2)).view(B, Hkv, G, T, L)
    q_pos = torch.arange(start, start + T, device=q.device)
    hidden = torch.arange(L, device=q.device) > q_pos[:, None]  # (T, L): the keys' future
    probs = logits.masked_fill_(hidden, float("-inf")).softmax(dim=-1)  # (B, Hkv, G, T, L)
    out = torch.matmul(probs.view(B, Hkv, G * T, L), v.float().contiguous()).view(B, H, T, d)
    return out, probs.sum(dim=3).reshape(B, H, L)
