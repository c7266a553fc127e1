"""InfLLM context memory (SPEC §3–§6): initial tokens, local window, memory blocks chosen
through representative vectors, pending remainder; one softmax over local and far keys.

Per layer the memory holds, all keys **un-rotated**:

* ``init_k/v``   (B, Hkv, n_init, d): tokens 0 … n_init-1;
* ``tail_k/v``   (B, Hkv, C, d): every later token not yet in a block (pending remainder
  + local window + the current execution chunk), from position ``tail_start`` on, with
  ``tail_scores`` (B, H, C) float32, the representative scores they collect while local;
* ``block_k/v``  (B, Hkv, N, block, d) and ``block_repr`` (B, N, H·d): formed blocks.

A model call is cut into execution chunks of ``exc_block_size`` queries. For a chunk the
layer (1) stores the chunk's keys, (2) selects the blocks (all if few, else top-k of
``q̄ · repr``), (3) attends: local keys at their true RoPE positions, far keys (initial,
selected blocks, pending remainder) with the query rotated at ``n_local - 1`` and the key
un-rotated, one softmax over both, (4) adds the local probabilities to the keys' scores,
(5) forms every block that left the window, vectorised over blocks. Every count used for
slicing (length, blocks, tail start) is a host-side integer derived from positions, so
nothing waits for the device; selections stay on the device.

This module is the plain-torch path: scores are materialised per chunk (exc × keys per
head), in float32.
"""

from __future__ import annotations

import math

import torch

from ..config import ModelArgs
from ..memory_config import MemoryConfig, n_formed_blocks
from ..models.rope import RotaryEmbedding, apply_rope
from .base import AttentionState, LayerAttention


