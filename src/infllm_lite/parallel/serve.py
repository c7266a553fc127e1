"""``infllm-lite serve --tensor-parallel`` under ``torchrun``: rank 0 runs the HTTP server
(uvicorn, :mod:`infllm_lite.server`) and its engine thread; the other ranks run no server,
only the same :class:`~infllm_lite.engine.Engine` and conversation store on their shard,
stepping in lockstep so that every collective inside the model matches.

Rank 0 applies what the handlers ask for (submissions, cancellations, conversations
created and deleted, the shutdown) only between engine steps, in arrival order, and
broadcasts that log before each step (:class:`LeaderRunner`); each follower applies the
same log to its engine and store, then steps (:class:`Follower`). The engine schedules by
no clock, so the same log gives the same admissions, prefill chunks and decode batches on
every rank: a request's sequence id, tokens and sampling (rank 0 draws a seed for a
request without one) are the same everywhere. Inside a step, the conversations to evict
are rank 0's choice, broadcast; each rank saves its own snapshot (``ID.rankR-of-N.snap``)
and the ranks agree that every save, and every load at admission, succeeded
(:class:`LockstepStore`): a load failed on one rank refuses the request on all.

After each step the ranks compare its outcome: a step failed on every rank cancels the
running sequences on every rank (as one process does; their clients get 503 naming the
failed step); failed on some only, it stops the server on every rank with a message. A
dead rank breaks the next collective (rank 0 broadcasts at least every ``HEARTBEAT_S``
seconds, idle or not; a hung one times out after ``INFLLM_LITE_DIST_TIMEOUT``): rank 0 then
fails its open requests (503 with that message), stops uvicorn and exits with
``error: ...`` (ignoring the SIGTERM torchrun sends once a rank has failed), a follower
exits with its error. Followers ignore SIGINT and SIGTERM (torchrun passes them to every
rank): they end when rank 0's shutdown reaches them, after saving their conversations'
snapshots, or when rank 0 is gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import signal
import time
from functools import partial
from types import SimpleNamespace

import torch.distributed as dist

from ..engine import Event
from ..errors import InfLLMLiteError, describe
from ..memory_config import MemoryConfig
from ..server.conversations import Conversation, ConversationStore, Turn
from ..server.runner import EngineRunner, Listener, end_every_sequence
from ..server.schemas import APIError
from .group import all_gather_object, broadcast_object, timeout_seconds

log = logging.getLogger("infllm_lite.server")
HEARTBEAT_S = 5.0  # rank 0 broadcasts at least this often (at most a quarter of the collective timeout)


class Lockstep:
    """The gloo groups of a tensor-parallel server (every rank creates them, in order)."""

    def __init__(self, group):
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        ranks = dist.get_process_group_ranks(group)
        self.leader = ranks[0]  # global rank
        self.log = dist.new_group(ranks, backend="gloo")  # rank 0's log, before each step
        self.outcomes = dist.new_group(ranks, backend="gloo")  # each step's outcome
        self.store = dist.new_group(ranks, backend="gloo")  # evictions and loads, inside a step
        self.heartbeat_s = min(HEARTBEAT_S, timeout_seconds() / 4)

    def share(self, message=None):
        """Rank 0's ``message`` on every rank."""
        return broadcast_object(message, self.log, self.leader)

    def failures(self, error: BaseException | None, group) -> list[tuple[int, str]]:
        """``(rank, message)`` of every rank whose ``error`` was not None (one all_gather)."""
        seen = all_gather_object(None if error is None else describe(error), group)
        return [(r, m) for r, m in enumerate(seen) if m is not None]

    def settle(self, error: BaseException | None, what: str) -> str | None:
        """Every rank's outcome of ``what``: None when it succeeded everywhere, the first
        message when it failed everywhere; raises when it failed on some ranks only."""
        failed = self.failures(error, self.outcomes)
        if not failed:
            return None
        r, message = failed[0]
        if len(failed) == self.world_size:
            return message
        raise InfLLMLiteError(f"rank {r}: {what} failed ({message}) on some ranks only: their engines "
                              "now differ, so the server stops")


