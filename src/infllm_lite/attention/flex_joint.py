"""InfLLM's joint softmax over local and far keys (SPEC §4) and the representative-score
increments (SPEC §5), computed by FlexAttention over block masks.

A layer's keys live in one slot array of static length S, each slot with an absolute
position (``k_pos``): the initial tokens, the selected blocks (position ``FAR``: far from
every query), the tail (pending remainder, window, current chunk), unused slots (position
``EMPTY``: seen by nobody) and, last, one **sentinel** slot. Keys are kept twice: rotated
at their own positions (``k_rot``, for local logits) and un-rotated (``k_raw``, for far
logits). Keys and values carry two extra columns: ``real`` (1 on every slot a local call
may see: not the sentinel, and not the block-pool slots, which are never local and whose
far logits take 0 from the query's column) and ``sentinel`` (1 on the sentinel only). A
query's extra columns then set the sentinel's logit (or subtract a constant from every real logit) inside the ordinary dot
product: no ``score_mod``, only position-based ``mask_mod``s.

Compiled flex on the CPU returns no log-sum-exp, so the sentinel provides it. Three flex
calls, each a normalised weighted sum:

1. local: query rotated at i, keys ``k_rot``, visible iff ``0 <= i - j < n_local``; the
   sentinel's logit is the query's own (self) logit, which is always visible, so
   ``real ≥ 1/2`` and ``lse_loc = self + log(real) - log(sentinel)``;
2. far: query rotated at ``n_local - 1``, keys ``k_raw``, visible iff ``i - j >= n_local``;
   the sentinel's logit is ``lse_loc``: the sentinel then stands for the whole local mass,
   so the call's value part is the far half of the joint output, already jointly
   normalised, and its sentinel column is the local share ``w_loc = Z_loc / Z``;
3. scores (roles swapped): every slot's rotated key attends to the chunk's rotated queries
   (the ``G`` query heads of a KV head stacked along the sequence) with logit
   ``s_ij - lse_i`` = log P(i → j), values one-hot in the query head, and a sentinel of
   logit 0: the per-head sums Σ_i P(i → j) are the value columns over the sentinel column.
   A single query (decode) reads its local probabilities off directly instead.

Only log P(i → i) < -87 within the local window (a query giving its own token less than
1e-38 of its local attention) would underflow. Nothing finer than 128 × 128 tiles is
materialised. The same code runs on CUDA, where compiled flex could also return the
log-sum-exp directly. :mod:`.dense_joint` is the same computation with every logit
materialised (the ``torch`` kernel, for debugging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .slots import EMPTY, FAR, FLEX_BLOCK, PAD_QUERY, compiled_once

_BIG = 1 << 50


@dataclass
class ChunkMasks:
    """Positions and tile-level visibility of one execution chunk, shared by all layers:
    for each call, the number of visible key tiles per query tile and their indices. The
    block-pool slots hold position ``EMPTY`` in ``k_pos``: which of them a layer's far call
    sees comes per layer (:func:`far_tiles`)."""

    q_pos: torch.Tensor  # (T,) query positions, PAD_QUERY on padding rows
    k_pos: torch.Tensor  # (S,) slot positions; the last slot is the sentinel
    sw_pos: torch.Tensor  # (G·T + 1,) the swapped call's keys: the queries G times, sentinel
    local_end: int  # slots [0, local_end) are the only ones that can be local
    q_tiles: tuple[torch.Tensor, ...]  # per query tile: min, max valid position, any invalid
    k_tiles: tuple[torch.Tensor, ...]  # the same per slot tile (pool slots EMPTY: invalid)
    local: tuple[torch.Tensor, ...]  # (partial counts (1, 1, Qt), indices (1, 1, Qt, Kt), full …)
    swapped: tuple[torch.Tensor, ...]  # slots [0, local_end) as queries: (1, 1, Lt, ·)


def _tile_range(pos: torch.Tensor, invalid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per FLEX_BLOCK tile of ``pos`` (..., L): min and max valid position, and whether the
    tile holds any invalid entry (or runs past the end); each (..., ceil(L / FLEX_BLOCK))."""
    pad = (-pos.shape[-1]) % FLEX_BLOCK
    pos = F.pad(pos, (0, pad)).unflatten(-1, (-1, FLEX_BLOCK))
    invalid = F.pad(invalid, (0, pad), value=True).unflatten(-1, (-1, FLEX_BLOCK))
    lo = torch.where(invalid, _BIG, pos).amin(dim=-1)
    hi = torch.where(invalid, -_BIG, pos).amax(dim=-1)
    return lo, hi, invalid.any(dim=-1)


