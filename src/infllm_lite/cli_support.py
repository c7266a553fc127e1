"""What the commands of ``infllm-lite`` share once their options are parsed: the checks made
before any work (numbers, options that apply, output folders), the model the model options
name, the ``MemoryConfig`` the memory options ask for, ``--max-len``."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from .errors import InfLLMLiteError
from .options import ATTENTION_MODES, MEMORY_MODES, parse_length

MEMORY_OPTIONS = ("n_init", "n_local", "block_size", "topk", "repr_topk", "max_cached_blocks", "cache_policy",
                  "max_host_bytes", "offload_dir", "kv_dtype")

# The attention modes an option applies to (streaming keeps only sinks and a local window).
OPTION_MODES = {
    "n_init": MEMORY_MODES, "n_local": MEMORY_MODES,
    "block_size": ("infllm",), "topk": ("infllm",), "repr_topk": ("infllm",), "max_cached_blocks": ("infllm",),
    "cache_policy": ("infllm",), "max_host_bytes": ("infllm",), "offload_dir": ("infllm",),
    "attention_kernel": ("infllm",), "compile": ("full",), "memory_preset": MEMORY_MODES,
    "kv_dtype": ("full", *MEMORY_MODES),
}

# Numeric options: (rule met, what the rule says).
NUMBER_RULES = {
    "max_new_tokens": (lambda v: v >= 1, "must be at least 1"),
    "temperature": (lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 = off)"),
    "chunk_size": (lambda v: v >= 1, "must be at least 1"),
    "length": (lambda v: v >= 1, "must be at least 1"),
    "depth": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "samples": (lambda v: v >= 0, "must be >= 0 (0 = every official record)"),
    "n_init": (lambda v: v >= 0, "must be >= 0"),
    "n_local": (lambda v: v >= 1, "must be at least 1"),
    "block_size": (lambda v: v >= 1, "must be at least 1"),
    "topk": (lambda v: v >= 0, "must be >= 0"),
    "repr_topk": (lambda v: v >= 1, "must be at least 1"),
    "max_cached_blocks": (lambda v: v >= 1, "must be at least 1"),
    "max_sequences": (lambda v: v >= 1, "must be at least 1"),
    "step_tokens": (lambda v: v >= 1, "must be at least 1"),
}


def flag(dest: str) -> str:
    """'max_new_tokens' -> '--max-new-tokens'."""
    return "--" + dest.replace("_", "-")


def check_numbers(args) -> None:
    """Every numeric option the command has and the user set, checked against NUMBER_RULES."""
    for dest, (ok, rule) in NUMBER_RULES.items():
        value = getattr(args, dest, None)
        if value is not None and (isinstance(value, float) and math.isnan(value) or not ok(value)):
            raise InfLLMLiteError(f"{flag(dest)} {rule}, got {value}")


def check_options_apply(args, modes: list[str]) -> None:
    """Refuse an option the user set that none of the attention ``modes`` uses."""
    for dest, applies in OPTION_MODES.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False and not set(applies) & set(modes):
            raise InfLLMLiteError(f"{flag(dest)} applies to --attention {' or '.join(applies)} only "
                                  f"(here: {','.join(modes)})")


def known_modes(modes: list[str]) -> bool:
    return all(m in ATTENTION_MODES for m in modes)


def check_writable_dir(path, option: str, *, create: bool = True) -> Path:
    """The folder ``path`` (created if missing and ``create``), or one line saying why
    ``option`` cannot write there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InfLLMLiteError(f"{option} {path} is a file, not a folder")
    if not path.exists() and not create:
        raise InfLLMLiteError(f"{option} {path} does not exist; create it first")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise InfLLMLiteError(f"{option} {path}: cannot write there ({e.strerror or e})") from None
    return path


def memory_config_from_args(args, model):
    """The MemoryConfig the memory options ask for (None: the model's default)."""
    from .memory_config import MemoryConfig
    overrides = {k: getattr(args, k) for k in MEMORY_OPTIONS if getattr(args, k) is not None}
    preset = getattr(args, "memory_preset", None)
    if preset is not None:
        return MemoryConfig.preset(preset, model.args, **overrides)
    return MemoryConfig.for_model(model.args, **overrides) if overrides else None


def load_from_args(args):
    import torch

    from .loading import load_model
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if getattr(args, "tensor_parallel", False) and getattr(args, "quantize", None):
        raise InfLLMLiteError("--quantize does not apply with --tensor-parallel (the shards are float)")
    if getattr(args, "tensor_parallel", False):  # under torchrun: this rank's shard
        from .parallel.launch import load_tensor_parallel
        return load_tensor_parallel(args, dtype)
    return load_model(args.model, dtype=dtype, device=args.device,
                      quantize=getattr(args, "quantize", None), group_size=getattr(args, "group_size", None))


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
