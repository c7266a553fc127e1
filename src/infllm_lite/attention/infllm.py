"""InfLLM context memory (SPEC §3–§6): initial tokens, local window, memory blocks chosen
through representative vectors, pending remainder; one softmax over local and far keys.

Per layer, the keys an execution chunk may see live in one **slot array** of static
length ``S``:

* slots ``[0, n_init)``: the initial tokens;
* the tail ``[n_init, local_end)``: every later token not yet in a block (pending
  remainder + local window + the current chunk), from absolute position ``tail_start``
  on, with ``tail_scores`` (B, H, ·) float32, the representative scores they collect
  while local;
* the **block-pool slots** ``[pool_slot, pool_slot + n_pool·block)`` (``pool_slot`` rounded
  up to a FlexAttention tile): the fast tier of the layer's :class:`~infllm_lite.memory.BlockPool`,
  which loads the selected blocks there and keeps them cached (``lru`` / ``lru-s``);
* the last slot: the sentinel of :mod:`.flex_joint`.

Each slot holds its key twice, rotated at its own position (``k_rot``) and un-rotated
(``k_raw``), and its value (``v``), all with the two indicator columns (real, sentinel).
The slots' absolute positions are one (S,) tensor per chunk, shared by all layers (pool
slots ``EMPTY``: never local), so the local and swapped tile masks are built once per
chunk; each layer then marks the pool slots of its selected blocks ``FAR`` (per sequence,
(B, S)) and lists the far call's tiles from that: the BlockMask's kv indices point at
the slots where the blocks already are, nothing is gathered. Formed blocks go to the pool
(its host tier is the authoritative copy, with a disk tier beyond ``max_host_bytes``);
their representative vectors ``block_repr`` (B, N, H·d) stay here.

A model call is cut into execution chunks of ``exc_block_size`` queries. For a chunk the
layer (1) stores the chunk's keys, (2) selects the blocks (all if few, else top-k of
``q̄ · repr``, :mod:`infllm_lite.kernels.block_relevance`) and makes them resident in the pool, (3) attends through
its kernel (local keys at their true RoPE positions, far
keys with the query at ``n_local - 1``, one softmax), (4) adds the local probabilities to
the tail's scores, (5) forms every block that left the window, vectorised over blocks.
Chunks are padded (a single-token decode step stays one query) to the few row counts
of the kernel's geometry (flex: ``exc_block_size``; window: whole query tiles in a
power-of-two count), so compiled attention sees a few shapes in a whole generation. Counts used for
slicing are host-side integers derived from positions; the selection is read on the host
only by the pool's page table (one read per chunk and layer, free on the CPU).

A call of exactly one query with batch 1 (a decode step; ``state.one_query``, on by
default) skips the kernel: :mod:`.decode_step` computes the same joint softmax as a few
small matmuls over contiguous slot ranges (the far prefix, the local window) and the
selected blocks, kept side by side in a :class:`.decode_step.SelectedBlocks` that copies
only the blocks a step newly selects; the rotations of a step are built once for all
layers (``one_query_rotation``). Same scores, selection, pool residency and block
formation as the chunk path (tests/test_infllm_decode_step.py holds the two together).

Kernels (``InfLLMState(kernel=...)``, resolved once into an object by
:func:`.kernels.make_kernel`): ``"auto"`` (the default) picks ``"window"`` on the CPU and
``"flex"`` elsewhere; ``"flex"`` compiled FlexAttention, ``"flex-eager"`` the same calls
uncompiled; ``"window"`` compiled dense attention over each query tile's key window
(:mod:`.window_joint`: about twice as fast as compiled flex on the CPU, where flex visits
its tiles in a loop), ``"window-eager"`` uncompiled; ``"torch"`` every logit of the slot
array materialised (:mod:`.dense_joint`, for debugging). With the window kernel, a chunk
that ends within ``n_local`` (only local keys, no block yet: a short prompt) is plain
causal attention plus the score sums (:mod:`.local_chunk`). The slot layout is
:class:`.slots.SlotLayout`; a layer's ``tail_start`` follows from its block count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelArgs
from ..errors import InfLLMLiteError
from ..kernels.block_relevance import block_scores, select_blocks
from ..memory import BlockPool, PoolStats
from ..memory_config import MemoryConfig, n_formed_blocks
from ..rope import RotaryEmbedding, apply_rope
from .base import AttentionState, LayerAttention, copy_into, storage_dtype
from .decode_step import SelectedBlocks, one_query_attention
from .infllm_rows import attend_rows
from .kernels import ChunkGeometry, InfLLMKernel, make_kernel
from .kv_arena import attend_by_bank
from .local_chunk import local_causal_chunk
from .slots import SlotLayout


class InfLLMLayerAttention(LayerAttention):
    """One layer's InfLLM memory."""

    def __init__(self, state: "InfLLMState", args: ModelArgs, index: int):
        cfg, lay = state.config, state.layout
        B, Hkv, d = state.batch_size, args.n_kv_heads, args.head_dim
        self.state, self.cfg, self.index = state, cfg, index
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, Hkv, d
        self.row = state.row  # an arena row holding this layer's slot arrays, or None
        if self.row is None:
            slots = torch.zeros(B, Hkv, lay.n_slots, d + 2, device=state.device)  # float32
            self.k_rot, self.k_raw, self.v = slots, slots.clone(), slots.clone()
            self.tail_scores = torch.zeros(B, args.n_heads, lay.tail_capacity, device=state.device)
        else:  # zeros, as a row is handed out
            views = self.row.views(index)
            self.k_rot, self.k_raw, self.v = views["k_rot"], views["k_raw"], views["v"]
            self.tail_scores = views["tail_scores"]
        for slots in (self.k_rot, self.k_raw, self.v):
            # "real" column, on the slots a local call sees (flex_joint: no pool slot is ever
            # local, and the far call's queries carry 0 there). The pool's slots, most of the
            # array, stay unwritten until blocks come: an arena row is backed by memory only
            # where written (first-touch page faults cost about 2 s per sequence of the
            # embedded model's default memory on these machines; a short prompt needs none)
            slots[:, :, :lay.pool_slot, d] = 1.0
            slots[:, :, lay.pool_end:-1, d] = 1.0
            slots[:, :, -1, d + 1] = 1.0  # "sentinel" column
        self.n_blocks = 0
        self.block_repr = torch.zeros(B, 0, args.n_heads * d, dtype=torch.float32, device=state.device)
        a, b = lay.pool_slot, lay.pool_end
        self.pool = BlockPool(
            B, Hkv, cfg.block_size, d, n_slots=lay.n_pool, dtype=storage_dtype(cfg, state.dtype), device=state.device,
            policy=cfg.cache_policy, score_decay=cfg.score_decay, max_host_bytes=state.host_bytes_per_layer,
            offload_dir=cfg.offload_dir,
            fast_k=self.k_raw[:, :, a:b, :d].unflatten(2, (lay.n_pool, cfg.block_size)),
            fast_v=self.v[:, :, a:b, :d].unflatten(2, (lay.n_pool, cfg.block_size)))
        self.trace: list[tuple[int, int, torch.Tensor]] = []
        self._one = None  # the one-query path's views (:meth:`_one_query_views`), made on its first step
        self._one_selected: SelectedBlocks | None = None  # and its copy of the selected blocks

    @property
    def tail_start(self) -> int:
        """Absolute position of the first tail slot: every token after the initial ones
        that is not yet in a block."""
        return self.cfg.n_init + self.n_blocks * self.cfg.block_size

    # ------------------------------------------------------------------ interface
    def attend(self, q, k, v, positions, cos, sin, rope):
        # every rotation of this memory is the state's own (``state.rope``: the model's
        # frequencies), so a restored memory rotates its keys exactly as they were stored
        start = self.state.length
        if q.shape[-2] == 1 and q.shape[0] == 1 and self.state.one_query:
            return self._one_query(q, k, v, start)
        outs = []
        for a in range(0, q.shape[-2], self.cfg.exc_block_size):
            b = min(a + self.cfg.exc_block_size, q.shape[-2])
            outs.append(self._chunk(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], start + a, start + b))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    @classmethod
    def attend_many(cls, layers, q, k, v, positions, cos, sin, rope):
        """Decode steps of B sequences (one query each, the one-query path): the memories
        that are rows of one arena bank together (:func:`.infllm_rows.attend_rows`), each
        other alone; anything else through each layer's own ``attend``."""
        if q.shape[-2] != 1 or not all(layer.state.one_query and layer.state.batch_size == 1 for layer in layers):
            return super().attend_many(layers, q, k, v, positions, cos, sin, rope)
        return attend_by_bank(layers, q, k, v, attend_rows)

    def _held(self) -> tuple[int, int]:
        """(initial tokens, tail tokens) the slot array holds after ``state.length`` tokens."""
        n = self.state.length
        return min(self.cfg.n_init, n), max(0, n - self.tail_start)

    def export(self):
        """Only what is in use: the initial and tail tokens' un-rotated keys and values (the
        rotated keys are recomputed on restore), the tail's scores, the representative
        vectors and the pool's blocks (its fast tier is reloaded from them)."""
        d, (m, used), t0 = self.head_dim, self._held(), self.state.layout.tail_slot
        tensors = {"init_k": self.k_raw[:, :, :m, :d], "init_v": self.v[:, :, :m, :d],
                   "tail_k": self.k_raw[:, :, t0:t0 + used, :d], "tail_v": self.v[:, :, t0:t0 + used, :d],
                   "tail_scores": self.tail_scores[:, :, :used], "block_repr": self.block_repr[:, :self.n_blocks]}
        pool_tensors, pool_meta = self.pool.export()
        tensors.update({f"pool.{name}": x for name, x in pool_tensors.items()})
        return tensors, {"n_blocks": self.n_blocks, "pool": pool_meta}

    def restore(self, tensors, meta):
        n = int(meta["n_blocks"])
        formed = n_formed_blocks(self.cfg, self.state.length)
        if n != formed:
            raise InfLLMLiteError(f"the snapshot's layer holds {n} blocks after {self.state.length} tokens; "
                                  f"a memory of this shape forms {formed} (another MemoryConfig)")
        self._grow_repr(n)
        copy_into(self.block_repr[:, :n], tensors["block_repr"], "block_repr")
        self.n_blocks = n
        d, (m, used), t0 = self.head_dim, self._held(), self.state.layout.tail_slot
        for a, count, first, part in ((0, m, 0, "init"), (t0, used, self.tail_start, "tail")):
            raw = self.k_raw[:, :, a:a + count, :d]
            copy_into(raw, tensors[f"{part}_k"], f"{part}_k")
            copy_into(self.v[:, :, a:a + count, :d], tensors[f"{part}_v"], f"{part}_v")
            # rotated as the chunk that stored them rotated them: elementwise, the same bits
            cos, sin = self.state.rope(torch.arange(first, first + count, device=raw.device), torch.float32)
            self.k_rot[:, :, a:a + count, :d] = apply_rope(raw, cos, sin)
        copy_into(self.tail_scores[:, :, :used], tensors["tail_scores"], "tail_scores")
        self.pool.restore({k[5:]: x for k, x in tensors.items() if k.startswith("pool.")}, meta["pool"])
        if self.pool.n_blocks != n:
            raise InfLLMLiteError(f"the snapshot's pool holds {self.pool.n_blocks} blocks, its "
                                  f"layer {n}")

    # ------------------------------------------------------------------ one execution chunk
    def _chunk(self, q, k, v, s: int, e: int) -> torch.Tensor:
        """q: (B, H, T, d), k/v: (B, Hkv, T, d) for positions [s, e). Returns (B, H, T, d)."""
        state, T = self.state, e - s
        if e <= self.cfg.n_local and state.kernel.local_path:
            return self._local_chunk(q, k, v, s, e)
        geo = state.geometry(s, e, self.tail_start)
        q32 = F.pad(q.float(), (0, 0, 0, geo.padded - T))  # (B, H, Tp, d)
        q_loc = apply_rope(q32, geo.cos, geo.sin)  # true positions
        q_far = apply_rope(q32, state.cos_far, state.sin_far)  # the one far angle
        k_rot = apply_rope(k.float(), geo.cos[:T], geo.sin[:T])  # (B, Hkv, T, d)
        self._store(k.float(), k_rot, v.float(), s, e)
        selected = self._select(q_far[:, :, :T])  # (B, n_selected) or None
        union = slots = None
        if selected is not None:
            union, union_slots, slots = self._make_resident(selected)
        out, sums, lse = state.kernel.attend(state.layout, q_loc, q_far, k_rot, self.k_rot, self.k_raw,
                                             self.v, geo, slots)
        self._add_scores(sums, e)
        if union is not None and self.pool.policy == "lru-s":
            mass = self._slot_mass(q_far[:, :, :T], lse[:, :, :T], slots)  # (n_pool,)
            self.pool.record_chunk(union, mass[union_slots])
        if state.record:
            self.trace.append((s, e, self._padded(selected)))
        self._form_blocks(e)
        return out[:, :, :T].to(q.dtype)

    def _local_chunk(self, q, k, v, s: int, e: int) -> torch.Tensor:
        """A chunk ending at or before ``n_local`` (:mod:`.local_chunk`): every token it sees
        is local and no block exists yet, so slots ``[0, e)`` hold positions ``[0, e)``."""
        d = self.head_dim
        cos, sin = self.state.chunk_rotation(s, e)  # (T, d)
        k_rot = apply_rope(k.float(), cos, sin)
        self._store(k.float(), k_rot, v.float(), s, e)
        out, sums = local_causal_chunk(apply_rope(q.float(), cos, sin), self.k_rot[:, :, :e, :d],
                                       self.v[:, :, :e, :d], s)
        self._add_scores(sums, e)
        if self.state.record:
            self.trace.append((s, e, self._padded(None)))
        return out.to(q.dtype)

    # ------------------------------------------------------------------ one query
    def _one_query(self, q, k, v, s: int) -> torch.Tensor:
        """A chunk of one query at position ``s``, batch 1 (a decode step): the same
        attention, scores, selection, residency and block formation as :meth:`_chunk`,
        without its geometry (:mod:`.decode_step`). q: (1, H, 1, d), k/v: (1, Hkv, 1, d)."""
        state, cfg = self.state, self.cfg
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        if self._one is None:
            self._one = self._one_query_views()
        k_rot, k_raw, values, scores, t0 = self._one
        cos, sin = state.one_query_rotation(s)  # (2, 1, 1, d): position s, then n_local - 1
        x = apply_rope(torch.cat((q, k), dim=1).float(), cos, sin).view(2, H + Hkv, d)
        q_loc, q_far = x[0, :H], x[1, :H]  # (H, d) each, contiguous: rotated at s, at n_local - 1
        # store the token: an initial one, or the tail's newest (its score is 0 already)
        tail = None if s < cfg.n_init else s - self.tail_start
        slot = s if tail is None else t0 + tail
        k_raw.select(1, slot).copy_(k.reshape(Hkv, d))
        k_rot.select(1, slot).copy_(x[0, H:])
        values.select(1, slot).copy_(v.reshape(Hkv, d))
        selected, block_k, block_v = self._select_one(q_far)
        last = slot + 1
        split = max(0, last - cfg.n_local)  # slots [0, split) far, [split, last) local
        out, p = one_query_attention(q_loc.view(Hkv, H // Hkv, d), q_far.view(Hkv, H // Hkv, d), k_rot, k_raw,
                                     values, split, last, block_k, block_v)
        if tail is not None:  # the tail slots' local probabilities are their score increments
            a = max(split, t0)
            scores[:, a - t0:last - t0].add_(p[..., a:last].reshape(H, last - a))
        if selected is not None and self.pool.policy == "lru-s":
            blocks = self._one_selected.blocks[:len(selected)]  # in the order of the block keys
            self.pool.record_chunk(blocks, p[..., last:].reshape(H, len(blocks), cfg.block_size).sum(dim=(0, 2)))
        if state.record:
            rows = None if selected is None else torch.tensor([selected], device=q.device)
            self.trace.append((s, s + 1, self._padded(rows)))
        self._form_blocks(s + 1)
        out = out.view(1, H, 1, d)
        return out if out.dtype == q.dtype else out.to(q.dtype)

    def _one_query_views(self):
        """What every one-query step reads, as views made once: the rotated and raw keys
        and the values (Hkv, S, d) and the tail's scores (H, ·) of the one sequence, and
        the first tail slot."""
        d = self.head_dim
        views = None if self.row is None else self.row.views(self.index)
        store = None if views is None else (views["sel_k"][0], views["sel_v"][0])
        self._one_selected = SelectedBlocks(self.n_kv_heads, self.cfg.topk, self.cfg.block_size, d,
                                            self.k_raw.device, self.pool.slot_k[0], self.pool.slot_v[0], store)
        return (self.k_rot[0, :, :, :d], self.k_raw[0, :, :, :d], self.v[0, :, :, :d], self.tail_scores[0],
                self.state.layout.tail_slot)

    def _select_one(self, q_far: torch.Tensor):
        """One query's selection (SPEC §6: all blocks if few, else the top-k of q_far ·
        repr, the numbers :meth:`_select` computes) made resident and read side by side:
        (the selected blocks as a host list, their keys, their values), or Nones.
        q_far: (H, d)."""
        n, topk = self.n_blocks, self.cfg.topk
        if n == 0 or topk == 0:
            return None, None, None
        if n <= topk:
            chosen = list(range(n))
        else:  # the mean over one query is the query itself
            q_mean = q_far.view(1, -1)  # (1, H·d)
            if self.block_repr.is_cuda:
                scores = block_scores(q_mean, self.block_repr, n)  # (1, n)
            else:  # block_scores' torch twin without its checks: the same bmm, the same numbers
                scores = torch.bmm(self.block_repr[:, :n], q_mean[:, :, None])[..., 0]
            if self.state.score_reduce is not None:  # this rank's heads' part: summed over ranks
                scores = self.state.score_reduce(scores)
            chosen = scores[0].topk(topk).indices
        chosen, slots = self.pool.ensure_resident_slots(chosen)  # page-table lookup, loads the misses
        block_k, block_v = self._one_selected.update(chosen, slots)
        return chosen, block_k, block_v

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
            a = self.state.layout.tail_slot + s - self.tail_start
            b = a + e - s
            for buf, x in ((self.k_raw, k_raw), (self.k_rot, k_rot), (self.v, v)):
                buf[:, :, a:b, :d] = x
            self.tail_scores[:, :, s - self.tail_start:e - self.tail_start] = 0

    def _add_scores(self, sums: torch.Tensor, e: int) -> None:
        """Add the chunk's local probabilities summed per slot (B, H, ≥ local_end) to the
        tail's representative scores (SPEC §5); the initial tokens never form blocks."""
        used = e - self.tail_start  # the tail holds positions [tail_start, e)
        if used > 0:
            t0 = self.state.layout.tail_slot
            self.tail_scores[:, :, :used] += sums[:, :, t0:t0 + used]

    def _make_resident(self, selected: torch.Tensor):
        """Load the selected blocks (B, k) into pool slots (the union over the batch).
        Returns the union (U,), its slots (U,) and the selection's slots (B, k)."""
        union = selected.unique() if selected.shape[0] > 1 else selected[0]  # (U,)
        union_slots = self.pool.ensure_resident(union)  # (U,) page-table lookup, loads the misses
        lookup = torch.zeros(self.n_blocks, dtype=torch.long, device=selected.device)
        lookup[union] = union_slots
        return union, union_slots, lookup[selected]

    def _slot_mass(self, q_far, lse, slots) -> torch.Tensor:
        """Attention mass each pool slot received in this chunk (``lru-s``): the joint
        probabilities of its keys summed over queries, heads and sequences (n_pool,).
        q_far: (B, H, T, d) real rows only, lse: (B, H, T), slots: (B, k) selected."""
        B, H, T, d = q_far.shape
        Hkv, G, bs = self.n_kv_heads, H // self.n_kv_heads, self.cfg.block_size
        pool_k = self.pool.slot_k  # (B, Hkv, n_pool, bs, d) float32 view
        index = slots[:, None, :, None, None].expand(B, Hkv, slots.shape[1], bs, d)
        keys = pool_k.gather(2, index).flatten(2, 3)  # (B, Hkv, k·bs, d)
        logits = q_far.reshape(B, Hkv, G * T, d) @ keys.transpose(-1, -2) / d ** 0.5  # (B, Hkv, G·T, k·bs)
        p = (logits - lse.reshape(B, Hkv, G * T, 1)).exp()
        per_slot = p.sum(dim=2).unflatten(-1, (slots.shape[1], bs)).sum(dim=(1, 3))  # (B, k)
        return torch.zeros(self.state.layout.n_pool, device=q_far.device).index_add_(0, slots.flatten(),
                                                                              per_slot.flatten())

    def _select(self, q_far: torch.Tensor) -> torch.Tensor | None:
        """(B, k) indices of the blocks this chunk attends (SPEC §6); None if none."""
        reduce, n, topk = self.state.score_reduce, self.n_blocks, self.cfg.topk
        if reduce is None or n <= topk or topk == 0:
            return select_blocks(q_far, self.block_repr, n, topk)
        # tensor parallel: q̄ · repr over this rank's heads, summed over the ranks' heads
        q_mean = q_far.float().mean(dim=2).reshape(q_far.shape[0], -1)  # (B, H_rank·d)
        return reduce(block_scores(q_mean, self.block_repr, n)).topk(topk, dim=-1).indices

    def _form_blocks(self, e: int) -> None:
        """Form every block that has left the window (SPEC §3), all at once."""
        cfg = self.cfg
        target = n_formed_blocks(cfg, e)
        new = target - self.n_blocks
        if new <= 0:
            return
        B, Hkv, d, H, bs = self.k_raw.shape[0], self.n_kv_heads, self.head_dim, self.n_heads, cfg.block_size
        n_tok, t0 = new * bs, self.state.layout.tail_slot
        keys = self.k_raw[:, :, t0:t0 + n_tok, :d].reshape(B, Hkv, new, bs, d)
        values = self.v[:, :, t0:t0 + n_tok, :d].reshape(B, Hkv, new, bs, d)
        scores = self.tail_scores[:, :, :n_tok].reshape(B, H, new, bs)
        top = scores.topk(cfg.repr_topk, dim=-1).indices  # (B, H, new, r)
        keys_per_head = keys.repeat_interleave(H // Hkv, dim=1)  # (B, H, new, bs, d)
        picked = keys_per_head.gather(3, top[..., None].expand(*top.shape, d))  # (B, H, new, r, d)
        repr_vec = picked.mean(dim=3).permute(0, 2, 1, 3).reshape(B, new, H * d)  # (B, new, H·d)
        self._grow_repr(target)
        self.pool.append(keys.to(self.pool.dtype), values.to(self.pool.dtype))
        self.block_repr[:, self.n_blocks:target] = repr_vec
        # shift the tail left by the formed tokens
        used = e - self.tail_start  # the tail holds positions [tail_start, e)
        rest = used - n_tok
        for buf in (self.k_raw, self.k_rot, self.v):
            buf[:, :, t0:t0 + rest, :d] = buf[:, :, t0 + n_tok:t0 + used, :d].clone()
        self.tail_scores[:, :, :rest] = self.tail_scores[:, :, n_tok:used].clone()
        self.tail_scores[:, :, rest:used] = 0  # slots past the tail score 0 (the one-query path adds to them)
        self.n_blocks = target  # the tail now starts n_tok tokens later

    def _grow_repr(self, needed: int) -> None:
        """Room for ``needed`` representative vectors, doubling the capacity (amortised)."""
        have = self.block_repr.shape[1]
        if needed > have:
            grow = max(needed, 2 * have, 16) - have
            self.block_repr = torch.cat([self.block_repr, self.block_repr.new_zeros(
                self.block_repr.shape[0], grow, self.block_repr.shape[2])], dim=1)

    def _padded(self, selected: torch.Tensor | None) -> torch.Tensor:
        """Selection as (B, topk), sorted, -1 padded: the form tests compare."""
        B, topk = self.k_raw.shape[0], self.cfg.topk
        out = torch.full((B, topk), -1, dtype=torch.long, device=self.k_raw.device)
        if selected is not None and topk:
            out[:, :selected.shape[1]] = selected.sort(dim=-1).values
        return out


class InfLLMState(AttentionState):
    """InfLLM memories of all layers for one generation (unbounded length).

    ``kernel``: an ``attention_kernel`` option (``options.ATTENTION_KERNELS``) or an
    :class:`~.kernels.InfLLMKernel`, resolved once. ``close()`` (or the end of a
    generation) releases the pools' disk files; ``stats()`` adds up the pools' counters
    over the layers."""

    def __init__(self, args: ModelArgs, config: MemoryConfig, *, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 kernel: "str | InfLLMKernel" = "auto", row=None):
        self.config, self.batch_size, self.dtype = config, batch_size, dtype
        self.device = torch.device(device)
        self.kernel = make_kernel(kernel, self.device)
        self.layout = SlotLayout.build(config, batch_size=batch_size, group=args.n_heads // args.n_kv_heads)
        # the memory's one rotation (the model's frequencies): chunks and restored keys alike
        self.rope = RotaryEmbedding(args).to(self.device)
        far = torch.tensor([config.n_local - 1], device=self.device)
        self.cos_far, self.sin_far = self.rope(far, torch.float32)  # (1, d): the one far angle
        self.length = 0
        self.record = False
        self.host_bytes_per_layer = (None if config.max_host_bytes is None
                                     else max(1, config.max_host_bytes // args.n_layers))
        self._geometry_key, self._geometry = None, None
        self.one_query = True  # single-query chunks of batch 1 take the decode step's path
        # Tensor parallelism (infllm_lite.parallel): a rank holds only its heads, and this
        # callable sums a chunk's (B, n_blocks) block scores over the ranks (one all_reduce
        # per chunk and layer) so every rank selects the same blocks. None: one process.
        self.score_reduce = getattr(args, "score_reduce", None)
        self._rotation_key, self._rotation = None, None
        self._chunk_rotation_key, self._chunk_rotation = None, None
        self._rows_rotation_key, self._rows_rotation = None, None
        if row is not None and batch_size != 1:
            raise InfLLMLiteError("an arena row holds the memory of one sequence")
        self.row = row  # an arena row (:meth:`in_arena`) holding the layers' slot arrays, or None
        self.layers = [InfLLMLayerAttention(self, args, i) for i in range(args.n_layers)]

    @classmethod
    def in_arena(cls, arena, args: ModelArgs, config: MemoryConfig, *, dtype: torch.dtype = torch.float32,
                 kernel: "str | InfLLMKernel" = "auto") -> "InfLLMState | None":
        """A memory of one sequence whose slot arrays, tail scores and selected blocks are
        a row of ``arena`` (a :class:`~.kv_arena.Arena`; memories of one config share a
        bank, so their decode steps attend together, :mod:`.infllm_rows`), or None where
        the row would be too large for a bank."""
        lay = SlotLayout.build(config, batch_size=1, group=args.n_heads // args.n_kv_heads)
        Hkv, d = args.n_kv_heads, args.head_dim
        slots = (Hkv, lay.n_slots, d + 2)
        selected = (Hkv, config.topk, config.block_size, d)
        row = arena.take(("infllm", config), {"k_rot": slots, "k_raw": slots, "v": slots,
                                              "tail_scores": (args.n_heads, lay.tail_capacity),
                                              "sel_k": selected, "sel_v": selected})
        return None if row is None else cls(args, config, dtype=dtype, device=arena.device, kernel=kernel, row=row)

    def stats(self) -> PoolStats:
        """The block pools' counters added up over the layers."""
        return sum((layer.pool.stats() for layer in self.layers), PoolStats())

    def close(self) -> None:
        """Release the pools (their offload files), then the layers' references to this
        state (:meth:`AttentionState.close`). ``stats()`` still works. Idempotent."""
        for layer in self.layers:
            layer.pool.close()
        super().close()
        if self.row is not None:  # given back (its pages freed) once no layer reads it
            for layer in self.layers:
                layer.row = layer._one = layer._one_selected = None
            self.row.release()
            self.row = None

    def geometry(self, s: int, e: int, tail_start: int) -> ChunkGeometry:
        """The kernel's geometry of the chunk [s, e): identical in every layer, so built
        once per chunk."""
        key = (s, e, tail_start, self.kernel)
        if self._geometry_key != key:
            self._geometry = self.kernel.geometry(self.layout, s, e, tail_start, self.rope, self.device)
            self._geometry_key = key
        return self._geometry

    def chunk_rotation(self, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (e - s, d) of the positions [s, e): built once per chunk for all layers."""
        if self._chunk_rotation_key != (s, e):
            self._chunk_rotation = self.rope(torch.arange(s, e, device=self.device), torch.float32)
            self._chunk_rotation_key = (s, e)
        return self._chunk_rotation

    def one_query_rotation(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (2, 1, 1, d) of a one-query chunk at position ``s``: its own angle (as
        :func:`.kernels.query_rows` computes it), then the far one; built once per step for
        all layers."""
        if self._rotation_key != s:
            cos, sin = self.rope(torch.tensor([s], device=self.device), torch.float32)
            self._rotation = (torch.cat((cos, self.cos_far)).view(2, 1, 1, -1),
                              torch.cat((sin, self.sin_far)).view(2, 1, 1, -1))
            self._rotation_key = s
        return self._rotation

    def rows_rotation(self, starts: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (B, 1, 1, d) of one query of each of B sequences at ``starts`` (their
        own angles, as :meth:`one_query_rotation` computes them); built once per step for
        all layers (:mod:`.infllm_rows`)."""
        if self._rows_rotation_key != starts:
            cos, sin = self.rope(torch.tensor(starts, device=self.device), torch.float32)  # (B, d)
            self._rows_rotation = cos[:, None, None], sin[:, None, None]
            self._rows_rotation_key = starts
        return self._rows_rotation
