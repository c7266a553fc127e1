"""Sequences at different lengths, each with its own attention memory, presented to the
model as one batch: the projections, MLP, norms and LM head run once over the batch
(one ``(B, 1, dim)`` pass), and each layer's attention goes to each sequence's memory.

A :class:`RaggedBatch` is an :class:`~.base.AttentionState` look-alike for one model step:
``positions`` are (B, T), one row per sequence, and layer ``i``'s ``attend`` hands row
``b`` of its queries, keys and values (with row ``b``'s positions and angles) to
sequence ``b``'s own layer ``i``. The memories may be of any mode and configuration, at
any lengths, with any number of blocks.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import AttentionState, LayerAttention


class RaggedLayer(LayerAttention):
    """Layer ``index`` of every sequence in the batch (no reference back to the batch: no
    cycle keeps the memories alive after the step). The sequences whose memories are of one
    kind go to that kind's :meth:`~.base.LayerAttention.attend_many` together."""

    state = None

    def __init__(self, states: list[AttentionState], index: int):
        self.states, self.index = states, index
        kinds: dict[type, list[int]] = {}
        for b, state in enumerate(states):
            kinds.setdefault(type(state.layers[index]), []).append(b)
        self.groups = [(kind, rows, torch.tensor(rows)) for kind, rows in kinds.items()]

    def attend(self, q, k, v, positions, cos, sin, rope):
        """q: (B, H, T, d), k/v: (B, Hkv, T, d), positions: (B, T), cos/sin: (B, T, d)."""
        layers = [state.layers[self.index] for state in self.states]
        if len(self.groups) == 1:
            return self.groups[0][0].attend_many(layers, q, k, v, positions, cos, sin, rope)
        out = torch.empty_like(q)  # (B, H, T, d)
        for kind, rows, index in self.groups:
            index = index.to(q.device)
            out[index] = kind.attend_many([layers[b] for b in rows], q[index], k[index], v[index],
                                          positions[index], cos[index], sin[index], rope)
        return out


class RaggedBatch:
    """One step over the memories ``states`` (each of batch size 1), the same number of
    new tokens for each: ``model.step(ids, batch.positions(T), batch)`` then
    ``batch.advance(T)``."""

    def __init__(self, states: Sequence[AttentionState], n_layers: int):
        self.states = list(states)
        self.layers = [RaggedLayer(self.states, i) for i in range(n_layers)]

    def positions(self, n_tokens: int) -> torch.Tensor:
        """(B, n_tokens): each sequence's next positions."""
        return torch.stack([state.positions(n_tokens) for state in self.states])

    def advance(self, n_tokens: int) -> None:
        for state in self.states:
            state.advance(n_tokens)
