"""Throughput and memory against context length for each attention mode, and for
transformers and llama.cpp on the same model, in one run: prefill tokens/s, time to first
token, decode tokens/s at that context, peak resident memory and KV bytes.

    python bench/scaling.py --lengths 1k,2k,4k,8k,16k,32k,64k,128k \\
        --modes infllm,streaming,full,transformers,llama.cpp --runs 3 --out docs/results/scaling_smollm2

llama.cpp (``llama-cpp-python`` on the embedded GGUF file, as stored: Q4_1 weights,
float16 KV cache; ``bench/llama_cpp_engine.py``) is left out, and said so, when it is not
installed; the float32 roofline does not apply to it.

Every (mode, length) cell runs in a fresh process (its peak RSS is its own) that warms up
first (compiles what it compiles; the warm-up time is reported, never timed with the
rest), then times ``--runs`` generations from a passkey haystack of that many tokens
(medians; fewer runs when one run takes longer than ``--cell-seconds`` / runs); peak RSS
is taken after the warm-up and the first timed run, and over all runs (they differed,
4.2 vs 2.0 GiB for InfLLM at 8K, while a reference cycle kept each finished generation's
memory until the garbage collector ran; states now drop it when closed). A cell is
skipped, with the reason, when its estimated time (fitted on the mode's shorter lengths:
linear + quadratic in the length) exceeds ``--cell-seconds``. Modes run one after the
other at each length, shortest first, so that ratios come from the same conditions.
``--resume`` keeps the cells an interrupted run (same threads, runs, new tokens) already
wrote to ``--out`` and runs the rest; each row records when it ``finished``.

The roofline (float32 matmul peak, memory bandwidth: ``bench/roofline.py``) is measured
first with the same threads; each cell reports the fraction of the peak its prefill
reaches and of the bandwidth bound its decode reaches (the algorithm's FLOPs and bytes).
Writes ``scaling.json``, ``scaling.md`` (the table README includes, with the issue's
target ratios) and ``throughput_vs_length.png``, ``memory_vs_length.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.options import parse_lengths

sys.path.insert(0, str(Path(__file__).parent))  # bench/: roofline.py, llama_cpp_engine.py
from llama_cpp_engine import LLAMA_CPP_MISSING, llama_cpp_installed  # noqa: E402

MODES = ("infllm", "streaming", "full", "transformers", "llama.cpp")


# ---------------------------------------------------------------- one cell, in a child process

def prompt_ids(tokenizer, length: int) -> list[int]:
    from infllm_lite.eval.passkey import make_passkey_sample
    from infllm_lite.generate import encode_prompt
    return encode_prompt(tokenizer, make_passkey_sample(tokenizer, length, depth=0.5, seed=0).messages)


def kv_bytes(mode: str, args, length: int, memory) -> int:
    """Bytes of keys and values the mode holds after ``length`` tokens (all layers, all tiers)."""
    per_token = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 4  # K and V, float32
    if mode == "infllm":
        from infllm_lite.memory_config import memory_estimate
        return memory_estimate(args, memory, length)["total"]  # fast tier + the blocks' store
    if mode == "streaming":
        return per_token * min(length, memory.n_init + memory.n_local)
    if mode == "llama.cpp":
        return per_token // 2 * length  # its default float16 KV cache
    return per_token * length


def run_ours(mode: str, ids: list[int], new_tokens: int, model, memory) -> tuple[float, float]:
    """(seconds to the first new token, seconds for the next ``new_tokens``)."""
    from infllm_lite import generate_ids
    start = time.perf_counter()
    stamps = []
    for _ in generate_ids(model, ids, max_new_tokens=new_tokens + 1, attention=mode,
                          memory=None if mode == "full" else memory, stop_token_ids=()):
        stamps.append(time.perf_counter())
    return stamps[0] - start, stamps[-1] - stamps[0]


def run_transformers(ids: list[int], new_tokens: int, ref) -> tuple[float, float]:
    x = torch.tensor([ids])
    start = time.perf_counter()
    out = ref(x, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    first = time.perf_counter()
    for _ in range(new_tokens):
        out = ref(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return first - start, time.perf_counter() - first


def make_runner(mode: str, folder: Path, memory, n_ctx: int, threads: int):
    """``run(prompt_ids, new_tokens) -> (seconds to the first new token, seconds for the
    rest)`` for ``mode``, loading only the model that mode runs (a cell's peak RSS is its
    own): ours from ``folder``, transformers from the same folder, llama.cpp from the
    embedded GGUF with room for ``n_ctx`` tokens."""
    if mode == "transformers":
        import transformers
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        return lambda prompt, n: run_transformers(prompt, n, ref)
    if mode == "llama.cpp":  # the same GGUF file, as stored (Q4_1)
        from llama_cpp_engine import load_llama_cpp, run_llama_cpp
        from infllm_lite.weights.embedded import embedded_gguf_path
        llm = load_llama_cpp(embedded_gguf_path(), n_ctx, threads)
        return lambda prompt, n: run_llama_cpp(llm, prompt, n)
    from infllm_lite import load_model
    model, _ = load_model(folder, dtype=torch.float32, device="cpu", progress=False)
    return lambda prompt, n: run_ours(mode, prompt, n, model, memory)


def one_cell(mode: str, length: int, new_tokens: int, runs: int, cell_seconds: float,
             threads: int) -> dict:
    from infllm_lite import MemoryConfig, ModelArgs, Tokenizer
    from infllm_lite.weights.embedded import embedded_model_dir

    torch.set_num_threads(threads)
    folder = embedded_model_dir(progress=False)
    model_args = ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text()))
    memory = MemoryConfig.for_model(model_args)
    ids = prompt_ids(Tokenizer.from_dir(folder), length)
    run = make_runner(mode, folder, memory, len(ids) + new_tokens + 8, threads)

    with torch.inference_mode():
        t = time.perf_counter()
        run(ids[:2 * memory.exc_block_size + 7], 2)  # compiles infllm's chunk and decode shapes
        warmup_s = time.perf_counter() - t
        timings = []
        while len(timings) < runs:
            timings.append(run(ids, new_tokens))
            if len(timings) == 1:  # one generation's peak (the all-runs peak is kept beside it)
                peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            spent = sum(a + b for a, b in timings)
            if spent / len(timings) * runs > cell_seconds and len(timings) >= 1:
                break  # one more run would overrun the cell's budget: keep what we have
    prefill = statistics.median(a for a, _ in timings)
    decode = statistics.median(b for _, b in timings)
    return dict(mode=mode, length=len(ids), target_length=length, runs=len(timings),
                prefill_tokens_per_s=len(ids) / prefill, ttft_s=prefill,
                decode_tokens_per_s=new_tokens / decode if new_tokens else None,
                prefill_s_all=[a for a, _ in timings], decode_s_all=[b for _, b in timings],
                warmup_s=warmup_s, threads=threads,
                peak_rss_bytes=peak_rss,
                peak_rss_all_runs_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                kv_bytes=kv_bytes(mode, model_args, len(ids), memory),
                memory_config=memory.to_dict() if mode in ("infllm", "streaming") else None)


# ---------------------------------------------------------------- the parent: plan, skip, report

def estimate_seconds(done: list[dict], length: int, new_tokens: int) -> float | None:
    """One run's seconds at ``length``, fitted on the mode's finished cells: prefill time
    a·n + b·n² (least squares on the two longest), decode as measured at the longest."""
    rows = sorted(done, key=lambda r: r["length"])[-2:]
    if not rows:
        return None
    if len(rows) == 1:
        r = rows[0]
        a, b = r["ttft_s"] / r["length"], 0.0
    else:
        (n1, t1), (n2, t2) = [(r["length"], r["ttft_s"]) for r in rows]
        b = max(0.0, (t2 / n2 - t1 / n1) / (n2 - n1))  # t/n = a + b·n
        a = max(0.0, t1 / n1 - b * n1)
    last = rows[-1]
    decode = new_tokens / last["decode_tokens_per_s"] if last.get("decode_tokens_per_s") else 0.0
    return a * length + b * length * length + decode * length / last["length"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1k,2k,4k,8k,16k,32k,64k,128k")
    p.add_argument("--modes", default=",".join(MODES),
                   help="llama.cpp is left out when llama-cpp-python is not installed")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--cell-seconds", type=float, default=900,
                   help="time budget of one (mode, length) cell; longer cells are skipped (default 900)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=Path("scaling_out"))
    p.add_argument("--resume", action="store_true",
                   help="keep the cells already in OUT/scaling.json (same threads, runs and new "
                        "tokens) and run only the others: a long run can stop and go on later")
    p.add_argument("--one", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        row = one_cell(args.one[0], int(args.one[1]), args.new_tokens, args.runs, args.cell_seconds,
                       args.threads)
        print(json.dumps(row))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose among {', '.join(MODES)}")
    modes = available_modes(modes)
    try:
        lengths = sorted(parse_lengths(args.lengths))
    except InfLLMLiteError as e:
        p.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    from roofline import embedded_args, measure_peaks
    torch.set_num_threads(args.threads)
    args.peaks = measure_peaks(embedded_args())  # the roofline, same threads as the cells
    print(f"roofline: {args.peaks['peak_gflop_s']:.0f} GFLOP/s float32 matmul, "
          f"{args.peaks['bandwidth_gb_s']:.1f} GB/s", file=sys.stderr)
    rows, skipped = [], []
    if args.resume and (args.out / "scaling.json").is_file():
        rows = reusable_rows(json.loads((args.out / "scaling.json").read_text()), args)
        print(f"resuming: {len(rows)} cells kept from {args.out / 'scaling.json'}", file=sys.stderr)
    for length in lengths:
        for mode in modes:
            done = [r for r in rows if r["mode"] == mode]
            if _cell(rows, mode, length) is not None:
                continue  # kept from the run being resumed
            guess = estimate_seconds(done, length, args.new_tokens)
            if any(s["mode"] == mode for s in skipped):
                skipped.append(dict(mode=mode, length=length, reason="a shorter length was skipped"))
                continue
            if guess is not None and guess > args.cell_seconds:
                skipped.append(dict(mode=mode, length=length,
                                    reason=f"one run estimated at {guess / 60:.0f} min (fitted on "
                                           f"shorter lengths), over the cell budget of "
                                           f"{args.cell_seconds / 60:.0f} min"))
                print(f"{length:>7} {mode:>12}: skipped ({skipped[-1]['reason']})", file=sys.stderr)
                continue
            cmd = [sys.executable, __file__, "--one", mode, str(length), "--runs", str(args.runs),
                   "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
                   "--cell-seconds", str(args.cell_seconds)]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if proc.returncode != 0:
                reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                skipped.append(dict(mode=mode, length=length, reason=f"failed: {reason}"))
                print(f"{length:>7} {mode:>12}: FAILED {reason}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall_s"] = time.perf_counter() - t
            row["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            row["roofline"] = roofline_of(row, args.peaks)
            rows.append(row)
            print(f"{length:>7} {mode:>12}: prefill {row['prefill_tokens_per_s']:7.1f} tok/s, decode "
                  f"{row['decode_tokens_per_s']:5.1f} tok/s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} "
                  f"GiB ({row['runs']} runs, warm-up {row['warmup_s']:.0f} s)", file=sys.stderr)
            write(args, argv, rows, skipped, modes, lengths)  # after every cell
    report = write(args, argv, rows, skipped, modes, lengths)
    print(report["table"])
    return 0


def available_modes(modes: list[str]) -> list[str]:
    """``modes`` less llama.cpp when ``llama-cpp-python`` is not installed (said on stderr)."""
    if "llama.cpp" in modes and not llama_cpp_installed():
        print(LLAMA_CPP_MISSING, file=sys.stderr)
        return [m for m in modes if m != "llama.cpp"]
    return modes


def reusable_rows(previous: dict, args) -> list[dict]:
    """The cells of an earlier report that this run can keep: all of them when it measured
    with the same threads, runs and new tokens (its roofline is kept with them), none
    otherwise (said on stderr)."""
    old = previous.get("rows", [])
    same = (previous.get("runs") == args.runs and previous.get("new_tokens") == args.new_tokens
            and all(r.get("threads") == args.threads for r in old))
    if not same:
        print("not resuming: the earlier run measured with other --threads, --runs or "
              "--new-tokens", file=sys.stderr)
        return []
    return [r for r in old if r["mode"] in MODES]


def roofline_of(row: dict, peaks: dict) -> dict | None:
    """The fraction of the float32 matmul peak prefill reaches and of the bandwidth bound
    decode reaches (transformers computes full attention); None for llama.cpp, whose
    quantized weights and float16 cache make it another roofline."""
    from roofline import roofline
    if row["mode"] == "llama.cpp":
        return None
    mode = "full" if row["mode"] == "transformers" else row["mode"]
    return roofline(row["prefill_tokens_per_s"], row["decode_tokens_per_s"], row["length"], mode,
                    peaks=peaks)


def write(args, argv, rows, skipped, modes, lengths) -> dict:
    from roofline import machine_info
    report = dict(
        command="python bench/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(), roofline_peaks=args.peaks, new_tokens=args.new_tokens,
        runs=args.runs,
        rows=rows, skipped=skipped, targets=targets(rows))
    report["table"] = markdown(rows, skipped, modes, lengths, report["targets"])
    (args.out / "scaling.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "scaling.md").write_text(report["table"] + "\n")
    plot(args.out, rows, modes)
    return report


def _cell(rows, mode, length):
    """The row of ``mode`` at the target ``length`` (None when not run)."""
    return next((r for r in rows if r["mode"] == mode and r["target_length"] == length), None)


def targets(rows: list[dict]) -> list[dict]:
    """The issue's ratios, each from cells of this run (absent cells: not measured)."""
    out = []

    def ratio(name, num, den, key, goal):
        if num and den and num.get(key) and den.get(key):
            value = num[key] / den[key]
            out.append(dict(target=name, value=round(value, 3), goal=goal, met=value >= goal))
        else:
            out.append(dict(target=name, value=None, goal=goal, met=None))

    ratio("infllm prefill 64K / 4K", _cell(rows, "infllm", 65536), _cell(rows, "infllm", 4096),
          "prefill_tokens_per_s", 0.7)
    ratio("infllm decode 64K / 4K", _cell(rows, "infllm", 65536), _cell(rows, "infllm", 4096),
          "decode_tokens_per_s", 0.7)
    ratio("infllm / full prefill at 32K", _cell(rows, "infllm", 32768), _cell(rows, "full", 32768),
          "prefill_tokens_per_s", 1.0)
    ratio("full / transformers prefill at 2K", _cell(rows, "full", 2048), _cell(rows, "transformers", 2048),
          "prefill_tokens_per_s", 1.2)
    ratio("full / transformers decode at 2K", _cell(rows, "full", 2048), _cell(rows, "transformers", 2048),
          "decode_tokens_per_s", 2.0)

    def fraction(name, row, key, goal):
        value = row["roofline"][key] if row is not None else None
        out.append(dict(target=name, value=None if value is None else round(value, 3), goal=goal,
                        met=None if value is None else value >= goal))

    fraction("full decode at 2K / bandwidth bound", _cell(rows, "full", 2048), "decode_fraction", 0.7)
    for mode in ("full", "infllm"):
        fraction(f"{mode} prefill at 4K / matmul peak", _cell(rows, mode, 4096), "prefill_fraction", 0.4)
    return out


