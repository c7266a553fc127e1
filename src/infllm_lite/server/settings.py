"""What a server is started with (``infllm-lite serve``'s options, or a caller's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_PROMPT_TOKENS = 131072
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BODY_BYTES = 8 << 20  # 8 MiB: about 2M tokens of English text
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 512}  # OpenAI's completions default; chat's CLI cap


@dataclass
class ServerSettings:
    """``model_name``: the id clients name (``/v1/models``); ``attention``: a request's
    default mode; ``memory``: ``MemoryConfig.for_model`` overrides (the command line's),
    under a request's own ``memory`` fields; the engine's ``memory_budget``,
    ``max_sequences``, ``step_tokens``, ``attention_kernel``; ``max_queue`` sequences
    waiting at most (then 429); ``max_prompt_tokens`` per request (then 400);
    ``max_body_bytes`` per request body (then 413); ``api_keys`` (none: open);
    ``snapshot_dir`` for conversations' snapshots (none: conversations live in memory only
    and are never evicted)."""

    model_name: str
    attention: str = "infllm"
    memory: dict = field(default_factory=dict)
    memory_budget: int | None = None
    max_sequences: int | None = None
    step_tokens: int | None = None
    attention_kernel: str = "auto"
    max_queue: int = DEFAULT_MAX_QUEUE
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_conversations: int = 1000
    api_keys: tuple[str, ...] = ()
    snapshot_dir: Path | None = None
    default_max_tokens: dict = field(default_factory=lambda: dict(DEFAULT_MAX_TOKENS))
