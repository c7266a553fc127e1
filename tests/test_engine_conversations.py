"""The engine continuing and keeping memories (what the server's conversations run on):
a turn that continues a kept memory gives continue_ids' tokens, batched with others or
not; a kept memory stays counted against the budget until released; make_room is asked
for room; a request that can never fit beside the kept memories is refused, not left
waiting; a snapshot loader runs only at admission; bad continuations are refused."""

from __future__ import annotations

import pytest
import torch

from infllm_lite import InfLLMLiteError, MemoryConfig
from infllm_lite.attention import make_attention_state
from infllm_lite.engine import Engine, Request
from infllm_lite.generate import continue_ids

TINY_MEMORY = MemoryConfig(n_init=4, n_local=32, block_size=8, topk=2, repr_topk=2,
                           exc_block_size=16, max_cached_blocks=4)
KERNEL = "window-eager"
NO_STOP = frozenset()
GREEDY = dict(temperature=0.0, top_p=1.0, top_k=0, generator=None)


def prompts(seed: int, *lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]


def turn(ids, mode, new=5, **kw) -> Request:
    return Request(list(ids), max_new_tokens=new, attention=mode, stop_token_ids=NO_STOP,
                   memory=TINY_MEMORY if mode != "full" else None, keep_state=True, **kw)


def drain(engine: Engine, *seq_ids: int) -> list:
    while engine.has_work:
        engine.step()
    return [engine.pop(i) for i in seq_ids]


def reference_turns(model, mode, turns, new=5, capacity=400):
    """Each turn's tokens through batch-1 continue_ids on one memory (ChatSession's path)."""
    state = make_attention_state(mode, model.args, capacity=capacity, memory=TINY_MEMORY if mode != "full" else None,
                                 kernel=KERNEL)
    out = [list(continue_ids(model, state, ids, max_new_tokens=new, sampling=GREEDY, chunk_size=TINY_MEMORY.chunk_size))
           for ids in turns]
    return out, state.length


@pytest.mark.parametrize("mode", ["full", "streaming", "infllm"])
def test_a_continued_memory_gives_continue_ids_tokens_alone_and_batched(tiny, mode):
    """Three turns of 70, 9 and 45 tokens (beyond the 32-token window: blocks formed and
    retrieved) on one kept memory, each turn alone and then beside another sequence that
    arrives mid-turn: every turn's tokens equal continue_ids', and the memory has read
    exactly what the batch-1 memory read."""
    model, _ = tiny
    turns = prompts(1, 70, 9, 45)
    expected, length = reference_turns(model, mode, turns)
    for neighbour in (False, True):
        engine = Engine(model, step_tokens=24, attention_kernel=KERNEL)
        state, got = None, []
        for k, ids in enumerate(turns):
            req = turn(ids, mode, state=state, position=0 if state is None else state.length, capacity=400)
            seq_id = engine.submit(req)
            others = []
            if neighbour:
                engine.step()
                others.append(engine.submit(Request(prompts(10 + k, 50)[0], max_new_tokens=4, attention=mode,
                                                    stop_token_ids=NO_STOP,
                                                    memory=TINY_MEMORY if mode != "full" else None)))
            seq = drain(engine, seq_id, *others)[0]
            got.append(seq.token_ids)
            state = seq.state
            assert state is not None and engine.held_bytes > 0
        assert got == expected
        assert state.length == length
        assert engine.release(state) and not engine.release(state)
        assert engine.held_bytes == 0 and engine.reserved == 0
        state.close()


