"""Passkey retrieval accuracy (InfiniteBench's passkey task, generated locally) per attention
mode and prompt length, on the embedded SmolLM2-135M-Instruct by default.

    python bench/passkey_accuracy.py --lengths 16384,32768 --depths 10 \\
        --modes infllm,streaming,full --seed 0 --out docs/results/passkey_smollm2.json

For every length and every depth (``--depths`` values evenly spaced in [0.05, 0.95]) one
sample is built (its seed derived from ``--seed``, the length and the depth's index, so every
mode reads the same prompts), answered greedily (``--max-new-tokens``, default 16) and scored
with InfiniteBench's rule (the first integer of the answer equals the key). Full attention
is skipped above ``--full-max-length`` tokens, the reason recorded. Prints a markdown table
(accuracy per mode and length) and writes every prediction to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from infllm_lite import MemoryConfig, generate_ids, load_model
from infllm_lite.eval.passkey import make_passkey_sample, score_passkey
from infllm_lite.eval.runner import depths, sample_seed  # the eval's depths and seeds: the same prompts
from infllm_lite.generate import encode_prompt, stop_token_ids

MODES = ("full", "streaming", "infllm")


def answer(model, tokenizer, prompt_ids, mode, max_new_tokens, memory):
    """Greedy answer, seconds, and prefill tokens/s (prompt / time to the first new token)."""
    stop_ids = stop_token_ids(model, tokenizer)
    start = time.perf_counter()
    first, new_ids = None, []
    for token_id in generate_ids(model, prompt_ids, max_new_tokens=max_new_tokens, attention=mode,
                                 stop_token_ids=stop_ids,
                                 memory=memory if mode != "full" else None):
        first = first or time.perf_counter()
        new_ids.append(token_id)
    end = time.perf_counter()
    prefill = (first or end) - start
    return tokenizer.decode(new_ids, skip_special_tokens=True), end - start, len(prompt_ids) / prefill


def markdown_table(accuracy: dict, lengths: list[int], modes: list[str]) -> str:
    lines = ["| mode | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for mode in modes:
        cells = []
        for n in lengths:
            cell = accuracy[mode][str(n)]
            if cell["skipped"]:
                cells.append("skipped")
            else:
                cells.append(f"{100 * cell['correct'] / cell['total']:.0f}% "
                             f"({cell['correct']}/{cell['total']})")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="16384,32768",
                   help="comma-separated prompt lengths in tokens (default 16384,32768)")
    p.add_argument("--depths", type=int, default=10,
                   help="depths per length, evenly spaced in [0.05, 0.95] (default 10)")
    p.add_argument("--modes", default="infllm,streaming,full",
                   help="comma-separated attention modes (default infllm,streaming,full)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the samples (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--full-max-length", type=int, default=16384,
                   help="skip full attention above this many tokens (default 16384)")
    p.add_argument("--model", default=None, help="model source (default: the embedded model)")
    p.add_argument("--out", type=Path, default=None,
                   help="write the JSON report here (rewritten after every sample)")
    p.add_argument("--resume", action="store_true",
                   help="keep the samples already in --out and run only the missing ones")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    args.modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"unknown modes {bad}; choose among {', '.join(MODES)}")
    if args.depths < 1 or not args.lengths or min(args.lengths) < 1:
        p.error("--depths and every length must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, tokenizer = load_model(args.model, progress=False)
    memory = MemoryConfig.for_model(model.args)
    depth_list = depths(args.depths)

    skipped = {}  # (mode, length) -> reason
    for mode in args.modes:
        for n in args.lengths:
            if mode == "full" and n > args.full_max_length:
                skipped[(mode, n)] = (f"full attention is skipped above --full-max-length "
                                      f"{args.full_max_length} tokens (the model's native window "
                                      f"is {model.args.max_position_embeddings})")
    runs = [(n, i, mode) for n in args.lengths for i in range(len(depth_list)) for mode in args.modes
            if (mode, n) not in skipped]

    results = []
    if args.resume and args.out is not None and args.out.is_file():
        results = json.loads(args.out.read_text())["results"]  # finished samples are kept
        done = {(r["length"], r["seed"], r["mode"]) for r in results}
        runs = [(n, i, mode) for n, i, mode in runs if (n, sample_seed(args.seed, n, i), mode) not in done]
        print(f"resuming: {len(results)} samples already in {args.out}, {len(runs)} to run", file=sys.stderr)
    built = None  # (length, depth index): the sample every mode reads in turn
    bar = tqdm(runs, desc="passkey", unit="sample")
    for n, i, mode in bar:
        depth = depth_list[i]
        seed = sample_seed(args.seed, n, i)
        if built != (n, i):
            built, sample = (n, i), make_passkey_sample(tokenizer, n, depth, seed)
            prompt_ids = encode_prompt(tokenizer, sample.messages)
        bar.set_postfix(length=n, depth=depth, mode=mode)
        prediction, seconds, prefill_tps = answer(model, tokenizer, prompt_ids, mode,
                                                  args.max_new_tokens, memory)
        results.append(dict(length=n, depth=depth, seed=seed, mode=mode, prompt_tokens=sample.n_tokens,
                            needle_token=sample.needle_token, key=sample.key, prediction=prediction,
                            correct=score_passkey(prediction, sample.key), seconds=round(seconds, 2),
                            prefill_tokens_per_s=round(prefill_tps, 1)))
        if args.out is not None:  # after every sample: an interrupted run loses nothing (--resume)
            write_report(args.out, report_of(args, model, memory, depth_list, skipped, results, argv,
                                             partial=True))
    bar.close()
    report = report_of(args, model, memory, depth_list, skipped, results, argv, partial=False)
    print(report["table"])
    for (mode, n), reason in skipped.items():
        print(f"{mode} at {n} tokens: skipped: {reason}")
    if args.out is not None:
        write_report(args.out, report)
        print(f"wrote {args.out}")
    return report


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous report


def report_of(args, model, memory, depth_list, skipped, results, argv, partial: bool) -> dict:
    """The JSON report of the samples so far (``partial``: the run has not finished)."""

    accuracy = {mode: {} for mode in args.modes}
    for mode in args.modes:
        for n in args.lengths:
            cell = [r for r in results if r["mode"] == mode and r["length"] == n]
            accuracy[mode][str(n)] = dict(correct=sum(r["correct"] for r in cell), total=len(cell),
                                          accuracy=(sum(r["correct"] for r in cell) / len(cell)
                                                    if cell else None),
                                          skipped=skipped.get((mode, n)))
    table = markdown_table(accuracy, args.lengths, args.modes)
    return dict(
        partial=partial,
        command="python " + " ".join([sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model=args.model or "embedded SmolLM2-135M-Instruct",
        native_window=model.args.max_position_embeddings,
        memory=memory.to_dict(),
        task="passkey (InfiniteBench recipe, generated locally, chat template applied)",
        max_new_tokens=args.max_new_tokens, lengths=args.lengths, depths=depth_list,
        modes=args.modes, seed=args.seed,
        environment=dict(torch=torch.__version__, python=platform.python_version(),
                         machine=platform.machine(), threads=torch.get_num_threads(),
                         device=str(next(model.parameters()).device),
                         dtype=str(next(model.parameters()).dtype)),
        accuracy=accuracy, table=table,
        skipped=[dict(mode=m, length=n, reason=r) for (m, n), r in skipped.items()],
        results=results,
    )


if __name__ == "__main__":
    main()
