"""InfLLM prefill and decode throughput against prompt length, with peak memory and the
block pools' counters, on the embedded SmolLM2-135M-Instruct by default.

    python bench/infllm_prefill.py --lengths 4096,16384,32768 \\
        --out docs/results/infllm_prefill_smollm2.json

Each (length, variant) runs in a fresh process (so its peak resident memory is its own)
that first warms up (compiles the attention's two shapes, never timed), then generates
from a passkey prompt of that many tokens: prefill tokens/s = prompt tokens / time to the
first new token; decode tokens/s over the following ``--new-tokens``. Variants, run one
after the other for each length so that their ratios come from the same conditions:

* ``pool``: this tree, default memory (host tier unlimited);
* ``disk``: this tree with ``max_host_bytes`` = ``--disk-host-blocks`` blocks per layer,
  the older blocks in an offload file;
* ``before``: the library found under ``--before-src`` (e.g. a ``git worktree`` of an older
  commit's ``src``), same script and settings.

Prints a markdown table (each variant's rates relative to the first variant's at the
same length) and writes JSON with the pools' counters (hit rate, bytes moved per tier,
per decoded token).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def one(length: int, kernel: str, new_tokens: int, threads: int, max_host_bytes: int | None) -> dict:
    import inspect

    from infllm_lite import MemoryConfig, generate_ids, load_model
    from infllm_lite.eval.passkey import make_passkey_sample
    from infllm_lite.generate import encode_prompt
    from infllm_lite.memory_config import memory_estimate

    torch.set_num_threads(threads)
    model, tokenizer = load_model()
    memory = MemoryConfig.for_model(model.args)
    if max_host_bytes is not None:
        memory = MemoryConfig(**{**memory.to_dict(), "max_host_bytes": max_host_bytes})
    sample = make_passkey_sample(tokenizer, length, depth=0.5, seed=0)
    ids = encode_prompt(tokenizer, sample.messages)
    has_stats = "stats" in inspect.signature(generate_ids).parameters  # an older tree may lack it

    def run(prompt_ids, n_new):
        extra = {}
        if has_stats:
            from infllm_lite import GenerationStats
            extra["stats"] = GenerationStats()
        start = time.perf_counter()
        stamps = []
        for _ in generate_ids(model, prompt_ids, max_new_tokens=n_new, attention="infllm",
                              memory=memory, attention_kernel=kernel, stop_token_ids=(), **extra):
            stamps.append(time.perf_counter())
        return start, stamps, extra.get("stats")

    warm_start = time.perf_counter()
    run(ids[:2 * memory.exc_block_size + 7], 3)  # compiles the chunk and the decode shapes
    warmup_s = time.perf_counter() - warm_start
    start, stamps, stats = run(ids, new_tokens + 1)
    prefill_s = stamps[0] - start
    decode_s = stamps[-1] - stamps[0]
    row = {
        "length": len(ids), "kernel": kernel, "threads": threads, "max_host_bytes": max_host_bytes,
        "prefill_tokens_per_s": len(ids) / prefill_s, "prefill_s": prefill_s,
        "decode_tokens_per_s": (len(stamps) - 1) / decode_s if len(stamps) > 1 else None,
        "warmup_s_including_compile": warmup_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "kv_bytes": memory_estimate(model.args, memory, len(ids)),
        "memory_config": memory.to_dict(),
    }
    if stats is not None and stats.memory is not None:
        dec = stats.decode_memory
        steps = max(1, len(stamps) - 1)
        row["pool"] = stats.to_dict()["memory"]
        row["decode_pool"] = {**stats.to_dict()["decode_memory"],
                              "bytes_slow_to_fast_per_token": dec.bytes_slow_to_fast / steps,
                              "bytes_disk_to_host_per_token": dec.bytes_disk_to_host / steps}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384,32768")
    p.add_argument("--kernel", default="auto", choices=("auto", "window", "flex", "window-eager", "flex-eager", "torch"))
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--variants", default="pool", help="comma-separated: pool, disk, before (default pool)")
    p.add_argument("--disk-host-blocks", type=int, default=16,
                   help="the disk variant's host budget in blocks per layer (default 16)")
    p.add_argument("--before-src", type=Path, help="the src folder of the library to compare with")
    p.add_argument("--out", type=Path)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-host-bytes", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.kernel, args.new_tokens, args.threads, args.max_host_bytes)))
        return 0
    variants = args.variants.split(",")
    if "before" in variants and (args.before_src is None or not args.before_src.is_dir()):
        p.error("the 'before' variant needs --before-src DIR (a src folder)")
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for variant in variants:
            cmd = [sys.executable, __file__, "--one", str(length), "--kernel", args.kernel,
                   "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
            env = dict(os.environ)
            if variant == "disk":
                cmd += ["--max-host-bytes", str(disk_budget(args.disk_host_blocks))]
            if variant == "before":
                env["PYTHONPATH"] = str(args.before_src.resolve())
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["variant"] = variant
            rows.append(r)
            print(f"{r['length']:>7} tokens {variant:>6}: prefill {r['prefill_tokens_per_s']:.0f} tok/s, "
                  f"decode {r['decode_tokens_per_s']:.1f} tok/s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB",
                  file=sys.stderr)
    print(markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "machine": {"platform": platform.platform(), "cpus_used": args.threads,
                        "torch": torch.__version__},
            "rows": rows}, indent=2) + "\n")
    return 0


def disk_budget(blocks_per_layer: int) -> int:
    """max_host_bytes holding that many blocks per layer of the embedded model (float32)."""
    from infllm_lite import MemoryConfig, load_model
    model, _ = load_model()
    a, m = model.args, MemoryConfig.for_model(model.args)
    return blocks_per_layer * 2 * a.n_kv_heads * m.block_size * a.head_dim * 4 * a.n_layers


def markdown(rows: list[dict]) -> str:
    """Rates per length and variant, each relative to the length's first variant."""
    lines = ["| prompt tokens | variant | prefill tok/s | ratio | decode tok/s | ratio | peak RSS MiB "
             "| decode hit rate | MiB to fast tier / decoded token | MiB from disk / decoded token |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    first: dict[int, dict] = {}
    for r in rows:
        f = first.setdefault(r["length"], r)
        d = r.get("decode_pool")
        pool = ("| - | - | - |" if d is None else
                f"| {d['hit_rate']:.1%} | {d['bytes_slow_to_fast_per_token'] / 2**20:.2f} "
                f"| {d['bytes_disk_to_host_per_token'] / 2**20:.2f} |")
        lines.append(f"| {r['length']} | {r['variant']} | {r['prefill_tokens_per_s']:.0f} "
                     f"| {r['prefill_tokens_per_s'] / f['prefill_tokens_per_s']:.2f} "
                     f"| {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / f['decode_tokens_per_s']:.2f} "
                     f"| {r['peak_rss_bytes'] / 2**20:.0f} {pool}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
