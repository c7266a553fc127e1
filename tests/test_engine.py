"""The continuous-batching engine against batch-1 generation: every sequence of a batch
gives the tokens (and, within 1e-4, the logits) it gives alone, whatever its length, its
arrival step, its neighbours and the step's token budget; seeds belong to their sequence;
a finished or cancelled sequence frees its memory at once; admission by memory; bad
requests refused alone."""

from __future__ import annotations

import os
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infllm_lite import InfLLMLiteError, MemoryConfig, generate, generate_ids
from infllm_lite.attention import make_attention_state
from infllm_lite.attention.footprint import state_bytes
from infllm_lite.engine import Engine, Request, SamplingOptions
from infllm_lite.generate import prefill

TINY_MEMORY = MemoryConfig(n_init=4, n_local=32, block_size=8, topk=2, repr_topk=2,
                           exc_block_size=16, max_cached_blocks=4)
KERNEL = "window-eager"  # the CPU kernel's math without compiling each tiny shape
NO_STOP = frozenset()


def request(ids, mode, new=6, **kw) -> Request:
    return Request(list(ids), max_new_tokens=new, attention=mode, stop_token_ids=NO_STOP,
                   memory=TINY_MEMORY if mode != "full" else None, **kw)


def run(engine: Engine, arrivals: list[tuple[int, Request]]) -> list:
    """Submit each request at its step; step until done. Returns the sequences in order."""
    ids, step = [None] * len(arrivals), 0
    while step <= max(a for a, _ in arrivals) or engine.has_work:
        for i, (at, req) in enumerate(arrivals):
            if at == step:
                ids[i] = engine.submit(req)
        engine.step()
        step += 1
    return [engine.pop(i) for i in ids]


def alone(model, req: Request):
    """The request run by itself: the engine's batch-1 path (model(ids, state), as generate)."""
    return run(Engine(model, attention_kernel=KERNEL), [(0, req)])[0]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(["full", "streaming", "infllm"]),
       lengths=st.lists(st.integers(1, 110), min_size=1, max_size=6),
       arrivals=st.lists(st.integers(0, 8), min_size=6, max_size=6),
       step_tokens=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_every_sequence_of_a_batch_decodes_as_it_does_alone(tiny, mode, lengths, arrivals, step_tokens, seed):
    """Prompts of 1 token to 3x beyond the 32-token window (blocks formed and retrieved),
    arriving at any step, 1-6 at once, any per-step budget: greedy tokens equal batch-1
    generate_ids, logits within 1e-4 of the sequence run alone."""
    model, _ = tiny
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]
    reqs = [request(p, mode, keep_logits=True) for p in prompts]
    engine = Engine(model, step_tokens=step_tokens, attention_kernel=KERNEL)
    batched = run(engine, list(zip(arrivals, reqs)))
    for p, req, seq in zip(prompts, reqs, batched):
        ref = list(generate_ids(model, p, max_new_tokens=6, attention=mode, memory=req.memory,
                                attention_kernel=KERNEL))
        assert seq.token_ids == ref
        solo = alone(model, req)
        assert solo.token_ids == ref
        for a, b in zip(seq.logits, solo.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert engine.reserved == 0 and not engine.running


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(modes=st.lists(st.sampled_from(["full", "streaming", "infllm"]), min_size=2, max_size=6),
       lengths=st.lists(st.integers(1, 80), min_size=6, max_size=6), seed=st.integers(0, 2**16))
def test_a_batch_of_mixed_modes_decodes_each_sequence_as_alone(tiny, modes, lengths, seed):
    """Sequences of different attention modes in one step (each mode's layers take their
    rows of the batch together): each gives its tokens alone, logits within 1e-4."""
    model, _ = tiny
    g = torch.Generator().manual_seed(seed)
    reqs = [request(torch.randint(3, 49152, (n,), generator=g).tolist(), mode, keep_logits=True)
            for mode, n in zip(modes, lengths)]
    batched = run(Engine(model, step_tokens=512, attention_kernel=KERNEL), [(0, r) for r in reqs])
    for req, seq in zip(reqs, batched):
        solo = alone(model, req)
        assert seq.token_ids == solo.token_ids
        for a, b in zip(seq.logits, solo.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["full", "infllm"])
def test_the_embedded_model_batched_equals_alone(smollm, mode):
    """The real model, the CPU's default kernel, prompts across the 512-token window (blocks
    retrieved), arriving together and two steps apart: token for token equal to generate."""
    model, tok = smollm
    texts = ["The history of the lighthouse keepers of the northern coast. " * n for n in (1, 45, 60)]
    prompts = [tok.encode(t) for t in texts]
    reqs = [Request(p, max_new_tokens=8, attention=mode, stop_token_ids=NO_STOP) for p in prompts]
    batched = run(Engine(model, tok, step_tokens=512), [(0, reqs[0]), (0, reqs[1]), (2, reqs[2])])
    for p, seq in zip(prompts, batched):
        assert seq.token_ids == list(generate_ids(model, p, max_new_tokens=8, attention=mode))


def test_seeded_samples_do_not_depend_on_the_batch(tiny):
    """A seeded sequence draws the same tokens alone, with neighbours, and in generate."""
    model, tok = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (9, 40, 3, 70)]
    sampling = SamplingOptions(temperature=1.0, top_p=0.9, top_k=50, seed=7)
    target = request(prompts[0], "infllm", new=10, sampling=sampling)
    others = [request(p, "infllm", new=10, sampling=SamplingOptions(temperature=1.0, seed=i))
              for i, p in enumerate(prompts[1:])]
    solo = alone(model, target).token_ids
    for arrivals in ([(0, target)], [(0, target)] + [(0, o) for o in others],
                     [(0, others[0]), (3, target), (1, others[1]), (5, others[2])]):
        seqs = run(Engine(model, step_tokens=24, attention_kernel=KERNEL), arrivals)
        assert seqs[[r for _, r in arrivals].index(target)].token_ids == solo
    ref = list(generate_ids(model, prompts[0], max_new_tokens=10, attention="infllm", memory=TINY_MEMORY,
                            attention_kernel=KERNEL, temperature=1.0, top_p=0.9, top_k=50, seed=7))
    assert solo == ref