class LockstepStore(ConversationStore):
    """The conversation store of every rank: evictions chosen by rank 0, saved by each rank
    to its own file, and loads, agreed on by all. On rank 0 (``runner`` set), creations and
    deletions also go into the log, the deletions applied between steps."""

    def __init__(self, *args, lockstep: Lockstep, **kwargs):
        self.lockstep, self.runner = lockstep, None
        error = None
        try:
            super().__init__(*args, **kwargs)
        except InfLLMLiteError as e:  # e.g. a folder of another world size: every rank stops alike
            error = e
        found = None if error is not None else sorted((c.id, c.length) for c in self._convs.values())
        seen = all_gather_object((None if error is None else str(error), found), lockstep.store)
        for r, (message, _) in enumerate(seen):
            if message is not None:
                raise InfLLMLiteError(message if r == lockstep.rank else f"rank {r}: {message}")
        if any(convs != seen[0][1] for _, convs in seen):
            raise InfLLMLiteError(f"--snapshot-dir {self.snapshot_dir}: the ranks find different conversations "
                                  "in it (a rank's snapshot missing?)")

    # ------------------------------------------------------------------ every rank, inside a step
    def make_room(self, needed: int) -> None:
        if self.snapshot_dir is None:
            return
        with self._lock:
            chosen = [c.id for c in self.choose_evictions(needed)] if self.lockstep.rank == 0 else None
            chosen = broadcast_object(chosen, self.lockstep.store, self.lockstep.leader)
            convs = [self._convs[i] for i in chosen]
            error = None
            try:
                for conv in convs:
                    self._save(conv)
            except Exception as e:  # noqa: BLE001 (a full disk: agreed on below)
                error = e
            failed = self.lockstep.failures(error, self.lockstep.store)
            if failed:
                log.error("saving a snapshot failed on rank %d (%s); no conversation evicted", *failed[0])
                return
            for conv in convs:
                self._evict(conv)  # saved already: released and closed

    def _load(self, conv: Conversation):
        state, error = None, None
        try:
            state = super()._load(conv)
        except Exception as e:  # noqa: BLE001 (agreed on below: refused on every rank)
            error = e
        failed = self.lockstep.failures(error, self.lockstep.store)
        if not failed:
            return state
        if state is not None:
            state.close()
        r, message = failed[0]
        raise InfLLMLiteError(message if r == self.lockstep.rank else f"rank {r}: {message}")

    # ------------------------------------------------------------------ rank 0: into the log
    def create(self, owner, attention, memory, system) -> Conversation:
        with self._lock:
            conv = super().create(owner, attention, memory, system)
            self.runner.defer(lambda: ("create", conv.meta()))
            return conv

    def drop(self, conv: Conversation) -> None:
        if self.runner is None:  # a follower (its deletions come from the log)
            return ConversationStore.drop(self, conv)

        def apply():
            try:
                ConversationStore.drop(self, conv)
            except Exception:  # noqa: BLE001
                log.exception("freeing conversation %s failed", conv.id)
            return ("delete", conv.id)
        self.runner.defer(apply)

    def close(self, save: bool = True) -> None:
        # after a failed rank the memories may differ from the peers': nothing saved
        super().close(save=save and (self.runner is None or self.runner.fatal is None))

    # ------------------------------------------------------------------ followers: from the log
    def mirror_create(self, meta: dict) -> None:
        memory = None if meta["memory"] is None else MemoryConfig(**meta["memory"])
        conv = Conversation(id=meta["id"], owner=meta["owner"], attention=meta["attention"], memory=memory,
                            system=meta["system"], created=meta["created"])
        if conv.system:
            conv.messages.append({"role": "system", "content": conv.system})
        with self._lock:
            self._convs[conv.id] = conv

    def mirror_delete(self, conv_id: str) -> None:
        with self._lock:
            conv = self._convs.pop(conv_id)
            ConversationStore.drop(self, conv)

    def mirror_turn(self, turn: dict) -> Turn:
        """Rank 0's turn (its ``describe_turn``) on this rank's conversation."""
        with self._lock:
            conv = self._convs.get(turn["id"])
            if conv is None or conv.length != turn["position"] or (conv.state is not None) != turn["in_memory"]:
                raise InfLLMLiteError(f"conversation {turn['id']} differs from rank 0's")
            state = conv.state if conv.state is not None else (partial(self._load, conv) if conv.length else None)
            conv.busy = True
            return Turn(conv, turn["messages"], turn["rendered"], turn["common"], turn["new_ids"], conv.length, state)


