"""The engine's KV arena: full-attention caches as rows of shared banks, attended in one
batched product per bank, against each cache attended alone (the batch-1 decode path);
rows by capacity class; a freed row's pages given back (it reads zeros)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infllm_lite.attention.full import FullAttentionState
from infllm_lite.attention.kv_arena import MIN_CAPACITY, Arena, capacity_class
from infllm_lite.attention.ragged import RaggedLayer
from infllm_lite.config import ModelArgs
from infllm_lite.engine import Engine, Request
from infllm_lite.rope import RotaryEmbedding

ARGS = ModelArgs(vocab_size=64, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8,
                 intermediate_size=32)
NO_STOP = frozenset()


def filled(state: FullAttentionState, n: int, g: torch.Generator) -> FullAttentionState:
    """``state`` with ``n`` random rotated keys/values in every layer."""
    for layer in state.layers:
        layer.k[:, :, :n] = torch.randn(layer.k[:, :, :n].shape, generator=g)
        layer.v[:, :, :n] = torch.randn(layer.v[:, :, :n].shape, generator=g)
    state.length = n
    return state


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 1500), min_size=2, max_size=7),
       holes=st.lists(st.booleans(), min_size=7, max_size=7),
       private=st.lists(st.booleans(), min_size=7, max_size=7), seed=st.integers(0, 2**16))
def test_a_decode_step_over_banked_rows_equals_each_cache_alone(lengths, holes, private, seed):
    """Rows of one bank and of several (capacity classes), rows left out of the step
    between them, caches of their own: each sequence's output equals its cache's own
    decode (one query, the CPU flash kernel) within 1e-5, and each new key lands in its
    own row at its own position."""
    g = torch.Generator().manual_seed(seed)
    arena = Arena(ARGS.n_layers, "cpu")
    states, twins, skipped = [], [], []
    for n, hole, own in zip(lengths, holes, private):
        capacity = n + 1 if n < 700 else 2 * MIN_CAPACITY  # two capacity classes
        state = FullAttentionState(ARGS, capacity) if own else FullAttentionState.in_arena(
            arena, ARGS, capacity, torch.float32)
        filled(state, n, g)
        if hole and state.row is not None:
            skipped.append(state)  # holds a row inside the bank, not in this step
            continue
        twin = FullAttentionState(ARGS, capacity)
        for a, b in zip(twin.layers, state.layers):
            a.k.copy_(b.k[:, :, :capacity])
            a.v.copy_(b.v[:, :, :capacity])
        twin.length = n
        states.append(state)
        twins.append(twin)
    if not states:
        return
    B, layer = len(states), 1
    q = torch.randn(B, ARGS.n_heads, 1, ARGS.head_dim, generator=g)
    k = torch.randn(B, ARGS.n_kv_heads, 1, ARGS.head_dim, generator=g)
    v = torch.randn(B, ARGS.n_kv_heads, 1, ARGS.head_dim, generator=g)
    rope = RotaryEmbedding(ARGS)
    positions = torch.tensor([[s.length] for s in states])  # (B, 1)
    cos, sin = rope(positions.reshape(-1), torch.float32)
    cos, sin = cos.reshape(B, 1, -1), sin.reshape(B, 1, -1)
    out = RaggedLayer(states, layer).attend(q, k, v, positions, cos, sin, rope)
    for b, twin in enumerate(twins):
        alone = twin.layers[layer].attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], positions[b], cos[b], sin[b], rope)
        torch.testing.assert_close(out[b:b + 1], alone, atol=1e-5, rtol=1e-5)
        n = twin.length + 1
        torch.testing.assert_close(states[b].layers[layer].k[:, :, :n], twin.layers[layer].k[:, :, :n], atol=0, rtol=0)
    for state in states + skipped:
        state.close()


def test_rows_come_by_capacity_class_and_a_freed_row_reads_zeros():
    """Capacities share a bank by their power-of-two class; a bank opens when its class is
    full; a closed cache's row goes back to its bank with its pages returned (zeros)."""
    assert [capacity_class(c) for c in (1, 1024, 1025, 3000)] == [1024, 1024, 2048, 4096]
    arena = Arena(ARGS.n_layers, "cpu")

    def full(capacity):
        return FullAttentionState.in_arena(arena, ARGS, capacity, torch.float32)

    a, b = full(10), full(1500)
    assert a.row.bank is not b.row.bank and a.row.row == b.row.row == 0
    c = full(700)  # the row after a's; a's neighbour on both sides of its pages
    filled(a, 10, torch.Generator().manual_seed(0))
    filled(c, 700, torch.Generator().manual_seed(1))
    bank, row = a.row.bank, a.row.row
    kept = bank.slab(1, "k")[c.row.row].clone()
    assert bank.slab(1, "k")[row].abs().sum() > 0
    a.close()
    assert row in bank.free and bank.slab(1, "k")[row].abs().sum() == 0 and bank.slab(0, "v")[row].abs().sum() == 0
    assert torch.equal(bank.slab(1, "k")[c.row.row], kept)  # the neighbour untouched
    states = [full(5) for _ in range(bank.rows)]
    assert states[0].row.bank is bank and states[0].row.row == 0 and states[-1].row.bank is not bank
    for state in states + [b, c]:
        state.close()


def test_the_engine_banks_full_caches_and_decodes_them_as_alone(tiny):
    """Four full-attention requests in two capacity classes (two banks): batched greedy
    tokens and logits equal each run alone, and every row is free once they finish."""
    model, _ = tiny
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 900, 17)]

    def make(i):
        return Request(prompts[i], max_new_tokens=5, attention="full", stop_token_ids=NO_STOP,
                       keep_logits=True, capacity=2000 if i == 2 else None)

    engine = Engine(model, step_tokens=4096)
    ids = [engine.submit(make(i)) for i in range(4)]
    while engine.has_work:
        engine.step()
    together = [engine.pop(i) for i in ids]
    assert sorted(kind[1] for kind, _ in engine.arena.banks) == [1024, 2048]  # (("full", class), dtype)
    assert all(len(bank.free) == bank.rows for banks in engine.arena.banks.values() for bank in banks)
    for i, seq in enumerate(together):
        solo = Engine(model)
        sid = solo.submit(make(i))
        while solo.has_work:
            solo.step()
        alone = solo.pop(sid)
        assert seq.token_ids == alone.token_ids
        torch.testing.assert_close(torch.stack(seq.logits), torch.stack(alone.logits), atol=1e-4, rtol=0)