def _state_bytes_held(state) -> int:
    """Bytes of every distinct tensor storage a memory holds (its layers and the objects
    they hold: pools, the decode step's selected blocks)."""
    seen, total = set(), 0
    for layer in state.layers:
        objects = [layer] + [x for x in vars(layer).values() if hasattr(x, "__dict__") and x is not state]
        for obj in objects:
            for x in vars(obj).values():
                if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in seen:
                    seen.add(x.untyped_storage().data_ptr())
                    total += x.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize("mode,n", [("full", 300), ("streaming", 300), ("infllm", 40), ("infllm", 300),
                                    ("infllm", 1000)])
def test_the_predicted_memory_bounds_what_a_memory_holds(tiny, mode, n):
    """The engine admits by state_bytes: never below what the state really holds, at most
    twice it (the host block store and the representative vectors grow by doubling; the
    static slot arrays, most of a memory up to a few thousand tokens, are exact)."""
    model, _ = tiny
    state = make_attention_state(mode, model.args, capacity=n, memory=TINY_MEMORY, kernel=KERNEL)
    prefill(model, state, torch.randint(3, 49152, (1, n)), chunk_size=128, predict=True)  # + one decode step
    held, predicted = _state_bytes_held(state), state_bytes(mode, model.args, n, TINY_MEMORY)
    assert held <= predicted <= 2 * held
    state.close()


