"""A decode step's attention over a float32 KV cache, both of ``one_query_attention``'s
kernels: SDPA's CPU flash kernel and the two matmuls, at several cache lengths, in one
run (rounds interleaved, best-of-rounds medians), to place ``causal.FLASH_MAX_KEYS``.

    python bench/decode_attention.py --threads 2 --keys 128,512,1024,2048,8192

One timed call is ``--layers`` calls (one per layer, each its own cache: a decode step's
share) with SmolLM2-135M's shape (9 query heads, 3 KV heads, head size 64) by default.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from infllm_lite.causal import FLASH_MAX_KEYS, flash_grouped_attention, matmul_grouped_attention


def median_ms(fn, caches, q, repeats: int) -> float:
    fn(q, *caches[0])  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for k, v in caches:
            fn(q, k, v)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keys", default="128,512,1024,2048,8192", help="cache lengths, comma-separated")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", default="9,3", help="query heads, KV heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each cell keeps its best median")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    H, Hkv = (int(x) for x in args.heads.split(","))
    d = args.head_dim
    print(f"{args.layers} calls per time, {H}/{Hkv} heads, d={d}, {args.threads} threads; "
          f"FLASH_MAX_KEYS = {FLASH_MAX_KEYS}")
    print(f"{'keys':>6} {'flash ms':>9} {'matmuls ms':>11} {'matmuls/flash':>14}")
    for S in (int(x) for x in args.keys.split(",")):
        caches = [(torch.randn(1, Hkv, S, d), torch.randn(1, Hkv, S, d)) for _ in range(args.layers)]
        q = torch.randn(1, Hkv, H // Hkv, d)  # (1, Hkv, G, d): the G query heads of a KV head
        best = {"flash": float("inf"), "matmuls": float("inf")}
        for _ in range(args.rounds):
            for name, fn in (("flash", flash_grouped_attention), ("matmuls", matmul_grouped_attention)):
                best[name] = min(best[name], median_ms(fn, caches, q, args.repeats))
        print(f"{S:>6} {best['flash']:9.2f} {best['matmuls']:11.2f} {best['matmuls'] / best['flash']:14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