def _percent(fraction: float | None) -> str:
    return "–" if fraction is None else f"{fraction:.0%}"


def _label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def markdown(rows, skipped, modes, lengths, goals) -> str:
    lines = ["| context | mode | prefill tok/s | of matmul peak | time to first token | decode tok/s "
             "| of bandwidth bound | peak RSS | KV held | runs |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in lengths:
        for mode in modes:
            r = _cell(rows, mode, n)
            if r is None:
                s = next((s for s in skipped if s["mode"] == mode and s["length"] == n), None)
                if s is not None:
                    lines.append(f"| {_label(n)} | {mode} | skipped: {s['reason']} | | | | | | | |")
                continue
            roof = r["roofline"] or dict(prefill_fraction=None, decode_fraction=None)
            lines.append(f"| {_label(n)} | {mode} | {r['prefill_tokens_per_s']:.0f} "
                         f"| {_percent(roof['prefill_fraction'])} | {r['ttft_s']:.1f} s "
                         f"| {r['decode_tokens_per_s']:.1f} | {_percent(roof['decode_fraction'])} "
                         f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB "
                         f"| {r['kv_bytes'] / 2**20:.0f} MiB | {r['runs']} |")
    if any(r["mode"] == "llama.cpp" for r in rows):
        lines += ["", "llama.cpp runs the GGUF file as stored (Q4_1 weights, float16 KV cache): "
                      "the float32 roofline does not apply to it (–)."]
    lines += ["", "| target (same run) | measured | goal |", "|---|---:|---:|"]
    for g in goals:
        value = "not measured" if g["value"] is None else f"{g['value']:.2f}x" + ("" if g["met"] else " (missed)")
        lines.append(f"| {g['target']} | {value} | ≥ {g['goal']}x |")
    return "\n".join(lines)


def plot(out: Path, rows: list[dict], modes: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("throughput_vs_length.png", (("prefill_tokens_per_s", "prefill tokens/s"),
                                            ("decode_tokens_per_s", "decode tokens/s"))),
              ("memory_vs_length.png", (("peak_rss_bytes", "peak resident memory (GiB)"),
                                        ("kv_bytes", "keys and values held (GiB)"))))
    for name, keys in panels:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, (key, title) in zip(axes, keys):
            for mode in modes:
                pts = sorted((r["length"], r[key]) for r in rows if r["mode"] == mode and r.get(key))
                if pts:
                    xs, ys = zip(*pts)
                    if key.endswith("bytes"):
                        ys = [y / 2**30 for y in ys]
                    ax.plot(xs, ys, "o-", label=mode)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_title(title)
            ax.grid(alpha=0.3, which="both")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
