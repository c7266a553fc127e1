"""What the commands of ``infllm-lite`` share once their options are parsed: the model the
model options name, the ``MemoryConfig`` the memory options ask for, ``--max-len``."""

from __future__ import annotations

from .options import parse_length

MEMORY_OPTIONS = ("n_init", "n_local", "block_size", "topk", "max_cached_blocks", "cache_policy",
                  "max_host_bytes", "offload_dir")


def memory_config_from_args(args, model):
    """The MemoryConfig the memory options ask for (None: the model's default)."""
    from .memory_config import MemoryConfig
    overrides = {k: getattr(args, k) for k in MEMORY_OPTIONS if getattr(args, k) is not None}
    return MemoryConfig.for_model(model.args, **overrides) if overrides else None


def load_from_args(args):
    import torch

    from .loading import load_model
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(args.model, dtype=dtype, device=args.device)


def parse_max_len(values: list[str] | None, modes: list[str]) -> dict:
    """['full=none', '16k'] -> {'full': None, <every other mode>: 16384}."""
    limits = {}
    for value in values or []:
        mode, _, limit = value.rpartition("=")
        targets = [mode] if mode else modes
        number = None if limit.strip().lower() == "none" else parse_length(limit)
        for m in targets:
            limits[m] = number
    return limits
