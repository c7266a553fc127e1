"""What a caller asks the engine for: a ``Request`` (prompt ids, sampling, stop rules,
attention mode and memory), checked whole before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..errors import InfLLMLiteError
from ..memory_config import MemoryConfig
from ..options import ATTENTION_MODES
from ..sampling import check_sampling


@dataclass(frozen=True)
class SamplingOptions:
    """Greedy at temperature 0; a ``seed`` makes a sequence's draws its own (the same
    whatever other sequences share its steps)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def check(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InfLLMLiteError(f"{name} must be a number, got {value!r}")
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InfLLMLiteError(f"{name} must be an integer, got {value!r}")
        if self.top_k is None:
            raise InfLLMLiteError("top_k must be an integer, got None")
        check_sampling(self.temperature, self.top_p, self.top_k)


@dataclass(frozen=True)
class Request:
    """One sequence to generate. ``stop_token_ids`` None: the engine's (EOS, end of turn);
    ``memory`` configures ``streaming`` and ``infllm`` (default: ``MemoryConfig.for_model``);
    the prompt is read in calls of at most ``chunk_size`` tokens."""

    prompt_ids: Sequence[int]
    max_new_tokens: int = 256
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: Sequence[str] = ()
    stop_token_ids: frozenset[int] | None = None
    attention: str = "full"
    memory: MemoryConfig | None = None
    chunk_size: int | None = None  # tokens per prefill call at most (None: memory.chunk_size)
    keep_logits: bool = False  # keep each step's logits (vocab,) in ``Sequence.logits``

    def check(self, vocab_size: int) -> None:
        """Refuse what cannot run, with one clear line (an ``InfLLMLiteError``)."""
        ids = self.prompt_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InfLLMLiteError(f"prompt_ids must be a list of token ids, got {type(ids).__name__}")
        if len(ids) == 0:
            raise InfLLMLiteError("the prompt is empty")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise InfLLMLiteError(f"prompt token id {t!r} is not in the vocabulary (0..{vocab_size - 1})")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InfLLMLiteError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        c = self.chunk_size
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise InfLLMLiteError(f"chunk_size must be an integer >= 1, got {c!r}")
        if not isinstance(self.sampling, SamplingOptions):
            raise InfLLMLiteError(f"sampling must be a SamplingOptions, got {type(self.sampling).__name__}")
        self.sampling.check()
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise InfLLMLiteError(f"stop must be a list of strings, got {self.stop!r}")
        if self.attention not in ATTENTION_MODES:
            raise InfLLMLiteError(f"unknown attention mode {self.attention!r}; "
                                  f"available: {', '.join(ATTENTION_MODES)}")
        if self.memory is not None and not isinstance(self.memory, MemoryConfig):
            raise InfLLMLiteError(f"memory must be a MemoryConfig, got {type(self.memory).__name__}")
