"""InfLLM's joint softmax (SPEC §4) and representative-score sums (SPEC §5) with every
logit of the slot array materialised: the plain twin of :mod:`.flex_joint` (same inputs,
same outputs), behind the ``torch`` kernel, for debugging. (B, H, T, S) scores: slow."""

from __future__ import annotations

import math

import torch

from .flex_joint import ChunkMasks


def joint_attention_dense(q_loc: torch.Tensor, q_far: torch.Tensor, k_self: torch.Tensor,
                          k_rot: torch.Tensor, k_raw: torch.Tensor, v_ext: torch.Tensor,
                          masks: ChunkMasks, far_pos: torch.Tensor, far_lists, n_local: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same as :func:`.flex_joint.joint_attention_flex`, every logit materialised."""
    B, H, T, d = q_loc.shape
    G = H // k_rot.shape[1]
    keys_loc = k_rot[:, :, :-1, :d].repeat_interleave(G, dim=1)  # (B, H, S-1, d), sentinel dropped
    keys_far = k_raw[:, :, :-1, :d].repeat_interleave(G, dim=1)
    values = v_ext[:, :, :-1, :d].repeat_interleave(G, dim=1)
    dist = masks.q_pos[:, None] - masks.k_pos[None, :-1]  # (T, S-1)
    local = (dist >= 0) & (dist < n_local)
    far = (masks.q_pos[:, None] - far_pos[:, None, :-1] >= n_local)[:, None]  # (B, 1, T, S-1)
    scale = 1.0 / math.sqrt(d)
    logits = torch.where(local, q_loc @ keys_loc.transpose(-1, -2) * scale,
                         torch.where(far, q_far @ keys_far.transpose(-1, -2) * scale, float("-inf")))
    lse = torch.logsumexp(logits, dim=-1)  # (B, H, T), -inf on padding rows
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # padding rows see nothing
    sums = (p * local).sum(dim=2)[..., :masks.local_end]  # (B, H, local_end)
    return p @ values, sums, torch.where(lse.isfinite(), lse, 0.0)
