"""The slot-array vocabulary both InfLLM kernels share (see :mod:`.infllm`).

A layer's keys live in one slot array of static length S: the initial tokens, the tail
(pending remainder, local window, current chunk), the block pool's fast-tier slots and,
last, one sentinel slot. Every slot has an absolute position; these constants are the
positions that mean "no real token here", and the tile size the slot layout is aligned
to. :func:`compiled_once` is the one cache of compiled kernels.
"""

from __future__ import annotations

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
