"""Sequences at different lengths, each with its own attention memory, presented to the
model as one batch: the projections, MLP, norms and LM head run once over the batch
(one ``(B, 1, dim)`` pass), and each layer's attention goes to each sequence's memory.

A :class:`RaggedBatch` is an :class:`~.base.AttentionState` look-alike for one model step:
``positions`` are (B, T), one row per sequence, and layer ``i``'s ``attend`` hands row
``b`` of its queries, keys and values (with row ``b``'s positions and angles) to
sequence ``b``'s own layer ``i``. The memories may be of any mode and configuration, at
any lengths, with any number of blocks.

A :class:`PackedBatch` carries prompt chunks and decode rows in one call of one row
``(1, T)``: the engine's step while prompts are still being read, so the decoding
sequences advance with the chunk instead of in a second call.
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


class PackedLayer(LayerAttention):
    """Layer ``index`` of a :class:`PackedBatch`: each prompt chunk to its own memory's
    ``attend`` (exactly its batch-1 call), the one-token rows together through a
    :class:`RaggedLayer` (as a decode step)."""

    state = None

    def __init__(self, chunks: list[tuple[AttentionState, int, int]], rows: RaggedLayer | None,
                 rows_start: int, index: int):
        self.chunks, self.rows, self.rows_start, self.index = chunks, rows, rows_start, index

    def attend(self, q, k, v, positions, cos, sin, rope):
        """q: (1, H, T, d), k/v: (1, Hkv, T, d), positions: (T,), cos/sin: (T, d)."""
        out = torch.empty_like(q)  # (1, H, T, d)
        for state, a, b in self.chunks:
            out[:, :, a:b] = state.layers[self.index].attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                             positions[a:b], cos[a:b], sin[a:b], rope)
        if self.rows is not None:
            r = self.rows_start

            def one_each(x):  # (1, h, R, d) -> (R, h, 1, d): one query per sequence
                return x[0, :, r:].transpose(0, 1).unsqueeze(2)

            y = self.rows.attend(one_each(q), one_each(k), one_each(v), positions[r:, None],
                                 cos[r:, None], sin[r:, None], rope)  # (R, H, 1, d)
            out[0, :, r:] = y[:, :, 0].transpose(0, 1)
        return out


class PackedBatch:
    """One model call over prompt chunks of some memories and one new token of others, laid
    end to end in one row: ``model.step(ids, batch.positions(), batch, rows=batch.rows)``
    with ids (1, T) (each chunk's tokens, then the one-token rows), then ``batch.advance()``.
    The projections, MLP and norms run once over all T tokens (a decode row costs little
    beside a prompt chunk); only the rows' logits are computed."""

    def __init__(self, chunks: Sequence[tuple[AttentionState, int]], rows: Sequence[AttentionState],
                 n_layers: int):
        spans, start = [], 0
        for state, n in chunks:
            spans.append((state, start, start + n))
            start += n
        self.spans, self.row_states = spans, list(rows)
        self.rows = slice(start, start + len(self.row_states))  # the rows' positions in the call
        ragged = RaggedBatch(self.row_states, n_layers) if self.row_states else None
        self.layers = [PackedLayer(spans, None if ragged is None else ragged.layers[i], start, i)
                       for i in range(n_layers)]

    def positions(self) -> torch.Tensor:
        """(T,): each chunk's positions, then each row's next one."""
        parts = [state.positions(b - a) for state, a, b in self.spans]
        parts += [state.positions(1) for state in self.row_states]
        return torch.cat(parts)

    def advance(self) -> None:
        for state, a, b in self.spans:
            state.advance(b - a)
        for state in self.row_states:
            state.advance(1)
