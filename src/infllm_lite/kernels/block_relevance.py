"""Block relevance (SPEC §6): each memory block's score for a chunk is the dot product of
the chunk's mean query with the block's representative vector; the chunk attends the
top-k blocks.

``block_scores_triton`` and ``block_scores_torch`` share one signature and one result;
``block_scores`` dispatches (Triton for CUDA tensors when triton imports, else torch).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.kernels import jitted, launch_mode, on_triton, tl, triton

# (BLOCK_N, BLOCK_D): blocks per program, feature tile. The interpreter runs numpy on
# whole tiles, one program after another: small tiles keep it quick.
CUDA_BLOCKS = (64, 128)
INTERPRET_BLOCKS = (16, 32)


def _check(q_mean: torch.Tensor, block_repr: torch.Tensor, n_blocks: int) -> None:
    if q_mean.dim() != 2:
        raise InfLLMLiteError(f"block_scores: q_mean must be (B, D), got shape {tuple(q_mean.shape)}")
    if block_repr.dim() != 3:
        raise InfLLMLiteError(f"block_scores: block_repr must be (B, N_cap, D), got shape {tuple(block_repr.shape)}")
    (B, D), (Br, n_cap, Dr) = q_mean.shape, block_repr.shape
    if (B, D) != (Br, Dr):
        raise InfLLMLiteError(f"block_scores: q_mean {tuple(q_mean.shape)} and block_repr "
                              f"{tuple(block_repr.shape)} disagree on B or D")
    if not 0 <= n_blocks <= n_cap:
        raise InfLLMLiteError(f"block_scores: n_blocks={n_blocks} outside [0, N_cap={n_cap}]")
    if not (q_mean.is_floating_point() and block_repr.is_floating_point()):
        raise InfLLMLiteError(f"block_scores: need floating tensors, got {q_mean.dtype} and {block_repr.dtype}")
    if q_mean.device != block_repr.device:
        raise InfLLMLiteError(f"block_scores: q_mean on {q_mean.device}, block_repr on {block_repr.device}")


def block_scores_torch(q_mean: torch.Tensor, block_repr: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(B, n_blocks) float32: ``q_mean[b] · block_repr[b, n]`` for the first n_blocks rows."""
    _check(q_mean, block_repr, n_blocks)
    q = q_mean.float()[:, :, None]  # (B, D, 1)
    return (block_repr[:, :n_blocks].float() @ q).squeeze(-1)  # (B, n_blocks)


def _block_scores_kernel(q_ptr, r_ptr, out_ptr, n_blocks, D,
                         stride_qb, stride_qd, stride_rb, stride_rn, stride_rd, stride_ob, stride_on,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_N blocks of one batch row, the feature axis in BLOCK_D tiles."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    n_ok = n < n_blocks
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        d_ok = dd < D
        q = tl.load(q_ptr + b * stride_qb + dd * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
        r_off = b * stride_rb + n[:, None].to(tl.int64) * stride_rn + dd[None, :] * stride_rd
        r = tl.load(r_ptr + r_off, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(r * q[None, :], axis=1)  # (BLOCK_N,)
    tl.store(out_ptr + b * stride_ob + n * stride_on, acc, mask=n_ok)


def block_scores_triton(q_mean: torch.Tensor, block_repr: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Triton twin of :func:`block_scores_torch` (CUDA tensors, or any with TRITON_INTERPRET=1)."""
    _check(q_mean, block_repr, n_blocks)
    interpret = launch_mode(q_mean.device, "block_scores_triton")
    B, D = q_mean.shape
    out = torch.empty(B, n_blocks, dtype=torch.float32, device=q_mean.device)  # (B, n_blocks)
    if B == 0 or n_blocks == 0:
        return out
    if D == 0:
        return out.zero_()
    BLOCK_N, BLOCK_D = INTERPRET_BLOCKS if interpret else CUDA_BLOCKS
    grid = (B, triton.cdiv(n_blocks, BLOCK_N))
    kernel = jitted(_block_scores_kernel, interpret)
    with torch.cuda.device(q_mean.device) if q_mean.is_cuda else nullcontext():
        kernel[grid](q_mean, block_repr, out, n_blocks, D,
                     q_mean.stride(0), q_mean.stride(1),
                     block_repr.stride(0), block_repr.stride(1), block_repr.stride(2),
                     out.stride(0), out.stride(1), BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    return out


def block_scores(q_mean: torch.Tensor, block_repr: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(B, n_blocks) float32 block scores; Triton on CUDA when available, else torch.

    q_mean (B, D) any float dtype; block_repr (B, N_cap, D) a capacity buffer whose first
    n_blocks rows are valid. Accumulated in float32."""
    if on_triton(q_mean, block_repr):
        return block_scores_triton(q_mean, block_repr, n_blocks)
    return block_scores_torch(q_mean, block_repr, n_blocks)


def select_blocks(q_far: torch.Tensor, block_repr: torch.Tensor, n_blocks: int,
                  topk: int) -> torch.Tensor | None:
    """(B, k) int64 indices of the blocks a chunk attends (SPEC §6), None if none.

    All blocks (in order) when n_blocks <= topk, else the top-k by the score of the mean
    query q_far (B, H, T, d) over T, flattened to (B, H·d)."""
    if q_far.dim() != 4:
        raise InfLLMLiteError(f"select_blocks: q_far must be (B, H, T, d), got shape {tuple(q_far.shape)}")
    if topk < 0:
        raise InfLLMLiteError(f"select_blocks: topk must be >= 0, got {topk}")
    if n_blocks < 0:
        raise InfLLMLiteError(f"select_blocks: n_blocks must be >= 0, got {n_blocks}")
    if n_blocks == 0 or topk == 0:
        return None
    B = q_far.shape[0]
    if n_blocks <= topk:
        return torch.arange(n_blocks, device=q_far.device).expand(B, n_blocks)
    q_mean = q_far.float().mean(dim=2).reshape(B, -1)  # (B, H·d)
    scores = block_scores(q_mean, block_repr, n_blocks)  # (B, n_blocks)
    return scores.topk(topk, dim=-1).indices
