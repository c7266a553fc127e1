"""InfLLM's joint softmax over local and far keys (SPEC §4) and the representative-score
increments (SPEC §5) as dense matmuls over the few keys an execution chunk can see: the
CPU's fast path.

Compiled FlexAttention on the CPU visits its 128 × 128 tiles in a C++ loop at about a
quarter of the matmul rate, and needs a third call for the representative scores. The
keys one chunk of ``T`` queries (padded to ``Tp``) at positions ``[s, e)`` can see are
few, and those of the slot array contiguous: slots ``[0, tail_slot + used)`` hold
increasing positions (initial tokens, then the tail), so

* its **local** keys lie in the ``Tp + n_local - 1`` slots ending at the chunk's last
  token (rotated keys; visible iff ``0 <= i - p < n_local``);
* its **far** keys lie in the slot prefix ``[0, F)``, ``F = n_init + Tp + block_size - 1``
  (the initial tokens and the tail's oldest, never more: blocks form as soon as they
  leave the window), visible iff ``i - p >= n_local``, plus the selected blocks' pool
  slots (always far), un-rotated keys.

The queries go in tiles of ``QUERY_TILE`` rows, each with its own window and prefix
(``W = tile + n_local - 1`` slots, the prefix up to its last query's reach), so that
the materialised logits (``(B, H, tile, W + F_t + topk·block)``) stay small; one softmax
runs over the three sets of keys, and the local probabilities summed over the queries
are every slot's score increment, read off the same tensor. Static shapes, so one
compiled graph (``slots.compiled_once``) serves every chunk and one every decode step.
"""

from __future__ import annotations

import math

import torch

QUERY_TILE = 64  # query rows per tile (measured on one layer chunk: 512 rows 65 ms, 128 rows 54, 64 rows 50, 32 rows 57)


def window_rows(n_queries: int, exc_block_size: int) -> int:
    """The rows a chunk of ``n_queries`` is padded to: one for a decode step, else whole
    query tiles in a power-of-two count, at most ``exc_block_size``: with 512 and tiles of
    64 a chunk is padded to 64, 128, 256 or 512 rows, so compiled attention sees five shapes
    in all, and a short prompt (a chat turn) pays for its own tiles, not for 512 rows
    (measured before: a 128-token prompt cost as much as a 512-token one)."""
    if n_queries == 1:
        return 1
    rows = QUERY_TILE
    while rows < n_queries:
        rows *= 2
    return min(rows, exc_block_size)


