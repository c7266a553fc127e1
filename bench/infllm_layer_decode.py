"""One InfLLM layer at the embedded model's geometry (9 heads, 3 KV heads, head dim 64,
its default MemoryConfig), compiled flex kernel: prefill random q/k/v of ``--length``
tokens, then time single-token decode steps. With ``--compare-src`` the same runs
alternate with the library under that ``src`` folder (e.g. a worktree of an older
commit), each run in a fresh process, and the medians and their ratio are printed.

    python bench/infllm_layer_decode.py --length 32768 --runs 3 --compare-src /tmp/before/src

A model's decode step pays the chunk geometry once and the per-layer work 30 times;
this measures both together for one layer (so it overstates the geometry's share).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def one(length: int, steps: int) -> dict:
    from infllm_lite.attention.base import attend_in_calls
    from infllm_lite.attention.infllm import InfLLMState
    from infllm_lite.config import ModelArgs
    from infllm_lite.memory_config import MemoryConfig
    from infllm_lite.rope import RotaryEmbedding

    args = ModelArgs(model_type="llama", vocab_size=16, dim=576, n_layers=1, n_heads=9, n_kv_heads=3,
                     head_dim=64, intermediate_size=8, rope_theta=100000.0, max_position_embeddings=8192)
    config = MemoryConfig.for_model(args)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, length + steps, 64, generator=g) for h in (9, 3, 3))
    rope = RotaryEmbedding(args)
    with torch.inference_mode():
        state = InfLLMState(args, config, kernel="flex")
        start = time.perf_counter()
        attend_in_calls(state, q[:, :, :length], k[:, :, :length], v[:, :, :length],
                        [min(8192, length - i) for i in range(0, length, 8192)], rope)
        prefill_s = time.perf_counter() - start
        times = []
        for i in range(steps):
            a = length + i
            start = time.perf_counter()
            attend_in_calls(state, q[:, :, a:a + 1], k[:, :, a:a + 1], v[:, :, a:a + 1], [1], rope)
            times.append(time.perf_counter() - start)
    warm = steps // 10  # the first steps compile or warm caches
    return {"prefill_s": prefill_s, "decode_ms_median": 1e3 * statistics.median(times[warm:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--compare-src", default=None, help="src folder of the library to compare with")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.length, args.steps)))
        return 0
    trees = {"this": None, **({"other": args.compare_src} if args.compare_src else {})}
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, src in trees.items():  # alternate, so both see the same conditions
            env = dict(os.environ, **({"PYTHONPATH": src} if src else {}))
            out = subprocess.run([sys.executable, __file__, "--one", "--length", str(args.length),
                                  "--steps", str(args.steps)], env=env, check=True, capture_output=True,
                                 text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    for name, rows in results.items():
        ms = [r["decode_ms_median"] for r in rows]
        print(f"{name}: decode {statistics.median(ms):.2f} ms/step (runs {', '.join(f'{m:.2f}' for m in ms)}), "
              f"prefill {statistics.median(r['prefill_s'] for r in rows):.1f} s")
    if args.compare_src:
        ratio = [a["decode_ms_median"] / b["decode_ms_median"] for a, b in zip(results["this"], results["other"])]
        print(f"this / other decode time per run: {', '.join(f'{r:.2f}' for r in ratio)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
