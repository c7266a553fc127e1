"""``infllm-lite eval`` from its parsed command line: the plan, the checks before any
work, the run and the lines it prints (the parser itself is in ``cli.py``). Under
``torchrun`` with more than one process it runs data parallel
(:mod:`infllm_lite.parallel.data`); rank 0 prints."""

from __future__ import annotations

from pathlib import Path

from ..cli_support import load_from_args, memory_config_from_args, parse_max_len
from ..options import parse_lengths
from ..parallel.group import launched_distributed
from .plan import EvalPlan
from .runner import PREDICTIONS, report_only, run_eval


def run_eval_command(args) -> None:
    """``infllm-lite eval``: the parsed command line -> a run (or a rewritten report)."""
    modes = [m.strip() for m in args.attention.split(",") if m.strip()]
    plan = EvalPlan(tasks=[t.strip() for t in args.task.split(",") if t.strip()], modes=modes,
                    lengths=parse_lengths(args.lengths) if args.lengths else None,
                    samples=args.samples or None, seed=args.seed, data_dir=args.data_dir,
                    max_len=parse_max_len(args.max_len, modes), chunk_size=args.chunk_size,
                    attention_kernel=args.attention_kernel, official=args.official)
    plan.check()  # before loading the model: bad options and missing data fail fast
    out = Path(args.out)
    if args.report_only:
        summary = report_only(plan, out, plots=not args.no_plots)
        print(summary["table"])
        print(written_line(out, summary["files"]))
        return
    plan.check_scorers()
    plan.load_data()
    shard = None
    if launched_distributed():  # under torchrun: data parallel, each rank a whole model
        from ..parallel.data import join_eval
        shard, args.device = join_eval(args.device)
    model, tokenizer = load_from_args(args)
    plan.memory = memory_config_from_args(args, model)
    summary = run_eval(model, tokenizer, plan, out, plots=not args.no_plots, shard=shard,
                       progress=shard is None or shard.rank == 0)
    if summary is None:  # another rank than 0: rank 0 merged and reported
        return
    print(summary["table"])
    print(written_line(out, [PREDICTIONS, *summary["files"]]))


def written_line(out: Path, names: list[str]) -> str:
    """The line naming every file written, by its path ("wrote a/summary.md, ...")."""
    return "wrote " + ", ".join(str(out / name) for name in names)
