"""One request's life inside the engine: waiting, prefilling, decoding, finished; its own
attention memory, random generator, text and counters."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..memory_config import MemoryConfig
from ..stats import GenerationStats
from ..text_stream import TextStream
from .request import Request

WAITING, PREFILL, DECODE, FINISHED = "waiting", "prefill", "decode", "finished"


@dataclass
class SequenceStats(GenerationStats):
    """A :class:`~infllm_lite.GenerationStats` with the waits of a shared engine: seconds
    from submission to admission, to the first new token, to the end."""

    queued_seconds: float = 0.0
    first_token_seconds: float = 0.0
    total_seconds: float = 0.0
    finish_reason: str | None = None


@dataclass(frozen=True)
class Event:
    """What a step did for one sequence: a new token (``token_id``, and ``text``, the text
    it made final), and/or its end (``finish_reason``: ``stop``, ``length``, ``cancelled``,
    or ``refused``: it could never be admitted; ``Sequence.error`` says why it was refused, or
    cancelled by a failed step)."""

    seq_id: int
    token_id: int | None = None
    text: str = ""
    finish_reason: str | None = None


class Sequence:
    """A request being served; ``state`` is its attention memory while it runs (and after,
    with ``Request.keep_state``)."""

    def __init__(self, seq_id: int, request: Request, memory: MemoryConfig | None, reserved: int,
                 stop_ids: frozenset[int], text: TextStream | None, device: torch.device):
        self.id, self.request, self.memory, self.reserved = seq_id, request, memory, reserved
        self.stop_ids = stop_ids
        self.prompt = list(request.prompt_ids)
        self.text = text
        self.status = WAITING
        self.state = None
        self.fed = 0  # prompt tokens read into the memory
        self.next_input: int | None = None  # the token the next decode step feeds
        self.token_ids: list[int] = []
        self.pieces: list[str] = []
        self.logits: list[torch.Tensor] = []  # (vocab,) per sampled token, with request.keep_logits
        self.finish_reason: str | None = None
        self.error: str | None = None  # why it was refused, or cancelled by a failed step (not by a client)
        seed = request.sampling.seed
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        self.stats = SequenceStats(prompt_tokens=len(self.prompt))
        self.submitted = time.perf_counter()
        self.admitted = 0.0
        self.first_token = 0.0

    @property
    def body(self) -> int:
        """Prompt tokens read in prefill calls; the last goes alone (SPEC §8) in a decode step."""
        return len(self.prompt) - 1

    @property
    def output(self) -> str:
        return "".join(self.pieces)

    def sampling(self) -> dict:
        s = self.request.sampling
        return dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, generator=self.generator)
