"""Batched decode: aggregate decode tokens/s and per-sequence latency of the continuous-batching
engine (``infllm_lite.engine.Engine``) at 1, 2, 4, 8 concurrent sequences, per attention
mode, against batch-1 ``generate_ids`` and the memory-bandwidth roofline, in one run.

    python bench/batch_decode.py --concurrency 1,2,4,8 --modes full,infllm --prompt-len 2048 \\
        --new-tokens 64 --runs 3 --threads 2 --out docs/results/batch_decode_smollm2

A cell is (mode, concurrency N). Each run of a cell makes a fresh engine, submits N requests
at once (distinct prompts of ``--prompt-len`` tokens: consecutive windows of one
deterministic English text, Python's own reference documentation ``pydoc_data.topics``,
tokenized; no two prompts share a token window; ``stop_token_ids=frozenset()`` so each makes
exactly ``--new-tokens`` tokens), steps until every sequence has its first token (every
prompt read), then times the steps until all finish:

* aggregate decode tok/s = tokens decoded in those steps / their wall seconds (prefill
  excluded); ``EngineStats.decode_tokens_per_second`` (the engine's own decode-call clock,
  first-token steps included) is reported beside it;
* per-sequence ms/step = a sequence's ``SequenceStats.decode_seconds / (new_tokens - 1)``
  (median over the N sequences), and its time to first token when all N arrive together
  (``first_token_seconds``: median over the sequences and the last one).

By default the engine's step budget (``--step-tokens 0``) is N·prompt-len + N tokens, so all N
prompts are read in the first step and every timed step decodes exactly N sequences (at the
engine's default of 512 tokens per step the first sequences would start decoding while the
later prompts are read and finish earlier: the timed steps would ramp down from N to fewer
sequences; each run records the batch sizes its timed steps saw). The TTFT this gives is
every sequence's wait for all N prompts; what a user of the engine's default sees is
measured in a pass of its own (kind ``ttft``, ``--ttft-step-tokens``, default 512: the N
requests submitted together, stepped until each has its first token, then cancelled),
its median and last first token in the table's "TTFT, 512-token steps" column.

The batch-1 reference (``generate``, one per mode): ``infllm_lite.generate_ids`` on the first
prompt, its decode rate from ``GenerationStats.decode_tokens_per_second``, so the report can
say whether the engine at one sequence equals batch-1 generation.

Every cell, TTFT passes and references included, runs once per round, ``--runs`` rounds,
every other round in reverse order, so a slow drift of a shared machine shifts all cells
alike (exactly so for an even number of runs); medians over the runs. Before the rounds,
each mode warms up untimed (one real-length prompt, 3 new tokens, through the decode run's
engine, the TTFT pass's engine and ``generate_ids``: InfLLM's kernel compiles its shapes,
about 20 s on first use; a batch of N calls each sequence's attention with the shapes of one).

Roofline: ``bench/roofline.py``'s ``measure_peaks`` at the same threads, before the rounds
(and again after them, recorded as a drift check). Bytes per decode step of N sequences =
the weights once (every parameter, tied embeddings once) + per sequence what its attention
reads at its context (``roofline.Cost``: K and V of the keys it attends, float32, 2·layers·
kv_heads·head_dim·4 bytes a key; full: context + 1 keys; infllm: n_init + n_local +
topk·block_size of ``MemoryConfig.for_model`` once that many blocks are formed, plus the
representative vectors the retrieval scores), averaged over the timed steps' contexts.
Bound tok/s = N · bandwidth / bytes per step; the fraction is the measured aggregate over it.

Writes ``batch_decode.json`` (settings, machine, peaks, every run, the cells' medians),
``batch_decode.md`` (the table) and ``batch_decode.png`` to ``--out``; prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from infllm_lite.engine import DEFAULT_STEP_TOKENS

sys.path.insert(0, str(Path(__file__).parent))  # bench/: roofline.py

MODES = ("full", "streaming", "infllm")
REFERENCE = "generate"  # the batch-1 generate_ids cells' kind
WARMUP_NEW_TOKENS = 3
# Extra deterministic text when the reference documentation is too short for N prompts:
# these standard-library modules' sources, in this order.
EXTRA_SOURCES = ("argparse", "inspect", "typing", "dataclasses", "pathlib", "subprocess", "tarfile",
                 "zipfile", "logging", "asyncio.base_events", "unittest.case", "email.message",
                 "http.client", "collections", "functools", "enum", "statistics", "decimal",
                 "datetime", "ast", "pydoc", "difflib", "textwrap", "shutil", "tempfile", "threading")


# --------------------------------------------------------------------------- prompts


def corpus_pieces():
    """The deterministic text, piece by piece: the reference documentation's topics (sorted
    by name), then the sources of ``EXTRA_SOURCES``."""
    from pydoc_data.topics import topics
    for name in sorted(topics):
        yield topics[name]
    for module in EXTRA_SOURCES:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            yield Path(spec.origin).read_text(encoding="utf-8")


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` distinct prompts of exactly ``length`` token ids: consecutive windows of the
    tokenized corpus (no window shares a token position with another)."""
    need, ids = count * length, []
    for piece in corpus_pieces():
        ids.extend(tokenizer.encode(piece + "\n\n", add_special_tokens=False))
        if len(ids) >= need:
            return [ids[i * length:(i + 1) * length] for i in range(count)]
    raise SystemExit(f"error: {count} prompts of {length} tokens need {need} tokens of text; "
                     f"the corpus has {len(ids)}")


