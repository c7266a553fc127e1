"""What every evaluation task shares: a sample (prompt and references) and a task's settings
(prompt template, answer length, chat template or raw text, stop strings, metric)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskSpec:
    """How a task is prompted, decoded and scored, as the official benchmark does it.

    ``template`` is formatted with the sample's fields (``{context}``, ``{input}``, ...) into
    the prompt text; with ``chat`` that text is the user message of the model's chat
    template, otherwise it is fed raw (few-shot and code tasks). ``stop`` are extra stop
    strings (samsum: a newline); ``first_line`` scores only the prediction's first line.
    ``metric`` names a scorer of :mod:`infllm_lite.eval.metrics`.
    """

    name: str
    benchmark: str  # "infinitebench" or "longbench"
    template: str
    max_new_tokens: int
    metric: str
    chat: bool = True
    stop: tuple[str, ...] = ()
    first_line: bool = False


@dataclass(frozen=True)
class EvalSample:
    """One sample, ready to prompt and score.

    ``prompt`` is the task template already filled in (the user message, or the raw text
    when the task's ``chat`` is false); ``answers`` are the references in the form the
    task's metric takes (any one matching is enough: the score is the max over them).
    ``meta`` carries the rest: for generated samples ``length`` (target tokens), ``depth``
    and ``seed``; for official data the source's fields a metric needs (``all_classes``).
    """

    task: str
    id: str
    prompt: str
    answers: tuple[str, ...]
    meta: dict = field(default_factory=dict)
