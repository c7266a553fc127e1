"""Persistent conversations: each keeps its attention memory on the server between
requests, so a turn reads only its new messages (the chat template's text after what the
memory has read, as :class:`~infllm_lite.ChatSession` does).

Between turns the memory is *held*: the engine still counts it against the budget. With a
snapshot folder, an idle conversation is saved to ``ID.snap`` and evicted when the engine
needs its room (least recently used first), and loaded back at its next turn's
admission; ``ID.json`` records who owns it and how it attends, so a restarted server with
the same folder has every conversation (the memories in memory are saved at shutdown).
A snapshot is a chat snapshot (``infllm-lite chat --load ID.snap`` continues it).

One turn at a time per conversation (another gets 409 while one runs). A turn whose
client went away keeps what the memory read (the partial answer, as ``ChatSession.stop``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InfLLMLiteError
from ..memory_config import MemoryConfig
from ..parallel.model import rank_path
from ..snapshot import load_snapshot, read_header, save_snapshot
from .schemas import APIError

log = logging.getLogger("infllm_lite.server")
ID_PATTERN = re.compile(r"conv_[0-9a-f]{32}")


class WorldSizeError(InfLLMLiteError):
    """The snapshot folder was written by a server of another world size."""


@dataclass
class Conversation:
    id: str
    owner: str
    attention: str
    memory: MemoryConfig | None
    system: str | None
    created: int
    messages: list[dict] = field(default_factory=list)
    text: str = ""  # what the memory has read, as the chat template rendered it
    tokens: list[int] | None = field(default_factory=list)  # the ids it has read (None: in the snapshot)
    length: int = 0  # how many
    state: object = None  # the memory while it is in memory (held by the engine between turns)
    saved: bool = True  # the snapshot (or nothing, when empty) holds the latest memory
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)

    def info(self) -> dict:
        return {"id": self.id, "object": "conversation", "created": self.created, "attention": self.attention,
                "memory": None if self.memory is None else self.memory.to_dict(), "tokens": self.length,
                "messages": len(self.messages), "in_memory": self.state is not None}

    def meta(self) -> dict:
        return {"id": self.id, "owner": self.owner, "attention": self.attention, "system": self.system,
                "memory": None if self.memory is None else self.memory.to_dict(), "created": self.created}


@dataclass
class Turn:
    """A request's part of a conversation: the history with its new messages, what the
    memory reads for them, and the memory (or its snapshot's loader) to continue."""

    conversation: Conversation
    messages: list[dict]
    rendered: str
    common: int  # characters of ``rendered`` the memory has already read
    new_ids: list[int]
    position: int
    state: object  # the memory, a loader, or None (a fresh one)


class ConversationStore:
    def __init__(self, model, tokenizer, engine, *, snapshot_dir: Path | None, capacity: int,
                 kernel="auto", max_conversations: int = 1000, metrics=None):
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        self.capacity, self.kernel, self.max_conversations, self.metrics = capacity, kernel, max_conversations, metrics
        self._convs: dict[str, Conversation] = {}
        self._lock = threading.RLock()
        if self.snapshot_dir is not None:
            self._load_folder()

    # ------------------------------------------------------------------ lifecycle
    def create(self, owner: str, attention: str, memory: MemoryConfig | None, system: str | None) -> Conversation:
        with self._lock:
            if len(self._convs) >= self.max_conversations:
                raise APIError(429, f"this server holds {len(self._convs)} conversations, its limit; delete some",
                               type="rate_limit_error", code="too_many_conversations")
            conv = Conversation(id=f"conv_{uuid.uuid4().hex}", owner=owner, attention=attention,
                                memory=memory, system=system,
                                created=int(time.time()))
            if system:
                conv.messages.append({"role": "system", "content": system})
            if self.snapshot_dir is not None:
                _write_json(self._path(conv, ".json"), conv.meta())
            self._convs[conv.id] = conv
            self._count()
            return conv

    def get(self, conv_id: str, owner: str) -> Conversation:
        """The conversation, or 404 (also for another key's: its existence is not revealed)."""
        conv = self._convs.get(conv_id) if isinstance(conv_id, str) else None
        if conv is None or conv.owner != owner:
            raise APIError(404, f"no conversation {conv_id!r}", param="conversation_id", code="conversation_not_found")
        return conv

    def list(self, owner: str) -> list[Conversation]:
        with self._lock:
            return sorted((c for c in self._convs.values() if c.owner == owner), key=lambda c: c.created)

    def delete(self, conv_id: str, owner: str) -> None:
        with self._lock:
            conv = self.get(conv_id, owner)
            if conv.busy:
                raise APIError(409, "the conversation is answering a request; delete it when that ends",
                               code="conversation_busy")
            del self._convs[conv.id]
            self.drop(conv)

    def drop(self, conv: Conversation) -> None:
        """Free a deleted conversation's memory and remove its files (a tensor-parallel
        server does this between engine steps, on every rank: :mod:`infllm_lite.parallel.serve`)."""
        with self._lock:
            if conv.state is not None:
                self.engine.release(conv.state)
                conv.state.close()
                conv.state = None
            if self.snapshot_dir is not None:
                for suffix in (".snap", ".json"):
                    self._path(conv, suffix).unlink(missing_ok=True)
            self._count()

    # ------------------------------------------------------------------ turns
    def begin_turn(self, conv_id: str, owner: str, new_messages: list[dict]) -> Turn:
        """Reserve the conversation for one request and work out what its memory reads."""
        with self._lock:
            conv = self.get(conv_id, owner)
            if conv.busy:
                raise APIError(409, "the conversation is answering another request; one at a time",
                               code="conversation_busy")
            messages = conv.messages + new_messages
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            common = len(os.path.commonprefix([conv.text, rendered]))
            new_ids = self.tokenizer.encode(rendered[common:], add_special_tokens=False)
            if not new_ids:
                raise APIError(400, "the new messages add nothing for the model to read", param="messages")
            state = conv.state
            if state is None and conv.length:
                state = lambda: self._load(conv)  # noqa: E731 (the engine calls it at admission)
            conv.busy = True
            return Turn(conv, messages, rendered, common, new_ids, conv.length, state)

    def abort_turn(self, turn: Turn) -> None:
        """The turn's request was refused before the engine had it: nothing changed."""
        with self._lock:
            turn.conversation.busy = False

    def end_turn(self, turn: Turn, seq) -> None:
        """Record what the memory read in ``seq`` (the engine thread calls this at its end)."""
        conv, dec = turn.conversation, self.tokenizer.decode
        with self._lock:
            conv.busy, conv.last_used = False, time.monotonic()
            if seq.state is None:  # never admitted, nothing loaded: the conversation is as it was
                return
            conv.state = seq.state
            self._count()
            read = seq.state.length - turn.position
            if read <= 0:
                return
            conv.saved = False
            new = turn.new_ids
            if read < len(new):  # the client left while its messages were being read
                conv.messages, conv.tokens = turn.messages, conv.tokens + new[:read]
                conv.text = turn.rendered[:turn.common] + dec(new[:read])
            else:
                fed = seq.token_ids[:read - len(new)]  # the answer's tokens the memory read
                reply = dec(seq.token_ids, skip_special_tokens=True)
                conv.messages = turn.messages + [{"role": "assistant", "content": reply}]
                conv.tokens = conv.tokens + new + fed
                conv.text = turn.rendered + dec(fed)
            conv.length = seq.state.length

    def _load(self, conv: Conversation):
        """The conversation's memory from its snapshot (in the engine thread, at admission)."""
        snap = load_snapshot(self._path(conv, ".snap"), self.model, memory=conv.memory, kernel=self.kernel,
                             capacity=self.capacity if conv.attention == "full" else None)
        if len(snap.tokens) != conv.length:
            snap.state.close()
            raise InfLLMLiteError(f"the snapshot of {conv.id} holds {len(snap.tokens)} tokens, "
                                  f"the conversation {conv.length}")
        conv.tokens = snap.tokens
        if self.metrics is not None:
            self.metrics.loads.inc()
        return snap.state

    # ------------------------------------------------------------------ memory
    def make_room(self, needed: int) -> None:
        """Evict idle conversations to their snapshots, least recently used first, until
        ``needed`` bytes are free (the engine calls this; nothing without a snapshot folder)."""
        if self.snapshot_dir is None:
            return
        with self._lock:
            for conv in self.choose_evictions(needed):
                self._evict(conv)

    def choose_evictions(self, needed: int) -> list[Conversation]:
        """The idle conversations in memory to evict for ``needed`` bytes, least recently
        used first."""
        with self._lock:
            idle = sorted((c for c in self._convs.values() if c.state is not None and not c.busy),
                          key=lambda c: c.last_used)
            chosen, freed = [], 0
            for conv in idle:
                if freed >= needed:
                    break
                freed += self.engine.held_size(conv.state, conv.attention, conv.memory)
                chosen.append(conv)
            return chosen

    def _evict(self, conv: Conversation) -> None:
        self._save(conv)
        self.engine.release(conv.state)
        conv.state.close()
        conv.state = None
        if self.metrics is not None:
            self.metrics.evictions.inc()
        self._count()

    def _save(self, conv: Conversation) -> None:
        if conv.saved:
            return
        extra = {"messages": conv.messages, "system": conv.system, "text": conv.text,
                 "capacity": self.capacity if conv.attention == "full" else None, "conversation": conv.meta()}
        save_snapshot(self._path(conv, ".snap"), conv.state, model=self.model, mode=conv.attention,
                      memory=conv.memory, tokens=conv.tokens, extra=extra)
        conv.saved = True

    def close(self, save: bool = True) -> None:
        """At shutdown: save what is only in memory (with a snapshot folder, unless not
        ``save``), free every memory."""
        with self._lock:
            for conv in self._convs.values():
                if conv.state is None:
                    continue
                if save and self.snapshot_dir is not None and not conv.busy:
                    try:
                        self._save(conv)
                    except Exception:
                        log.exception("saving conversation %s failed", conv.id)
                self.engine.release(conv.state)
                conv.state.close()
                conv.state = None

    def memories(self) -> list:
        with self._lock:
            return [c.state for c in self._convs.values() if c.state is not None and not c.busy]

    # ------------------------------------------------------------------ files
    def _path(self, conv: Conversation, suffix: str) -> Path:
        """``ID.json``, and ``ID.snap``: a tensor-parallel rank's own ``ID.rankR-of-N.snap``
        (its memory holds the rank's heads only)."""
        path = self.snapshot_dir / f"{conv.id}{suffix}"
        return rank_path(path, self.model) if suffix == ".snap" else path

    def _check_world(self, conv: Conversation) -> None:
        """Refuse a folder whose snapshot of ``conv`` another world size saved (one process
        against tensor-parallel ranks, or another number of ranks)."""
        if self._path(conv, ".snap").exists():
            return
        for other in sorted(self.snapshot_dir.glob(f"{conv.id}*.snap")):
            tp = getattr(self.model, "tp", None)
            here = "one process" if tp is None else f"{tp.world_size} tensor-parallel ranks"
            found = re.fullmatch(rf"{conv.id}\.rank\d+-of-(\d+)\.snap", other.name)
            there = "one process" if found is None else f"{found.group(1)} tensor-parallel ranks"
            raise WorldSizeError(f"--snapshot-dir {self.snapshot_dir}: {other.name} was saved by a server of "
                                  f"{there}, this one has {here}; start it with the same number of ranks "
                                  "(or use another folder)")

    def _load_folder(self) -> None:
        """The conversations a server with this folder had (their memories stay on disk)."""
        for meta_path in sorted(self.snapshot_dir.glob("conv_*.json")):
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                if not ID_PATTERN.fullmatch(meta.get("id", "")):
                    raise ValueError("bad id")
                memory = None if meta["memory"] is None else MemoryConfig(**meta["memory"])
                conv = Conversation(id=meta["id"], owner=meta["owner"], attention=meta["attention"], memory=memory,
                                    system=meta["system"], created=meta["created"])
                if conv.system:
                    conv.messages.append({"role": "system", "content": conv.system})
                self._check_world(conv)
                snap = self._path(conv, ".snap")
                if snap.exists():
                    header = read_header(snap)
                    conv.messages, conv.text = header["extra"]["messages"], header["extra"]["text"]
                    conv.length, conv.tokens = int(header["state"]["length"]), None
            except WorldSizeError:
                raise
            except (OSError, ValueError, KeyError, TypeError, InfLLMLiteError) as e:
                log.warning("skipping conversation file %s: %s", meta_path, e)
                continue
            self._convs[conv.id] = conv
        self._count()

    def _count(self) -> None:
        if self.metrics is not None:
            in_memory = sum(c.state is not None for c in self._convs.values())
            self.metrics.conversations.labels(where="memory").set(in_memory)
            self.metrics.conversations.labels(where="snapshot").set(len(self._convs) - in_memory)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)
