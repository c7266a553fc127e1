"""The slot-array vocabulary both InfLLM kernels share (see :mod:`.infllm`).

A layer's keys live in one slot array of static length S: the initial tokens, the tail
(pending remainder, local window, current chunk), the block pool's fast-tier slots and,
last, one sentinel slot. Every slot has an absolute position; these constants are the
positions that mean "no real token here", the tile size the layout is aligned to, and
:class:`SlotLayout`, where each region starts. :func:`compiled_once` is the one cache of
compiled kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLEX_BLOCK = 128  # FlexAttention's sparse block size: one BlockMask entry per 128 × 128 tile
FAR = -(1 << 40)  # position of selected-block slots: far from every query
EMPTY = 1 << 40  # position of unused slots: in every query's future, so never seen
PAD_QUERY = -(1 << 41)  # position of padding query rows: sees nothing but the sentinel

_COMPILED: dict[str, object] = {}


def compiled_once(name: str, fn):
    """``fn`` compiled once per process (static shapes and flags: one graph each)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


@dataclass(frozen=True)
class SlotLayout:
    """Where everything lives in one layer's slot array, fixed for a whole generation:

    * ``[0, n_init)``: the initial tokens;
    * the tail ``[tail_slot, local_end)``: every later token not yet in a block (pending
      remainder + local window + current chunk), ``tail_capacity`` slots, never exceeded;
    * the block pool's fast-tier slots ``[pool_slot, pool_end)``, ``n_pool`` blocks,
      starting on a tile so that whole blocks of 128 are whole tiles;
    * the last slot ``n_slots - 1``: the sentinel.
    """

    n_init: int
    n_local: int
    block_size: int
    exc_block_size: int
    topk: int
    group: int  # query heads per KV head
    batch_size: int
    tail_slot: int
    tail_capacity: int
    local_end: int
    n_pool: int
    pool_slot: int
    pool_end: int
    n_slots: int

    @classmethod
    def build(cls, config, *, batch_size: int, group: int) -> "SlotLayout":
        """The layout of a ``MemoryConfig``; every sequence's top-k must fit in the pool."""
        tail_capacity = config.n_local + config.block_size + config.exc_block_size
        local_end = config.n_init + tail_capacity
        n_pool = max(config.max_cached_blocks, batch_size * config.topk, 1)
        pool_slot = -(-local_end // FLEX_BLOCK) * FLEX_BLOCK
        pool_end = pool_slot + n_pool * config.block_size
        return cls(config.n_init, config.n_local, config.block_size, config.exc_block_size,
                   config.topk, group, batch_size, config.n_init, tail_capacity, local_end,
                   n_pool, pool_slot, pool_end, pool_end + 1)

    def slot_positions(self, end: int, tail_start: int, device: torch.device) -> torch.Tensor:
        """(n_slots,) absolute position of every slot once the tokens before ``end`` are
        stored and the tail starts at ``tail_start``: unused and pool slots ``EMPTY``."""
        k_pos = torch.full((self.n_slots,), EMPTY, dtype=torch.long, device=device)
        n_init_seen = min(self.n_init, end)
        k_pos[:n_init_seen] = torch.arange(n_init_seen, device=device)
        used = max(0, end - tail_start)
        k_pos[self.tail_slot:self.tail_slot + used] = torch.arange(tail_start, tail_start + used, device=device)
        return k_pos
