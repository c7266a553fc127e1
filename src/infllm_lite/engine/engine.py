"""The continuous-batching engine: many sequences, each with its own attention memory,
decoded together.

Each :meth:`Engine.step`:

1. admits waiting requests in arrival order while their predicted memory
   (:func:`~infllm_lite.attention.footprint.state_bytes`) fits the budget, each into a
   fresh memory of its own mode and configuration;
2. chooses the admitted prompts' next chunks within the step's token budget
   (``step_tokens`` minus the decode tokens), so a long prompt never stalls the sequences
   already decoding. Chunks end where batch-1 ``generate``'s execution chunks end
   (multiples of ``exc_block_size`` for ``infllm``, within calls of ``chunk_size``), so
   every sequence reads its prompt exactly as it would alone;
3. decodes one token for every sequence whose prompt was read by an earlier step (its
   last prompt token, or the token it sampled last), with this step's prompt chunks, in
   **one** model call: the projections, MLP, norms and LM head batched, attention per
   sequence (:class:`~infllm_lite.attention.ragged.RaggedBatch` for decode rows alone,
   :class:`~infllm_lite.attention.ragged.PackedBatch` with chunks: a decode row costs
   little beside a chunk). With nobody decoding, each chunk is its own batch-1 call;
4. samples each sequence with its own generator and applies its stop rules; a finished
   or cancelled sequence closes its memory at once (host slots, disk files) and gives its
   budget back.

A request may continue a memory (``Request.state``: a conversation's next turn) and keep
it (``Request.keep_state``): the memory is then handed back in ``Sequence.state`` and
stays counted against the budget as *held* until :meth:`Engine.release`. When held
memories leave no room for the next waiting request, the engine calls ``make_room``
(which may release some, e.g. after saving them to snapshots); a request that still
cannot fit with nothing else running is refused (``finish_reason`` ``refused``,
``Sequence.error`` says why) instead of waiting forever.

Submission and cancellation are thread-safe (a server thread may submit while another
steps); steps run one at a time. A step that raises (a bug) loses no end: the sequences it
finished are reported by the next step, as :meth:`close`'s cancellations are.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..attention import make_attention_state, make_kernel
from ..attention.footprint import state_bytes
from ..attention.full import FullAttentionState
from ..attention.infllm import InfLLMState
from ..attention.kv_arena import Arena
from ..attention.ragged import PackedBatch, RaggedBatch
from ..errors import InfLLMLiteError
from ..memory_config import MemoryConfig
from ..options import DEFAULT_CHUNK_SIZE
from ..prompts import stop_token_ids as prompt_stop_ids
from ..sampling import sample
from ..stats import device_clock
from ..text_stream import TextStream
from .request import Request
from .sequence import DECODE, FINISHED, PREFILL, Event, Sequence

DEFAULT_STEP_TOKENS = 512  # tokens per step (decode + prefill): a 2K prompt is read in 4 steps


@dataclass
class EngineStats:
    """Counters over the engine's life: steps, tokens and seconds per phase, the most
    sequences decoded in one step."""

    steps: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # tokens sampled in decode steps
    decode_seconds: float = 0.0
    max_batch: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def _cut(fed: int, body: int, budget: int, unit: int, chunk: int) -> int:
    """Where the next prefill call of a prompt at ``fed`` (of ``body`` tokens) ends: as far
    as ``budget`` allows on a boundary of batch-1 prefill's execution chunks (calls of
    ``chunk`` tokens cut every ``unit`` queries), at least one such chunk."""
    c0 = (fed // chunk) * chunk
    c_end = min(c0 + chunk, body)  # the batch-1 call holding ``fed`` ends here
    limit = min(c_end, fed + max(budget, 0))
    cut = limit if limit == c_end else c0 + ((limit - c0) // unit) * unit
    if cut <= fed:  # the budget is spent: one execution chunk anyway, so everyone progresses
        cut = min(c0 + ((fed - c0) // unit + 1) * unit, c_end)
    return cut


class Engine:
    """Serves many requests at once on ``model`` (see the module's docstring).

    ``tokenizer`` (optional) gives each sequence its text and stop strings, and the
    default stop tokens; ``memory_budget`` (bytes, None: unlimited) bounds the attention
    memory of the admitted sequences; ``max_sequences`` how many run at once;
    ``step_tokens`` the tokens one step processes (decode tokens first, prompt chunks in
    what is left); ``attention_kernel`` computes ``infllm`` (resolved once); ``make_room(n)``
    (optional) is called inside a step when the next waiting request needs ``n`` bytes
    more than the budget has free and held memories take some of it.
    """

    def __init__(self, model, tokenizer=None, *, memory_budget: int | None = None,
                 max_sequences: int | None = None, step_tokens: int = DEFAULT_STEP_TOKENS,
                 attention_kernel="auto", stop_token_ids: set[int] | None = None,
                 make_room: Callable[[int], object] | None = None):
        for name, value in (("memory_budget", memory_budget), ("max_sequences", max_sequences),
                            ("step_tokens", step_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InfLLMLiteError(f"{name} must be a positive integer, got {value!r}")
        self.model, self.tokenizer = model, tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.memory_budget, self.max_sequences, self.step_tokens = memory_budget, max_sequences, step_tokens
        self.kernel = make_kernel(attention_kernel, self.device)
        self.arena = Arena(model.args.n_layers, self.device)  # rows of the sequences' memories
        if stop_token_ids is None:
            stop_token_ids = (set(model.args.eos_token_ids) if tokenizer is None
                              else prompt_stop_ids(model, tokenizer))
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stats = EngineStats()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted, in admission order
        self.sequences: dict[int, Sequence] = {}  # every sequence not yet collected
        self.reserved = 0  # predicted bytes of the running sequences' memories
        self._next_id = 0
        self._lock = threading.Lock()  # the queues (submit / cancel against a step)
        self._step_lock = threading.Lock()  # one step at a time
        self._cancels: set[int] = set()
        self._events: list[Event] = []  # cancellations outside a step, reported by the next
        self._finishes: list[Event] = []  # the ends of the step in progress
        self.make_room = make_room
        self._held: dict[int, tuple[object, int]] = {}  # id(state) -> (state, bytes): kept memories

    # ------------------------------------------------------------------ requests
    def predicted_bytes(self, request: Request) -> int:
        """The memory ``request`` will hold at its longest (what its state has read, prompt
        and max_new_tokens; a full-attention cache: its capacity)."""
        n = request.position + len(request.prompt_ids) + request.max_new_tokens
        if request.attention == "full":
            n = max(n, getattr(request.state, "capacity", None) or request.capacity or 0)
        return state_bytes(request.attention, self.model.args, n, request.memory, self.dtype)

    def held_size(self, state, mode: str, memory: MemoryConfig | None) -> int:
        """What a kept memory of ``mode`` counts against the budget: its bytes at its length
        (a full-attention cache: at its capacity)."""
        n = state.capacity if mode == "full" else state.length
        return state_bytes(mode, self.model.args, n, memory, self.dtype)

    @property
    def held_bytes(self) -> int:
        """Bytes of the memories handed back with ``keep_state`` and not yet released."""
        with self._lock:
            return sum(n for _, n in self._held.values())

    def held_states(self) -> list:
        with self._lock:
            return [state for state, _ in self._held.values()]

    def release(self, state) -> bool:
        """Stop counting a kept memory against the budget (the caller closes it, or has saved
        it); False if the engine does not hold it (never kept, already released, or in use
        by a request)."""
        with self._lock:
            return self._held.pop(id(state), None) is not None

    def check(self, request: Request) -> int:
        """What :meth:`submit` refuses (``InfLLMLiteError``: bad input, a memory larger than
        the whole budget, stop strings without a tokenizer), refused without queueing;
        returns the request's predicted memory bytes."""
        if not isinstance(request, Request):
            raise InfLLMLiteError(f"submit takes a Request, got {type(request).__name__}")
        request.check(self.model.args.vocab_size)
        needed = self.predicted_bytes(request)
        if self.memory_budget is not None and needed > self.memory_budget:
            raise InfLLMLiteError(
                f"this request needs {needed / 2**20:.1f} MiB of attention memory "
                f"({request.attention}, {len(request.prompt_ids)} prompt + {request.max_new_tokens} "
                f"new tokens), more than the engine's whole budget of {self.memory_budget / 2**20:.1f} MiB")
        if request.stop and self.tokenizer is None:
            raise InfLLMLiteError("stop strings need an engine with a tokenizer")
        return needed

    def submit(self, request: Request) -> int:
        """Queue ``request``; returns its sequence id. Bad input, or a memory larger than
        the whole budget, is refused here (``InfLLMLiteError``), before any work."""
        needed = self.check(request)
        memory = request.memory
        if request.attention != "full" and memory is None:
            memory = MemoryConfig.for_model(self.model.args)
        stop_ids = self.stop_token_ids if request.stop_token_ids is None else frozenset(request.stop_token_ids)
        text = TextStream(self.tokenizer, request.stop) if self.tokenizer is not None else None
        with self._lock:
            seq = Sequence(self._next_id, request, memory, needed, stop_ids, text, self.device)
            self._next_id += 1
            self.sequences[seq.id] = seq
            self.waiting.append(seq)
        return seq.id

    def cancel(self, seq_id: int) -> bool:
        """Stop a sequence (waiting or running); its memory is freed now, or at the end of
        the step in progress. False if it is unknown or already finished."""
        with self._lock:
            seq = self.sequences.get(seq_id)
            if seq is None or seq.status == FINISHED:
                return False
            self._cancels.add(seq_id)
        if self._step_lock.acquire(blocking=False):
            try:
                self._events.extend(self._apply_cancels())
            finally:
                self._step_lock.release()
        return True

    def pop(self, seq_id: int) -> Sequence:
        """Forget a finished sequence and return it (its tokens, text, stats)."""
        with self._lock:
            seq = self.sequences[seq_id]
            if seq.status != FINISHED:
                raise InfLLMLiteError(f"sequence {seq_id} has not finished")
            return self.sequences.pop(seq_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._events)

    def close(self) -> None:
        """Cancel everything and free every memory."""
        for seq_id in list(self.sequences):
            self.cancel(seq_id)

    # ------------------------------------------------------------------ steps
    def events(self) -> Iterator[Event]:
        """Step until no work is left, yielding every event."""
        while self.has_work:
            yield from self.step()

    def step(self) -> list[Event]:
        """One step of every running sequence (see the module's docstring)."""
        with self._step_lock:
            events, self._events = self._events, []
            self._finishes = []
            try:
                events.extend(self._apply_cancels())
                self._admit()
                events.extend(self._events)  # requests refused at admission
                self._events = []
                with torch.inference_mode():
                    decoding = [s for s in self.running if s.status == DECODE]
                    chunks = self._prefill_chunks(self.step_tokens - len(decoding))
                    if decoding:
                        events.extend(self._decode(decoding, chunks))
                    else:
                        self._prefill(chunks)
                events.extend(self._apply_cancels())
            except BaseException:
                # what the failed step reported and every sequence it finished reach the
                # caller with the next step: a finished sequence is never left unreported
                told = {id(e) for e in events}
                self._events = events + [e for e in self._finishes if id(e) not in told] + self._events
                raise
            finally:
                self._finishes = []
            self.stats.steps += 1
            return events

    def _admit(self) -> None:
        while self.waiting and (self.max_sequences is None or len(self.running) < self.max_sequences):
            seq = self.waiting[0]
            if not self._fits(seq):
                if self.running:
                    return  # it waits (arrival order: nobody overtakes it)
                self._refuse(seq, f"this request needs {seq.reserved / 2**20:.1f} MiB of attention memory; "
                             f"kept memories (conversations) hold {self.held_bytes / 2**20:.1f} MiB of the "
                             f"budget's {self.memory_budget / 2**20:.1f} MiB and none could be released")
                continue
            try:
                seq.state = self._memory_for(seq)
            except InfLLMLiteError as e:
                self._refuse(seq, str(e))
                continue
            with self._lock:
                self.waiting.popleft()
                self.running.append(seq)
            self.reserved += seq.reserved
            seq.status = PREFILL if seq.body else DECODE
            seq.next_input = seq.prompt[-1]
            seq.admitted = time.perf_counter()
            seq.stats.queued_seconds = seq.admitted - seq.submitted

    def _fits(self, seq: Sequence) -> bool:
        """Whether ``seq``'s memory fits the budget now, after asking ``make_room`` for room
        held memories take (the memory it continues counts as its own)."""
        if self.memory_budget is None:
            return True
        own = self._held.get(id(seq.request.state), (None, 0))[1]

        def shortfall() -> int:  # bytes past the budget if seq were admitted now
            return self.reserved + self.held_bytes - own + seq.reserved - self.memory_budget

        short = shortfall()
        if short > 0 and self.make_room is not None and self.held_bytes > own:
            self.make_room(short)
            short = shortfall()
        return short <= 0

    def _memory_for(self, seq: Sequence):
        """The memory ``seq`` reads into: the one its request continues (no longer held:
        its sequence's reservation counts it now), or a fresh one."""
        req = seq.request
        if req.state is None:
            capacity = req.capacity or len(seq.prompt) + req.max_new_tokens
            state = self._in_arena(req, seq.memory, capacity)
            if state is not None:
                return state
            return make_attention_state(
                req.attention, self.model.args, capacity=capacity,
                memory=seq.memory, dtype=self.dtype, device=self.device, kernel=self.kernel)
        state = req.state if hasattr(req.state, "layers") else req.state()
        if getattr(state, "length", None) != req.position:
            raise InfLLMLiteError(f"the memory to continue has read {getattr(state, 'length', None)} tokens, "
                                  f"the request's position is {req.position}")
        with self._lock:
            self._held.pop(id(state), None)
        return state

    def _in_arena(self, req: Request, memory: MemoryConfig | None, capacity: int):
        """A new memory in a row of the engine's arena (so decode steps attend over the
        batch's memories at once), or None: not on the CPU, a full cache stored in
        another dtype than the model's, another mode, or too large a row for a bank."""
        if self.device.type != "cpu":
            return None
        model_dtype = str(self.dtype).removeprefix("torch.")
        if req.attention == "full" and getattr(memory, "kv_dtype", None) in (None, model_dtype):
            return FullAttentionState.in_arena(self.arena, self.model.args, capacity, self.dtype)
        if req.attention == "infllm":  # ``memory``: the request's, resolved at submit
            return InfLLMState.in_arena(self.arena, self.model.args, memory, dtype=self.dtype, kernel=self.kernel)
        return None

    def _refuse(self, seq: Sequence, why: str) -> None:
        """End a waiting ``seq`` that cannot run; its event is reported by this step."""
        seq.error = why
        self._events.append(self._finish(seq, "refused"))

    def _prefill_chunks(self, budget: int) -> list[tuple[Sequence, int]]:
        """The prompt chunks this step reads, ``(sequence, end)`` in admission order, within
        ``budget`` tokens (at least one chunk, so every prompt progresses)."""
        chunks = []
        for seq in self.running:
            if seq.status != PREFILL:
                continue
            if budget <= 0 and chunks:
                break
            memory = seq.memory
            unit = memory.exc_block_size if seq.request.attention == "infllm" else 1
            chunk = seq.request.chunk_size or (memory.chunk_size if memory is not None else DEFAULT_CHUNK_SIZE)
            cut = _cut(seq.fed, seq.body, budget, unit, chunk)
            chunks.append((seq, cut))
            budget -= cut - seq.fed
        return chunks

    def _read(self, chunks: list[tuple[Sequence, int]], seconds: float) -> None:
        """Count the prompt chunks just read; a prompt read whole decodes from the next step."""
        self.stats.prefill_seconds += seconds
        for seq, cut in chunks:
            self.stats.prefill_tokens += cut - seq.fed
            seq.fed = cut
            if seq.fed == seq.body:
                seq.status = DECODE

    def _prefill(self, chunks: list[tuple[Sequence, int]]) -> None:
        """Nobody decodes: each chunk in its own batch-1 call (exactly ``generate``'s)."""
        for seq, cut in chunks:
            t0 = device_clock(self.device)
            ids = torch.tensor([seq.prompt[seq.fed:cut]], dtype=torch.long, device=self.device)  # (1, n)
            self.model(ids, seq.state, last_only=True)
            self._read([(seq, cut)], device_clock(self.device) - t0)

    def _decode(self, seqs: list[Sequence], chunks: list[tuple[Sequence, int]] = ()) -> list[Event]:
        """One token of every sequence in ``seqs``, in one model call with this step's
        prompt ``chunks`` (:class:`~infllm_lite.attention.ragged.PackedBatch`)."""
        t0 = device_clock(self.device)
        n_read = sum(cut - seq.fed for seq, cut in chunks)
        if chunks:
            batch = PackedBatch([(seq.state, cut - seq.fed) for seq, cut in chunks],
                                [s.state for s in seqs], self.model.args.n_layers)
            ids = torch.tensor([[t for seq, cut in chunks for t in seq.prompt[seq.fed:cut]]
                                + [s.next_input for s in seqs]], dtype=torch.long, device=self.device)  # (1, T)
            logits = self.model.step(ids, batch.positions(), batch, rows=batch.rows)[0, :, None]  # (B, 1, vocab)
            batch.advance()
        else:
            ids = torch.tensor([[s.next_input] for s in seqs], dtype=torch.long, device=self.device)  # (B, 1)
            if len(seqs) == 1:
                logits = self.model(ids, seqs[0].state)  # (1, 1, vocab): exactly batch-1's step
            else:
                batch = RaggedBatch([s.state for s in seqs], self.model.args.n_layers)
                logits = self.model.step(ids, batch.positions(1), batch)  # (B, 1, vocab)
                batch.advance(1)
        events = [self._sampled(seq, logits[b:b + 1, -1]) for b, seq in enumerate(seqs)]
        seconds = device_clock(self.device) - t0
        if chunks:  # the call's time, shared by its tokens
            self._read(chunks, seconds * n_read / (n_read + len(seqs)))
            seconds *= len(seqs) / (n_read + len(seqs))
        self.stats.decode_seconds += seconds
        self.stats.decode_tokens += len(seqs)
        self.stats.max_batch = max(self.stats.max_batch, len(seqs))
        return events

    def _sampled(self, seq: Sequence, logits: torch.Tensor) -> Event:
        """Sample ``seq``'s next token from logits (1, vocab) and apply its stop rules."""
        now = time.perf_counter()
        if not seq.token_ids:  # this step read the prompt's last token
            seq.first_token = now
            seq.stats.first_token_seconds = now - seq.submitted
            seq.stats.prefill_seconds = now - seq.admitted
            seq.stats.prefill_memory = seq.state.stats()
        else:
            seq.stats.decode_seconds = now - seq.first_token
        if seq.request.keep_logits:
            seq.logits.append(logits[0].clone())
        token_id = int(sample(logits, **seq.sampling()))
        if token_id in seq.stop_ids:
            return self._finish(seq, "stop")
        seq.token_ids.append(token_id)
        seq.stats.new_tokens += 1
        piece, hit = seq.text.add(token_id) if seq.text is not None else ("", False)
        if len(seq.token_ids) == seq.request.max_new_tokens or hit:
            return self._finish(seq, "stop" if hit else "length", token_id, piece)
        seq.pieces.append(piece)
        seq.next_input = token_id
        return Event(seq.id, token_id, piece)

    def _finish(self, seq: Sequence, reason: str, token_id: int | None = None, piece: str = "") -> Event:
        """End ``seq``: its last text, its memory closed and its budget given back."""
        if seq.text is not None and reason != "cancelled":
            piece += seq.text.finish()
        seq.pieces.append(piece)
        seq.finish_reason = seq.stats.finish_reason = reason
        seq.stats.total_seconds = time.perf_counter() - seq.submitted
        if seq.state is None and seq.request.keep_state and hasattr(seq.request.state, "layers"):
            seq.state = seq.request.state  # never admitted: handed back as it was (still held)
        elif seq.state is not None:
            seq.stats.memory = seq.state.stats()
            self.reserved -= seq.reserved
            if seq.request.keep_state:
                with self._lock:
                    self._held[id(seq.state)] = (seq.state, self.held_size(seq.state, seq.request.attention,
                                                                           seq.memory))
            else:
                seq.state.close()
                seq.state = None
        with self._lock:
            if seq in self.running:
                self.running.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
        seq.status = FINISHED
        event = Event(seq.id, token_id, piece, reason)
        self._finishes.append(event)  # this step's ends (reported even if the step fails later)
        return event

    def _apply_cancels(self) -> list[Event]:
        with self._lock:
            cancels, self._cancels = self._cancels, set()
        return [self._finish(self.sequences[i], "cancelled") for i in sorted(cancels)
                if self.sequences[i].status != FINISHED]
