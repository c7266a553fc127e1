"""``EvalPlan``: what an evaluation runs (tasks × modes × lengths × samples, the memory and
truncation settings), checked before any work; the runner and the report both read it.

    plan = EvalPlan(tasks=["passkey"], modes=["infllm", "full"], lengths=[4096], samples=10)
    plan.check()
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import InfLLMLiteError
from ..memory_config import MemoryConfig
from ..options import ATTENTION_MODES, check_choice
from .datasets import load_official
from .metrics import require_scorers
from .sample import EvalSample
from .synthetic import generated_here
from .tasks import TRUNCATION_PREFIX, get_task

# the eval's order of the attention modes (default plan, reports, plots): InfLLM first, the
# baselines after it; a mode added to options.ATTENTION_MODES comes last
_ORDER = ("infllm", "streaming", "lm-infinite", "full")
MODES = tuple(sorted(ATTENTION_MODES, key=lambda m: _ORDER.index(m) if m in _ORDER else len(_ORDER)))


@dataclass
class EvalPlan:
    """What to run. ``lengths``: prompt tokens of generated tasks, truncation limits of
    official ones (None: official prompts whole; required for generated tasks).
    ``max_len``: a truncation limit per mode; a mode not in it gets the default (full
    attention: the model's native window; infllm and streaming: none)."""

    tasks: list[str]
    modes: list[str] = field(default_factory=lambda: list(MODES))
    lengths: list[int] | None = None
    samples: int | None = 10  # per task and length (None: every record of official data)
    seed: int = 0
    data_dir: str | None = None
    max_len: dict[str, int | None] = field(default_factory=dict)
    memory: MemoryConfig | None = None  # infllm and streaming (default: MemoryConfig.for_model)
    chunk_size: int | None = None
    attention_kernel: str = "auto"  # how infllm computes attention (see generate_ids)
    official: bool = False  # passkey, number_string, kv_retrieval from files (not RULER's)

    def load_data(self) -> dict[str, list[EvalSample]]:
        """Read every official task's records now (a missing file fails before any model is
        loaded); kept for the run."""
        if not hasattr(self, "_records"):
            self._records = {task: load_official(task, self.data_dir)
                             for task in self.tasks if not self.generated(task)}
        return self._records

    def generated(self, task: str) -> bool:
        """Whether ``task``'s samples are generated here (else read from official files):
        :func:`.synthetic.generated_here` (RULER's tasks even with ``official``)."""
        return generated_here(task, self.official)

    def check(self) -> None:
        """Raise InfLLMLiteError on a bad plan, before any work."""
        if not self.tasks:
            raise InfLLMLiteError("no tasks given")
        for task in self.tasks:
            get_task(task)
        if not self.modes:
            raise InfLLMLiteError(f"no attention modes given; choose among {', '.join(MODES)}")
        for mode in self.modes:
            check_choice(mode, MODES, "attention mode")
        if self.lengths is not None and (not self.lengths or min(self.lengths) < 1):
            raise InfLLMLiteError(f"lengths must be positive token counts, got {self.lengths}")
        generated = [t for t in self.tasks if self.generated(t)]
        if generated and not self.lengths:
            raise InfLLMLiteError(f"generated tasks ({', '.join(generated)}) need lengths (e.g. "
                                  "--lengths 4k,8k)")
        if self.samples is not None and self.samples < 1:
            raise InfLLMLiteError(f"samples must be at least 1, got {self.samples}")
        if generated and self.samples is None:
            raise InfLLMLiteError("generated tasks need a number of samples per length")
        for mode, limit in self.max_len.items():
            if mode not in MODES or (limit is not None and limit < 1):
                raise InfLLMLiteError(f"bad truncation limit {mode}={limit}")
        for task in self.tasks:  # a truncated prompt keeps 128 ids, then room for the rest
            spec = get_task(task)
            limits = [v for v in self.max_len.values() if v is not None]
            if not self.generated(task):
                limits += self.lengths or []
            for limit in limits:
                if limit - spec.max_new_tokens <= TRUNCATION_PREFIX:
                    raise InfLLMLiteError(
                        f"a limit of {limit} tokens is too small for {task}: a truncated prompt "
                        f"keeps its first {TRUNCATION_PREFIX} tokens and leaves room for "
                        f"{spec.max_new_tokens} new ones; use more than "
                        f"{TRUNCATION_PREFIX + spec.max_new_tokens}")

    def check_scorers(self) -> None:
        """Raise InfLLMLiteError when a task's metric needs a package that is not installed
        (ROUGE: the ``eval`` extra), before any model is loaded."""
        require_scorers(self.tasks)

    def to_dict(self) -> dict:
        """The plan as JSON (the memory config expanded)."""
        d = asdict(self)
        d["memory"] = self.memory.to_dict() if self.memory is not None else None
        return d