def test_a_sequence_that_stops_leaves_and_frees_its_memory_while_others_go_on(tiny, tmp_path):
    """EOS, a stop string, max_new_tokens and a cancellation each end their sequence at
    once: its memory is closed (no reference left, its disk file gone) and its budget
    returned, while the others keep decoding to their own ends."""
    model, tok = tiny
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 49152, (80,), generator=g).tolist()
    disk = MemoryConfig(**{**TINY_MEMORY.to_dict(), "max_host_bytes": 4096, "offload_dir": str(tmp_path)})
    free_run = alone(model, request(prompt, "infllm", new=30))
    tokens = free_run.token_ids
    text = tok.decode(tokens, skip_special_tokens=True)
    stop_string = text[len(text) // 3:len(text) // 3 + 3]
    engine = Engine(model, tok, step_tokens=400, attention_kernel=KERNEL)  # every prompt read in step 0
    seqs = {
        "eos": engine.submit(Request(prompt, max_new_tokens=30, attention="infllm", memory=disk,
                                     stop_token_ids=frozenset({tokens[4]}))),
        "string": engine.submit(Request(prompt, max_new_tokens=30, attention="infllm", memory=disk,
                                        stop=(stop_string,), stop_token_ids=NO_STOP)),
        "length": engine.submit(Request(prompt, max_new_tokens=3, attention="infllm", memory=disk,
                                        stop_token_ids=NO_STOP)),
        "cancel": engine.submit(Request(prompt, max_new_tokens=30, attention="infllm", memory=disk,
                                        stop_token_ids=NO_STOP)),
        "long": engine.submit(Request(prompt, max_new_tokens=30, attention="infllm", memory=disk,
                                      stop_token_ids=NO_STOP)),
    }
    engine.step()
    assert all(engine.sequences[i].status == "decode" for i in seqs.values())
    refs = {name: weakref.ref(engine.sequences[i].state) for name, i in seqs.items()}
    files_per_memory = model.args.n_layers  # one offload file per layer's pool
    assert len(os.listdir(tmp_path)) == files_per_memory * len(seqs)  # blocks beyond 4 KiB on disk
    ended: dict[str, int] = {}
    step = 1
    while engine.has_work:
        if step == 2:
            assert engine.cancel(seqs["cancel"])
            ended["cancel"] = step
        for event in engine.step():
            if event.finish_reason:
                name = next(n for n, i in seqs.items() if i == event.seq_id)
                ended[name] = step
                assert refs[name]() is None  # nothing holds the memory any more
                live = [n for n, i in seqs.items() if engine.sequences[i].status != "finished"]
                assert engine.reserved == sum(engine.sequences[seqs[n]].reserved for n in live)
                assert len(os.listdir(tmp_path)) == files_per_memory * len(live)
        step += 1
    out = {name: engine.pop(i) for name, i in seqs.items()}
    assert out["eos"].token_ids == tokens[:4] and out["eos"].finish_reason == "stop"
    assert out["string"].finish_reason == "stop" and stop_string not in out["string"].output
    assert text.startswith(out["string"].output + stop_string)
    assert out["length"].token_ids == tokens[:3] and out["length"].finish_reason == "length"
    assert out["cancel"].finish_reason == "cancelled" and len(out["cancel"].token_ids) < 30
    assert out["long"].token_ids == tokens and out["long"].finish_reason == "length"
    assert ended["length"] < ended["eos"] < ended["long"] and ended["cancel"] < ended["long"]
    assert os.listdir(tmp_path) == [] and engine.reserved == 0


def test_a_waiting_request_can_be_cancelled(tiny):
    model, _ = tiny
    engine = Engine(model, max_sequences=1, attention_kernel=KERNEL)
    first = engine.submit(request([5] * 20, "full"))
    second = engine.submit(request([6] * 20, "full"))
    engine.step()
    assert engine.cancel(second) and not engine.cancel(second)
    finished = [e for _ in range(20) if engine.has_work for e in engine.step() if e.finish_reason]
    assert [e.finish_reason for e in finished] == ["cancelled", "length"]
    assert engine.pop(second).token_ids == [] and len(engine.pop(first).token_ids) == 6


def test_admission_by_memory_runs_two_at_a_time_and_refuses_the_impossible(tiny):
    """A budget that fits two: five requests run two at a time in arrival order and all
    finish with their batch-1 tokens; one larger than the whole budget is refused at
    submission with a clear error, and nothing else changes."""
    model, _ = tiny
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 49152, (50,), generator=g).tolist() for _ in range(5)]
    reqs = [request(p, "infllm") for p in prompts]
    one = state_bytes("infllm", model.args, 50 + 6, TINY_MEMORY)
    engine = Engine(model, memory_budget=2 * one + one // 2, step_tokens=32, attention_kernel=KERNEL)
    ids = [engine.submit(r) for r in reqs]
    with pytest.raises(InfLLMLiteError, match=r"more than the engine's whole budget"):
        engine.submit(request(torch.randint(3, 49152, (5000,)).tolist(), "full"))
    admitted_order, most = [], 0
    while engine.has_work:
        engine.step()
        most = max(most, len(engine.running))
        admitted_order += [s.id for s in engine.running if s.id not in admitted_order]
        assert engine.reserved <= engine.memory_budget
    assert most == 2 and admitted_order == ids
    for p, req, i in zip(prompts, reqs, ids):
        seq = engine.pop(i)
        assert seq.finish_reason == "length" and seq.token_ids == alone(model, req).token_ids


@pytest.mark.parametrize("change,message", [
    (dict(prompt_ids=[]), "the prompt is empty"),
    (dict(prompt_ids=[1, 10**9]), "not in the vocabulary"),
    (dict(prompt_ids="hello"), "list of token ids"),
    (dict(sampling=SamplingOptions(temperature=-1.0)), "temperature must be >= 0"),
    (dict(sampling=SamplingOptions(top_p=0.0)), "top_p must be in"),
    (dict(sampling=SamplingOptions(top_k=-2)), "top_k must be >= 0"),
    (dict(sampling=SamplingOptions(seed="x")), "seed must be an integer"),
    (dict(attention="sparse"), "unknown attention mode 'sparse'"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(memory={"n_local": 4}), "memory must be a MemoryConfig"),
    (dict(stop="END"), "stop must be a list of strings"),
])
def test_a_bad_request_is_refused_alone_before_any_work(tiny, change, message):
    model, tok = tiny
    engine = Engine(model, tok, attention_kernel=KERNEL)
    good = engine.submit(request([7, 8, 9] * 10, "infllm"))
    fields = {**dict(prompt_ids=[7, 8, 9], max_new_tokens=6, attention="infllm", stop_token_ids=NO_STOP,
                     memory=TINY_MEMORY), **change}
    with pytest.raises(InfLLMLiteError, match=message):
        engine.submit(Request(**fields))
    assert len(engine.waiting) == 1 and engine.reserved == 0  # nothing queued, nothing allocated
    list(engine.events())
    assert engine.pop(good).token_ids == alone(model, request([7, 8, 9] * 10, "infllm")).token_ids


def test_engine_options_are_checked(tiny):
    model, _ = tiny
    for kw, message in ((dict(memory_budget=0), "memory_budget"), (dict(step_tokens=-1), "step_tokens"),
                        (dict(max_sequences=1.5), "max_sequences"), (dict(attention_kernel="fast"), "fast")):
        with pytest.raises(InfLLMLiteError, match=message):
            Engine(model, **kw)


def test_generate_on_a_list_returns_each_prompts_own_text(tiny):
    """Strings, chat messages and ids of different lengths: the texts of their own
    generate() calls (greedy and seeded), streamed as (index, piece) pairs, with stats."""
    model, tok = tiny
    prompts = ["Once upon a time", [{"role": "user", "content": "Name a colour."}],
               tok.encode("The harbour at night " * 12), "A"]
    kw = dict(max_new_tokens=12, attention="infllm", memory=TINY_MEMORY, attention_kernel=KERNEL)
    solo = [generate(model, tok, p, **kw) for p in prompts]
    texts, stats = generate(model, tok, prompts, return_stats=True, step_tokens=16, **kw)
    assert texts == solo
    assert stats.sequences[0].prompt_tokens == len(tok.encode(prompts[0]))
    assert stats.sequences[2].prompt_tokens == len(prompts[2])
    assert sum(s.new_tokens for s in stats.sequences) == stats.engine.decode_tokens
    assert stats.engine.max_batch >= 2 and "sequences" in stats.summary()
    pairs = list(generate(model, tok, prompts, stream=True, **kw))
    assert sorted(i for i, piece in pairs if piece == "") == list(range(len(prompts)))  # one end each
    assert all(j != i for n, (i, piece) in enumerate(pairs) if piece == "" for j, _ in pairs[n + 1:])
    assert ["".join(p for j, p in pairs if j == i) for i in range(len(prompts))] == solo
    seeded = dict(kw, temperature=1.0, seed=11)
    assert generate(model, tok, prompts, **seeded) == [generate(model, tok, p, **seeded) for p in prompts]
    with pytest.raises(InfLLMLiteError, match=r"prompt 1: the prompt is empty"):
        generate(model, tok, ["fine", "  "], **kw)
    with pytest.raises(InfLLMLiteError, match=r"list of prompts only"):
        generate(model, tok, "one prompt", step_tokens=4)


def test_a_failed_step_loses_no_sequence_it_finished(tiny, monkeypatch):
    """A step that raises after it finished a sequence (here: the next sequence's sampling
    fails): that end is reported by the next step, after ``close`` cancels the rest, so
    every sequence ends exactly once and can be collected (a server's client is told)."""
    model, _ = tiny
    engine = Engine(model, attention_kernel=KERNEL)
    done = engine.submit(request(range(5, 12), "full", new=1))  # ends at its first token
    failing = engine.submit(request(range(20, 30), "full", new=4))
    engine.step()  # reads both prompts (nobody decodes yet)
    sampled = Engine._sampled

    def sampled_or_fail(self, seq, logits):
        if seq.id == failing:
            raise RuntimeError("injected")
        return sampled(self, seq, logits)

    monkeypatch.setattr(Engine, "_sampled", sampled_or_fail)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    assert engine.sequences[done].status == "finished"
    engine.close()
    ends = [(e.seq_id, e.finish_reason) for e in engine.step() if e.finish_reason is not None]
    assert sorted(ends) == sorted([(done, "length"), (failing, "cancelled")])
    assert engine.pop(done).token_ids and not engine.has_work and engine.reserved == 0
    assert engine.step() == []  # reported once
