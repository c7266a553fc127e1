"""Attention memories behind the model's one attention interface (see base.py)."""

from __future__ import annotations

import torch

from ..config import ModelArgs
from ..errors import InfLLMLiteError
from .base import AttentionState, LayerAttention
from .full import FullAttentionState

ATTENTION_MODES = ("full",)


def make_attention_state(mode: str, args: ModelArgs, *, capacity: int, batch_size: int = 1,
                         dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> AttentionState:
    """A fresh attention memory of the given mode for ``capacity`` tokens."""
    if mode == "full":
        return FullAttentionState(args, capacity, batch_size=batch_size, dtype=dtype, device=device)
    raise InfLLMLiteError(
        f"unknown attention mode {mode!r}; available: {', '.join(ATTENTION_MODES)}")


__all__ = ["ATTENTION_MODES", "AttentionState", "FullAttentionState", "LayerAttention",
           "make_attention_state"]