def test_a_kept_memory_counts_until_released_and_make_room_is_asked(tiny):
    model, _ = tiny
    a, b = prompts(2, 60, 60)
    one = Engine(model, attention_kernel=KERNEL).predicted_bytes(turn(a, "full", capacity=200))
    asked = []
    engine = Engine(model, memory_budget=one + one // 2, attention_kernel=KERNEL, make_room=asked.append)
    first = drain(engine, engine.submit(turn(a, "full", capacity=200)))[0]
    assert engine.held_bytes == engine.held_size(first.state, "full", None) == one
    # b needs `one` more: nothing runs, make_room frees nothing -> refused, not left waiting
    refused = drain(engine, engine.submit(turn(b, "full", capacity=200)))[0]
    assert refused.finish_reason == "refused" and "none could be released" in refused.error
    assert asked and asked[0] == one + one - engine.memory_budget
    assert refused.token_ids == [] and refused.state is None
    # a make_room that releases the kept memory lets b in
    held = first.state

    def evict(n):
        assert engine.release(held)
        held.close()
    engine.make_room = evict
    second = drain(engine, engine.submit(turn(b, "full", capacity=200)))[0]
    assert second.finish_reason == "length" and len(second.token_ids) == 5
    assert engine.held_bytes == one and engine.release(second.state)


def test_continuing_a_kept_memory_needs_no_room_twice(tiny):
    """The memory a request continues is its own: it is not counted twice at admission."""
    model, _ = tiny
    a, b = prompts(3, 40, 10)
    budget = Engine(model, attention_kernel=KERNEL).predicted_bytes(turn(a, "full", capacity=200))
    engine = Engine(model, memory_budget=budget, attention_kernel=KERNEL)
    state = drain(engine, engine.submit(turn(a, "full", capacity=200)))[0].state
    seq = drain(engine, engine.submit(turn(b, "full", state=state, position=state.length)))[0]
    assert seq.finish_reason == "length" and seq.state is state and engine.held_bytes == budget


def test_cancelled_turns_hand_their_memory_back(tiny):
    model, _ = tiny
    a, b = prompts(4, 40, 20)
    engine = Engine(model, attention_kernel=KERNEL)
    state = drain(engine, engine.submit(turn(a, "infllm")))[0].state
    n = state.length
    waiting = engine.submit(turn(b, "infllm", state=state, position=n))
    engine.cancel(waiting)  # before admission: the memory is handed back untouched
    seq = drain(engine, waiting)[0]
    assert seq.finish_reason == "cancelled" and seq.state is state and state.length == n
    running = engine.submit(turn(b, "infllm", state=state, position=n, new=50))
    for _ in range(3):
        engine.step()
    engine.cancel(running)  # mid-answer: what it read stays consistent
    seq = drain(engine, running)[0]
    assert seq.finish_reason == "cancelled" and seq.state is state
    assert state.length == n + len(b) + len(seq.token_ids) - 1
    assert engine.release(state)


def test_a_loader_runs_at_admission_and_its_error_refuses_the_request(tiny):
    model, _ = tiny
    a, b = prompts(5, 30, 8)
    engine = Engine(model, attention_kernel=KERNEL)
    state = drain(engine, engine.submit(turn(a, "infllm")))[0].state
    engine.release(state)
    calls = []

    def load():
        calls.append(1)
        return state
    seq_id = engine.submit(turn(b, "infllm", state=load, position=state.length))
    assert not calls  # not loaded when submitted
    seq = drain(engine, seq_id)[0]
    assert calls == [1] and seq.state is state and seq.finish_reason == "length"

    def broken():
        raise InfLLMLiteError("snapshot conv.snap is corrupt")
    seq = drain(engine, engine.submit(turn(b, "infllm", state=broken, position=3)))[0]
    assert seq.finish_reason == "refused" and seq.error == "snapshot conv.snap is corrupt"


def test_bad_continuations_are_refused_before_any_work(tiny):
    model, _ = tiny
    a, = prompts(6, 30)
    engine = Engine(model, attention_kernel=KERNEL)
    state = drain(engine, engine.submit(turn(a, "full", capacity=60)))[0].state
    cases = [
        (dict(state=state, position=3), "has read 34 tokens, position says 3"),
        (dict(position=4), "position 4 without a state"),
        (dict(state=state, position=state.length, new=40), "holds 60 tokens"),
        (dict(state="memory", position=0), "state must be an open attention memory"),
        (dict(capacity=10), "capacity 10 is less than"),
        (dict(keep_state=1), "keep_state must be True or False"),
    ]
    for change, message in cases:
        new = change.pop("new", 5)
        fields = dict(max_new_tokens=new, attention="full", stop_token_ids=NO_STOP, keep_state=True)
        fields.update(change)
        with pytest.raises(InfLLMLiteError, match=message):
            engine.submit(Request(list(a), **fields))
    engine.release(state)
    state.close()
    with pytest.raises(InfLLMLiteError, match=r"\(closed\)"):
        engine.submit(turn(a, "full", state=state, position=state.length))
    assert not engine.has_work and engine.held_bytes == 0
