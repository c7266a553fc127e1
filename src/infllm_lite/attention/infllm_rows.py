"""InfLLM decode steps of several sequences whose memories are rows of one arena bank.

Each sequence's step is :meth:`.infllm.InfLLMLayerAttention._one_query` (SPEC §4–§6 for
one query, :mod:`.decode_step`); here the parts that are the same arithmetic for every
sequence run once over the bank's rows, and only what follows one sequence's own blocks
runs per sequence:

* over the batch: the rotations (each query and key at its own position, the queries
  again at ``n_local - 1``), the stores into each row's next slot, the logits of the far
  prefix, of the local window and of the selected blocks (one batched matmul each over
  the rows from the lowest to the highest, each row's columns past its own masked), the
  one joint softmax, the outputs and the tail's score increments;
* per sequence: the block selection and residency (the pool's page table, the copy of
  newly selected blocks into the row's ``sel_k`` / ``sel_v``), ``lru-s`` masses, the
  trace, and block formation (which works on the row's views, as for one sequence).

The numbers are one sequence's up to float rounding of the batched reductions (tests
hold them within 1e-4 and the greedy tokens equal, tests/test_infllm_rows.py).
"""

from __future__ import annotations

import torch

from ..rope import apply_rope


def attend_rows(layers: list, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query of each of B sequences, ``layers[b]`` (an ``InfLLMLayerAttention`` of
    batch 1, all rows of one bank, one config) that of row b. q: (B, H, 1, d), k/v:
    (B, Hkv, 1, d) un-rotated. Returns (B, H, 1, d)."""
    first = layers[0]
    if len(layers) == 1:
        return first._one_query(q, k, v, first.state.length)
    cfg, state, bank, i = first.cfg, first.state, first.row.bank, first.index
    B, H, _, d = q.shape
    Hkv, dev = k.shape[1], q.device
    G, bs, t0 = H // Hkv, cfg.block_size, state.layout.tail_slot

    starts = [layer.state.length for layer in layers]  # each query's position
    cos, sin = state.rows_rotation(tuple(starts))  # (B, 1, 1, d) at each position; the far angle (1, d)
    x = apply_rope(torch.cat((q, k), dim=1).float(), cos, sin)  # (B, H + Hkv, 1, d)
    q_loc, k_rot = x[:, :H, 0], x[:, H:, 0]  # (B, H, d), (B, Hkv, d)
    q_far = apply_rope(q.float(), state.cos_far, state.sin_far)[:, :, 0]  # (B, H, d)

    # the token's slot in each row: an initial one, or the tail's newest (its score is 0 already)
    slots = [s if s < cfg.n_init else t0 + s - layer.tail_start for s, layer in zip(starts, layers)]
    rows = [layer.row.row for layer in layers]
    row_t, slot_t = torch.tensor(rows, device=dev), torch.tensor(slots, device=dev)
    k_rot_all, k_raw_all, v_all = (bank.slab(i, name) for name in ("k_rot", "k_raw", "v"))  # (R, Hkv, S, d + 2)
    k_raw_all[row_t, :, slot_t, :d] = k[:, :, 0].float()
    k_rot_all[row_t, :, slot_t, :d] = k_rot
    v_all[row_t, :, slot_t, :d] = v[:, :, 0].float()

    for layer in layers:
        if layer._one is None:
            layer._one = layer._one_query_views()
    chosen = [layer._select_one(q_far[b])[0] for b, layer in enumerate(layers)]  # host lists or None
    n_sel = [0 if c is None else len(c) for c in chosen]

    lo, hi = min(rows), max(rows) + 1  # the rows the batched products run over
    R, at = hi - lo, row_t - lo  # (B,) each sequence's place among them
    last = [slot + 1 for slot in slots]
    split = [max(0, end - cfg.n_local) for end in last]  # slots [0, split) far, [split, last) local
    end, far_end, loc_start = max(last), max(split), min(split)
    n_keys = max(n_sel) * bs  # block columns after the slots
    per_row = torch.tensor([[1, 0, 0]] * R, device=dev)  # (R, 3): last, split, block keys; other rows see slot 0
    per_row[at] = torch.tensor([[a, b, c * bs] for a, b, c in zip(last, split, n_sel)], device=dev)
    last_r, split_r, keys_r = per_row.unbind(1)

    def grouped(x: torch.Tensor) -> torch.Tensor:  # (B, H, d) -> (R, Hkv, G, d), zero rows outside
        out = x.new_zeros(R, Hkv, G, d)
        out[at] = x.view(B, Hkv, G, d)
        return out

    q_loc, q_far = grouped(q_loc), grouped(q_far)
    logits = q.new_empty(R, Hkv, G, end + n_keys, dtype=torch.float32)
    logits[..., loc_start:end] = q_loc @ k_rot_all[lo:hi, :, loc_start:end, :d].transpose(-1, -2)
    if far_end:
        far = q_far @ k_raw_all[lo:hi, :, :far_end, :d].transpose(-1, -2)  # (R, Hkv, G, far_end)
        logits[..., :loc_start] = far[..., :loc_start]
        is_far = torch.arange(loc_start, far_end, device=dev) < split_r[:, None]  # (R, ·)
        logits[..., loc_start:far_end] = torch.where(is_far[:, None, None], far[..., loc_start:],
                                                     logits[..., loc_start:far_end])
    if n_keys:
        block_k = bank.slab(i, "sel_k")[lo:hi].flatten(2, 3)[:, :, :n_keys]  # (R, Hkv, n_keys, d)
        logits[..., end:] = q_far @ block_k.transpose(-1, -2)
    cols = torch.arange(end + n_keys, device=dev)
    unseen = torch.where(cols < end, cols >= last_r[:, None], cols - end >= keys_r[:, None])  # (R, ·)
    logits.masked_fill_(unseen[:, None, None], float("-inf"))
    p = torch.softmax(logits.mul_(d ** -0.5), dim=-1)  # (R, Hkv, G, end + n_keys)
    out = p[..., :end] @ v_all[lo:hi, :, :end, :d]  # (R, Hkv, G, d)
    if n_keys:
        out += p[..., end:] @ bank.slab(i, "sel_v")[lo:hi].flatten(2, 3)[:, :, :n_keys]

    if end > t0:  # the tail slots' local probabilities are their score increments
        local = torch.arange(t0, end, device=dev) >= split_r[:, None]  # (R, end - t0)
        gained = (p[..., t0:end] * local[:, None, None]).reshape(R, H, end - t0)
        scores = bank.slab(i, "tail_scores")  # (R_bank, H, tail_capacity)
        scores[row_t, :, :end - t0] += gained[at]
    for b, layer in enumerate(layers):
        selected = chosen[b]
        if selected is not None and layer.pool.policy == "lru-s":
            blocks = layer._one_selected.blocks[:len(selected)]  # in the order of the block keys
            mass = p[at[b], ..., end:end + len(blocks) * bs].reshape(H, len(blocks), bs).sum(dim=(0, 2))
            layer.pool.record_chunk(blocks, mass)
        if layer.state.record:
            picked = None if selected is None else torch.tensor([selected], device=dev)
            layer.trace.append((starts[b], starts[b] + 1, layer._padded(picked)))
        layer._form_blocks(starts[b] + 1)
    out = out[at].reshape(B, H, 1, d)
    return out if out.dtype == q.dtype else out.to(q.dtype)
