"""Prefill and decode tok/s of the embedded SmolLM2-135M-Instruct with float32, int8, int4
and GGUF-packed weights, and llama.cpp on the same GGUF file, in one run (same prompts,
same threads), with the weights' bytes in memory and the linear kernel each variant ran.

    python bench/quantized_decode.py --threads 2 --prompt-tokens 2048,16384 --new-tokens 64 \
        --runs 3 --compile --fresh

A cell is a variant at one prompt length, eager or (``--compile``) with
``generate_ids(compile=True)``: the whole-model ``torch.compile`` of the decode step over
the static KV cache (a ``+compile`` row per variant of ours; its compile time is in
``compile_seconds``, not in the rates). ``llama.cpp`` (``llama-cpp-python`` on the
embedded GGUF as stored, float16 KV cache: ``bench/llama_cpp_engine.py``) is one of the
variants; it is left out, and said so, when the package is not installed
(``make bench LLAMA_CPP=1`` installs it). Each cell: its model loaded once per process
(load seconds reported), one warm-up generation (the kernel probe, first-use packing and,
compiled, the compilation: the timed generation itself),
then ``--runs`` timed greedy generations (full attention by default; ``--kv-dtype`` for
our caches) of ``--new-tokens`` tokens; medians. Cells interleave across runs (order
rotated per run) so a noisy neighbour hurts all alike. ``INFLLM_LITE_QUANT_KERNEL=packed|dequant``
forces the kernel, ``INFLLM_LITE_QUANT_PREFILL=bf16|float32`` the prefill's (the kernels
column: what ran, with ``--fresh``). ``--fresh`` runs each cell in a process of its own instead (not
interleaved), so each row's peak RSS is its own (``peak_rss_mib``; in one process it is
the run's).
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

sys.path.insert(0, str(Path(__file__).parent))  # bench/: llama_cpp_engine.py
from llama_cpp_engine import LLAMA_CPP_MISSING, llama_cpp_installed  # noqa: E402

from infllm_lite import MemoryConfig, load_model  # noqa: E402
from infllm_lite.generate import generate_ids  # noqa: E402
from infllm_lite.models.quantized import model_kernels, weights_bytes  # noqa: E402
from infllm_lite.stats import GenerationStats  # noqa: E402

VARIANTS = {  # name -> load_model's quantization keywords
    "float32": {},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4", "group_size": 32},
    "gguf": {"quantize": "gguf"},
    "llama.cpp": None,  # the embedded GGUF file as stored, through llama-cpp-python
}
LLAMA_CPP_KERNELS = "llama.cpp: the file's Q4_1 / Q8_0 blocks, float16 KV cache"
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


def run_once(model, ids, new_tokens, attention, compile=False, memory=None) -> GenerationStats:
    stats = GenerationStats()
    for _ in generate_ids(model, ids, max_new_tokens=new_tokens, attention=attention, stats=stats,
                          compile=compile, memory=memory, stop_token_ids=()):
        pass
    return stats


def run_llama(llm, ids, new_tokens) -> tuple[float, float]:
    """llama.cpp's (prefill tok/s, decode tok/s), counted as ours: the first new token
    ends the prefill, the other ``new_tokens - 1`` are the decode."""
    from llama_cpp_engine import run_llama_cpp
    first, rest = run_llama_cpp(llm, ids, new_tokens - 1)
    return len(ids) / first, (new_tokens - 1) / rest if rest else 0.0


def cell_label(name: str, length: int, compiled: bool) -> str:
    return f"{name}{'+compile' if compiled else ''}@{length}"


def cells_of(a, names) -> list[tuple[str, int, bool]]:
    """(variant, prompt length, compiled) of every row, in the table's order."""
    cells = []
    for length in a.lengths:
        for name in names:
            cells.append((name, length, False))
            if a.compile and name != "llama.cpp":
                cells.append((name, length, True))
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="default: all of " + ",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--prompt-tokens", default="2048", help="prompt lengths, comma-separated (default 2048)")
    p.add_argument("--new-tokens", type=int, default=64, help="default 64")
    p.add_argument("--runs", type=int, default=3, help="timed runs per variant, medians (default 3)")
    p.add_argument("--attention", default="full", help="attention mode (default full)")
    p.add_argument("--compile", action="store_true",
                   help="also each variant of ours with compile=True (full attention only)")
    p.add_argument("--kv-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="MemoryConfig.kv_dtype of our memories (default: the model's dtype)")
    p.add_argument("--out", default=None, help="write the results as JSON here (default: print only)")
    p.add_argument("--fresh", action="store_true", help="each variant in a fresh process (its own peak RSS)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    names = a.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            p.error(f"unknown variant {n!r}: choose from {', '.join(VARIANTS)}")
    try:
        a.lengths = [int(n) for n in a.prompt_tokens.split(",")]
    except ValueError:
        p.error(f"--prompt-tokens takes comma-separated integers, got {a.prompt_tokens!r}")
    if a.compile and a.attention != "full":
        p.error("--compile applies to --attention full only")
    if "llama.cpp" in names and not llama_cpp_installed():
        print(LLAMA_CPP_MISSING, file=sys.stderr)
        names = [n for n in names if n != "llama.cpp"]
    torch.set_num_threads(a.threads)
    cells = cells_of(a, names)
    if a.child:  # one cell (--fresh)
        cells = [(names[0], a.lengths[0], a.compile)]
    rows = fresh_rows(a, cells) if a.fresh and not a.child else measure(a, cells)
    if a.child:
        print(json.dumps(rows))
        return
    report(a, cells, rows)


def fresh_rows(a, cells) -> dict:
    rows = {}
    for name, length, compiled in cells:
        cmd = [sys.executable, __file__, "--child", "--variants", name, "--threads", str(a.threads),
               "--prompt-tokens", str(length), "--new-tokens", str(a.new_tokens),
               "--runs", str(a.runs), "--attention", a.attention]
        cmd += ["--compile"] if compiled else []
        cmd += ["--kv-dtype", a.kv_dtype] if a.kv_dtype else []
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.update(json.loads(out.strip().splitlines()[-1]))
        print(f"{cell_label(name, length, compiled)}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def load_variant(name: str, n_ctx: int, threads: int):
    """(model or llama.cpp's Llama, tokenizer, load seconds, weights bytes, kernels)."""
    t0 = time.perf_counter()
    if name == "llama.cpp":
        from llama_cpp_engine import load_llama_cpp
        from infllm_lite.tokenizer import Tokenizer
        from infllm_lite.weights.embedded import embedded_gguf_path, embedded_model_dir
        path = embedded_gguf_path()
        llm = load_llama_cpp(path, n_ctx, threads)
        tokenizer = Tokenizer.from_dir(embedded_model_dir(progress=False))  # the same vocabulary
        return llm, tokenizer, time.perf_counter() - t0, path.stat().st_size, LLAMA_CPP_KERNELS
    model, tokenizer = load_model(**VARIANTS[name], device="cpu", progress=False)
    return model, tokenizer, time.perf_counter() - t0, weights_bytes(model), None


def measure(a, cells) -> dict:
    memory = MemoryConfig(kv_dtype=a.kv_dtype) if a.kv_dtype else None
    n_ctx = max(length for _, length, _ in cells) + a.new_tokens + 8
    loaded, rows = {}, {}
    for name, length, compiled in cells:
        if name not in loaded:
            loaded[name] = load_variant(name, n_ctx, a.threads)
        model, tokenizer, load_s, size, kernels = loaded[name]
        ids = prompt_ids(tokenizer, length)
        row = rows[cell_label(name, length, compiled)] = {
            "variant": name, "prompt_tokens": length, "compile": compiled, "load_seconds": load_s,
            "weights_bytes": size, "rss_mib_after_load": rss_mib(), "prefill": [], "decode": [],
            "kernels": kernels}
        t0 = time.perf_counter()
        if name == "llama.cpp":
            run_llama(model, ids[:64], 4)  # warm-up
        elif compiled:  # warm-up: the timed generation itself, compiled (a shorter prompt of the same
            # cache capacity left a second compilation to the timed run)
            with torch.inference_mode():
                run_once(model, ids, a.new_tokens, a.attention, True, memory)
            row["compile_seconds"] = time.perf_counter() - t0
        else:
            with torch.inference_mode():
                run_once(model, ids[:64], 4, a.attention, False, memory)  # warm-up: probe, first-use packing
        row["warmup_seconds"] = time.perf_counter() - t0
    order = list(rows)
    for run in range(a.runs):
        for label in order[run % len(order):] + order[:run % len(order)]:
            row = rows[label]
            model, tokenizer = loaded[row["variant"]][:2]
            ids = prompt_ids(tokenizer, row["prompt_tokens"])
            if row["variant"] == "llama.cpp":
                prefill, decode = run_llama(model, ids, a.new_tokens)
            else:
                with torch.inference_mode():
                    stats = run_once(model, ids, a.new_tokens, a.attention, row["compile"], memory)
                prefill, decode = stats.prefill_tokens_per_second, stats.decode_tokens_per_second
                row["kernels"] = model_kernels(model)
                row["kernels_ran"] = stats.linear_kernels  # this process's (one cell's with --fresh): the prefill's too
            row["prefill"].append(prefill)
            row["decode"].append(decode)
    for row in rows.values():
        row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rows


def report(a, cells, rows) -> None:
    print(f"\nembedded SmolLM2-135M, {a.new_tokens} new tokens, {a.threads} threads, {a.attention} attention"
          f"{', kv_dtype ' + a.kv_dtype if a.kv_dtype else ''}, medians of {a.runs}; decode and size "
          "relative to float32 eager and to llama.cpp at the same prompt length")
    print("| weights | prompt | prefill tok/s | decode tok/s | decode vs float32 | decode vs llama.cpp | "
          "prefill vs llama.cpp | weights MiB | vs float32 | peak RSS MiB | compile s | kernels |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows.values():
        r["prefill_tok_s"] = statistics.median(r["prefill"])
        r["decode_tok_s"] = statistics.median(r["decode"])

    def ratio(r, base, key):
        return f"{r[key] / base[key]:.2f}x" if base and base[key] else "-"

    for name, length, compiled in cells:
        r = rows[cell_label(name, length, compiled)]
        base = rows.get(cell_label("float32", length, False))
        llama = rows.get(cell_label("llama.cpp", length, False))
        size = f"{r['weights_bytes'] / base['weights_bytes']:.2f}x" if base else "-"
        compile_s = f"{r['compile_seconds']:.0f}" if "compile_seconds" in r else "-"
        print(f"| {name}{' + compile' if compiled else ''} | {length} | {r['prefill_tok_s']:.0f} | "
              f"{r['decode_tok_s']:.1f} | {ratio(r, base, 'decode_tok_s')} | {ratio(r, llama, 'decode_tok_s')} | "
              f"{ratio(r, llama, 'prefill_tok_s')} | {r['weights_bytes'] / 2**20:.0f} | {size} | "
              f"{r['peak_rss_mib']:.0f}{'' if a.fresh else ' (run)'} | {compile_s} | {(a.fresh and r.get('kernels_ran')) or r.get('kernels')} |")
    if a.out:
        result = {"args": vars(a), "machine": platform.processor() or platform.machine(),
                  "torch": torch.__version__, "rows": rows}
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
