"""Times each Triton kernel of infllm_lite.kernels against its torch twin on CUDA, at the
sizes of a 7B model (32 query heads, 8 KV heads, head dim 128), and checks they agree.
Run from the repository root with the interpreter off:

    TRITON_INTERPRET=0 python bench/kernels_bench.py [--quick]

Prints a table: median milliseconds of each (CUDA-synchronised wall time of N runs after a
warm-up), the ratio torch / Triton, and the largest relative difference. Without CUDA it
says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up: compiles the kernel
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


def block_case(B: int, N: int, D: int, dtype: torch.dtype):
    q_mean = torch.randn(B, D, device="cuda").to(dtype)  # (B, D)
    block_repr = torch.randn(B, N + N // 8, D, device="cuda")  # (B, N_cap, D): spare capacity
    return q_mean, block_repr, N


def representative_case(B: int, H: int, Hkv: int, d: int, dtype: torch.dtype):
    """One InfLLM chunk's slots at the default MemoryConfig (SPEC layout
    S = n_init + topk·block + (n_local + block + exc_block_size) + 1): init tokens, the
    selected blocks (FAR), the local tail ending with the chunk, EMPTY slots after it;
    T = exc_block_size queries, the last 8 of them padding."""
    from infllm_lite.memory_config import MemoryConfig

    cfg = MemoryConfig()
    T, n_local = cfg.exc_block_size, cfg.n_local
    tail = cfg.n_init + cfg.topk * cfg.block_size
    S = tail + n_local + cfg.block_size + T + 1
    start = 100_000  # the chunk's first position
    k_pos = torch.full((S,), 1 << 40, dtype=torch.long)  # EMPTY
    k_pos[:cfg.n_init] = torch.arange(cfg.n_init)
    k_pos[cfg.n_init:tail] = -(1 << 40)  # FAR
    k_pos[tail:tail + n_local + T] = start - n_local + torch.arange(n_local + T)
    q_pos = start + torch.arange(T)
    q_pos[-8:] = -(1 << 41)
    q = torch.randn(B, H, T, d, device="cuda").to(dtype)  # (B, H, T, d)
    k = torch.randn(B, Hkv, S, d, device="cuda").to(dtype)  # (B, Hkv, S, d)
    lse = torch.full((B, H, T), 8.0, device="cuda")  # (B, H, T)
    return q, k, q_pos.cuda(), k_pos.cuda(), lse, n_local


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, one dtype")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernels_bench: needs a CUDA device; none here, nothing to time")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels_bench: TRITON_INTERPRET is set; rerun with TRITON_INTERPRET=0")
        return 0
    from infllm_lite.kernels import block_relevance as br
    from infllm_lite.kernels import representative_scores as rs

    runs = 5 if opts.quick else 30
    dtypes = [torch.bfloat16] if opts.quick else [torch.bfloat16, torch.float32]
    rows = []
    for dtype in dtypes:
        args = block_case(1, 8192, 4096, dtype)
        rows.append(("block_scores B=1 N=8192 D=4096", dtype, args, br.block_scores_torch, br.block_scores_triton))
        args = representative_case(1, 32, 8, 128, dtype)
        T, S = args[0].shape[2], args[1].shape[2]
        rows.append((f"representative_scores H=32/8 T={T} S={S} d=128", dtype, args,
                     rs.representative_scores_torch, rs.representative_scores_triton))
    print(f"{'kernel':<52} {'dtype':<9} {'torch ms':>9} {'triton ms':>9} {'ratio':>7} {'rel diff':>9}")
    with torch.inference_mode():
        for name, dtype, args, twin, kernel in rows:
            diff = rel_diff(kernel(*args), twin(*args))
            t_torch = median_ms(lambda f=twin, a=args: f(*a), runs)
            t_triton = median_ms(lambda f=kernel, a=args: f(*a), runs)
            print(f"{name:<52} {str(dtype).removeprefix('torch.'):<9} {t_torch:>9.3f} {t_triton:>9.3f} "
                  f"{t_torch / t_triton:>7.2f} {diff:>9.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
