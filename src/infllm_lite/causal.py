"""Causal attention over positions (SDPA and two CPU fast paths): the stateless primitive
below both the model (a call without a memory) and the full-attention KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     q_positions: torch.Tensor, k_positions: torch.Tensor,
                     window: int | None = None) -> torch.Tensor:
    """SDPA where query i sees key j iff k_pos[j] <= q_pos[i] (and within ``window``).

    q: (B, H, T, d); k/v: (B, Hkv, S, d); positions: (T,), (S,). GQA through enable_gqa.
    """
    T, S = q.shape[-2], k.shape[-2]
    contiguous_causal = T == S and window is None
    if contiguous_causal:  # keys are exactly the queries' tokens: the fast path
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    distance = q_positions[:, None] - k_positions[None, :]  # (T, S)
    mask = distance >= 0
    if window is not None:
        mask &= distance < window
    if T == 1:
        return one_query_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def prefix_causal_attention(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                            k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of a chunk of queries after a cached prefix, on the CPU: the prefix
    (seen whole by every query) and the chunk's own keys (causal) through SDPA's CPU flash
    kernel, which returns each part's log-sum-exp, merged. An explicit (T, S) mask instead
    sends SDPA down a path 3x slower (measured: 16K tokens in two 8K calls, 74 prefill tok/s
    against 107 in one call).

    q: (B, H, T, d); k_prefix/v_prefix: (B, Hkv, P, d); k/v: (B, Hkv, T, d), GQA allowed."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out_p, lse_p = flash(q, k_prefix, v_prefix, 0.0, False)  # (B, H, T, d), (B, H, T)
    out_c, lse_c = flash(q, k, v, 0.0, True)
    top = torch.maximum(lse_p, lse_c)
    w_p, w_c = (lse_p - top).exp(), (lse_c - top).exp()  # (B, H, T)
    return ((out_p * w_p[..., None] + out_c * w_c[..., None]) / (w_p + w_c)[..., None]).to(q.dtype)


FLASH_MAX_KEYS = 1024  # decode steps over fewer keys take SDPA's CPU flash kernel, longer ones two matmuls


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per head (a decode step) in which the G query heads of a KV
    head share its keys: every key and value is read once.

    On the CPU without a mask and with fewer than ``FLASH_MAX_KEYS`` keys: SDPA's CPU flash
    kernel with the G query heads of a KV head as G queries of one head (one op: no score
    tensor, no separate softmax pass). Otherwise two matmuls with the keys as the large
    operand (``k · qᵀ``: 16 against 12 GB/s for ``q · kᵀ`` at 2K keys, 2 threads), the
    scale on the queries (the fewest elements). Measured on an AMD EPYC with 2 threads, 30
    layers' calls of SmolLM2's shape (``python bench/decode_attention.py``): flash 0.50 /
    1.22 / 2.95 / 5.91 / 24.0 ms at 128 / 512 / 1K / 2K / 8K keys, the matmuls 1.39 / 1.13 /
    0.92 / 0.85 / 0.79x that (past 1K keys the matmuls read the cache nearer the memory's
    bandwidth); the packed GGUF's decode at a 2K prompt went from 52.7 to 61.0 tok/s.

    q: (B, H, 1, d); k/v: (B, Hkv, S, d); mask: (1, S) True where visible, or None when
    every key is."""
    B, H, _, d = q.shape
    Hkv = k.shape[1]
    grouped = q.reshape(B, Hkv, H // Hkv, d)  # (B, Hkv, G, d)
    if (mask is None and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype
            and k.shape[-2] < FLASH_MAX_KEYS):
        return flash_grouped_attention(grouped, k, v).reshape(B, H, 1, d)
    return matmul_grouped_attention(grouped, k, v, mask).reshape(B, H, 1, d)


def flash_grouped_attention(grouped: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA's CPU flash kernel, the G query heads of a KV head as G queries of one head.
    grouped: (B, Hkv, G, d); k/v: (B, Hkv, S, d) -> (B, Hkv, G, d)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(grouped, k, v, 0.0, False)[0]


def matmul_grouped_attention(grouped: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
    """The same as two matmuls, the keys the large operand, the scale on the queries;
    mask: (1, S) True where visible, or None. -> (B, Hkv, G, d)."""
    scores = (k @ (grouped * grouped.shape[-1] ** -0.5).transpose(-1, -2)).transpose(-1, -2)  # (B, Hkv, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v