# --------------------------------------------------------------------------- one run of a cell


def engine_run(model, tokenizer, mode: str, prompts: list[list[int]], new_tokens: int,
               step_tokens: int) -> dict:
    """One engine run: all ``prompts`` submitted at once, prefill untimed, the decode steps
    timed (see the module's docstring)."""
    from infllm_lite.engine import Engine, Request

    n = len(prompts)
    budget = step_tokens or sum(len(p) for p in prompts) + n
    engine = Engine(model, tokenizer, step_tokens=budget, stop_token_ids=set())
    start = time.perf_counter()
    ids = [engine.submit(Request(list(p), max_new_tokens=new_tokens, attention=mode,
                                 stop_token_ids=frozenset())) for p in prompts]
    made = dict.fromkeys(ids, 0)  # tokens each sequence has made so far

    def step() -> int:
        count = 0
        for event in engine.step():
            if event.token_id is not None:
                made[event.seq_id] += 1
                count += 1
        return count

    prefill_steps = 0
    while not all(made.values()):  # until every prompt is read and its first token made
        step()
        prefill_steps += 1
    all_first = time.perf_counter()
    before = sum(made.values())
    batches, step_seconds = [], []
    t0 = time.perf_counter()
    while engine.has_work:
        t = time.perf_counter()
        batches.append(step())
        step_seconds.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    decoded = sum(made.values()) - before
    seqs = [engine.pop(i) for i in ids]
    if any(s.stats.new_tokens != new_tokens for s in seqs):
        raise RuntimeError(f"{mode}: a sequence stopped before {new_tokens} tokens: "
                           f"{[s.stats.new_tokens for s in seqs]} ({[s.finish_reason for s in seqs]})")
    stats = engine.stats
    steps = new_tokens - 1
    per_step_ms = [1e3 * s.stats.decode_seconds / steps for s in seqs] if steps else []
    ttft = [s.stats.first_token_seconds for s in seqs]
    row = dict(kind="engine", mode=mode, concurrency=n, step_tokens=budget,
               decode_tokens=decoded, decode_wall_s=wall,
               decode_tokens_per_s=decoded / wall if wall > 0 and decoded else None,
               engine_decode_tokens_per_s=stats.decode_tokens_per_second or None,
               engine_stats=dict(steps=stats.steps, prefill_tokens=stats.prefill_tokens,
                                 prefill_seconds=stats.prefill_seconds, decode_tokens=stats.decode_tokens,
                                 decode_seconds=stats.decode_seconds, max_batch=stats.max_batch),
               prefill_steps=prefill_steps, all_first_token_s=all_first - start,
               timed_steps=len(step_seconds),
               timed_batch_min=min(batches, default=None), timed_batch_max=max(batches, default=None),
               step_ms_median=1e3 * statistics.median(step_seconds) if step_seconds else None,
               seq_ms_per_step=per_step_ms,
               seq_ms_per_step_median=statistics.median(per_step_ms) if per_step_ms else None,
               ttft_s=ttft, ttft_median_s=statistics.median(ttft), ttft_max_s=max(ttft),
               seq_total_s=[s.stats.total_seconds for s in seqs])
    engine.close()  # its memories and arena rows given back before the next run
    del seqs
    gc.collect()
    return row


