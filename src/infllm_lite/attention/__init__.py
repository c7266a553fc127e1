"""Attention memories behind the model's one attention interface (see base.py)."""

from __future__ import annotations

import torch

from ..config import ModelArgs
from ..errors import InfLLMLiteError
from ..memory_config import MemoryConfig
from .base import AttentionState, LayerAttention
from ..options import ATTENTION_MODES
from .full import FullAttentionState
from .kernels import InfLLMKernel, make_kernel


def make_attention_state(mode: str, args: ModelArgs, *, capacity: int,
                         memory: MemoryConfig | None = None, batch_size: int = 1,
                         dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu",
                         kernel: "str | InfLLMKernel" = "auto") -> AttentionState:
    """A fresh attention memory of the given mode.

    ``full`` preallocates ``capacity`` tokens (stored in ``memory.kv_dtype`` if given); ``streaming``, ``lm-infinite`` and ``infllm`` are unbounded
    and follow ``memory`` (default: ``MemoryConfig.for_model(args)``); ``kernel`` chooses
    how ``infllm`` computes its attention (``auto``, ``window``, ``flex``, … see
    :mod:`.infllm`).
    """
    kernel = make_kernel(kernel, device)  # resolved once (and a bad name refused) in every mode
    if mode == "full":
        return FullAttentionState(args, capacity, batch_size=batch_size, dtype=dtype, device=device,
                                  memory=memory)
    if mode not in ATTENTION_MODES:
        raise InfLLMLiteError(
            f"unknown attention mode {mode!r}; available: {', '.join(ATTENTION_MODES)}")
    memory = memory if memory is not None else MemoryConfig.for_model(args)
    if mode == "streaming":
        from .streaming import StreamingState
        return StreamingState(args, memory, batch_size=batch_size, dtype=dtype, device=device)
    if mode == "lm-infinite":
        from .lm_infinite import LMInfiniteState
        return LMInfiniteState(args, memory, batch_size=batch_size, dtype=dtype, device=device)
    from .infllm import InfLLMState
    return InfLLMState(args, memory, batch_size=batch_size, dtype=dtype, device=device, kernel=kernel)


def kernel_name(kernel: str, device: torch.device | str) -> str:
    """The InfLLM kernel ``kernel`` (one of ``options.ATTENTION_KERNELS``) resolves to on
    ``device`` (``auto`` -> ``window`` on the CPU, ``flex`` elsewhere)."""
    return make_kernel(kernel, device).name


__all__ = ["ATTENTION_MODES", "AttentionState", "FullAttentionState", "InfLLMKernel", "LayerAttention",
           "kernel_name", "make_attention_state", "make_kernel"]
