"""What a caller asks the engine for: a ``Request`` (prompt ids, sampling, stop rules,
attention mode and memory, optionally a memory to continue and keep), checked whole before
any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from ..errors import InfLLMLiteError
from ..memory_config import MemoryConfig
from ..options import ATTENTION_MODES
from ..sampling import check_sampling

if TYPE_CHECKING:
    from ..attention import AttentionState


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
    the prompt is read in calls of at most ``chunk_size`` tokens.

    A conversation's turn continues a memory instead of starting one: ``state`` is an
    :class:`~infllm_lite.attention.AttentionState` that has read ``position`` tokens (its
    ``length``), or a callable returning one (called at admission, once the memory fits:
    a snapshot loaded only then); ``prompt_ids`` are the tokens to read after them, as
    :func:`~infllm_lite.generate.continue_ids` reads them. ``keep_state`` hands the memory
    back at the end (``Sequence.state``, still open and still counted against the budget
    until :meth:`Engine.release <infllm_lite.engine.Engine.release>`) instead of closing
    it. ``capacity``: tokens a ``full`` memory the engine creates is sized for (default:
    prompt + ``max_new_tokens``; a conversation's cache is sized once for all its turns).
    """

    prompt_ids: Sequence[int]
    max_new_tokens: int = 256
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stop: Sequence[str] = ()
    stop_token_ids: frozenset[int] | None = None
    attention: str = "full"
    memory: MemoryConfig | None = None
    chunk_size: int | None = None  # tokens per prefill call at most (None: memory.chunk_size)
    keep_logits: bool = False  # keep each step's logits (vocab,) in ``Sequence.logits``
    state: "AttentionState | Callable[[], AttentionState] | None" = None  # a memory to continue
    position: int = 0  # tokens ``state`` has read
    capacity: int | None = None  # tokens a new full-attention memory holds
    keep_state: bool = False  # hand the memory back at the end instead of closing it

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
        self._check_continuation()

    def _check_continuation(self) -> None:
        p, c = self.position, self.capacity
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise InfLLMLiteError(f"position must be an integer >= 0, got {p!r}")
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise InfLLMLiteError(f"capacity must be an integer >= 1, got {c!r}")
        if not isinstance(self.keep_state, bool):
            raise InfLLMLiteError(f"keep_state must be True or False, got {self.keep_state!r}")
        state = self.state
        if state is None:
            if p:
                raise InfLLMLiteError(f"position {p} without a state to continue")
            if c is not None and self.attention == "full" and len(self.prompt_ids) + self.max_new_tokens > c:
                raise InfLLMLiteError(f"capacity {c} is less than the prompt's {len(self.prompt_ids)} "
                                      f"tokens + {self.max_new_tokens} new ones")
            return
        if callable(state) and not hasattr(state, "layers"):
            return  # a loader: checked when it is called
        layers = getattr(state, "layers", None)
        if layers is None or not hasattr(state, "length") or any(layer.state is not state for layer in layers):
            raise InfLLMLiteError(f"state must be an open attention memory or a callable returning one, "
                                  f"got {type(state).__name__}{' (closed)' if layers else ''}")
        if state.length != p:
            raise InfLLMLiteError(f"the state has read {state.length} tokens, position says {p}")
        total = p + len(self.prompt_ids) + self.max_new_tokens
        held = getattr(state, "capacity", None)
        if self.attention == "full" and held is not None and total > held:
            raise InfLLMLiteError(f"this memory holds {held} tokens (full attention); {p} are used and "
                                  f"this request needs {len(self.prompt_ids)} + {self.max_new_tokens} more")