def ttft_run(model, tokenizer, mode: str, prompts: list[list[int]], new_tokens: int,
             step_tokens: int) -> dict:
    """Time to first token of ``prompts`` arriving together at an engine of ``step_tokens``
    tokens per step (the first sequences decode while later prompts are read); the engine is
    closed once every sequence has its first token."""
    from infllm_lite.engine import Engine, Request

    engine = Engine(model, tokenizer, step_tokens=step_tokens, stop_token_ids=set())
    ids = [engine.submit(Request(list(p), max_new_tokens=new_tokens, attention=mode,
                                 stop_token_ids=frozenset())) for p in prompts]
    first: set[int] = set()
    steps = 0
    while len(first) < len(ids):
        first.update(e.seq_id for e in engine.step() if e.token_id is not None)
        steps += 1
    engine.close()
    seqs = [engine.pop(i) for i in ids]
    made = [len(s.token_ids) for s in seqs]  # tokens made by then (some may have finished)
    ttft = [s.stats.first_token_seconds for s in seqs]
    row = dict(kind="ttft", mode=mode, concurrency=len(prompts), step_tokens=step_tokens, steps=steps,
               decode_tokens_per_s=None, seq_ms_per_step_median=None,
               ttft_s=ttft, ttft_median_s=statistics.median(ttft), ttft_max_s=max(ttft),
               tokens_made_meanwhile=made)
    del engine, seqs
    gc.collect()
    return row


def generate_run(model, mode: str, prompt: list[int], new_tokens: int) -> dict:
    """Batch-1 ``generate_ids`` on ``prompt``: its ``GenerationStats`` decode rate."""
    from infllm_lite import GenerationStats, generate_ids

    stats = GenerationStats()
    start = time.perf_counter()
    first = None
    n = 0
    for _ in generate_ids(model, prompt, max_new_tokens=new_tokens, attention=mode,
                          stop_token_ids=frozenset(), stats=stats):
        n += 1
        if first is None:
            first = time.perf_counter() - start
    if n != new_tokens:
        raise RuntimeError(f"{mode}: generate_ids made {n} tokens, not {new_tokens}")
    steps = new_tokens - 1
    ms = 1e3 * stats.decode_seconds / steps if steps else None
    row = dict(kind=REFERENCE, mode=mode, concurrency=1,
               decode_tokens_per_s=stats.decode_tokens_per_second or None,
               seq_ms_per_step=[ms] if ms is not None else [], seq_ms_per_step_median=ms,
               ttft_s=[first], ttft_median_s=first, ttft_max_s=first,
               prefill_tokens_per_s=stats.prefill_tokens_per_second,
               generation_stats=dict(prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens,
                                     prefill_seconds=stats.prefill_seconds,
                                     decode_seconds=stats.decode_seconds))
    gc.collect()
    return row


# --------------------------------------------------------------------------- plan, roofline, report


def plan(concurrency: list[int], modes: list[str], runs: int,
         ttft: bool = True) -> list[tuple[int, str, str, int]]:
    """(run, kind, mode, N) in execution order: every cell once per round, every other round
    reversed; the engine's default-step TTFT passes (kind ``ttft``) and the batch-1
    references (kind ``generate``) are cells of their own."""
    kinds = ("engine", "ttft") if ttft else ("engine",)
    cells = [(k, m, n) for n in concurrency for m in modes for k in kinds] + \
        [(REFERENCE, m, 1) for m in modes]
    order = []
    for r in range(runs):
        for kind, mode, n in (cells if r % 2 == 0 else cells[::-1]):
            order.append((r, kind, mode, n))
    return order


def weight_bytes(model) -> int:
    """Bytes of every parameter, a tied LM head counted once (shared tensors once)."""
    unique = {p.data_ptr(): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in unique.values())


