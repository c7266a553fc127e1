"""InfLLM context memory (SPEC §3–§6): initial tokens, local window, memory blocks chosen
through representative vectors, pending remainder; one softmax over local and far keys.

Per layer, the keys an execution chunk may see live in one **slot array** of static
length ``S = n_init + topk·block + (n_local + block + exc_block_size) + 1``:

* slots ``[0, n_init)``: the initial tokens;
* the next ``topk·block`` slots: the blocks selected for the current chunk, copied in;
* the tail: every later token not yet in a block (pending remainder + local window + the
  current chunk), from absolute position ``tail_start`` on, with ``tail_scores``
  (B, H, ·) float32, the representative scores they collect while local;
* the last slot: the sentinel of :mod:`.flex_joint`.

Each slot holds its key twice, rotated at its own position (``k_rot``) and un-rotated
(``k_raw``), and its value (``v``), all with the two indicator columns (real, sentinel).
Every slot's absolute position is one shared (S,) tensor per chunk, so the geometry and
the tile masks are built once per chunk for all layers. Formed blocks (``block_k/v``
(B, Hkv, N, block, d), ``block_repr`` (B, N, H·d)) live outside the slots.

A model call is cut into execution chunks of ``exc_block_size`` queries. For a chunk the
layer (1) stores the chunk's keys, (2) selects the blocks (all if few, else top-k of
``q̄ · repr``) and copies them into their slots, (3) attends through
:func:`.flex_joint.joint_attention_flex` (local keys at their true RoPE positions, far
keys with the query at ``n_local - 1``, one softmax), (4) adds the local probabilities to
the tail's scores, (5) forms every block that left the window, vectorised over blocks.
Chunks are padded to ``exc_block_size`` queries (a single-token decode step stays one
query), so compiled attention sees two shapes in a whole generation. Every count used for
slicing is a host-side integer derived from positions, so nothing waits for the device;
selections stay on the device.

Backends (``InfLLMState(kernel=...)``): ``"flex"`` compiled FlexAttention (the default),
``"flex-eager"`` the same calls uncompiled, ``"torch"`` every logit materialised (for
debugging).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelArgs
from ..errors import InfLLMLiteError
from ..memory_config import MemoryConfig, n_formed_blocks
from ..models.rope import RotaryEmbedding, apply_rope
from .base import AttentionState, LayerAttention
from .flex_joint import (EMPTY, FAR, PAD_QUERY, ChunkMasks, chunk_masks, joint_attention_dense,
                         joint_attention_flex)

KERNELS = ("flex", "flex-eager", "torch")


def check_kernel(kernel: str) -> None:
    """Refuse an unknown attention kernel with the list of known ones."""
    if kernel not in KERNELS:
        raise InfLLMLiteError(f"unknown attention kernel {kernel!r}; available: {', '.join(KERNELS)}")


@dataclass
class ChunkGeometry:
    """What every layer shares for one execution chunk."""

    padded: int  # query rows after padding
    cos: torch.Tensor  # (padded, d) rotation of the query rows (position 0 on padding)
    sin: torch.Tensor
    masks: ChunkMasks


class InfLLMLayerAttention(LayerAttention):
    """One layer's InfLLM memory."""

    def __init__(self, state: "InfLLMState", args: ModelArgs):
        cfg = state.config
        B, Hkv, d = state.batch_size, args.n_kv_heads, args.head_dim
        self.state, self.cfg = state, cfg
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, Hkv, d
        slots = torch.zeros(B, Hkv, state.n_slots, d + 2, device=state.device)  # float32
        slots[:, :, :-1, d] = 1.0  # "real" column
        slots[:, :, -1, d + 1] = 1.0  # "sentinel" column
        self.k_rot, self.k_raw, self.v = slots, slots.clone(), slots.clone()
        self.tail_scores = torch.zeros(B, args.n_heads, state.tail_capacity, device=state.device)
        self.tail_start = cfg.n_init  # absolute position of the first tail slot
        self.n_blocks = 0
        self.block_k = torch.zeros(B, Hkv, 0, cfg.block_size, d, dtype=state.dtype, device=state.device)
        self.block_v = torch.zeros(B, Hkv, 0, cfg.block_size, d, dtype=state.dtype, device=state.device)
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
        state, T = self.state, e - s
        n_selected = min(self.n_blocks, self.cfg.topk)
        geo = state.geometry(s, e, self.tail_start, n_selected, rope)
        pad = geo.padded - T
        q32 = F.pad(q.float(), (0, 0, 0, pad))  # (B, H, Tp, d)
        q_loc = apply_rope(q32, geo.cos, geo.sin)  # true positions
        q_far = apply_rope(q32, state.cos_far, state.sin_far)  # the one far angle
        k_rot = apply_rope(k.float(), geo.cos[:T], geo.sin[:T])  # (B, Hkv, T, d)
        self._store(k.float(), k_rot, v.float(), s, e)
        selected = self._select(q_far[:, :, :T])  # (B, n_selected) or None
        if selected is not None:
            self._place_selected(selected)
        out, sums = state.attention(q_loc, q_far, F.pad(k_rot, (0, 0, 0, pad)), self.k_rot, self.k_raw,
                                    self.v, geo.masks, self.cfg.n_local)
        used = e - self.tail_start  # the tail holds positions [tail_start, e)
        if used > 0:  # the initial tokens never form blocks: only the tail keeps scores
            self.tail_scores[:, :, :used] += sums[:, :, state.tail_slot:state.tail_slot + used]
        if state.record:
            self.trace.append((s, e, self._padded(selected)))
        self._form_blocks(e)
        return out[:, :, :T].to(q.dtype)

    # ------------------------------------------------------------------ pieces
    def _store(self, k_raw, k_rot, v, s: int, e: int) -> None:
        """Write the chunk's keys/values into their slots: initial tokens, then the tail."""
        n_init, d = self.cfg.n_init, self.head_dim
        if s < n_init:
            m = min(e, n_init) - s
            for buf, x in ((self.k_raw, k_raw), (self.k_rot, k_rot), (self.v, v)):
                buf[:, :, s:s + m, :d] = x[:, :, :m]
            k_raw, k_rot, v, s = k_raw[:, :, m:], k_rot[:, :, m:], v[:, :, m:], s + m
        if e > s:
            a = self.state.tail_slot + s - self.tail_start
            b = a + e - s
            for buf, x in ((self.k_raw, k_raw), (self.k_rot, k_rot), (self.v, v)):
                buf[:, :, a:b, :d] = x
            self.tail_scores[:, :, s - self.tail_start:e - self.tail_start] = 0

    def _place_selected(self, selected: torch.Tensor) -> None:
        """Copy the selected blocks' K/V into the selection slots (a gather on the device)."""
        B, n_sel = selected.shape
        Hkv, bs, d = self.n_kv_heads, self.cfg.block_size, self.head_dim
        index = selected[:, None, :, None, None].expand(B, Hkv, n_sel, bs, d)
        a, b = self.cfg.n_init, self.cfg.n_init + n_sel * bs
        self.k_raw[:, :, a:b, :d] = self.block_k[:, :, :self.n_blocks].gather(2, index).reshape(B, Hkv, -1, d)
        self.v[:, :, a:b, :d] = self.block_v[:, :, :self.n_blocks].gather(2, index).reshape(B, Hkv, -1, d)

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

    def _form_blocks(self, e: int) -> None:
        """Form every block that has left the window (SPEC §3), all at once."""
        cfg = self.cfg
        target = n_formed_blocks(cfg, e)
        new = target - self.n_blocks
        if new <= 0:
            return
        B, Hkv, d, H, bs = self.k_raw.shape[0], self.n_kv_heads, self.head_dim, self.n_heads, cfg.block_size
        n_tok, t0 = new * bs, self.state.tail_slot
        keys = self.k_raw[:, :, t0:t0 + n_tok, :d].reshape(B, Hkv, new, bs, d)
        values = self.v[:, :, t0:t0 + n_tok, :d].reshape(B, Hkv, new, bs, d)
        scores = self.tail_scores[:, :, :n_tok].reshape(B, H, new, bs)
        top = scores.topk(cfg.repr_topk, dim=-1).indices  # (B, H, new, r)
        keys_per_head = keys.repeat_interleave(H // Hkv, dim=1)  # (B, H, new, bs, d)
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
        for buf in (self.k_raw, self.k_rot, self.v):
            buf[:, :, t0:t0 + rest, :d] = buf[:, :, t0 + n_tok:t0 + used, :d].clone()
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
        B, topk = self.k_raw.shape[0], self.cfg.topk
        out = torch.full((B, topk), -1, dtype=torch.long, device=self.k_raw.device)
        if selected is not None and topk:
            out[:, :selected.shape[1]] = selected.sort(dim=-1).values
        return out


class InfLLMState(AttentionState):
    """InfLLM memories of all layers for one generation (unbounded length)."""

    def __init__(self, args: ModelArgs, config: MemoryConfig, *, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 kernel: str = "flex"):
        check_kernel(kernel)
        self.config, self.batch_size, self.dtype = config, batch_size, dtype
        self.device = torch.device(device)
        self.kernel = kernel
        self.length = 0
        self.record = False
        self.group = args.n_heads // args.n_kv_heads
        self.tail_slot = config.n_init + config.topk * config.block_size  # first tail slot
        self.tail_capacity = config.n_local + config.block_size + config.exc_block_size  # never exceeded
        self.n_slots = self.tail_slot + self.tail_capacity + 1  # + the sentinel
        self._geometry_key, self._geometry = None, None
        self.cos_far, self.sin_far = None, None
        self.layers = [InfLLMLayerAttention(self, args) for _ in range(args.n_layers)]

    def attention(self, q_loc, q_far, k_self, k_rot, k_raw, v, masks, n_local):
        """The joint attention of one chunk through the chosen kernel."""
        if self.kernel == "torch":
            return joint_attention_dense(q_loc, q_far, k_self, k_rot, k_raw, v, masks, n_local)
        return joint_attention_flex(q_loc, q_far, k_self, k_rot, k_raw, v, masks, n_local,
                                    compiled=self.kernel == "flex")

    def geometry(self, s: int, e: int, tail_start: int, n_selected: int,
                 rope: RotaryEmbedding) -> ChunkGeometry:
        """Positions, rotations and tile masks of the chunk [s, e): identical in every
        layer, so built once per chunk. Chunks of more than one query are padded to
        ``exc_block_size`` rows so that compiled attention sees one shape for them."""
        key = (s, e, tail_start, n_selected)
        if self._geometry_key == key:
            return self._geometry
        cfg, device = self.config, self.device
        T = e - s
        padded = T if T == 1 else cfg.exc_block_size
        if self.cos_far is None:
            self.cos_far, self.sin_far = rope(torch.tensor([cfg.n_local - 1], device=device), torch.float32)
        rows = torch.arange(padded, device=device)
        q_pos = torch.where(rows < T, s + rows, PAD_QUERY)  # (Tp,)
        cos, sin = rope(torch.where(rows < T, s + rows, 0), torch.float32)
        k_pos = torch.full((self.n_slots,), EMPTY, dtype=torch.long, device=device)
        n_init_seen = min(cfg.n_init, e)
        k_pos[:n_init_seen] = torch.arange(n_init_seen, device=device)
        k_pos[cfg.n_init:cfg.n_init + n_selected * cfg.block_size] = FAR
        used = max(0, e - tail_start)
        k_pos[self.tail_slot:self.tail_slot + used] = torch.arange(tail_start, tail_start + used, device=device)
        masks = chunk_masks(q_pos, k_pos, cfg.n_local, self.group)
        self._geometry_key, self._geometry = key, ChunkGeometry(padded, cos, sin, masks)
        return self._geometry
