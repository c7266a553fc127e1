"""The choices a user makes, defined once: attention modes, InfLLM kernels, cache policies,
the default prefill call size, and the parsers of lengths and byte sizes.

Torch-free, so that ``infllm-lite --help`` and option checks need no torch import; the
CLI, ``eval/``, ``attention/`` and the benchmarks all read these names from here.
"""

from __future__ import annotations

import re

from .errors import InfLLMLiteError

# attention modes: what each layer's memory keeps (see attention/)
ATTENTION_MODES = ("full", "streaming", "lm-infinite", "infllm")
# modes with a context memory, configured by a MemoryConfig
MEMORY_MODES = ("streaming", "lm-infinite", "infllm")
# how the infllm mode computes its joint attention (attention/kernels.py); "auto" is the
# window kernel on the CPU (measured twice as fast there as compiled flex), flex elsewhere
ATTENTION_KERNELS = ("auto", "flex", "flex-eager", "window", "window-eager", "torch")
# what load_model(quantize=...) and --quantize accept (models/quantized.py)
QUANTIZE_CHOICES = ("int8", "int4", "gguf")
# how a memory stores the keys and values it keeps (None in MemoryConfig: the model's dtype)
KV_DTYPES = ("float32", "bfloat16", "float16")
# which cached block the fast tier evicts (memory/pool.py)
CACHE_POLICIES = ("lru", "lru-s")
# prompt tokens per model call during prefill (bounds the activations of one call)
DEFAULT_CHUNK_SIZE = 8192


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``choices``, else a clear error naming them."""
    if value not in choices:
        raise InfLLMLiteError(f"unknown {what} {value!r}; available: {', '.join(choices)}")
    return value


def parse_length(text: str) -> int:
    """'4k' -> 4096, '8K' -> 8192, '16384' -> 16384: a positive length in tokens."""
    part = text.strip().lower()
    scale = 1024 if part.endswith("k") else 1
    try:
        value = int(part[:-1] if scale > 1 else part) * scale
    except ValueError:
        raise InfLLMLiteError(f"{text.strip()!r} is not a length in tokens (e.g. 4k, 8192)") from None
    if value < 1:
        raise InfLLMLiteError(f"lengths must be positive, got {text.strip()!r}")
    return value


def parse_lengths(text: str) -> list[int]:
    """'4k,8K,16384' -> [4096, 8192, 16384] (empty items skipped, at least one length)."""
    out = [parse_length(part) for part in text.split(",") if part.strip()]
    if not out:
        raise InfLLMLiteError(f"{text!r} names no length")
    return out


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'8GiB', '500MB', '1.5gib', '123456' -> bytes (at least 1)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise InfLLMLiteError(f"{text!r} is not a size in bytes (e.g. 8GiB, 500MB, 1000000)")
    return int(float(match.group(1)) * _UNITS[unit])