def bound(args, mode: str, n: int, prompt_len: int, new_tokens: int, weights: int,
          bandwidth_gb_s: float, memory=None) -> dict:
    """The bandwidth bound of ``n`` sequences decoding together after ``prompt_len``-token
    prompts: the timed steps' contexts prompt_len .. prompt_len + new_tokens - 2."""
    from roofline import Cost

    cost = Cost(args, mode, memory)
    contexts = range(prompt_len, prompt_len + max(new_tokens - 1, 1))
    per_seq = [cost.decode_bytes_per_token(c) - cost.weight_bytes_per_token for c in contexts]
    step_bytes = statistics.fmean(weights + n * b for b in per_seq)
    return dict(weight_bytes=weights, seq_bytes_per_step=statistics.fmean(per_seq),
                step_bytes=step_bytes, bandwidth_gb_s=bandwidth_gb_s,
                bound_tokens_per_s=n * bandwidth_gb_s * 1e9 / step_bytes)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rows: list[dict], bounds: dict) -> list[dict]:
    """One row per cell: medians over its runs, the ratio to the mode's one sequence, the
    bound and the fraction of it reached."""
    cells = {}
    for r in rows:
        cells.setdefault((r["kind"], r["mode"], r["concurrency"]), []).append(r)
    out = []
    for (kind, mode, n), runs in cells.items():
        rate = _median(r["decode_tokens_per_s"] for r in runs)
        b = bounds.get((mode, n)) if kind != "ttft" else None
        out.append(dict(kind=kind, mode=mode, concurrency=n, runs=len(runs),
                        decode_tokens_per_s=rate,
                        engine_decode_tokens_per_s=_median(r.get("engine_decode_tokens_per_s") for r in runs),
                        seq_ms_per_step=_median(r.get("seq_ms_per_step_median") for r in runs),
                        ttft_median_s=_median(r["ttft_median_s"] for r in runs),
                        ttft_max_s=_median(r["ttft_max_s"] for r in runs),
                        bound_tokens_per_s=b["bound_tokens_per_s"] if b else None,
                        bound_fraction=rate / b["bound_tokens_per_s"] if b and rate else None))
    for c in out:
        one = next((o for o in out if o["kind"] == "engine" and o["mode"] == c["mode"]
                    and o["concurrency"] == 1), None)
        c["ratio_to_one"] = (c["decode_tokens_per_s"] / one["decode_tokens_per_s"]
                             if one and one["decode_tokens_per_s"] and c["decode_tokens_per_s"] else None)
    out.sort(key=lambda c: (c["mode"], c["kind"] != "engine", c["concurrency"]))
    return out


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _ttft(c: dict | None) -> str:
    if c is None:
        return "–"
    return f"{_fmt(c['ttft_median_s'], '.2f', ' s')} / {_fmt(c['ttft_max_s'], '.2f', ' s')}"


