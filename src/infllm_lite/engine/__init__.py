"""Many sequences at once: the continuous-batching engine (``Engine``), its ``Request``
and ``SamplingOptions``, and what it reports (``Event``, ``SequenceStats``, ``EngineStats``)."""

from .engine import DEFAULT_STEP_TOKENS, Engine, EngineStats
from .request import Request, SamplingOptions
from .sequence import Event, Sequence, SequenceStats

__all__ = ["DEFAULT_STEP_TOKENS", "Engine", "EngineStats", "Event", "Request", "SamplingOptions",
           "Sequence", "SequenceStats"]
