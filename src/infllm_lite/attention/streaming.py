"""StreamingLLM attention: ``n_init`` sink tokens + the last ``n_local`` tokens (SPEC §8).

The rule, for a query at absolute position ``i``:

* visible keys: the sinks ``j < n_init`` (``j <= i``) and the window keys ``j >= n_init``
  with ``0 <= i - j < n_local`` (a sink inside the window is seen once, as a sink);
  everything older is dropped for good;
* positions are re-assigned inside the cache: the query sits at
  ``p_i = min(i, n_init + n_local - 1)``, a window key ``j`` at ``p_i - (i - j)`` (true
  relative distance), a sink ``j`` at ``j``. Up to ``n_init + n_local`` tokens this is
  ordinary causal attention at true positions;
* one softmax (scale ``1/√d``, float32) over sinks and window (computed in place on the
  two score blocks, never concatenated); GQA: query head ``h`` reads
  KV head ``h // (H / Hkv)``.

Memory (per layer, preallocated once, never grows): keys/values are stored un-rotated in

* a sink buffer of ``n_init`` slots (token ``j < n_init`` in slot ``j``);
* a **ring** of ``R = n_local - 1`` slots for the past window (token ``j >= n_init`` in slot
  ``(j - n_init) % R``): between calls it holds the last ``R`` non-sink tokens, all that a
  later query can still see (its own token comes with its call). A call writes only its
  own last ``R`` tokens into the ring (``index_copy_``, after attending), so a decode step
  costs one slot write, not a copy of the window. Slot order does not matter: each slot's
  absolute position is computed from the host-side length, and an unfilled slot gets a
  position ``< n_init`` that the window mask rejects.

Rotation: RoPE logits depend only on the difference of the two positions, so a slice of
queries starting at ``a`` rotates its window part by one common offset ``c = a - p_a``
(query at ``i - c``, key at ``j - c``: the true distance ``i - j``, angles stay below
``n_init + 2·n_local``), and its sink part at the re-assigned positions (query at ``p_i``,
sink at ``j``). The call's queries are processed in slices of ``SLICE_ROWS`` (at most
``n_local``): a slice of ``Q`` queries materialises the scores of the sinks, the ring
when it reaches back before the call (``n_local - 1``) and the call's keys it can see
(``n_local - 1 + Q`` at most) per head.
Everything a call needs besides the tensors (positions, masks, rotations, ring indices) is
computed once per call from host-side ints and shared by all layers: no host
synchronisation inside ``attend``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..config import ModelArgs
from ..memory_config import MemoryConfig
from ..rope import RotaryEmbedding, apply_rope
from .base import AttentionState, LayerAttention, copy_into, storage_dtype


SLICE_ROWS = 64  # queries per slice, at most n_local (measured, embedded model at 8K: 64 rows
# 301 prefill tok/s, 128 rows 282, 512 rows 216: a slice's scores stay in cache)


@dataclass
class _Slice:
    """One slice of a call's queries (offsets relative to the call's first token)."""

    start: int
    stop: int
    use_ring: bool  # whether the ring (the past window) can be visible to this slice
    new_lo: int  # this call's non-sink keys [new_lo, new_hi) in the slice's window
    new_hi: int
    q_sink_rope: tuple[torch.Tensor, torch.Tensor]  # queries at p_i
    q_win_rope: tuple[torch.Tensor, torch.Tensor]  # queries at i - c
    k_win_rope: tuple[torch.Tensor, torch.Tensor]  # window keys (ring, then new) at j - c
    sink_hidden: torch.Tensor  # (Q, n_sinks): True where a key is invisible
    win_hidden: torch.Tensor  # (Q, window keys)
    # LM-Infinite (:mod:`.lm_infinite`): the sink logits of pairs at distance >= the cap are
    # taken at the cap (query at the cap, sink un-rotated); None when no pair of the slice is
    sink_capped: torch.Tensor | None = None  # (Q, n_sinks) True where the distance is capped
    q_cap_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # the queries at the cap


@dataclass
class _CallPlan:
    """What every layer needs for one call of T tokens at absolute position L."""

    call_sinks: int  # how many of the call's first tokens are sinks
    n_sinks: int  # valid sink slots once this call's sinks are written
    sink_rope: tuple[torch.Tensor, torch.Tensor]  # sinks at their own positions
    slices: list[_Slice]
    ring_src: int  # offset in the call of the first token written to the ring
    ring_index: torch.Tensor | None  # ring slots of the call's tokens [ring_src, T)


def _masked_scores(q: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """q (B, Hkv, G, Q, d) @ keys (B, Hkv, S, d) → (B, Hkv, G·Q, S): the G query heads of a
    kv head side by side, so keys are never expanded; ``hidden`` (Q, S) keys get -inf."""
    B, Hkv, G, Q, d = q.shape
    scores = q.reshape(B, Hkv, G * Q, d) @ keys.transpose(-1, -2)
    scores.view(B, Hkv, G, Q, -1).masked_fill_(hidden, float("-inf"))
    return scores


class StreamingLayerAttention(LayerAttention):
    """One layer's sinks and window ring (see the module docstring)."""

    def __init__(self, state: "StreamingState", args: ModelArgs):
        self.state = state
        B, Hkv, d = state.batch_size, args.n_kv_heads, args.head_dim
        zeros = dict(dtype=state.kv_dtype, device=state.device)
        self.k_sink = torch.zeros((B, Hkv, state.n_init, d), **zeros)  # un-rotated
        self.v_sink = torch.zeros((B, Hkv, state.n_init, d), **zeros)
        self.k_ring = torch.zeros((B, Hkv, state.ring_size, d), **zeros)  # un-rotated
        self.v_ring = torch.zeros((B, Hkv, state.ring_size, d), **zeros)

    def attend(self, q, k, v, positions, cos, sin, rope):
        B, H, T, d = q.shape
        Hkv = k.shape[1]
        plan = self.state.plan(T, rope)
        store = self.state.kv_dtype
        k, v = k.to(store), v.to(store)  # as stored: a key reads the same in its own call and later
        if plan.call_sinks:  # visible to the call's own later queries: store them first
            L, m = self.state.length, plan.call_sinks
            self.k_sink[:, :, L:L + m] = k[:, :, :m]
            self.v_sink[:, :, L:L + m] = v[:, :, :m]
        n_s = plan.n_sinks
        raw_sinks = self.k_sink[:, :, :n_s].float()  # (B, Hkv, n_s, d) un-rotated
        k_sinks = apply_rope(raw_sinks, *plan.sink_rope)  # at their positions
        v_sinks = self.v_sink[:, :, :n_s].float()
        G = H // Hkv  # query head h reads kv head h // G: the G heads of a kv head side by side
        qf = q.float().view(B, Hkv, G, T, d) / math.sqrt(d)
        outs = []
        for s in plan.slices:
            qs = qf[..., s.start:s.stop, :]  # (B, Hkv, G, Q, d)
            parts = []  # (scores, values) of the sinks and of the window
            if n_s:
                parts.append((self._sink_scores(qs, s, k_sinks, raw_sinks), v_sinks))
            if s.use_ring or s.new_hi > s.new_lo:  # (no window keys when the slice holds only sinks)
                keys, values = [k[:, :, s.new_lo:s.new_hi]], [v[:, :, s.new_lo:s.new_hi]]
                if s.use_ring:
                    keys.insert(0, self.k_ring)
                    values.insert(0, self.v_ring)
                k_win = apply_rope(torch.cat(keys, 2).float(), *s.k_win_rope)  # (B, Hkv, S, d)
                parts.append((_masked_scores(apply_rope(qs, *s.q_win_rope), k_win, s.win_hidden),
                              torch.cat(values, 2).float()))
            # one softmax over sinks and window, in place on the two score blocks (no concatenation)
            peak = functools.reduce(torch.maximum, [scores.amax(-1, keepdim=True) for scores, _ in parts])
            total, out = 0, 0
            for scores, values in parts:
                weights = scores.sub_(peak).exp_()
                total = total + weights.sum(-1, keepdim=True)
                out = out + weights @ values
            outs.append((out / total).view(B, Hkv, G, -1, d))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
        if plan.ring_index is not None:  # after attending: the slots may still be read above
            self.k_ring.index_copy_(2, plan.ring_index, k[:, :, plan.ring_src:])
            self.v_ring.index_copy_(2, plan.ring_index, v[:, :, plan.ring_src:])
        return out.reshape(B, H, T, d).to(q.dtype)

    @staticmethod
    def _sink_scores(qs: torch.Tensor, s: _Slice, k_sinks: torch.Tensor, raw_sinks: torch.Tensor) -> torch.Tensor:
        """The slice's scores (B, Hkv, G·Q, n_s) of the sinks, k_sinks rotated at their
        positions, raw_sinks un-rotated: the queries at their re-assigned positions; where
        the plan caps a pair's distance (LM-Infinite), the query at the cap against the
        un-rotated sink."""
        scores = _masked_scores(apply_rope(qs, *s.q_sink_rope), k_sinks, s.sink_hidden)
        if s.sink_capped is None:
            return scores
        capped = _masked_scores(apply_rope(qs, *s.q_cap_rope), raw_sinks, s.sink_hidden)
        B, Hkv, G = qs.shape[:3]
        return torch.where(s.sink_capped, capped.view(B, Hkv, G, *s.sink_capped.shape),
                           scores.view(B, Hkv, G, *s.sink_capped.shape)).view_as(scores)

    def _held(self) -> tuple[int, int]:
        """(sink slots, ring slots) in use after ``state.length`` tokens (the ring fills
        from slot 0 until it wraps)."""
        n, state = self.state.length, self.state
        return min(state.n_init, n), min(state.ring_size, max(0, n - state.n_init))

    def export(self):
        """Only the slots in use: a short conversation's snapshot is as small as it."""
        sinks, ring = self._held()
        return {"k_sink": self.k_sink[:, :, :sinks], "v_sink": self.v_sink[:, :, :sinks],
                "k_ring": self.k_ring[:, :, :ring], "v_ring": self.v_ring[:, :, :ring]}, {}

    def restore(self, tensors, meta):
        sinks, ring = self._held()
        for name, used in (("k_sink", sinks), ("v_sink", sinks), ("k_ring", ring), ("v_ring", ring)):
            copy_into(getattr(self, name)[:, :, :used], tensors[name], name)


