"""Representative scores (SPEC §5): how much attention each key received from the queries
that saw it in their local window,

    scores[b, h, j] = Σ_i exp(q[b,h,i] · k[b,h//G,j] / sqrt(d) − lse[b,h,i])
                      over the i with 0 <= q_pos[i] − k_pos[j] < n_local,

i.e. the summed local attention probabilities; a block's representative tokens are its
top-scored keys. ``representative_scores_triton`` and ``representative_scores_torch``
share one signature and one result; ``representative_scores`` dispatches (Triton for CUDA
tensors when triton imports, else torch).

Positions are int64 and may be sentinels (padding queries ``-(1<<41)``, unused key slots
``1<<40``, far slots ``-(1<<40)``): the visibility rule alone hides them, and hidden
pairs contribute exactly 0.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.kernels import jitted, launch_mode, on_triton, tl, triton

# (BLOCK_S, BLOCK_T): keys per program, query tile. The interpreter runs numpy on whole
# tiles, one program after another: small tiles keep it quick.
CUDA_BLOCKS = (64, 64)
INTERPRET_BLOCKS = (16, 16)
QUERY_CHUNK = 256  # the torch twin's query rows per step: at most (B, H, 256, S) logits


def _check(q, k, q_pos, k_pos, lse, n_local) -> None:
    name = "representative_scores"
    if q.dim() != 4:
        raise InfLLMLiteError(f"{name}: q must be (B, H, T, d), got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise InfLLMLiteError(f"{name}: k must be (B, Hkv, S, d), got shape {tuple(k.shape)}")
    (B, H, T, d), (Bk, Hkv, S, dk) = q.shape, k.shape
    if B != Bk or d != dk:
        raise InfLLMLiteError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B or d")
    if Hkv == 0 or H % Hkv:
        raise InfLLMLiteError(f"{name}: H={H} query heads is not a multiple of Hkv={Hkv} key heads")
    if tuple(q_pos.shape) != (T,):
        raise InfLLMLiteError(f"{name}: q_pos must be (T,)=({T},), got shape {tuple(q_pos.shape)}")
    if tuple(k_pos.shape) != (S,):
        raise InfLLMLiteError(f"{name}: k_pos must be (S,)=({S},), got shape {tuple(k_pos.shape)}")
    if tuple(lse.shape) != (B, H, T):
        raise InfLLMLiteError(f"{name}: lse must be (B, H, T)={(B, H, T)}, got shape {tuple(lse.shape)}")
    if not (q.is_floating_point() and k.is_floating_point() and lse.is_floating_point()):
        raise InfLLMLiteError(f"{name}: q, k and lse must be floating, got {q.dtype}, {k.dtype}, {lse.dtype}")
    if q_pos.is_floating_point() or k_pos.is_floating_point() or q_pos.is_complex() or k_pos.is_complex():
        raise InfLLMLiteError(f"{name}: positions must be integers, got {q_pos.dtype} and {k_pos.dtype}")
    if n_local < 0:
        raise InfLLMLiteError(f"{name}: n_local must be >= 0, got {n_local}")
    devices = {t.device for t in (q, k, q_pos, k_pos, lse)}
    if len(devices) > 1:
        raise InfLLMLiteError(f"{name}: tensors on several devices: {sorted(map(str, devices))}")


def representative_scores_torch(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                                lse: torch.Tensor, n_local: int) -> torch.Tensor:
    """(B, H, S) float32, in float32, queries in chunks of QUERY_CHUNK rows."""
    _check(q, k, q_pos, k_pos, lse, n_local)
    (B, H, T, d), Hkv, S = q.shape, k.shape[1], k.shape[2]
    G = H // Hkv
    out = torch.zeros(B, Hkv, G, S, dtype=torch.float32, device=q.device)  # (B, Hkv, G, S)
    if T == 0 or S == 0:
        return out.reshape(B, H, S)
    scale = 1.0 / math.sqrt(d)
    kT = k.float().transpose(-1, -2)[:, :, None]  # (B, Hkv, 1, d, S)
    q_pos, k_pos = q_pos.long(), k_pos.long()
    for s in range(0, T, QUERY_CHUNK):
        e = min(s + QUERY_CHUNK, T)
        qc = q[:, :, s:e].float().reshape(B, Hkv, G, e - s, d)  # (B, Hkv, G, t, d)
        logits = (qc @ kT) * scale  # (B, Hkv, G, t, S)
        logits -= lse[:, :, s:e].float().reshape(B, Hkv, G, e - s, 1)
        dist = q_pos[s:e, None] - k_pos[None, :]  # (t, S) int64
        visible = (dist >= 0) & (dist < n_local)
        out += logits.masked_fill_(~visible, float("-inf")).exp_().sum(dim=3)
    return out.reshape(B, H, S)


def _representative_kernel(q_ptr, k_ptr, qpos_ptr, kpos_ptr, lse_ptr, out_ptr,
                           H, G, T, S, d, n_local, scale,
                           sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_s, sk_d, sl_b, sl_h, sl_t,
                           so_b, so_h, so_s,
                           BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_S keys of one (batch, query head), the queries in BLOCK_T tiles."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    hk = h // G
    j = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    j_ok = j < S
    dd = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_ok = dd < d
    k_off = b * sk_b + hk * sk_h + j[:, None].to(tl.int64) * sk_s + dd[None, :] * sk_d
    kt = tl.load(k_ptr + k_off, mask=j_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_S, BLOCK_D)
    k_pos = tl.load(kpos_ptr + j, mask=j_ok, other=0).to(tl.int64)  # (BLOCK_S,)
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        i = t0 + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
        i_ok = i < T
        q_pos = tl.load(qpos_ptr + i, mask=i_ok, other=0).to(tl.int64)  # (BLOCK_T,)
        dist = q_pos[:, None] - k_pos[None, :]  # (BLOCK_T, BLOCK_S) int64
        visible = (dist >= 0) & (dist < n_local) & i_ok[:, None] & j_ok[None, :]
        if tl.max(visible.to(tl.int32)) > 0:  # most tiles (far, empty, future) see nothing
            q_off = b * sq_b + h * sq_h + i[:, None].to(tl.int64) * sq_t + dd[None, :] * sq_d
            qt = tl.load(q_ptr + q_off, mask=i_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + b * sl_b + h * sl_h + i * sl_t, mask=i_ok, other=0.0).to(tl.float32)
            logits = tl.dot(qt, tl.trans(kt), input_precision="ieee") * scale  # (BLOCK_T, BLOCK_S)
            x = tl.where(visible, logits - lse[:, None], float("-inf"))
            acc += tl.sum(tl.exp(x), axis=0)
    tl.store(out_ptr + b * so_b + h * so_h + j * so_s, acc, mask=j_ok)


def representative_scores_triton(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                                 lse: torch.Tensor, n_local: int) -> torch.Tensor:
    """Triton twin of :func:`representative_scores_torch` (CUDA tensors, or any with
    TRITON_INTERPRET=1)."""
    _check(q, k, q_pos, k_pos, lse, n_local)
    interpret = launch_mode(q.device, "representative_scores_triton")
    (B, H, T, d), Hkv, S = q.shape, k.shape[1], k.shape[2]
    out = torch.empty(B, H, S, dtype=torch.float32, device=q.device)  # (B, H, S)
    if B * H * S == 0:
        return out
    if T == 0 or d == 0 or n_local == 0:
        return out.zero_()
    q_pos, k_pos = q_pos.long(), k_pos.long()
    BLOCK_S, BLOCK_T = INTERPRET_BLOCKS if interpret else CUDA_BLOCKS
    BLOCK_D = max(16, triton.next_power_of_2(d))
    grid = (B * H, triton.cdiv(S, BLOCK_S))
    kernel = jitted(_representative_kernel, interpret)
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        kernel[grid](q, k, q_pos, k_pos, lse, out, H, H // Hkv, T, S, d, n_local, 1.0 / math.sqrt(d),
                     *q.stride(), *k.stride(), *lse.stride(), *out.stride(),
                     BLOCK_S=BLOCK_S, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    return out


def representative_scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                          lse: torch.Tensor, n_local: int) -> torch.Tensor:
    """(B, H, S) float32 summed local attention probabilities of each key, per query head.

    q (B, H, T, d) and k (B, Hkv, S, d) already rotated, H = G·Hkv (head h reads kv head
    h // G); q_pos (T,), k_pos (S,) absolute positions; lse (B, H, T) the queries' full
    attention log-sum-exp. Triton on CUDA when available, else torch."""
    if on_triton(q, k, q_pos, k_pos, lse):
        return representative_scores_triton(q, k, q_pos, k_pos, lse, n_local)
    return representative_scores_torch(q, k, q_pos, k_pos, lse, n_local)