def describe_turn(turn: Turn) -> dict:
    return dict(id=turn.conversation.id, messages=turn.messages, rendered=turn.rendered, common=turn.common,
                new_ids=turn.new_ids, position=turn.position, in_memory=hasattr(turn.state, "layers"))


def agreed_step(engine, lockstep: Lockstep) -> list:
    """One engine step on this rank, its outcome agreed with every rank: the step's events;
    where it failed on some rank, every rank cancels its running sequences instead (and
    returns those cancellations), so the ranks' engines stay in lockstep."""
    try:
        events, error = engine.step(), None
    except Exception as e:  # noqa: BLE001 (agreed on below)
        events, error = [], e
    try:
        message = lockstep.settle(error, "an engine step")
    except InfLLMLiteError:
        if isinstance(error, InfLLMLiteError):  # e.g. the step's own all_reduce found a dead rank
            raise error from None
        raise
    if message is None:
        return events
    log.error("engine step failed on every rank (%s); cancelling the running sequences", message)
    return end_every_sequence(engine, f"an engine step failed on every rank ({message})")  # in step on every rank


def _seeded(request):
    """Every rank must draw the same tokens: a sampled request without a seed gets one."""
    s = request.sampling
    if s.temperature > 0 and s.seed is None:
        return dataclasses.replace(request, sampling=dataclasses.replace(s, seed=random.getrandbits(63)))
    return request