def markdown(cells: list[dict], settings: dict) -> str:
    step = settings.get("step_tokens", 0)
    budget = ("all N prompts read in the first step, so every timed step decodes all N" if not step
              else f"{step} tokens per step (the timed steps' batch sizes are in the JSON)")
    ttft_step = settings.get("ttft_step_tokens")
    lines = [f"{settings['prompt_len']}-token prompts, {settings['new_tokens']} new tokens each, "
             f"{settings['threads']} threads, medians of {settings['runs']} runs; bandwidth "
             f"{settings['bandwidth_gb_s']:.1f} GB/s (measured in the same run). Decode: {budget}.", "",
             "| mode | sequences | aggregate decode tok/s | × 1 sequence | ms/step per sequence "
             "| TTFT median / last | " + (f"TTFT, {ttft_step}-token steps | " if ttft_step else "")
             + "bound tok/s | of bound |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if ttft_step else "") + "---:|---:|"]
    for c in cells:
        if c["kind"] == "ttft":
            continue
        who = str(c["concurrency"]) if c["kind"] == "engine" else "1 (generate_ids)"
        other = next((o for o in cells if o["kind"] == "ttft" and o["mode"] == c["mode"]
                      and o["concurrency"] == c["concurrency"]), None) if c["kind"] == "engine" else None
        lines.append(f"| {c['mode']} | {who} | {_fmt(c['decode_tokens_per_s'], '.1f')} "
                     f"| {_fmt(c['ratio_to_one'], '.2f', 'x')} | {_fmt(c['seq_ms_per_step'], '.1f')} "
                     f"| {_ttft(c)} | " + (f"{_ttft(other)} | " if ttft_step else "")
                     + f"{_fmt(c['bound_tokens_per_s'], '.1f')} | {_fmt(c['bound_fraction'], '.0%')} |")
    refs = []
    for c in cells:
        if c["kind"] == REFERENCE and c["ratio_to_one"]:
            refs.append(f"{c['mode']} {1 / c['ratio_to_one']:.2f}x")
    if refs:
        lines += ["", "Engine at 1 sequence / batch-1 generate_ids decode tok/s: " + ", ".join(refs) + "."]
    return "\n".join(lines)


def plot(out: Path, cells: list[dict], modes: list[str], concurrency: list[int], settings: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, mode in enumerate(modes):
        color = f"C{i}"
        pts = sorted((c["concurrency"], c["decode_tokens_per_s"], c["bound_tokens_per_s"]) for c in cells
                     if c["kind"] == "engine" and c["mode"] == mode and c["decode_tokens_per_s"])
        if not pts:
            continue
        xs, ys, bs = zip(*pts)
        ax.plot(xs, ys, "o-", color=color, label=f"{mode}")
        if all(b is not None for b in bs):
            ax.plot(xs, bs, "--", color=color, alpha=0.7, label=f"{mode} bandwidth bound")
        ref = next((c for c in cells if c["kind"] == REFERENCE and c["mode"] == mode), None)
        if ref and ref["decode_tokens_per_s"]:
            ax.plot([1], [ref["decode_tokens_per_s"]], "x", color=color, markersize=9,
                    label=f"{mode} batch-1 generate_ids")
    ax.set_xscale("log", base=2)
    ax.set_xticks(concurrency, [str(n) for n in concurrency])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("concurrent sequences")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{settings['prompt_len']}-token prompts, {settings['new_tokens']} new tokens each, "
                 f"{settings['threads']} threads", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "batch_decode.png", dpi=110)
    plt.close(fig)


def write(out: Path, report: dict, modes: list[str], concurrency: list[int], png: bool = True) -> None:
    """The JSON and the table (after every run of a cell: an interrupted run keeps what it
    measured), and the plot (``png``)."""
    report["cells"] = summarize(report["rows"], report["_bounds"])
    report["table"] = markdown(report["cells"], report["settings"])
    doc = {k: v for k, v in report.items() if not k.startswith("_")}
    (out / "batch_decode.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "batch_decode.md").write_text(report["table"] + "\n")
    if png:
        plot(out, report["cells"], modes, concurrency, report["settings"])


def measure(args, report: dict, order, model, tokenizer, prompts, modes) -> None:
    """Every run of every cell in ``order``, appended to ``report["rows"]``."""
    for i, (run, kind, mode, n) in enumerate(order):
        if kind == REFERENCE:
            row = generate_run(model, mode, prompts[0], args.new_tokens)
        elif kind == "ttft":
            row = ttft_run(model, tokenizer, mode, prompts[:n], args.new_tokens, args.ttft_step_tokens)
        else:
            row = engine_run(model, tokenizer, mode, prompts[:n], args.new_tokens, args.step_tokens)
        row.update(run=run, order=i,
                   finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        report["rows"].append(row)
        print(f"[{i + 1}/{len(order)}] run {run} {mode:>9} {kind:>8} N={n}: decode "
              f"{_fmt(row['decode_tokens_per_s'], '.1f')} tok/s, "
              f"{_fmt(row['seq_ms_per_step_median'], '.1f')} ms/step per sequence, "
              f"TTFT {row['ttft_median_s']:.2f} s", file=sys.stderr)
        write(args.out, report, modes, args.concurrency, png=False)  # after every run of a cell


# --------------------------------------------------------------------------- CLI


def _ints(text: str) -> list[int]:
    values = sorted({int(x) for x in text.split(",") if x.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"want positive integers separated by commas, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8],
                   help="concurrent sequences per cell (default 1,2,4,8)")
    p.add_argument("--modes", default="full,infllm", help=f"among {', '.join(MODES)} (default full,infllm)")
    p.add_argument("--prompt-len", type=int, default=2048, help="tokens per prompt (default 2048)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per sequence (default 64)")
    p.add_argument("--runs", type=int, default=3, help="runs of every cell, median (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--step-tokens", type=int, default=0,
                   help="the engine's step budget; 0 (default): N·prompt-len + N, every prompt read "
                        "in the first step, so every timed step decodes all N")
    p.add_argument("--ttft-step-tokens", type=int, default=DEFAULT_STEP_TOKENS,
                   help="also time the first tokens at an engine of this step budget, the engine's "
                        f"default (default {DEFAULT_STEP_TOKENS}; 0: skip)")
    p.add_argument("--out", type=Path, default=Path("batch_decode_out"))
    p.add_argument("--roofline-runs", type=int, default=5, help=argparse.SUPPRESS)  # tests: fewer
    p.add_argument("--roofline-mbytes", type=int, default=512, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"unknown modes {bad}; choose among {', '.join(MODES)}")
    for name in ("prompt_len", "new_tokens", "runs", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the first token comes with the prefill)")
    if args.prompt_len < 2:
        p.error("--prompt-len must be at least 2")
    for name in ("step_tokens", "ttft_step_tokens"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or positive")
    args.out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    from infllm_lite import MemoryConfig, load_model
    from infllm_lite.attention import kernel_name
    from roofline import embedded_args, machine_info, measure_peaks

    model, tokenizer = load_model()
    peaks = measure_peaks(embedded_args(), args.roofline_runs, args.roofline_mbytes)  # same threads
    print(f"roofline: {peaks['bandwidth_gb_s']:.1f} GB/s, {peaks['peak_gflop_s']:.0f} GFLOP/s "
          f"float32 matmul ({args.threads} threads)", file=sys.stderr)
    top = max(args.concurrency)
    prompts = make_prompts(tokenizer, top, args.prompt_len)
    weights = weight_bytes(model)
    memory = MemoryConfig.for_model(model.args)
    bounds = {(m, n): bound(model.args, m, n, args.prompt_len, args.new_tokens, weights,
                            peaks["bandwidth_gb_s"], memory)
              for m in modes for n in args.concurrency}
    settings = dict(concurrency=args.concurrency, modes=modes, prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, runs=args.runs, threads=args.threads,
                    step_tokens=args.step_tokens, ttft_step_tokens=args.ttft_step_tokens,
                    bandwidth_gb_s=peaks["bandwidth_gb_s"], roofline_runs=args.roofline_runs,
                    roofline_mbytes=args.roofline_mbytes,
                    prompts=f"consecutive {args.prompt_len}-token windows of pydoc_data.topics "
                            f"(Python {platform.python_version()}), tokenized without special tokens",
                    attention_kernel=kernel_name("auto", next(model.parameters()).device))
    report = dict(
        command="python bench/batch_decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine={**machine_info(), "python": platform.python_version(),
                 "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        settings=settings, roofline_peaks=peaks,
        model=dict(name="SmolLM2-135M-Instruct", weight_bytes=weights,
                   n_params=sum(t.numel() for t in {t.data_ptr(): t for t in model.parameters()}.values()),
                   memory=memory.to_dict()),
        bounds=[dict(mode=m, concurrency=n, **b) for (m, n), b in bounds.items()],
        warmup_s={}, rows=[], _bounds=bounds)

    with torch.inference_mode():
        for mode in modes:  # untimed: compiles what the mode compiles
            t = time.perf_counter()
            engine_run(model, tokenizer, mode, prompts[:1], WARMUP_NEW_TOKENS, args.step_tokens)
            if args.ttft_step_tokens:  # its prompt chunks may have other shapes
                ttft_run(model, tokenizer, mode, prompts[:1], WARMUP_NEW_TOKENS, args.ttft_step_tokens)
            generate_run(model, mode, prompts[0], WARMUP_NEW_TOKENS)
            report["warmup_s"][mode] = time.perf_counter() - t
            print(f"warm-up {mode}: {report['warmup_s'][mode]:.1f} s", file=sys.stderr)
        order = plan(args.concurrency, modes, args.runs, ttft=bool(args.ttft_step_tokens))
        try:
            measure(args, report, order, model, tokenizer, prompts, modes)
        except BaseException:  # an interrupted run keeps its plot too
            if report["rows"]:
                write(args.out, report, modes, args.concurrency)
            raise
    report["roofline_peaks_after"] = measure_peaks(embedded_args(), args.roofline_runs, args.roofline_mbytes)
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    write(args.out, report, modes, args.concurrency)
    print(report["table"])
    print(f"wrote {args.out / 'batch_decode.json'}, {args.out / 'batch_decode.md'}, "
          f"{args.out / 'batch_decode.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
