"""``MemoryConfig``: the InfLLM context-memory settings (SPEC §2), validated up front,
and ``memory_estimate``: the bytes each memory tier will hold."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

from .config import ModelArgs
from .errors import InfLLMLiteError
from .options import CACHE_POLICIES, DEFAULT_CHUNK_SIZE, KV_DTYPES


@dataclass(frozen=True)
class MemoryConfig:
    """InfLLM settings (defaults of the reference configs, SPEC §2)."""

    n_init: int = 128  # initial (sink) tokens
    n_local: int = 4096  # local window, the query's own token included
    block_size: int = 128  # tokens per memory unit
    topk: int = 16  # memory units retrieved per execution chunk
    repr_topk: int = 4  # representative tokens per unit
    exc_block_size: int = 512  # queries per execution chunk (one retrieval each)
    max_cached_blocks: int = 32  # fast-tier block slots per layer
    cache_policy: str = "lru"
    score_decay: float = 0.1  # lru-s only
    chunk_size: int = DEFAULT_CHUNK_SIZE  # tokens per model call during prefill
    # Slow-tier budget: bytes of formed-block K/V kept in host memory over all layers (each
    # layer's pool gets an equal share); older blocks go to a memory-mapped file in
    # ``offload_dir``. None: unlimited (no disk tier).
    max_host_bytes: int | None = None
    offload_dir: str | None = None  # None: a temporary directory, removed when the pool closes
    # How the kept keys and values are stored: InfLLM's formed blocks (host and disk tiers),
    # StreamingLLM's and LM-Infinite's sinks and window. None: the model's dtype. Attention
    # arithmetic stays float32; a bfloat16/float16 store halves host memory and disk traffic.
    kv_dtype: str | None = None

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise InfLLMLiteError(f"invalid MemoryConfig: {message}")

        for name in ("n_local", "block_size", "repr_topk", "exc_block_size", "max_cached_blocks",
                     "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{name} must be a positive integer, got {value!r}")
        for name in ("n_init", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(f"{name} must be a non-negative integer, got {value!r}")
        if self.exc_block_size > self.n_local:
            fail(f"exc_block_size ({self.exc_block_size}) must be <= n_local ({self.n_local})")
        if self.topk > self.max_cached_blocks:
            fail(f"topk ({self.topk}) must be <= max_cached_blocks ({self.max_cached_blocks})")
        if self.repr_topk > self.block_size:
            fail(f"repr_topk ({self.repr_topk}) must be <= block_size ({self.block_size})")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            fail(f"kv_dtype must be one of {', '.join(KV_DTYPES)} or None, got {self.kv_dtype!r}")
        if self.cache_policy not in CACHE_POLICIES:
            fail(f"cache_policy must be one of {', '.join(CACHE_POLICIES)}, got {self.cache_policy!r}")
        if not 0 <= self.score_decay <= 1:
            fail(f"score_decay must be in [0, 1], got {self.score_decay}")
        if self.max_host_bytes is not None and (
                not isinstance(self.max_host_bytes, int) or isinstance(self.max_host_bytes, bool)
                or self.max_host_bytes <= 0):
            fail(f"max_host_bytes must be a positive integer or None, got {self.max_host_bytes!r}")
        if self.offload_dir is not None:
            if not isinstance(self.offload_dir, (str, os.PathLike)) or not os.fspath(self.offload_dir):
                fail(f"offload_dir must be a directory path or None, got {self.offload_dir!r}")
            object.__setattr__(self, "offload_dir", os.fspath(self.offload_dir))  # Path -> str

    @classmethod
    def for_model(cls, args: ModelArgs, **overrides) -> "MemoryConfig":
        """A default suited to the model's native window: the local window is 1/16 of it
        (at least 256, at most 4096 tokens) and as many blocks of 128 are retrieved as the
        window holds (2 to 16), so a query attends about 1/7 of the native window.

        Measured on the embedded SmolLM2-135M (native 8192): it answers passkeys with full
        attention at 1K tokens but not at 4K, and InfLLM with the reference's n_local 2048 /
        topk 16 (4352 keys per query) fails likewise, while n_local 512 / topk 4 (1152 keys)
        finds the key at 4K-32K. Large models can afford the reference settings
        (``MemoryConfig()``: n_local 4096, topk 16).
        """
        native = args.max_position_embeddings
        n_local = min(4096, max(256, native // 16))
        topk = min(16, max(2, n_local // 128))
        config = cls(n_init=min(128, n_local // 2), n_local=n_local, block_size=128, topk=topk,
                     exc_block_size=min(512, n_local), max_cached_blocks=max(32, topk))
        if "n_local" in overrides:  # keep the derived sizes consistent with an overridden window
            overrides.setdefault("exc_block_size", min(config.exc_block_size, overrides["n_local"]))
        if "topk" in overrides:
            overrides.setdefault("max_cached_blocks", max(config.max_cached_blocks, overrides["topk"]))
        return replace(config, **overrides)

    @classmethod
    def preset(cls, name: str, args: ModelArgs | None = None, **overrides) -> "MemoryConfig":
        """A named configuration (:mod:`.memory_presets`: the InfLLM paper's and its
        repository's, e.g. ``"infllm-mistral-paper"``), validated for the model ``args`` it
        is applied to; ``overrides`` replace fields of it."""
        from .memory_presets import preset_fields
        return cls(**{**preset_fields(name, args), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def memory_estimate(args: ModelArgs, config: MemoryConfig, n_tokens: int,
                    bytes_per_element: int = 4) -> dict[str, int]:
    """Bytes each tier holds after ``n_tokens`` tokens, over all layers (batch 1).

    ``fast``: initial tokens, local window and pending remainder (K and V), the cached
    block slots, and the representative vectors, at ``bytes_per_element`` (the model's
    dtype); ``slow``: K and V of every formed block (the authoritative copy), at
    ``config.kv_dtype``'s size if set; ``total`` the sum.
    """
    if n_tokens < 0:
        raise InfLLMLiteError(f"n_tokens must be >= 0, got {n_tokens}")
    kv_token = 2 * args.n_kv_heads * args.head_dim * bytes_per_element  # one layer, K and V
    n_blocks = n_formed_blocks(config, n_tokens)
    resident = n_tokens - n_blocks * config.block_size  # initial tokens, pending remainder, window
    cached_slots = min(n_blocks, config.max_cached_blocks) * config.block_size
    repr_bytes = n_blocks * args.n_heads * args.head_dim * bytes_per_element
    fast = args.n_layers * (resident * kv_token + cached_slots * kv_token + repr_bytes)
    stored_token = 2 * args.n_kv_heads * args.head_dim * kv_itemsize(config, bytes_per_element)  # as kept
    slow = args.n_layers * n_blocks * config.block_size * stored_token
    return {"fast": fast, "slow": slow, "total": fast + slow,
            "blocks_per_layer": n_blocks, "kv_bytes_per_token": args.n_layers * kv_token}


def kv_itemsize(config: MemoryConfig | None, default: int) -> int:
    """Bytes of one stored key/value element under ``config.kv_dtype`` (``default``, the
    model's, when it is None)."""
    if config is None or config.kv_dtype is None:
        return default
    return 4 if config.kv_dtype == "float32" else 2


def n_formed_blocks(config: MemoryConfig, n_tokens: int) -> int:
    """Blocks formed once ``n_tokens`` tokens are processed (SPEC §3): block b forms when
    its newest token ``n_init + (b+1)·B - 1 <= t - n_local`` with ``t = n_tokens - 1``."""
    return max(0, (n_tokens - config.n_local - config.n_init) // config.block_size)