class LeaderRunner(EngineRunner):
    """Rank 0's engine thread: the handlers' submissions and cancellations (and the
    store's changes) queued, applied between steps and broadcast to the followers; each
    step's outcome agreed on. The sequence ids it returns are tickets, mapped to the
    engine's ids when applied."""

    def __init__(self, engine, *, lockstep: Lockstep, max_queue: int, metrics=None):
        super().__init__(engine, max_queue=max_queue, metrics=metrics)
        self.lockstep = lockstep
        self._ops: list = []  # callables run between steps; each returns its log entry (or None)
        self._tickets: dict[int, int] = {}  # ticket -> engine sequence id
        self._ticket_of: dict[int, int] = {}
        self._next_ticket = 0
        self._pending = 0  # submissions not yet applied
        self.fatal: str | None = None  # why the ranks could not go on
        self.on_fatal = None  # called once with it (stops uvicorn)

    def defer(self, apply) -> None:
        with self._lock:
            self._ops.append(apply)
        self._wake.set()

    def submit(self, requests, queue, *, tags=None, on_finish=None, turn=None):
        loop = asyncio.get_running_loop()
        tags = tags if tags is not None else list(range(len(requests)))
        for request in requests:
            self.engine.check(request)
        requests = [_seeded(r) for r in requests]
        shared = None if turn is None else describe_turn(turn)
        with self._lock:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            waiting = len(self.engine.waiting) + self._pending
            if waiting + len(requests) > self.max_queue:
                raise APIError(429, f"the queue is full ({waiting} sequences wait for memory, at most "
                                    f"{self.max_queue}); retry later", type="rate_limit_error", code="queue_full")
            tickets = []
            for request, tag in zip(requests, tags):
                tickets.append(self._next_ticket)
                listener = Listener(loop, queue, tag, on_finish)
                self._ops.append(partial(self._apply_submit, self._next_ticket, request, listener, shared))
                self._next_ticket += 1
                self._pending += 1
        self._wake.set()
        return tickets

    def cancel(self, seq_ids) -> None:
        self.defer(partial(self._apply_cancel, list(seq_ids)))

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every sequence on every rank, let the thread report their ends, then tell
        the followers to stop and end the thread."""
        with self._lock:
            self._stopping = True
        self.defer(self._apply_close)
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and (self._ops or self.engine.has_work) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._thread_stop = True
        self._wake.set()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ applied between steps
    def _apply_submit(self, ticket, request, listener, turn):
        with self._lock:
            self._pending -= 1
        try:
            seq_id = self.engine.submit(request)
        except Exception as e:  # noqa: BLE001 (checked at submission: not expected)
            self._end(listener, "refused", str(e))
            return None
        with self._lock:
            self._tickets[ticket], self._ticket_of[seq_id] = seq_id, ticket
            self._listeners[seq_id] = listener
        return ("submit", seq_id, dataclasses.replace(request, state=None), turn)

    def _apply_cancel(self, tickets):
        ids = [self._tickets[t] for t in tickets if t in self._tickets]
        ids = [i for i in ids if self.engine.cancel(i)]
        if self.metrics is not None:
            self.metrics.cancelled.inc(len(ids))
        return ("cancel", ids) if ids else None

    def _apply_close(self):
        self.engine.close()
        return ("close",)

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 (a dead rank, ranks that differ, a bug)
            if not isinstance(e, InfLLMLiteError):
                log.exception("the engine thread failed")
            self._die(describe(e))

    def _run(self) -> None:
        sent = time.monotonic()
        while True:
            with self._lock:
                ops, self._ops = self._ops, []
            entries = [entry for entry in (op() for op in ops) if entry is not None]
            step = self.engine.has_work
            stop = self._thread_stop and not step and not ops
            if entries or step or stop or time.monotonic() - sent >= self.lockstep.heartbeat_s:
                self.lockstep.share({"ops": entries, "step": step, "stop": stop})
                sent = time.monotonic()
            if stop:
                return
            if step:
                self._dispatch(self._step())
            elif not entries:
                self._wake.wait(timeout=min(1.0, self.lockstep.heartbeat_s))
                self._wake.clear()

    def _step(self):
        return agreed_step(self.engine, self.lockstep)

    def _dispatch(self, events) -> None:
        super()._dispatch(events)
        with self._lock:
            for event in events:
                if event.finish_reason is not None and (t := self._ticket_of.pop(event.seq_id, None)) is not None:
                    self._tickets.pop(t, None)

    def _die(self, message: str) -> None:
        """The ranks cannot go on: every open request ends (503), uvicorn stops."""
        log.error("stopping the server: %s", message)
        self.fatal = message
        with self._lock:
            self._stopping = True
            listeners, self._listeners = list(self._listeners.values()), {}
        for listener in listeners:
            self._end(listener, "cancelled", message)
        if self.on_fatal is not None:
            self.on_fatal(message)

    @staticmethod
    def _end(listener: Listener, reason: str, error: str) -> None:
        """End a listener's sequence that the engine never ran (or can no longer run)."""
        seq = SimpleNamespace(id=None, finish_reason=reason, error=error, state=None, token_ids=[], output="")
        if listener.on_finish is not None:
            try:
                listener.on_finish(seq)
            except Exception:  # noqa: BLE001
                log.exception("recording the end of a sequence failed")
        try:
            listener.loop.call_soon_threadsafe(listener.queue.put_nowait,
                                               (listener.tag, Event(-1, None, "", reason), seq))
        except RuntimeError:  # the event loop is closed
            pass


