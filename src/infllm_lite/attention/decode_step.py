"""InfLLM's attention for one query of one sequence (a decode step): SPEC §4 without tiles.

A single query at position ``i`` sees, in the slot array (:mod:`.slots`), the contiguous
slots ``[0, last)`` (the initial tokens, then the tail up to and including its own token:
increasing positions) and the selected blocks. Of ``[0, last)`` the last ``n_local`` slots
are local and every slot before them is far: with no block formed the slots hold the
positions ``0 … i`` without a gap; once one is, the tail holds at least ``n_local + 1``
tokens (a block forms only when its newest token is ``n_local`` behind the last token
processed), so the local window lies inside it and the initial tokens and the pending
remainder are exactly the slots before it. The blocks are always far.

So the joint softmax is three small matmuls of logits (the far prefix with the query at
``n_local - 1`` against un-rotated keys, the local window with the query at its position
against rotated keys, the blocks with the far query) and two of values (the slots
``[0, last)`` in one, their far and local parts being adjacent, and the blocks): no masks,
no padding, no position tensors, no compiled graph (shapes follow the step).

The selected blocks are read from :class:`SelectedBlocks`, a copy of the blocks of the
current selection side by side, which a step changes only where its selection differs
from the previous step's (a block's keys and values never change once formed): no gather
of the pool's slots per step.
"""

from __future__ import annotations

import math

import torch


def one_query_attention(q_loc: torch.Tensor, q_far: torch.Tensor, k_rot: torch.Tensor, k_raw: torch.Tensor,
                        v: torch.Tensor, split: int, last: int, block_k: torch.Tensor | None,
                        block_v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention of one query per head, one sequence.

    q_loc/q_far: (Hkv, G, d) the query rotated at its position / at ``n_local - 1``,
    grouped by KV head; k_rot/k_raw/v: (Hkv, S, d) one sequence's slot arrays: slots
    ``[0, split)`` are far, ``[split, last)`` local; block_k/block_v: (Hkv, K, d) the
    selected blocks' keys and values, or None. Returns the output (Hkv, G, d) and the
    probabilities of the one joint softmax (Hkv, G, last [+ K]): column j < last is slot
    j (far below ``split``, local from there), then the blocks' keys in order."""
    parts = []
    if split:
        parts.append(torch.bmm(q_far, k_raw[:, :split].transpose(1, 2)))
    parts.append(torch.bmm(q_loc, k_rot[:, split:last].transpose(1, 2)))
    if block_k is not None:
        parts.append(torch.bmm(q_far, block_k.transpose(1, 2)))
    logits = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # (Hkv, G, last [+ K])
    p = torch.softmax(logits.mul_(1.0 / math.sqrt(q_loc.shape[-1])), dim=-1)
    out = torch.bmm(p[..., :last], v[:, :last])
    if block_k is not None:
        out = torch.baddbmm(out, p[..., last:], block_v)
    return out, p


class SelectedBlocks:
    """The keys and values of one sequence's selected blocks, side by side: position j
    (``block_size`` slots) holds block ``blocks[j]``. :meth:`update` makes positions
    ``[0, k)`` hold a selection of k blocks, copying from the pool's fast tier slot_k /
    slot_v (Hkv, n_slots, block_size, d) only the blocks that were not already there.
    ``store``: the (Hkv, topk, block_size, d) keys and values to keep them in (an arena
    row's), else tensors of its own."""

    def __init__(self, n_kv_heads: int, topk: int, block_size: int, head_dim: int, device: torch.device,
                 slot_k: torch.Tensor, slot_v: torch.Tensor,
                 store: tuple[torch.Tensor, torch.Tensor] | None = None):
        if store is None:  # else (k, v) given: zeros of that shape (an arena row's)
            k = torch.zeros(n_kv_heads, topk, block_size, head_dim, device=device)
            store = k, torch.zeros_like(k)
        self.k, self.v = store
        self.slot_k, self.slot_v = slot_k, slot_v
        self.blocks = [-1] * topk
        self._flat = {}  # k -> the first k positions' keys and values (Hkv, k·block_size, d)

    def update(self, selection: list[int], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[0, len(selection))`` hold the selected blocks (in any order), block
        ``selection[i]`` copied from fast-tier slot ``slots[i]`` if it is not there yet.
        Returns their keys and values (Hkv, k·block_size, d)."""
        n, blocks = len(selection), self.blocks
        if blocks[:n] != selection:
            wanted, held = set(selection), set(blocks[:n])
            free = [j for j in range(n) if blocks[j] not in wanted]
            for b, s in zip(selection, slots):
                if b not in held:
                    j = free.pop()
                    self.k.select(1, j).copy_(self.slot_k.select(1, s))
                    self.v.select(1, j).copy_(self.slot_v.select(1, s))
                    blocks[j] = b
        if n not in self._flat:
            self._flat[n] = self.k[:, :n].flatten(1, 2), self.v[:, :n].flatten(1, 2)
        return self._flat[n]