class InfLLMLayerAttention(LayerAttention):
    """One layer's InfLLM memory."""

    def __init__(self, state: "InfLLMState", args: ModelArgs):
        cfg = state.config
        B, Hkv, d = state.batch_size, args.n_kv_heads, args.head_dim
        kw = dict(dtype=state.dtype, device=state.device)
        self.state, self.cfg = state, cfg
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, Hkv, d
        self.init_k = torch.zeros(B, Hkv, cfg.n_init, d, **kw)
        self.init_v = torch.zeros(B, Hkv, cfg.n_init, d, **kw)
        capacity = cfg.n_local + cfg.block_size + cfg.exc_block_size  # tail never exceeds it
        self.tail_k = torch.zeros(B, Hkv, capacity, d, **kw)
        self.tail_v = torch.zeros(B, Hkv, capacity, d, **kw)
        self.tail_scores = torch.zeros(B, args.n_heads, capacity, dtype=torch.float32, device=state.device)
        self.tail_start = cfg.n_init  # absolute position of tail slot 0
        self.n_blocks = 0
        self.block_k = torch.zeros(B, Hkv, 0, cfg.block_size, d, **kw)
        self.block_v = torch.zeros(B, Hkv, 0, cfg.block_size, d, **kw)
        self.block_repr = torch.zeros(B, 0, args.n_heads * d, dtype=torch.float32, device=state.device)
        self.trace: list[tuple[int, int, torch.Tensor]] = []

    # ------------------------------------------------------------------ interface
    def attend(self, q, k, v, positions, cos, sin, rope):
        start = self.state.length
        outs = []
        for a in range(0, q.shape[-2], self.cfg.exc_block_size):
            b = min(a + self.cfg.exc_block_size, q.shape[-2])
            outs.append(self._chunk(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], start + a, start + b, rope))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    # ------------------------------------------------------------------ one execution chunk
    def _chunk(self, q, k, v, s: int, e: int, rope: RotaryEmbedding) -> torch.Tensor:
        """q: (B, H, T, d), k/v: (B, Hkv, T, d) for positions [s, e). Returns (B, H, T, d)."""
        cfg, device = self.cfg, q.device
        n_local = cfg.n_local
        self._store(k, v, s, e)

        # Candidate keys (host-side ranges: no device sync)
        n_init_seen = min(cfg.n_init, e)
        loc_lo = max(s - n_local + 1, 0)  # oldest key local to some query of the chunk
        far_hi = e - n_local  # keys < far_hi are far to some query of the chunk
        tail_loc_b = max(0, e - self.tail_start)  # the tail is empty while e <= n_init
        tail_loc_a = min(max(loc_lo, self.tail_start) - self.tail_start, tail_loc_b)
        tail_far_b = max(0, min(far_hi, e) - self.tail_start)

        q32 = q.float()
        pos_q = torch.arange(s, e, device=device)  # (T,)
        cos_q, sin_q = rope(pos_q, torch.float32)
        q_loc = apply_rope(q32, cos_q, sin_q)  # (B, H, T, d) true positions
        cos_f, sin_f = rope(torch.tensor([n_local - 1], device=device), torch.float32)
        q_far = apply_rope(q32, cos_f, sin_f)  # (B, H, T, d) the one far angle

        selected = self._select(q_far)  # (B, k_sel) block indices, or None

        # Far keys: [initial | selected blocks | pending remainder], un-rotated
        far_k = [self.init_k[:, :, :n_init_seen]]
        far_v = [self.init_v[:, :, :n_init_seen]]
        far_pos = [torch.arange(n_init_seen, device=device)]
        if selected is not None:
            bk, bv = self._gather_blocks(selected)
            far_k.append(bk)
            far_v.append(bv)
            far_pos.append(torch.full((bk.shape[2],), -(1 << 40), device=device))  # always far
        far_k.append(self.tail_k[:, :, :tail_far_b])
        far_v.append(self.tail_v[:, :, :tail_far_b])
        far_pos.append(torch.arange(self.tail_start, self.tail_start + tail_far_b, device=device))
        far_k, far_v, far_pos = torch.cat(far_k, 2).float(), torch.cat(far_v, 2).float(), torch.cat(far_pos)

        # Local keys: [initial | tail window], rotated at their true positions
        init_loc = torch.arange(loc_lo, n_init_seen, device=device) if loc_lo < n_init_seen else None
        loc_k, loc_v, loc_pos = [], [], []
        if init_loc is not None:
            loc_k.append(self.init_k[:, :, loc_lo:n_init_seen])
            loc_v.append(self.init_v[:, :, loc_lo:n_init_seen])
            loc_pos.append(init_loc)
        loc_k.append(self.tail_k[:, :, tail_loc_a:tail_loc_b])
        loc_v.append(self.tail_v[:, :, tail_loc_a:tail_loc_b])
        loc_pos.append(torch.arange(self.tail_start + tail_loc_a, self.tail_start + tail_loc_b, device=device))
        loc_k, loc_v, loc_pos = torch.cat(loc_k, 2).float(), torch.cat(loc_v, 2).float(), torch.cat(loc_pos)
        cos_k, sin_k = rope(loc_pos, torch.float32)
        loc_k = apply_rope(loc_k, cos_k, sin_k)

        bias_loc, bias_far = self.state.chunk_biases(
            (s, e, self.tail_start, far_k.shape[2]), pos_q, loc_pos, far_pos, q.shape[1] // k.shape[1])
        out, p_loc = joint_attention(q_loc, q_far, loc_k, loc_v, far_k, far_v, bias_loc, bias_far)
        # Representative scores of the tail keys (the initial tokens never form blocks)
        n_init_loc = 0 if init_loc is None else init_loc.numel()
        self.tail_scores[:, :, tail_loc_a:tail_loc_b] += p_loc[..., n_init_loc:]

        if self.state.record:
            self.trace.append((s, e, self._padded(selected)))
        self._form_blocks(e)
        return out.to(q.dtype)

    # ------------------------------------------------------------------ pieces
    def _store(self, k, v, s: int, e: int) -> None:
        """Append the chunk's keys/values: initial ones to init_*, the rest to the tail."""
        n_init = self.cfg.n_init
        if s < n_init:
            m = min(e, n_init) - s
            self.init_k[:, :, s:s + m] = k[:, :, :m]
            self.init_v[:, :, s:s + m] = v[:, :, :m]
            k, v, s = k[:, :, m:], v[:, :, m:], s + m
        if e > s:
            a, b = s - self.tail_start, e - self.tail_start
            self.tail_k[:, :, a:b] = k
            self.tail_v[:, :, a:b] = v
            self.tail_scores[:, :, a:b] = 0

    def _select(self, q_far: torch.Tensor) -> torch.Tensor | None:
        """(B, k) indices of the blocks this chunk attends (SPEC §6); None if none."""
        topk, n = self.cfg.topk, self.n_blocks
        if n == 0 or topk == 0:
            return None
        B = q_far.shape[0]
        if n <= topk:
            return torch.arange(n, device=q_far.device).expand(B, n)
        q_mean = q_far.mean(dim=2).reshape(B, 1, -1)  # (B, 1, H·d)
        scores = (q_mean @ self.block_repr[:, :n].transpose(1, 2)).squeeze(1)  # (B, n)
        return scores.topk(topk, dim=-1).indices

    def _gather_blocks(self, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected blocks' K/V as (B, Hkv, k·block, d)."""
        B, k_sel = selected.shape
        Hkv, bs, d = self.n_kv_heads, self.cfg.block_size, self.head_dim
        index = selected[:, None, :, None, None].expand(B, Hkv, k_sel, bs, d)
        bk = self.block_k[:, :, :self.n_blocks].gather(2, index).reshape(B, Hkv, k_sel * bs, d)
        bv = self.block_v[:, :, :self.n_blocks].gather(2, index).reshape(B, Hkv, k_sel * bs, d)
        return bk, bv

    def _form_blocks(self, e: int) -> None:
        """Form every block that has left the window (SPEC §3), all at once."""
        cfg = self.cfg
        target = n_formed_blocks(cfg, e)
        new = target - self.n_blocks
        if new <= 0:
            return
        B, Hkv, d, H, bs = self.tail_k.shape[0], self.n_kv_heads, self.head_dim, self.n_heads, cfg.block_size
        n_tok = new * bs
        keys = self.tail_k[:, :, :n_tok].reshape(B, Hkv, new, bs, d)
        values = self.tail_v[:, :, :n_tok].reshape(B, Hkv, new, bs, d)
        scores = self.tail_scores[:, :, :n_tok].reshape(B, H, new, bs)
        top = scores.topk(cfg.repr_topk, dim=-1).indices  # (B, H, new, r)
        keys_per_head = keys.float().repeat_interleave(H // Hkv, dim=1)  # (B, H, new, bs, d)
        picked = keys_per_head.gather(3, top[..., None].expand(*top.shape, d))  # (B, H, new, r, d)
        repr_vec = picked.mean(dim=3).permute(0, 2, 1, 3).reshape(B, new, H * d)  # (B, new, H·d)
        self._grow_blocks(target)
        self.block_k[:, :, self.n_blocks:target] = keys
        self.block_v[:, :, self.n_blocks:target] = values
        self.block_repr[:, self.n_blocks:target] = repr_vec
        self.n_blocks = target
        # shift the tail left by the formed tokens
        used = e - self.tail_start  # the tail holds positions [tail_start, e)
        rest = used - n_tok
        self.tail_k[:, :, :rest] = self.tail_k[:, :, n_tok:used].clone()
        self.tail_v[:, :, :rest] = self.tail_v[:, :, n_tok:used].clone()
        self.tail_scores[:, :, :rest] = self.tail_scores[:, :, n_tok:used].clone()
        self.tail_start += n_tok

    def _grow_blocks(self, needed: int) -> None:
        """Make room for ``needed`` blocks, doubling the capacity (amortised, rare)."""
        have = self.block_k.shape[2]
        if needed <= have:
            return
        cap = max(needed, 2 * have, 16)
        grow = cap - have

        def extend(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = grow
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        self.block_k, self.block_v = extend(self.block_k, 2), extend(self.block_v, 2)
        self.block_repr = extend(self.block_repr, 1)

    def _padded(self, selected: torch.Tensor | None) -> torch.Tensor:
        """Selection as (B, topk), sorted, -1 padded: the form tests compare."""
        B, topk = self.init_k.shape[0], self.cfg.topk
        out = torch.full((B, topk), -1, dtype=torch.long, device=self.init_k.device)
        if selected is not None and topk:
            out[:, :selected.shape[1]] = selected.sort(dim=-1).values
        return out


def joint_attention(q_loc, q_far, loc_k, loc_v, far_k, far_v, bias_loc, bias_far):
    """One softmax over local and far keys (SPEC §4), float32.

    q_loc/q_far: (B, H, T, d) rotated at the queries' positions / at the far angle;
    loc_k/v: (B, Hkv, S_l, d); far_k/v: (B, Hkv, S_f, d); bias_·: (G·T, S_·) additive masks
    (0 visible, -inf not), rows ordered (query head in group, query). Returns the output
    (B, H, T, d) and the local probabilities summed over the queries (B, H, S_l): the
    representative scores' increments (SPEC §5).
    """
    B, H, T, d = q_loc.shape
    Hkv, S_l, S_f = loc_k.shape[1], loc_k.shape[2], far_k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(d)
    ql = (q_loc * scale).reshape(B * Hkv, G * T, d)
    logits_loc = torch.baddbmm(bias_loc, ql, loc_k.reshape(B * Hkv, S_l, d).transpose(1, 2))
    row_max = logits_loc.amax(dim=-1, keepdim=True)  # finite: a query always sees itself
    if S_f:
        qf = (q_far * scale).reshape(B * Hkv, G * T, d)
        logits_far = torch.baddbmm(bias_far, qf, far_k.reshape(B * Hkv, S_f, d).transpose(1, 2))
        row_max = torch.maximum(row_max, logits_far.amax(dim=-1, keepdim=True))
    p_loc = logits_loc.sub_(row_max).exp_()  # (B·Hkv, G·T, S_l), unnormalised, in place
    norm = p_loc.sum(dim=-1, keepdim=True)
    out = p_loc @ loc_v.reshape(B * Hkv, S_l, d)
    if S_f:
        p_far = logits_far.sub_(row_max).exp_()
        norm += p_far.sum(dim=-1, keepdim=True)
        out += p_far @ far_v.reshape(B * Hkv, S_f, d)
    inv = norm.reciprocal()  # (B·Hkv, G·T, 1)
    out = (out * inv).view(B, H, T, d)
    # sum over queries of the normalised local probabilities, per query head: a batched
    # (1 × T) @ (T × S_l) product
    scores = inv.view(B * H, 1, T) @ p_loc.view(B * H, T, S_l)  # (B·H, 1, S_l)
    return out, scores.view(B, H, S_l)


class InfLLMState(AttentionState):
    """InfLLM memories of all layers for one generation (unbounded length)."""

    def __init__(self, args: ModelArgs, config: MemoryConfig, *, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.config, self.batch_size, self.dtype = config, batch_size, dtype
        self.device = torch.device(device)
        self.length = 0
        self.record = False
        self._bias_key, self._biases = None, None
        self.layers = [InfLLMLayerAttention(self, args) for _ in range(args.n_layers)]

    def chunk_biases(self, key, pos_q, loc_pos, far_pos, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive masks (G·T, S) of an execution chunk: local keys visible iff
        0 <= i - j < n_local, far keys iff i - j >= n_local. Every layer sees the same
        geometry for the same chunk, so the masks are built once and reused."""
        if self._bias_key != key:
            n_local, neg = self.config.n_local, float("-inf")
            zero = torch.zeros((), device=self.device)
            d_loc = pos_q[:, None] - loc_pos[None, :]
            d_far = pos_q[:, None] - far_pos[None, :]
            bias_loc = torch.where((d_loc >= 0) & (d_loc < n_local), zero, neg)
            bias_far = torch.where(d_far >= n_local, zero, neg)
            self._biases = (bias_loc.repeat(group, 1), bias_far.repeat(group, 1))
            self._bias_key = key
        return self._biases
