"""Prefill and decode tok/s of the embedded SmolLM2-135M-Instruct with float32, int8, int4
and GGUF-packed weights, in one run (same prompt, same threads), with the weights' bytes
in memory and the linear kernel each variant ran.

    python bench/quantized_decode.py --threads 2 --prompt-tokens 2048 --new-tokens 64 --runs 3

Each variant: loaded once (load seconds reported), one warm-up generation (the kernel
probe and first-use packing happen there or at load), then ``--runs`` timed greedy
generations through ``generate_ids`` (full attention by default) of ``--new-tokens``
tokens; medians. Cells interleave across runs (variant order rotated per run) so a noisy
neighbour hurts all alike. ``INFLLM_LITE_QUANT_KERNEL=packed|dequant`` forces the kernel.
``--fresh`` runs each variant in a process of its own instead (not interleaved), so each
row's peak RSS is its own (``peak_rss_mib``; in one process it is the run's).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from infllm_lite import load_model
from infllm_lite.generate import generate_ids
from infllm_lite.models.quantized import model_kernels, weights_bytes
from infllm_lite.stats import GenerationStats

VARIANTS = {  # name -> load_model's quantization keywords
    "float32": {},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4", "group_size": 32},
    "gguf": {"quantize": "gguf"},
}
TEXT = ("The history of the river valley is long. Farmers grew wheat and barley on its banks, "
        "traders carried salt and copper along its roads, and every spring the water rose. ")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(TEXT)
    return (ids * (n // len(ids) + 1))[:n]


def run_once(model, ids, new_tokens, attention) -> GenerationStats:
    stats = GenerationStats()
    for _ in generate_ids(model, ids, max_new_tokens=new_tokens, attention=attention, stats=stats):
        pass
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="default: all of " + ",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="default 2048")
    p.add_argument("--new-tokens", type=int, default=64, help="default 64")
    p.add_argument("--runs", type=int, default=3, help="timed runs per variant, medians (default 3)")
    p.add_argument("--attention", default="full", help="attention mode (default full)")
    p.add_argument("--out", default=None, help="write the results as JSON here (default: print only)")
    p.add_argument("--fresh", action="store_true", help="each variant in a fresh process (its own peak RSS)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    names = a.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            p.error(f"unknown variant {n!r}: choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(a.threads)
    rows = fresh_rows(a, names) if a.fresh else measure(a, names)
    if a.child:
        print(json.dumps(rows))
        return
    report(a, names, rows)


def fresh_rows(a, names) -> dict:
    rows = {}
    for name in names:
        cmd = [sys.executable, __file__, "--child", "--variants", name, "--threads", str(a.threads),
               "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
               "--runs", str(a.runs), "--attention", a.attention]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.update(json.loads(out.strip().splitlines()[-1]))
    return rows


def measure(a, names) -> dict:
    models, rows = {}, {}
    for name in names:
        t0 = time.perf_counter()
        model, tokenizer = load_model(**VARIANTS[name], device="cpu", progress=False)
        load_s = time.perf_counter() - t0
        ids = prompt_ids(tokenizer, a.prompt_tokens)
        with torch.inference_mode():
            run_once(model, ids[:64], 4, a.attention)  # warm-up: probe, first-use packing
        models[name] = (model, ids)
        rows[name] = {"load_seconds": load_s, "weights_bytes": weights_bytes(model), "rss_mib_after_load": rss_mib(),
                      "prefill": [], "decode": []}
    for run in range(a.runs):
        for name in names[run % len(names):] + names[:run % len(names)]:
            model, ids = models[name]
            with torch.inference_mode():
                stats = run_once(model, ids, a.new_tokens, a.attention)
            rows[name]["prefill"].append(stats.prefill_tokens_per_second)
            rows[name]["decode"].append(stats.decode_tokens_per_second)
            rows[name]["kernels"] = model_kernels(model)
    for name in names:
        rows[name]["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rows


def report(a, names, rows) -> None:
    base = rows.get("float32")
    print(f"\nembedded SmolLM2-135M, {a.prompt_tokens}-token prompt, {a.new_tokens} new tokens, "
          f"{a.threads} threads, {a.attention} attention, medians of {a.runs}")
    print("| weights | prefill tok/s | decode tok/s | decode vs float32 | weights MiB | vs float32 | peak RSS MiB | "
          "linear layers' kernels |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        r = rows[name]
        r["prefill_tok_s"] = statistics.median(r["prefill"])
        r["decode_tok_s"] = statistics.median(r["decode"])
        speed = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base and base["decode_tok_s"] else "-"
        size = f"{r['weights_bytes'] / base['weights_bytes']:.2f}x" if base else "-"
        print(f"| {name} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {speed} | "
              f"{r['weights_bytes'] / 2**20:.0f} | {size} | {r['peak_rss_mib']:.0f}{'' if a.fresh else ' (run)'} | "
              f"{r.get('kernels')} |")
    if a.out:
        result = {"args": vars(a), "machine": platform.processor() or platform.machine(),
                  "torch": torch.__version__, "rows": rows}
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
