"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import torch

from .errors import InfLLMLiteError


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not temperature >= 0:
        raise InfLLMLiteError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InfLLMLiteError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InfLLMLiteError(f"top_k must be >= 0 (0 disables it), got {top_k}")


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, vocab) -> token ids (B,). Greedy when temperature is 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
