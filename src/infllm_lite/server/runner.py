"""The engine thread: one thread steps the :class:`~infllm_lite.engine.Engine` while it has
work and sleeps when it has none; request handlers (on the event loop) submit and cancel,
and get each step's events on an ``asyncio.Queue`` of their own.

A submission's queue receives ``(tag, event)`` for every token, then ``(tag, event, seq)``
when the sequence ends (``seq`` popped from the engine: its tokens, stats and kept
memory). ``on_finish(seq)`` runs in this thread at the end whether anyone still listens
or not (a conversation records its turn even when the client is gone).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..engine import Engine, Request
from ..errors import describe
from .schemas import APIError

log = logging.getLogger("infllm_lite.server")


@dataclass
class Listener:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tag: object
    on_finish: Callable | None


def end_every_sequence(engine: Engine, why: str) -> list:
    """After a failed step (its engine's state is not to be trusted): cancel every sequence
    and return the next step's events, which run no model: the ends the failed step made
    and the cancellations, each cancelled sequence told ``why`` (its ``error``)."""
    engine.close()
    events = engine.step()
    for event in events:
        seq = engine.sequences.get(event.seq_id)
        if event.finish_reason == "cancelled" and seq is not None and seq.error is None:
            seq.error = f"{why}; the request was cancelled"
    return events


class EngineRunner:
    def __init__(self, engine: Engine, *, max_queue: int, metrics=None):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self._listeners: dict[int, Listener] = {}
        self._lock = threading.Lock()  # submissions against the dispatch of a step's events
        self._wake = threading.Event()
        self._stopping = False  # no more submissions
        self._thread_stop = False  # the thread ends
        self._thread = threading.Thread(target=self._loop, name="infllm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, requests: list[Request], queue: asyncio.Queue, *, tags: list | None = None,
               on_finish: Callable | None = None, turn=None) -> list[int]:
        """Queue ``requests`` together (all or none): 429 when the waiting queue is full,
        400 for a request the engine refuses (bad input, larger than the whole budget).
        ``turn``: the conversation turn they continue (what a tensor-parallel server's other
        ranks need to continue the same conversation: :mod:`infllm_lite.parallel.serve`)."""
        loop = asyncio.get_running_loop()
        tags = tags if tags is not None else list(range(len(requests)))
        with self._lock:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            waiting = len(self.engine.waiting)
            if waiting + len(requests) > self.max_queue:
                raise APIError(429, f"the queue is full ({waiting} sequences wait for memory, at most "
                                    f"{self.max_queue}); retry later", type="rate_limit_error",
                               code="queue_full")
            ids = []
            try:
                for request, tag in zip(requests, tags):
                    ids.append(self.engine.submit(request))
                    self._listeners[ids[-1]] = Listener(loop, queue, tag, on_finish)
            except Exception:
                for seq_id in ids:  # all or none
                    self.engine.cancel(seq_id)
                raise
        self._wake.set()
        return ids

    def cancel(self, seq_ids) -> None:
        for seq_id in seq_ids:
            if self.engine.cancel(seq_id) and self.metrics is not None:
                self.metrics.cancelled.inc()
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every sequence, let the thread report their ends, then stop it."""
        with self._lock:
            self._stopping = True
            ids = list(self._listeners)
        self.engine.close()
        self.cancel(ids)
        deadline = time.monotonic() + timeout
        while self.engine.has_work and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._thread_stop = True
        self._wake.set()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while not self._thread_stop:
            if not self.engine.has_work:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a bug, not bad input: end every sequence, keep serving
                log.exception("engine step failed; cancelling the running sequences")
                try:
                    events = end_every_sequence(self.engine, f"an engine step failed ({describe(e)})")
                except Exception:
                    log.exception("the engine cannot step; stopping")
                    return
            self._dispatch(events)

    def _dispatch(self, events) -> None:
        for event in events:
            with self._lock:
                listener = self._listeners.get(event.seq_id) if event.finish_reason is None \
                    else self._listeners.pop(event.seq_id, None)
            if listener is None:
                continue
            if event.finish_reason is None:
                listener.loop.call_soon_threadsafe(listener.queue.put_nowait, (listener.tag, event))
                continue
            seq = self.engine.pop(event.seq_id)
            if self.metrics is not None:
                self._count(seq)
            if listener.on_finish is not None:
                try:
                    listener.on_finish(seq)
                except Exception:
                    log.exception("recording the end of sequence %s failed", seq.id)
            try:
                listener.loop.call_soon_threadsafe(listener.queue.put_nowait, (listener.tag, event, seq))
            except RuntimeError:  # the event loop is closed (shutdown)
                pass

    def _count(self, seq) -> None:
        read = seq.fed + 1 if seq.token_ids or seq.finish_reason == "stop" else seq.fed  # the last goes alone
        self.metrics.prompt_tokens.inc(min(read, len(seq.prompt)))
        self.metrics.completion_tokens.inc(len(seq.token_ids))
        if seq.token_ids:
            self.metrics.ttft.observe(seq.stats.first_token_seconds)
