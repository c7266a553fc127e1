"""``infllm-lite eval`` from its parsed command line: the plan, the checks before any
work, the run and the lines it prints (the parser itself is in ``cli.py``)."""

from __future__ import annotations

from pathlib import Path

from ..options import parse_lengths
from ..cli_support import load_from_args, memory_config_from_args, parse_max_len
from .runner import EvalPlan, report_only, run_eval


def run_eval_command(args) -> None:
    """``infllm-lite eval``: the parsed command line -> a run (or a rewritten report)."""
    modes = [m.strip() for m in args.attention.split(",") if m.strip()]
    plan = EvalPlan(tasks=[t.strip() for t in args.task.split(",") if t.strip()], modes=modes,
                    lengths=parse_lengths(args.lengths) if args.lengths else None,
                    samples=args.samples or None, seed=args.seed, data_dir=args.data_dir,
                    max_len=parse_max_len(args.max_len, modes), chunk_size=args.chunk_size,
                    attention_kernel=args.attention_kernel, official=args.official)
    plan.check()  # before loading the model: bad options and missing data fail fast
    if args.report_only:
        print(report_only(plan, args.out, plots=not args.no_plots)["table"])
        return
    plan.load_data()
    model, tokenizer = load_from_args(args)
    plan.memory = memory_config_from_args(args, model)
    summary = run_eval(model, tokenizer, plan, args.out, plots=not args.no_plots)
    print(summary["table"])
    print(f"wrote {Path(args.out) / 'summary.md'}, summary.json and predictions.jsonl")
