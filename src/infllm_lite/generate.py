"""Text generation: chunked prefill, then a decode loop with sampling, stop tokens and
stop strings, as one string or as a stream of text pieces."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .attention import make_attention_state
from .batch_generate import generate_batch
from .errors import InfLLMLiteError
from .memory_config import MemoryConfig
from .models.transformer import Transformer
from .options import DEFAULT_CHUNK_SIZE
from .prompts import encode_prompt, is_prompt_list, stop_token_ids
from .sampling import check_sampling, sample
from .stats import GenerationStats, device_clock
from .text_stream import stream_text
from .tokenizer import Tokenizer


def generate_ids(model: Transformer, prompt_ids: Sequence[int], *, max_new_tokens: int = 256,
                 attention: str = "full", temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_token_ids: set[int] = frozenset(),
                 memory: MemoryConfig | None = None, chunk_size: int | None = None,
                 compile: bool = False, progress: bool = False,
                 attention_kernel: str = "auto", stats: GenerationStats | None = None) -> Iterator[int]:
    """An iterator of new token ids, one at a time (stop tokens are not yielded).

    Arguments are checked here, before any work, not at the first ``next()``.
    ``memory`` configures the ``streaming`` and ``infllm`` modes (default: one suited to the
    model, ``MemoryConfig.for_model``); ``chunk_size`` defaults to ``memory.chunk_size``.
    ``attention_kernel`` computes ``infllm``: ``auto`` (the default: ``window`` on the CPU,
    ``flex`` on other devices), ``window`` (compiled dense attention over each query tile's
    key window), ``flex`` (compiled FlexAttention), their uncompiled ``window-eager`` and
    ``flex-eager``, or ``torch`` (plain, every logit materialised: for debugging). A given
    ``stats`` (:class:`GenerationStats`) is filled in as the generation runs.
    """
    if not prompt_ids:
        raise InfLLMLiteError("the prompt is empty")
    if max_new_tokens < 1:
        raise InfLLMLiteError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if chunk_size is None:
        chunk_size = memory.chunk_size if memory is not None else DEFAULT_CHUNK_SIZE
    if chunk_size < 1:
        raise InfLLMLiteError(f"chunk_size must be at least 1, got {chunk_size}")
    check_sampling(temperature, top_p, top_k)
    if compile and attention != "full":
        raise InfLLMLiteError(
            f"compile=True applies to attention='full' only; {attention!r} is not compiled as a "
            "whole model (infllm compiles its own attention, see attention_kernel)")
    param = next(model.parameters())
    state = make_attention_state(attention, model.args, capacity=len(prompt_ids) + max_new_tokens,
                                 memory=memory, dtype=param.dtype, device=param.device,
                                 kernel=attention_kernel)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=param.device).manual_seed(seed)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=param.device)  # (1, P)
    return _prefill_and_decode(model, state, ids, max_new_tokens, stop_token_ids, chunk_size,
                               compile, progress, dict(temperature=temperature, top_p=top_p,
                                                       top_k=top_k, generator=generator),
                               stats if stats is not None else GenerationStats())


def continue_ids(model: Transformer, state, new_ids: Sequence[int], *, max_new_tokens: int,
                 sampling: dict, stop_token_ids: set[int] = frozenset(),
                 chunk_size: int = DEFAULT_CHUNK_SIZE,
                 progress: bool = False, stats: GenerationStats | None = None) -> Iterator[int]:
    """Like :func:`generate_ids`, but on a memory that has already read earlier tokens (a
    chat's): prefill ``new_ids`` after them, then decode. The state stays open and holds
    every token fed to it (``state.length``); the last token sampled is not fed (nor a stop
    token). ``sampling``: ``temperature``, ``top_p``, ``top_k``, ``generator``."""
    if not new_ids:
        raise InfLLMLiteError("nothing new to read")
    param = next(model.parameters())
    ids = torch.tensor([list(new_ids)], dtype=torch.long, device=param.device)  # (1, P)
    return _run(model, state, ids, max_new_tokens, stop_token_ids, chunk_size, False, progress,
                sampling, stats if stats is not None else GenerationStats())


def read_ids(model: Transformer, state, ids: Sequence[int], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
             progress: bool = False, desc: str = "reading") -> None:
    """Feed ``ids`` into the memory without generating (a document read before questions)."""
    param = next(model.parameters())
    x = torch.tensor([list(ids)], dtype=torch.long, device=param.device)  # (1, P)
    prefill(model, state, x, chunk_size=chunk_size, progress=progress, desc=desc, predict=False)


def prefill(model: Transformer, state, ids: torch.Tensor, *, chunk_size: int, progress: bool = False,
            desc: str = "prefill", predict: bool = True) -> torch.Tensor | None:
    """Feed ``ids`` (1, P) into ``state`` in model calls of ``chunk_size`` tokens, with a
    progress bar. With ``predict`` the last token goes alone (SPEC §8: with a memory, the
    query that predicts the first new token retrieves for itself instead of sharing one
    retrieval with a whole execution chunk) and its logits (1, 1, vocab) are returned."""
    body = ids[:, :-1] if predict else ids  # (1, P - 1) or (1, P)
    logits = None
    with torch.inference_mode(), tqdm(total=ids.shape[1], desc=desc, unit="tok",
                                      disable=not progress, leave=False) as bar:
        for start in range(0, body.shape[1], chunk_size):
            chunk = body[:, start:start + chunk_size]
            model(chunk, state, last_only=True)
            bar.update(chunk.shape[1])
        if predict:
            logits = model(ids[:, -1:], state)  # (1, 1, vocab)
            bar.update(1)
    return logits


def _prefill_and_decode(model, state, ids, max_new_tokens, stop_token_ids, chunk_size, compile,
                        progress, sampling, stats: GenerationStats) -> Iterator[int]:
    try:
        yield from _run(model, state, ids, max_new_tokens, stop_token_ids, chunk_size, compile,
                        progress, sampling, stats)
    finally:  # also when the caller stops early: the memory's counters, then its files
        stats.memory = state.stats()
        state.close()


def _run(model, state, ids, max_new_tokens, stop_token_ids, chunk_size, compile, progress, sampling,
         stats: GenerationStats) -> Iterator[int]:
    stats.prompt_tokens = ids.shape[1]
    t0 = device_clock(ids.device)
    with torch.inference_mode():
        logits = prefill(model, state, ids, chunk_size=chunk_size, progress=progress)  # (1, 1, vocab)
        stats.prefill_seconds = device_clock(ids.device) - t0
        stats.prefill_memory = state.stats()

        step = model.step
        if compile:
            state.static = True  # same shapes every step: one graph for the whole decode
            step = torch.compile(model.step, dynamic=False, fullgraph=True)
        for i in range(max_new_tokens):
            token = sample(logits[:, -1], **sampling)  # (1,)
            token_id = int(token)
            if token_id in stop_token_ids:
                return
            stats.new_tokens += 1
            yield token_id
            if i + 1 == max_new_tokens:
                return
            t1 = device_clock(ids.device)
            logits = step(token[:, None], state.positions(1), state)  # (1, 1, vocab)
            state.advance(1)
            stats.decode_seconds += device_clock(ids.device) - t1


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[dict] | Sequence[int], *,
             max_new_tokens: int = 256, attention: str = "full", temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: str | Sequence[str] | None = None, stream: bool = False,
             memory: MemoryConfig | None = None, chunk_size: int | None = None,
             compile: bool = False, progress: bool = False, attention_kernel: str = "auto",
             return_stats: bool = False, memory_budget: int | None = None,
             max_sequences: int | None = None, step_tokens: int | None = None):
    """Continue ``prompt``: a string, chat messages (rendered with the chat template) or
    token ids.

    Returns the generated text, or with ``stream=True`` an iterator of text pieces whose
    concatenation is that text. Stops at ``max_new_tokens``, at an end-of-sequence or
    end-of-turn token, or before the first of the ``stop`` strings. ``attention`` is
    ``full``, ``streaming`` or ``infllm``; ``memory`` (a ``MemoryConfig``) configures the
    last two; ``attention_kernel`` is as in :func:`generate_ids`. With ``return_stats=True``
    the result is a pair ``(text or iterator, GenerationStats)``; when streaming, the stats
    are complete once the iterator is exhausted.

    A **list of prompts** runs through one continuous-batching engine
    (:mod:`infllm_lite.engine`): the result is a list of texts in the prompts' order, or
    with ``stream=True`` an iterator of ``(index, piece)`` pairs (an empty piece ends each
    prompt's text); ``return_stats`` gives a
    :class:`~infllm_lite.batch_generate.BatchStats` (each sequence's stats and the
    engine's). Greedy or seeded, each text equals that prompt's own ``generate``. It also
    takes ``memory_budget`` (bytes of attention memory admitted at once),
    ``max_sequences`` and ``step_tokens`` (see :class:`~infllm_lite.engine.Engine`).
    """
    if is_prompt_list(prompt):
        if compile:
            raise InfLLMLiteError("compile=True applies to a single prompt")
        return generate_batch(model, tokenizer, prompt, max_new_tokens=max_new_tokens, attention=attention,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                              stop=[stop] if isinstance(stop, str) else list(stop or []), stream=stream,
                              memory=memory, chunk_size=chunk_size, progress=progress,
                              attention_kernel=attention_kernel, return_stats=return_stats,
                              memory_budget=memory_budget, max_sequences=max_sequences,
                              step_tokens=step_tokens)
    batch_only = [name for name, value in (("memory_budget", memory_budget), ("max_sequences", max_sequences),
                                           ("step_tokens", step_tokens)) if value is not None]
    if batch_only:
        raise InfLLMLiteError(f"{', '.join(batch_only)} apply to a list of prompts only")
    prompt_ids = encode_prompt(tokenizer, prompt)
    stats = GenerationStats()
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    stop_ids = stop_token_ids(model, tokenizer)
    token_ids = generate_ids(model, prompt_ids, max_new_tokens=max_new_tokens, attention=attention,
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             stop_token_ids=stop_ids, memory=memory, chunk_size=chunk_size,
                             compile=compile, progress=progress, attention_kernel=attention_kernel,
                             stats=stats)
    pieces = stream_text(tokenizer, token_ids, stops)
    result = pieces if stream else "".join(pieces)
    return (result, stats) if return_stats else result
