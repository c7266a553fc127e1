"""An evaluation's report: scores per task × length × mode (``summary.json``), a markdown
table per task (``summary.md``), and PNG plots: score against length per mode
(``score_vs_length.png``) and, for the generated tasks whose samples put the needle at their
depth (:data:`.synthetic.DEPTH_TASKS`: not RULER's vt, cwe, fwe), depth × length heatmaps
(``{task}_depth_heatmap.png``). ``summary["files"]`` names what was written."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

from .files import write_atomic, writing
from .plan import EvalPlan
from .synthetic import DEPTH_TASKS, generated_here


def _cell_key(r: dict) -> tuple:
    return r["task"], r["length"], r["mode"]


def summarize(records: list[dict], plan: EvalPlan, settings: dict | None = None) -> dict:
    """Mean score (0–100) and speed per task, length and mode, over the plan's cells;
    ``settings``: the run's ``settings.json`` (model and memory), recorded with it."""
    lengths = plan.lengths or [None]
    by_cell = defaultdict(list)
    for r in records:
        by_cell[_cell_key(r)].append(r)
    cells = []
    for task in plan.tasks:
        for length in lengths:
            for mode in plan.modes:
                rs = by_cell.get((task, length, mode), [])
                cells.append(dict(
                    task=task, length=length, mode=mode, n=len(rs),
                    score=round(100 * statistics.fmean(r["score"] for r in rs), 2) if rs else None,
                    truncated=sum(r["truncated"] for r in rs),
                    prefill_tokens_per_s=(round(statistics.median(r["prefill_tokens_per_s"] for r in rs), 1)
                                          if rs else None)))
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=run_command(sys.argv),
        plan=plan.to_dict(),
        settings=settings,
        environment=dict(torch=torch.__version__, python=platform.python_version(),
                         machine=platform.machine(), threads=torch.get_num_threads()),
        cells=cells,
        table=markdown_tables(cells, plan.tasks, lengths, plan.modes),
    )


def run_command(argv: list[str]) -> str:
    """The command line that made the predictions: ``argv`` without ``--report-only`` (a
    report rewritten from them names the run, not the rewrite)."""
    program = "infllm-lite" if argv[0].endswith("infllm-lite") else argv[0]
    return " ".join([program] + [a for a in argv[1:] if a != "--report-only"])


def _length_label(length: int | None) -> str:
    if length is None:
        return "whole"
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def markdown_tables(cells: list[dict], tasks: list[str], lengths: list, modes: list[str]) -> str:
    """One table per task: modes down, lengths across, "score (n)" in each cell."""
    index = {(c["task"], c["length"], c["mode"]): c for c in cells}
    parts = []
    for task in tasks:
        lines = [f"**{task}**", "",
                 "| mode | " + " | ".join(_length_label(n) for n in lengths) + " |",
                 "|---|" + "---:|" * len(lengths)]
        for mode in modes:
            row = []
            for n in lengths:
                c = index[(task, n, mode)]
                if c["n"] == 0:
                    row.append("–")
                else:
                    mark = "†" if c["truncated"] else ""
                    row.append(f"{c['score']:.0f}{mark} ({c['n']})")
            lines.append(f"| {mode} | " + " | ".join(row) + " |")
        parts.append("\n".join(lines))
    note = "Score 0–100 (the task's official metric, mean over samples), samples in brackets"
    if any(c["truncated"] for c in cells if c["task"] in tasks):
        note += ("; † some prompts were truncated to the mode's limit (first 128 tokens and the "
                 "last ones)")
    return "\n\n".join(parts) + "\n\n" + note + ".\n"


def write_report(out: Path, summary: dict, records: list[dict], *, plots: bool = True) -> list[Path]:
    """Write (with matplotlib) the plots, summary.md and summary.json, whose ``files`` (set
    in ``summary`` too) name them all relative to ``out``; return their paths."""
    written = []
    if plots:
        try:
            import matplotlib
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        else:
            matplotlib.use("Agg")
            with writing(out):
                written += plot_scores(out, summary)
                written += plot_depth_heatmaps(out, summary, records)
    written += [out / "summary.md", out / "summary.json"]
    summary["files"] = [p.name for p in written]
    write_atomic(written[-2], f"# Evaluation\n\nCommand: `{summary['command']}`\n\n{summary['table']}")
    write_atomic(written[-1], json.dumps(summary, indent=1) + "\n")
    return written


_STYLES = ("o-", "s--", "^:", "D-.")  # a line style per mode (cycled past four)


def plot_scores(out: Path, summary: dict) -> list[Path]:
    """Score against prompt length, one panel per task, one line per attention mode."""
    import matplotlib.pyplot as plt

    plan = summary["plan"]
    lengths = [n for n in (plan["lengths"] or []) if n is not None]
    if not lengths:
        return []
    tasks = plan["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, mode in enumerate(plan["modes"]):
            style = _STYLES[i % len(_STYLES)]
            points = [(c["length"], c["score"]) for c in summary["cells"]
                      if c["task"] == task and c["mode"] == mode and c["score"] is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, label=mode, alpha=0.85)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_length_label(n) for n in lengths])
        ax.set_ylim(-3, 103)
        ax.set_title(task)
        generated = generated_here(task, bool(plan.get("official")))
        ax.set_xlabel("prompt tokens" if generated else "truncation limit (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(loc="best")
    fig.tight_layout()
    path = out / "score_vs_length.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_depth_heatmaps(out: Path, summary: dict, records: list[dict]) -> list[Path]:
    """For each generated task with a needle depth (:data:`.synthetic.DEPTH_TASKS`): needle
    depth × length, one panel per mode, the mean score. vt, cwe and fwe samples also record
    the runner's depth, which places nothing there: no heatmap."""
    import matplotlib.pyplot as plt

    plan = summary["plan"]
    written = []
    for task in plan["tasks"]:
        if task not in DEPTH_TASKS:
            continue
        rs = [r for r in records if r["task"] == task and "depth" in r]  # generated samples
        if not rs:
            continue
        lengths = sorted({r["length"] for r in rs})
        depth_list = sorted({r["depth"] for r in rs})
        modes = [m for m in plan["modes"] if any(r["mode"] == m for r in rs)]
        fig, axes = plt.subplots(1, len(modes), figsize=(1.6 + 1.1 * len(lengths) * len(modes), 4.2),
                                 squeeze=False, sharey=True)
        for ax, mode in zip(axes[0], modes):
            grid = [[float("nan")] * len(lengths) for _ in depth_list]
            cell = defaultdict(list)
            for r in rs:
                if r["mode"] == mode:
                    cell[(depth_list.index(r["depth"]), lengths.index(r["length"]))].append(r["score"])
            for (i, j), scores in cell.items():
                grid[i][j] = 100 * statistics.fmean(scores)
            image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            for (i, j), scores in cell.items():
                ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
            ax.set_yticks(range(len(depth_list)), [f"{d:.0%}" for d in depth_list])
            ax.set_title(mode)
            ax.set_xlabel("prompt tokens")
        axes[0][0].set_ylabel("needle depth")
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="score")
        fig.suptitle(f"{task}: score by needle depth and length")
        path = out / f"{task}_depth_heatmap.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
