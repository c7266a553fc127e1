"""InfLLM prefill and decode throughput against prompt length, with peak memory, on the
embedded SmolLM2-135M-Instruct by default.

    python bench/infllm_prefill.py --lengths 4096,16384,32768 \\
        --out docs/results/infllm_prefill_smollm2.json

Each length runs in a fresh process (so its peak resident memory is its own) that first
warms up (compiles the attention's two shapes, never timed), then generates from a
passkey prompt of that many tokens: prefill tokens/s = prompt tokens / time to the first
new token; decode tokens/s over the following ``--new-tokens``. Prints a markdown table
(with each length's prefill rate relative to the first length's) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def one(length: int, kernel: str, new_tokens: int, threads: int) -> dict:
    from infllm_lite import MemoryConfig, generate_ids, load_model
    from infllm_lite.eval.passkey import make_passkey_sample
    from infllm_lite.generate import encode_prompt
    from infllm_lite.memory_config import memory_estimate

    torch.set_num_threads(threads)
    model, tokenizer = load_model()
    memory = MemoryConfig.for_model(model.args)
    sample = make_passkey_sample(tokenizer, length, depth=0.5, seed=0)
    ids = encode_prompt(tokenizer, sample.messages)

    def run(prompt_ids, n_new):
        start = time.perf_counter()
        stamps = []
        for _ in generate_ids(model, prompt_ids, max_new_tokens=n_new, attention="infllm",
                              memory=memory, attention_kernel=kernel, stop_token_ids=()):
            stamps.append(time.perf_counter())
        return start, stamps

    warm_start = time.perf_counter()
    run(ids[:2 * memory.exc_block_size + 7], 3)  # compiles the chunk and the decode shapes
    warmup_s = time.perf_counter() - warm_start
    start, stamps = run(ids, new_tokens + 1)
    prefill_s = stamps[0] - start
    decode_s = stamps[-1] - stamps[0]
    return {
        "length": len(ids), "kernel": kernel, "threads": threads,
        "prefill_tokens_per_s": len(ids) / prefill_s, "prefill_s": prefill_s,
        "decode_tokens_per_s": (len(stamps) - 1) / decode_s if len(stamps) > 1 else None,
        "warmup_s_including_compile": warmup_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "kv_bytes": memory_estimate(model.args, memory, len(ids)),
        "memory_config": memory.to_dict(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384,32768")
    p.add_argument("--kernel", default="flex", choices=("flex", "flex-eager", "torch"))
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.kernel, args.new_tokens, args.threads)))
        return 0
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--one", str(length), "--kernel", args.kernel,
                              "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['length']:>7} tokens: prefill {r['prefill_tokens_per_s']:.0f} tok/s, "
              f"decode {r['decode_tokens_per_s']:.1f} tok/s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB",
              file=sys.stderr)
    base = rows[0]["prefill_tokens_per_s"]
    print("| prompt tokens | prefill tok/s | vs first | decode tok/s | peak RSS MiB | KV total MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['length']} | {r['prefill_tokens_per_s']:.0f} | {r['prefill_tokens_per_s'] / base:.2f} | "
              f"{r['decode_tokens_per_s']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | "
              f"{r['kv_bytes']['total'] / 2**20:.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "machine": {"platform": platform.platform(), "cpus_used": args.threads,
                        "torch": torch.__version__},
            "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