class StreamingState(AttentionState):
    """Sinks + window ring of every layer for one generation (batch sequences in step)."""

    distance_cap: int | None = None  # LM-Infinite's cap on a sink's distance (None: StreamingLLM's positions)

    def __init__(self, args: ModelArgs, memory: MemoryConfig, *, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.n_init, self.n_local = memory.n_init, memory.n_local
        self.ring_size = memory.n_local - 1  # past window tokens kept between calls
        self.batch_size, self.dtype = batch_size, dtype
        self.kv_dtype = storage_dtype(memory, dtype)  # the sinks' and window's store
        self.device = torch.device(device)
        self.length = 0
        self._plan_key: tuple[int, int] | None = None
        self._plan: _CallPlan | None = None
        self.layers = [StreamingLayerAttention(self, args) for _ in range(args.n_layers)]

    def plan(self, n_tokens: int, rope: RotaryEmbedding) -> _CallPlan:
        """The call's plan, made by the first layer and reused by the others."""
        key = (self.length, n_tokens)
        if self._plan_key != key:
            self._plan = self._make_plan(self.length, n_tokens, rope)
            self._plan_key = key
        return self._plan

    def _make_plan(self, L: int, T: int, rope: RotaryEmbedding) -> _CallPlan:
        n_init, n_local, R, dev = self.n_init, self.n_local, self.ring_size, self.device
        top = n_init + n_local - 1  # the highest re-assigned query position
        end = L + T

        def arange(lo: int, hi: int) -> torch.Tensor:
            return torch.arange(lo, hi, device=dev)

        def rot(pos: torch.Tensor):
            return rope(pos, torch.float32)

        n_sinks = min(n_init, end)
        sink_pos = arange(0, n_sinks)
        has_ring = R > 0 and L > n_init  # the ring holds at least one token
        ring_pos = None
        if has_ring:  # absolute position held by each slot (< n_init if never filled)
            ring_pos = (L - 1) - torch.remainder((L - 1 - n_init) - arange(0, R), R)

        slices = []
        rows = min(n_local, SLICE_ROWS)
        for a in range(L, end, rows):
            b = min(a + rows, end)
            c = a - min(a, top)  # common shift of the slice's window part
            i = arange(a, b)
            use_ring = has_ring and a - n_local + 1 < L
            lo, hi = max(L, n_init, a - n_local + 1), b
            new_pos = arange(lo, max(lo, hi))
            win_pos = torch.cat([ring_pos, new_pos]) if use_ring else new_pos
            dist = i[:, None] - win_pos[None, :]
            win_mask = (dist >= 0) & (dist < n_local) & (win_pos >= n_init)[None, :]
            sink_mask = sink_pos[None, :] <= i[:, None]
            sink_capped = q_cap_rope = None
            if self.distance_cap is None:
                q_sink_rope = rot(i.clamp(max=top))
            else:  # true positions below the cap, the cap itself from there
                q_sink_rope = rot(i)
                if b - 1 >= self.distance_cap:  # the slice's last query and sink 0 (host ints: no sync)
                    sink_capped = i[:, None] - sink_pos[None, :] >= self.distance_cap  # (Q, n_sinks)
                    q_cap_rope = rot(torch.full_like(i, self.distance_cap))
            slices.append(_Slice(start=a - L, stop=b - L, use_ring=use_ring, new_lo=lo - L,
                                 new_hi=max(lo, hi) - L, q_sink_rope=q_sink_rope,
                                 q_win_rope=rot(i - c), k_win_rope=rot(win_pos - c),
                                 sink_hidden=~sink_mask, win_hidden=~win_mask,
                                 sink_capped=sink_capped, q_cap_rope=q_cap_rope))

        ring_first = max(L, n_init, end - R)
        ring_index = None
        if R > 0 and ring_first < end:
            ring_index = torch.remainder(arange(ring_first, end) - n_init, R)
        return _CallPlan(call_sinks=max(0, n_sinks - L),
                         n_sinks=n_sinks, sink_rope=rot(sink_pos), slices=slices,
                         ring_src=ring_first - L, ring_index=ring_index)
