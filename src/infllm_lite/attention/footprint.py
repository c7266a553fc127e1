"""How many bytes of RAM (or device memory) an attention memory will hold: what the
batching engine admits requests by.

Unlike :func:`~infllm_lite.memory_config.memory_estimate` (the tiers' K/V, the paper's
accounting), this counts what the state allocates: for ``infllm`` the static slot arrays
of every layer (initial tokens, tail, fast-tier pool slots: three float32 copies with two
indicator columns; the decode step's copy of its selected blocks) and the growing parts at their largest (the host block store and the
representative vectors grow by doubling); blocks sent to disk (``max_host_bytes``) are not
counted. An upper bound: exact for the static part, up to twice the growing part
(``tests/test_engine.py`` holds it to the tensors a state really holds).
"""

from __future__ import annotations

import torch

from ..config import ModelArgs
from ..errors import InfLLMLiteError
from ..memory.pool import MIN_HOST_BLOCKS
from ..memory_config import MemoryConfig, kv_itemsize, n_formed_blocks
from ..options import ATTENTION_MODES
from .slots import SlotLayout


def state_bytes(mode: str, args: ModelArgs, n_tokens: int, memory: MemoryConfig | None = None,
                dtype: torch.dtype = torch.float32) -> int:
    """Bytes a batch-1 memory of ``mode`` holds at most once it has read ``n_tokens`` tokens
    (``full``: its KV cache of ``n_tokens``, in ``memory.kv_dtype`` if given; ``memory`` defaults to
    ``MemoryConfig.for_model(args)``)."""
    if mode not in ATTENTION_MODES:
        raise InfLLMLiteError(f"unknown attention mode {mode!r}; available: {', '.join(ATTENTION_MODES)}")
    L, H, Hkv, d, elem = args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, dtype.itemsize
    if mode == "full":  # its KV cache, in memory.kv_dtype if given
        return 2 * L * Hkv * n_tokens * d * kv_itemsize(memory, elem)
    cfg = memory if memory is not None else MemoryConfig.for_model(args)
    kv_elem = kv_itemsize(cfg, elem)  # the kept keys and values (cfg.kv_dtype)
    if mode in ("streaming", "lm-infinite"):  # the same sinks and ring
        return 2 * L * Hkv * (cfg.n_init + cfg.n_local - 1) * d * kv_elem
    lay = SlotLayout.build(cfg, batch_size=1, group=H // Hkv)
    slots = 3 * Hkv * lay.n_slots * (d + 2) * 4  # k_rot, k_raw, v (float32)
    scores = H * lay.tail_capacity * 4 + lay.n_pool * 4  # the tail's scores, the pool slots' (lru-s)
    selected = 2 * Hkv * cfg.topk * cfg.block_size * d * 4  # the decode step's copy of its blocks
    n_blocks = n_formed_blocks(cfg, n_tokens)
    repr_rows = max(16, 2 * n_blocks) if n_blocks else 0
    block_bytes = Hkv * cfg.block_size * d * kv_elem  # K or V of one block
    host_blocks = max(MIN_HOST_BLOCKS, 2 * n_blocks) if n_blocks else 0
    if cfg.max_host_bytes is not None:
        host_blocks = min(host_blocks, max(1, cfg.max_host_bytes // L) // (2 * block_bytes))
    per_layer = slots + scores + selected + repr_rows * H * d * 4 + host_blocks * 2 * block_bytes
    return L * per_layer