def window_sizes(rows: int, n_init: int, n_local: int, block_size: int, local_end: int
                 ) -> tuple[int, int, int, tuple[int, ...]]:
    """(padded rows, query rows per tile, each tile's local window W in slots, each tile's
    far prefix in slots) for a chunk of up to ``rows`` queries: rows are padded to whole
    tiles. Tile t's queries reach the far prefix ``[0, n_init + (t+1)·tile + block_size - 1)``
    at most (the tail's oldest tokens formed a block as soon as they left the window), and
    never past ``local_end`` (the pool's slots are reached through the blocks)."""
    tile = min(rows, QUERY_TILE)
    padded = -(-rows // tile) * tile
    reach = tuple(min(n_init + (t + 1) * tile + block_size - 1, local_end) for t in range(padded // tile))
    return padded, tile, tile + n_local - 1, reach


def window_slots(k_pos: torch.Tensor, padded: int, last_slot: int, n_real: int,
                 tile: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query tile's local window: slots (n_tiles, W) and their positions. The chunk's
    real queries (the first ``n_real`` of its ``padded`` rows) sit in consecutive slots
    ending at ``last_slot`` (exclusive); a tile's window ends at its last real query's slot."""
    n_tiles = padded // tile
    last_row = torch.clamp(torch.arange(1, n_tiles + 1, device=k_pos.device) * tile, max=n_real) - 1
    end = last_slot - (n_real - 1 - last_row)  # (n_tiles,) slot after each tile's last query
    first = torch.clamp(end - W, min=0)
    win_idx = first[:, None] + torch.arange(W, device=k_pos.device)  # (n_tiles, W)
    return win_idx, k_pos[win_idx]


def block_keys(block_slots: torch.Tensor | None, n_blocks: int, block_size: int,
               batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot indices (B, n_blocks·block) of the selected blocks' keys and whether each
    entry is used: ``block_slots`` (B, k) are the first slots of the pool blocks each
    sequence selected (k <= n_blocks), None when none is."""
    idx = torch.zeros(batch_size, n_blocks * block_size, dtype=torch.long, device=device)
    used = torch.zeros(batch_size, n_blocks * block_size, dtype=torch.bool, device=device)
    if block_slots is not None and block_slots.shape[1]:
        k = block_slots.shape[1]
        idx[:, :k * block_size] = (block_slots[:, :, None] + torch.arange(block_size, device=device)).flatten(1)
        used[:, :k * block_size] = True
    return idx, used


def _masked_logits(q: torch.Tensor, k: torch.Tensor, seen: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, Hkv, G·t, d) against k (B, Hkv, n, d): logits (B, H, t, n), -inf where not
    ``seen`` (broadcastable to (B, 1, t, n))."""
    B, Hkv, rows, _ = q.shape
    t = seen.shape[-2]
    logits = (q @ k.transpose(-1, -2)).view(B, Hkv * (rows // t), t, k.shape[2]) * scale
    return logits.masked_fill(~seen, float("-inf"))


def joint_attention_window(q_loc: torch.Tensor, q_far: torch.Tensor, k_rot: torch.Tensor,
                           k_raw: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                           win_idx: torch.Tensor, win_pos: torch.Tensor, prefix_pos: torch.Tensor,
                           reach: tuple[int, ...], block_idx: torch.Tensor, block_used: torch.Tensor,
                           n_local: int, n_sums: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint local+far attention of one execution chunk (see the module docstring).

    q_loc/q_far: (B, H, T, d) float32 rotated at the queries' positions / at n_local - 1;
    k_rot/k_raw/v: (B, Hkv, S, ≥ d) the layer's slots (columns past d ignored); q_pos (T,)
    (``PAD_QUERY`` on padding rows); win_idx/win_pos (n_tiles, W): each query tile's
    local window slots and their positions (:func:`window_slots`); prefix_pos (F,): the
    positions of the slots ``[0, F)``, the far candidates besides the blocks, of which
    tile t reaches the first ``reach[t]`` (:func:`window_sizes`); block_idx /
    block_used (B, K): the selected blocks' slots (:func:`block_keys`). Returns the output
    (B, H, T, d), the summed jointly normalised local probabilities of the slots
    ``[0, n_sums)`` (B, H, n_sums) and the joint log-sum-exp (B, H, T) (0 on padding rows,
    which see nothing).
    """
    B, H, T, d = q_loc.shape
    Hkv = k_rot.shape[1]
    G, (n_tiles, W), F, K = H // Hkv, win_idx.shape, max(reach), block_idx.shape[1]
    tile = T // n_tiles
    scale = 1.0 / math.sqrt(d)
    k_win = k_rot[..., :d].index_select(2, win_idx.flatten()).view(B, Hkv, n_tiles, W, d)
    v_win = v[..., :d].index_select(2, win_idx.flatten()).view(B, Hkv, n_tiles, W, d)
    k_pre, v_pre = k_raw[:, :, :F, :d], v[:, :, :F, :d]  # (B, Hkv, F, d)
    index = block_idx[:, None, :, None].expand(B, Hkv, K, d)
    k_blk, v_blk = k_raw[..., :d].gather(2, index), v[..., :d].gather(2, index)  # (B, Hkv, K, d)
    # the blocks are far from every query: their logits for the whole chunk at once
    q_far = q_far.view(B, Hkv, G, T, d)
    blk = _masked_logits(q_far.reshape(B, Hkv, G * T, d), k_blk, block_used[:, None, None, :], scale)
    blk = blk.view(B, H, T, K)
    q_loc = q_loc.view(B, Hkv, G, T, d)
    sums = q_loc.new_zeros(B, H, n_sums)
    outs, lses = [], []
    for t in range(n_tiles):  # unrolled: static shapes
        rows = slice(t * tile, (t + 1) * tile)
        pos = q_pos[rows]  # (tile,)
        f = reach[t]  # the far prefix this tile's queries can reach
        dist = pos[:, None] - win_pos[t][None, :]  # (tile, W)
        local = _masked_logits(q_loc[:, :, :, rows].reshape(B, Hkv, G * tile, d), k_win[:, :, t],
                               (dist >= 0) & (dist < n_local), scale)  # (B, H, tile, W)
        qf = q_far[:, :, :, rows].reshape(B, Hkv, G * tile, d)
        pre = _masked_logits(qf, k_pre[:, :, :f], pos[:, None] - prefix_pos[None, :f] >= n_local, scale)
        parts = [(local, v_win[:, :, t]), (pre, v_pre[:, :, :f])]  # (logits, values)
        if K:
            parts.append((blk[:, :, rows], v_blk))  # (B, H, tile, K)

        top = torch.stack([x.amax(dim=-1) for x, _ in parts]).amax(dim=0)  # (B, H, tile)
        top = torch.where(top.isfinite(), top, 0.0)[..., None]  # padding rows see nothing
        probs = [(x - top).exp() for x, _ in parts]  # 0 where hidden
        z = sum(p.sum(dim=-1) for p in probs)  # (B, H, tile)
        seen = z > 0
        z = torch.where(seen, z, 1.0)
        inv = torch.where(seen, 1.0 / z, 0.0)
        out = sum(p.reshape(B, Hkv, G * tile, p.shape[-1]) @ vals for p, (_, vals) in zip(probs, parts))
        outs.append(out.view(B, H, tile, d) * inv[..., None])
        lses.append(torch.where(seen, top[..., 0] + z.log(), 0.0))
        sums.index_add_(2, win_idx[t], (probs[0] * inv[..., None]).sum(dim=2))  # (B, H, W) into slots
    return torch.cat(outs, dim=2), sums, torch.cat(lses, dim=2)
