"""``generate`` on a list of prompts: every prompt a request of one engine, decoded
together; texts in the prompts' order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from .engine import Engine, EngineStats, Request, SamplingOptions, SequenceStats
from .errors import InfLLMLiteError
from .memory_config import MemoryConfig
from .prompts import encode_prompt


@dataclass
class BatchStats:
    """``sequences``: each prompt's :class:`~infllm_lite.engine.SequenceStats` (in order);
    ``engine``: the steps, tokens and seconds of the whole batch."""

    sequences: list[SequenceStats]
    engine: EngineStats

    def summary(self) -> str:
        e = self.engine
        return (f"{len(self.sequences)} sequences, {e.prefill_tokens} prompt tok in "
                f"{e.prefill_seconds:.1f} s, {e.decode_tokens} tok decoded at "
                f"{e.decode_tokens_per_second:.1f} tok/s (up to {e.max_batch} at once), {e.steps} steps")


def _per_prompt(name: str, value, n: int) -> list:
    """A scalar for every prompt, or one value per prompt."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InfLLMLiteError(f"{name} has {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def generate_batch(model, tokenizer, prompts: Sequence, *, max_new_tokens: int = 256,
                   attention: str = "full", temperature: float = 0.0, top_p: float = 1.0,
                   top_k: int = 0, seed: int | Sequence[int] | None = None,
                   stop: Sequence[str] = (), stream: bool = False,
                   memory: MemoryConfig | None = None, chunk_size: int | None = None,
                   progress: bool = False, attention_kernel="auto",
                   memory_budget: int | None = None, max_sequences: int | None = None,
                   step_tokens: int | None = None, return_stats: bool = False):
    """The texts of ``prompts`` (see :func:`~infllm_lite.generate`); every request is
    checked (by ``Engine.submit``) before any work, a bad one named by its index.
    ``seed`` (one for all, or one per prompt): each prompt's draws are its own, equal to
    its batch-1 run with that seed."""
    seeds = _per_prompt("seed", seed, len(prompts))
    requests = []
    for i, (prompt, s) in enumerate(zip(prompts, seeds)):
        try:
            requests.append(Request(encode_prompt(tokenizer, prompt), max_new_tokens=max_new_tokens,
                                    sampling=SamplingOptions(temperature, top_p, top_k, s), stop=tuple(stop),
                                    attention=attention, memory=memory, chunk_size=chunk_size))
        except InfLLMLiteError as e:
            raise InfLLMLiteError(f"prompt {i}: {e}") from None
    options = {} if step_tokens is None else {"step_tokens": step_tokens}
    engine = Engine(model, tokenizer, memory_budget=memory_budget, max_sequences=max_sequences,
                    attention_kernel=attention_kernel, **options)
    ids = []
    try:
        for i, req in enumerate(requests):
            try:
                ids.append(engine.submit(req))
            except InfLLMLiteError as e:
                raise InfLLMLiteError(f"prompt {i}: {e}") from None
    except BaseException:
        engine.close()
        raise
    index = {seq_id: i for i, seq_id in enumerate(ids)}
    stats = BatchStats([engine.sequences[i].stats for i in ids], engine.stats)
    pieces = _pieces(engine, index, progress)
    if stream:
        return (pieces, stats) if return_stats else pieces
    texts = [""] * len(ids)
    for i, piece in pieces:
        texts[i] += piece
    return (texts, stats) if return_stats else texts


def _pieces(engine: Engine, index: dict[int, int], progress: bool) -> Iterator[tuple[int, str]]:
    """(prompt index, text piece) as the engine makes them, an empty piece ending each
    prompt's text (its stats are complete then); the engine closes at the end, or when the
    caller stops early."""
    try:
        with tqdm(total=len(index), desc="sequences", unit="seq", disable=not progress, leave=False) as bar:
            for event in engine.events():
                if event.text:
                    yield index[event.seq_id], event.text
                if event.finish_reason is not None:
                    yield index[event.seq_id], ""
                    bar.update(1)
    finally:
        engine.close()