def _tile_lists(visible: torch.Tensor, full: torch.Tensor, always: int) -> tuple[torch.Tensor, ...]:
    """(Bm, Qt, Kt) tile visibility -> BlockMask's counts (Bm, 1, Qt) and indices
    (Bm, 1, Qt, Kt), first of the partial tiles (``mask_mod`` decides each pair, the tile
    ``always`` among them), then of the full tiles (every pair visible)."""
    full = full & visible
    full[..., always] = False
    partial = visible & ~full
    partial[..., always] = True

    def listing(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True)  # listed tiles first
        return tiles.sum(dim=-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    return (*listing(partial), *listing(full))


def _slot_ranges(k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile ranges of slot positions (..., S), the sentinel (last slot) and EMPTY invalid."""
    S = k_pos.shape[-1]
    slot = torch.arange(S, device=k_pos.device)
    return _tile_range(k_pos, (k_pos == EMPTY) | (slot == S - 1))


def _far_lists(q_tiles, k_tiles, n_local: int, sentinel_tile: int) -> tuple[torch.Tensor, ...]:
    """Far visibility (``i - j >= n_local``) of query tiles (Qt,) against key tiles (Bm, Kt)."""
    q_lo, q_hi, q_bad = (t[None, :, None] for t in q_tiles)
    k_lo, k_hi, k_bad = (t[:, None, :] for t in k_tiles)
    far = q_hi - k_lo >= n_local
    far_full = ~q_bad & ~k_bad & (q_lo - k_hi >= n_local)
    return _tile_lists(far, far_full, sentinel_tile)


def chunk_masks(q_pos: torch.Tensor, k_pos: torch.Tensor, n_local: int, group: int,
                local_end: int | None = None) -> ChunkMasks:
    """Tile-level visibility of the local and swapped calls from the positions alone (the
    far call's depends on each layer's selection: :func:`far_tiles`).

    q_pos: (T,) query positions (``PAD_QUERY`` on padding rows); k_pos: (S,) slot
    positions, the last slot being the sentinel; slots from ``local_end`` on (default: all
    but the sentinel) are never local. A tile pair is visited when some pair of positions
    in it may be visible, and marked full when all are (then ``mask_mod`` is skipped
    there); nothing finer than tiles is materialised.
    """
    S = k_pos.shape[0]
    local_end = S - 1 if local_end is None else local_end
    q_tiles = _tile_range(q_pos, q_pos == PAD_QUERY)
    q_lo, q_hi, q_bad = q_tiles
    k_tiles = _slot_ranges(k_pos)
    k_lo, k_hi, k_bad = k_tiles
    clean = ~q_bad[:, None] & ~k_bad[None, :]
    # local: i - j in [0, n_local) for some pair <=> the distance range [q_lo - k_hi,
    # q_hi - k_lo] meets [0, n_local); for all pairs <=> it lies inside
    local = (q_hi[:, None] - k_lo[None, :] >= 0) & (q_lo[:, None] - k_hi[None, :] < n_local)
    local_full = clean & (q_lo[:, None] - k_hi[None, :] >= 0) & (q_hi[:, None] - k_lo[None, :] < n_local)
    sentinel_tile = (S - 1) // FLEX_BLOCK
    # swapped: the slots [0, local_end) attend to the queries (stacked G times) + a sentinel
    sw_pos = torch.cat([q_pos.repeat(group), q_pos.new_full((1,), PAD_QUERY)])
    s_lo, s_hi, s_bad = _tile_range(sw_pos, sw_pos == PAD_QUERY)
    l_lo, l_hi, l_bad = _tile_range(k_pos[:local_end], k_pos[:local_end] == EMPTY)
    swapped = (s_hi[None, :] - l_lo[:, None] >= 0) & (s_lo[None, :] - l_hi[:, None] < n_local)
    swapped_full = (~l_bad[:, None] & ~s_bad[None, :] & (s_lo[None, :] - l_hi[:, None] >= 0)
                    & (s_hi[None, :] - l_lo[:, None] < n_local))
    return ChunkMasks(q_pos, k_pos, sw_pos, local_end, q_tiles, k_tiles,
                      _tile_lists(local[None], local_full[None], sentinel_tile),
                      _tile_lists(swapped[None], swapped_full[None], (sw_pos.shape[0] - 1) // FLEX_BLOCK))


def far_tiles(masks: ChunkMasks, pool_far: torch.Tensor, pool_slot: int, n_local: int) -> tuple[torch.Tensor, ...]:
    """The far call's tile lists (B, 1, Qt, ·) for one layer: ``pool_far`` (B, P) marks
    the pool slots ``[pool_slot, pool_slot + P)`` (``pool_slot`` on a tile boundary) that
    hold a block the sequence selected. Only the pool's tiles are computed here; the
    tiles before them come from the chunk's ``k_tiles``. About 45 small ops: 0.22 ms a
    call on one CPU thread (the per-chunk gather it replaced took 0.6 ms a layer)."""
    if pool_slot % FLEX_BLOCK:
        raise ValueError(f"pool_slot {pool_slot} must be a multiple of {FLEX_BLOCK}")
    B, P = pool_far.shape
    S = masks.k_pos.shape[0]
    t0, n_tiles = pool_slot // FLEX_BLOCK, -(-S // FLEX_BLOCK)
    flags = F.pad(pool_far, (0, (n_tiles - t0) * FLEX_BLOCK - P)).view(B, n_tiles - t0, FLEX_BLOCK)
    some, every = flags.any(dim=-1), flags.all(dim=-1)  # (B, pool tiles); the sentinel counts as not far
    lo, hi, bad = (t[:t0].expand(B, -1) for t in masks.k_tiles)
    k_tiles = (torch.cat([lo, torch.where(some, FAR, _BIG)], dim=1),
               torch.cat([hi, torch.where(some, FAR, -_BIG)], dim=1),
               torch.cat([bad, ~every], dim=1))
    return _far_lists(masks.q_tiles, k_tiles, n_local, (S - 1) // FLEX_BLOCK)


def joint_attention_flex(q_loc: torch.Tensor, q_far: torch.Tensor, k_self: torch.Tensor,
                         k_rot: torch.Tensor, k_raw: torch.Tensor, v_ext: torch.Tensor,
                         masks: ChunkMasks, far_pos: torch.Tensor, far_lists: tuple[torch.Tensor, ...],
                         n_local: int, compiled: bool = True, scores=None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint local+far attention of one execution chunk (see the module docstring).

    q_loc/q_far: (B, H, T, d) float32, rotated at the queries' positions / at n_local - 1;
    k_self: (B, Hkv, T, d) the queries' own keys, rotated; k_rot/k_raw/v_ext:
    (B, Hkv, S, d + 2) slots with the columns (…, real, sentinel); far_pos (B, S) and
    far_lists: the far call's slot positions and tiles (:func:`far_tiles`). Returns the
    output (B, H, T, d), the per-slot sums over the queries of the jointly normalised
    local probabilities (B, H, local_end) and the joint log-sum-exp (B, H, T).
    ``compiled=False`` runs the same code eagerly (flex then materialises its scores: slow,
    for tests and debugging). ``scores``: a function computing the sums from (q_loc,
    k_rot[:, :, :local_end, :d], q_pos, k_pos[:local_end], lse, n_local) instead of the
    swapped flex call (the Triton kernel on CUDA).
    """
    args = (q_loc, q_far, k_self, k_rot, k_raw, v_ext, masks.q_pos, masks.k_pos, masks.sw_pos,
            far_pos, masks.local, far_lists, masks.swapped, n_local, masks.local_end)
    if not compiled:
        return _joint(*args, scores=scores)
    # Measured on the CPU (embedded model's sizes): a decode step is fastest compiled as one
    # graph (0.6 ms vs 1.7 ms a layer, the small ops fused), a 512-query chunk with only the
    # three flex calls compiled (44 ms vs 60 ms).
    if q_loc.shape[2] == 1:
        return compiled_once("joint", _joint)(*args)
    return _joint(*args, call=compiled_once("call", _sentinel_call), scores=scores)


def _joint(q_loc, q_far, k_self, k_rot, k_raw, v_ext, q_pos, k_pos, sw_pos, far_pos, local_tiles,
           far_lists, swapped_tiles, n_local: int, local_end: int, call=None, scores=None):
    call = call or _sentinel_call
    B, H, T, d = q_loc.shape
    Hkv = k_rot.shape[1]
    G = H // Hkv
    root_d = math.sqrt(d)  # flex scales every logit by 1/sqrt(d): pre-multiply the extras
    zeros = q_loc.new_zeros(B, H, T, 1)
    # each query's logit with its own key: always visible, so a safe reference logit
    self_logit = (q_loc * k_self.repeat_interleave(G, dim=1)).sum(dim=-1) / root_d  # (B, H, T)

    # 1. local: the sentinel column of the query holds the self logit
    q1 = torch.cat([q_loc, zeros, (self_logit * root_d)[..., None]], dim=-1)
    o_loc = call(q1, k_rot, v_ext, q_pos, k_pos, local_tiles, n_local, False)  # (B, H, T, d + 2)
    real, sent = o_loc[..., d], o_loc[..., d + 1]
    has_local = real > 0  # False only on padding rows
    lse_loc = torch.where(has_local, self_logit + real.log() - sent.log(), 0.0)
    out_loc = o_loc[..., :d] / torch.where(has_local, real, 1.0)[..., None]

    # 2. far: the sentinel stands for the whole local mass
    q2 = torch.cat([q_far, zeros, (lse_loc * root_d)[..., None]], dim=-1)
    o_far = call(q2, k_raw, v_ext, q_pos, far_pos, far_lists, n_local, True)  # (B, H, T, d + 2)
    w_loc = o_far[..., d + 1]  # local share of the joint mass
    out = out_loc * w_loc[..., None] + o_far[..., :d]
    lse = torch.where(has_local, lse_loc - w_loc.log(), 0.0)  # (B, H, T) joint log-sum-exp

    k_local, pos_local = k_rot[:, :, :local_end], k_pos[:local_end]
    if T == 1:  # one query: its local probabilities are the sums, read off directly
        logits = q_loc.view(B, Hkv, G, d) @ k_local[..., :d].transpose(-1, -2) / root_d  # (B, Hkv, G, L)
        dist = q_pos - pos_local  # (L,)
        is_local = (dist >= 0) & (dist < n_local)
        p = torch.where(is_local, (logits - lse.view(B, Hkv, G, 1)).exp(), 0.0)
        return out, p.reshape(B, H, -1), lse
    if scores is not None:
        return out, scores(q_loc, k_local[..., :d], q_pos, pos_local, lse, n_local), lse

    # 3. swapped: slots attend to the queries (the G heads of a KV head stacked); the
    # query's real column carries -lse so the logit is log P(i -> j); a zero key is the
    # sentinel of logit 0. Negated positions keep the local rule: -j - (-i) = i - j.
    n_sw = G * T
    keys = torch.cat([q_loc, (-lse * root_d)[..., None], zeros], dim=-1).reshape(B, Hkv, n_sw, d + 2)
    keys = torch.cat([keys, keys.new_zeros(B, Hkv, 1, d + 2)], dim=2)
    values = _one_hot_values(G, T, q_loc).expand(B, Hkv, -1, -1).contiguous()  # (B, Hkv, n_sw + 1, ≥ G + 1)
    o_sw = call(k_local, keys, values, -pos_local, -sw_pos, swapped_tiles, n_local, False)  # (B, Hkv, L, G + 1)
    sums = o_sw[..., :G] / o_sw[..., G:G + 1]  # (B, Hkv, L, G)
    return out, sums.permute(0, 1, 3, 2).reshape(B, H, -1), lse


def _sentinel_call(q, k, v, q_pos, k_pos, tiles, n_local: int, far: bool):
    """flex over the visited tiles: query i sees key j iff j is the sentinel (the last
    key), or, with d = q_pos[i] - k_pos[j], j is local (0 <= d < n_local) or, with
    ``far``, far (d >= n_local). q/k carry the two indicator columns (scale 1/sqrt(d)).
    ``k_pos`` is (S,) or, per sequence, (B, S)."""
    T, S, sentinel = q.shape[2], k.shape[2], k.shape[2] - 1
    per_sequence = k_pos.dim() == 2

    def mask_mod(b, h, qi, kv):
        dist = q_pos[qi] - (k_pos[b, kv] if per_sequence else k_pos[kv])
        seen = dist >= n_local if far else (dist >= 0) & (dist < n_local)
        return (kv == sentinel) | seen

    mask = BlockMask.from_kv_blocks(*tiles, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(T, S))
    return flex_attention(q, k, v, block_mask=mask, scale=1.0 / math.sqrt(q.shape[-1] - 2), enable_gqa=True)


def _one_hot_values(G: int, T: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 1, G·T + 1, max(G + 1, 16)): row c·T + t is one-hot at c, the last row at G;
    zero columns pad the width to 16, the least head dimension flex kernels take (and
    measured faster than 4 columns on the CPU)."""
    rows = torch.arange(G * T + 1, device=like.device)
    col = torch.where(rows < G * T, rows // T, G)
    return F.one_hot(col, max(G + 1, 16)).to(like.dtype)[None, None]
