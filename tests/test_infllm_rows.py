"""InfLLM decode steps of several sequences whose memories are rows of one arena bank
(attention/infllm_rows.py) held to each sequence's own one-query step on a memory of its
own: outputs, tail scores, block counts, selections and pool residency, over sequences
of different lengths (before the first block, with blocks, beyond the top-k) that join
and leave the batch at any step, ``lru`` and ``lru-s``, blocks on disk.

Near-ties among a block's representative scores are rejected (``assume``) as in
tests/test_infllm_decode_step.py: the batched sums round differently.
"""

from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from infllm_lite.attention.base import attend_in_calls
from infllm_lite.attention.infllm import InfLLMLayerAttention, InfLLMState
from infllm_lite.attention.kv_arena import Arena
from infllm_lite.memory_config import MemoryConfig
from infllm_lite.rope import RotaryEmbedding

from test_infllm_decode_step import Watch, model_args
from test_infllm_layer import one_thread  # noqa: F401  (an autouse fixture)

KERNEL = "window-eager"


def near_tie_refused():
    raise AssertionError("a representative near-tie in a fixed example: choose another seed")


def check_rows(lengths, schedule, cfg, H=4, Hkv=2, d=8, seed=0, on_near_tie=near_tie_refused):
    """Sequences of prompt ``lengths`` read alone, then decode steps: step t decodes the
    sequences ``schedule[t]`` together (rows of one bank) and the same tokens on twins of
    their own, one at a time. Returns the number of batched steps."""
    args = model_args(H, Hkv, d)
    rope = RotaryEmbedding(args)
    arena = Arena(1, "cpu")
    rows = [InfLLMState.in_arena(arena, args, cfg, kernel=KERNEL) for _ in lengths]
    twins = [InfLLMState(args, cfg, kernel=KERNEL) for _ in lengths]
    watches = [Watch(twin.layers[0]) for twin in twins]
    for state in rows + twins:
        state.record = True
    gen = torch.Generator().manual_seed(seed)

    def qkv(n):
        return (torch.randn(1, H, n, d, generator=gen), torch.randn(1, Hkv, n, d, generator=gen),
                torch.randn(1, Hkv, n, d, generator=gen))

    for row, twin, n in zip(rows, twins, lengths):
        if n:
            q, k, v = qkv(n)
            calls = [min(5, n)] + ([n - 5] if n > 5 else [])
            torch.testing.assert_close(attend_in_calls(row, q, k, v, calls, rope),
                                       attend_in_calls(twin, q, k, v, calls, rope), atol=0, rtol=0)
    batched = 0
    for members in schedule:
        parts = [qkv(1) for _ in members]
        q, k, v = (torch.cat(x) for x in zip(*parts))
        layers = [rows[b].layers[0] for b in members]
        out = InfLLMLayerAttention.attend_many(layers, q, k, v, None, None, None, rope)
        batched += len(members) > 1
        for j, b in enumerate(members):
            alone = twins[b].layers[0].attend(*parts[j], None, None, None, rope)
            rows[b].advance(1)
            twins[b].advance(1)
            if watches[b].near_tie:
                on_near_tie()
            torch.testing.assert_close(out[j:j + 1], alone, atol=1e-5, rtol=1e-5)
    for row, twin in zip(rows, twins):
        a, b = row.layers[0], twin.layers[0]
        assert a.n_blocks == b.n_blocks
        assert [(s, e) for s, e, _ in a.trace] == [(s, e) for s, e, _ in b.trace]
        for (_, _, x), (_, _, y) in zip(a.trace, b.trace):
            assert torch.equal(x, y)  # the same blocks selected at every step
        assert a.pool.resident() == b.pool.resident()
        torch.testing.assert_close(a.tail_scores, b.tail_scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.k_raw, b.k_raw, atol=0, rtol=0)
        torch.testing.assert_close(a.v, b.v, atol=0, rtol=0)
    bank = rows[0].row.bank
    for state in rows + twins:
        state.close()
    assert len(bank.free) == bank.rows  # every row given back
    return batched


CFG = MemoryConfig(n_init=4, n_local=16, block_size=4, topk=2, repr_topk=2, exc_block_size=8,
                   max_cached_blocks=3)


def test_rows_decode_as_each_alone_through_block_formation_and_selection():
    """Six sequences from empty to well past the top-k, all in every step for 30 steps."""
    lengths = [0, 1, 3, 17, 40, 70]
    assert check_rows(lengths, [list(range(6))] * 30, CFG) == 30


def test_rows_with_lru_s_and_blocks_on_disk(tmp_path):
    cfg = MemoryConfig(**{**CFG.to_dict(), "cache_policy": "lru-s", "max_host_bytes": 256,
                          "offload_dir": str(tmp_path)})
    assert check_rows([2, 25, 60], [[0, 1, 2], [2, 0], [1, 2]] * 8, cfg) == 24


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 60), min_size=2, max_size=5),
       picks=st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=1, max_size=14),
       seed=st.integers(0, 2**16))
def test_rows_join_and_leave_at_any_step(lengths, picks, seed):
    """Any sequences decode together at any step (some steps alone, some not at all)."""
    schedule = [[b for b in range(len(lengths)) if pick[b]] for pick in picks]
    schedule = [members for members in schedule if members]
    assume(schedule)
    check_rows(lengths, schedule, CFG, seed=seed, on_near_tie=lambda: assume(False))


def test_a_memory_writes_no_block_pool_slot_before_its_first_block():
    """An arena row is backed by memory only where written: a prompt that forms no block
    leaves the pool's slots (most of the row) untouched, all zeros; the first block lands there."""
    args, cfg = model_args(4, 2, 8), CFG
    rope, g = RotaryEmbedding(args), torch.Generator().manual_seed(0)
    state = InfLLMState.in_arena(Arena(1, "cpu"), args, cfg, kernel=KERNEL)
    lay, layer = state.layout, state.layers[0]

    def pool_written() -> bool:
        return any(bool(x[:, :, lay.pool_slot:lay.pool_end].any()) for x in (layer.k_rot, layer.k_raw, layer.v))

    def read(n):
        q, k, v = (torch.randn(1, h, n, 8, generator=g) for h in (4, 2, 2))
        attend_in_calls(state, q, k, v, [n], rope)

    read(cfg.n_init + cfg.n_local)  # everything still initial or local
    assert layer.n_blocks == 0 and not pool_written()
    read(2 * cfg.exc_block_size)
    assert layer.n_blocks > 0 and pool_written()