class Follower:
    """A rank other than 0: the same engine and store, driven by rank 0's log."""

    def __init__(self, model, tokenizer, settings, lockstep: Lockstep):
        from ..server.app import build_engine
        self.lockstep = lockstep
        self.engine, self.store = build_engine(model, tokenizer, settings,
                                               store_class=partial(LockstepStore, lockstep=lockstep))
        self.turns: dict[int, Turn] = {}  # sequence id -> the conversation turn it is

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):  # torchrun's; rank 0 decides when to stop
            signal.signal(sig, signal.SIG_IGN)
        while True:
            message = self.lockstep.share()
            for entry in message["ops"]:
                self._apply(entry)
            if message["step"]:
                self._step()
            if message["stop"]:
                break
        self.store.close()

    def _apply(self, entry) -> None:
        kind = entry[0]
        if kind == "submit":
            _, seq_id, request, turn = entry
            if turn is not None:
                turn = self.store.mirror_turn(turn)
                request = dataclasses.replace(request, state=turn.state)
            mine = self.engine.submit(request)
            if mine != seq_id:
                raise InfLLMLiteError(f"rank {self.lockstep.rank}: the engine gave sequence {mine} where rank 0's "
                                      f"gave {seq_id}: the ranks' engines differ, so the server stops")
            if turn is not None:
                self.turns[seq_id] = turn
        elif kind == "cancel":
            for seq_id in entry[1]:
                self.engine.cancel(seq_id)
        elif kind == "close":
            self.engine.close()
        elif kind == "create":
            self.store.mirror_create(entry[1])
        elif kind == "delete":
            try:
                self.store.mirror_delete(entry[1])
            except Exception:  # noqa: BLE001 (as on rank 0: logged, the server goes on)
                log.exception("freeing conversation %s failed", entry[1])

    def _step(self) -> None:
        for event in agreed_step(self.engine, self.lockstep):
            if event.finish_reason is None:
                continue
            seq = self.engine.pop(event.seq_id)
            turn = self.turns.pop(seq.id, None)
            if turn is not None:
                try:
                    self.store.end_turn(turn, seq)
                except Exception:  # noqa: BLE001
                    log.exception("recording the end of sequence %s failed", seq.id)


def serve_tensor_parallel(model, tokenizer, settings, config: dict, *, announce=None) -> None:
    """This rank's part of the server: rank 0 serves HTTP (uvicorn ``config``), the
    others follow. Raises :class:`InfLLMLiteError` when the ranks could not go on."""
    lockstep = Lockstep(model.tp.group)
    if lockstep.rank != 0:
        Follower(model, tokenizer, settings, lockstep).run()
        return
    import uvicorn

    from ..server.app import create_app
    app = create_app(model, tokenizer, settings, store_class=partial(LockstepStore, lockstep=lockstep),
                     runner_class=partial(LeaderRunner, lockstep=lockstep))
    runner = app.state.runner
    app.state.store.runner = runner
    server = uvicorn.Server(uvicorn.Config(app, **config))
    runner.on_fatal = lambda _: setattr(server, "should_exit", True)
    _ignore_signals_once_fatal(runner)
    if announce is not None:
        announce()
    server.run()
    if runner.fatal is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):  # also while the interpreter ends (a handler would be reset)
            signal.signal(sig, signal.SIG_IGN)
        raise InfLLMLiteError(runner.fatal)


def _ignore_signals_once_fatal(runner: LeaderRunner) -> None:
    """SIGINT and SIGTERM as before, unless the ranks could not go on: torchrun sends
    SIGTERM to the other ranks as soon as one has failed, and uvicorn re-raises the
    signals it caught once it has stopped, which would kill rank 0 before it exits with
    its error (then ignored, as the followers do)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        def handler(signum, frame, previous=signal.getsignal(sig)):
            if runner.fatal is not None:
                return
            if callable(previous):
                return previous(signum, frame)
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
            signal.raise_signal(signum)
        signal.signal(sig, handler)
