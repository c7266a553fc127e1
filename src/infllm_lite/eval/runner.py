"""Run an evaluation: every task × length × sample × attention mode, greedy, one prediction a
line in ``predictions.jsonl`` (appended as it goes, so a run resumes where it stopped), then
``summary.json``, ``summary.md`` and the plots.

    from infllm_lite.eval import EvalPlan, run_eval
    plan = EvalPlan(tasks=["passkey"], modes=["infllm", "full"], lengths=[4096, 8192], samples=10)
    summary = run_eval(model, tokenizer, plan, out_dir="eval_out")

Generated tasks (:data:`.synthetic.GENERATED_TASKS`; InfiniteBench's three not with ``official``,
RULER's always) are built at each length with
``samples`` needle depths evenly spaced in [0.05, 0.95]; official tasks read their jsonl
files (the first ``samples`` records), and a length there is a truncation limit. Prompts longer than a
mode's limit are truncated the reference's way (:func:`truncate_ids`): by default full
attention keeps to the model's native window, as the reference's baselines do, and the
memory modes read everything.

Data parallel (``shard``, an :class:`infllm_lite.parallel.data.EvalShard`: ``torchrun
--nproc-per-node N -m infllm_lite eval ...``): each rank holds a whole model and answers
the samples whose index in the run's order is its rank modulo N (every mode of a sample
on one rank), appending to its own ``predictions.rankR-of-N.jsonl``; when all are done
rank 0 merges them into ``predictions.jsonl`` in the order one process writes it, removes
them, and writes the report. Resuming reads every rank file there, whatever world size
wrote it, so a run may resume at another world size.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from ..attention import kernel_name
from ..errors import InfLLMLiteError
from ..generate import encode_prompt, generate
from ..memory_config import MemoryConfig
from .files import read_jsonl, write_atomic, writing
from .metrics import first_line, score
from .plan import EvalPlan
from .report import summarize, write_report
from .sample import EvalSample, TaskSpec
from .synthetic import make_synthetic_sample
from .tasks import get_task, truncate_ids

PREDICTIONS = "predictions.jsonl"
SETTINGS = "settings.json"


def depths(n: int) -> list[float]:
    """``n`` needle depths evenly spaced in [0.05, 0.95] (0.5 alone for one)."""
    if n == 1:
        return [0.5]
    return [round(0.05 + 0.9 * i / (n - 1), 4) for i in range(n)]


def sample_seed(seed: int, length: int, depth_index: int) -> int:
    """The seed of a generated sample: distinct per length and depth, the same for every mode
    and task (so passkey and number_string at one cell share their haystack's layout)."""
    return seed * 1_000_003 + length * 101 + depth_index


def iter_samples(plan: EvalPlan, tokenizer, task: str, length: int | None) -> Iterator[EvalSample]:
    """The samples of one task at one length (generated lazily: a 32K prompt takes a while)."""
    for make in sample_makers(plan, tokenizer, task, length):
        yield make()


def sample_makers(plan: EvalPlan, tokenizer, task: str, length: int | None) -> list:
    """One callable per sample of one task at one length, making it (a generated sample
    is built only when called: a data-parallel rank builds only its own)."""
    if plan.generated(task):
        return [partial(make_synthetic_sample, task, tokenizer, length, depth, sample_seed(plan.seed, length, i),
                        data_dir=plan.data_dir)  # RULER's qa tasks read their data there
                for i, depth in enumerate(depths(plan.samples))]
    records = plan.load_data()[task]
    return [partial(lambda r: r, r) for r in (records[:plan.samples] if plan.samples is not None else records)]


def prompt_ids(tokenizer, spec: TaskSpec, sample: EvalSample) -> list[int]:
    """The sample's prompt as token ids: the chat template around it, or the raw text."""
    if spec.chat:
        return encode_prompt(tokenizer, [{"role": "user", "content": sample.prompt}])
    return encode_prompt(tokenizer, sample.prompt)


def limit_for(plan: EvalPlan, mode: str, length: int | None, native: int,
              task: str) -> int | None:
    """Tokens a prompt may have in ``mode`` (None: no limit)."""
    limit = plan.max_len[mode] if mode in plan.max_len else (native if mode == "full" else None)
    if length is not None and not plan.generated(task):  # an official task's length is a limit
        limit = length if limit is None else min(limit, length)
    return limit


def predict(model, tokenizer, spec: TaskSpec, ids: list[int], mode: str, plan: EvalPlan) -> tuple[str, dict]:
    """Greedy answer to ``ids`` and what the run measured."""
    memory = None if mode == "full" else (plan.memory or MemoryConfig.for_model(model.args))
    text, stats = generate(model, tokenizer, ids, max_new_tokens=spec.max_new_tokens, attention=mode,
                           stop=list(spec.stop), memory=memory, chunk_size=plan.chunk_size,
                           attention_kernel=plan.attention_kernel, return_stats=True)
    kernel = kernel_name(plan.attention_kernel, next(model.parameters()).device) if mode == "infllm" else None
    return text, dict(attention_kernel=kernel, prefill_seconds=round(stats.prefill_seconds, 3),
                      prefill_tokens_per_s=round(stats.prefill_tokens_per_second, 1),
                      new_tokens=stats.new_tokens,
                      decode_tokens_per_s=round(stats.decode_tokens_per_second, 2))


def record_key(task: str, length: int | None, mode: str, sample_id: str) -> tuple:
    return task, length, mode, str(sample_id)


def read_predictions(path: Path) -> list[dict]:
    """The predictions already written (a torn last line from a killed run is dropped: that
    sample runs again)."""
    if not path.is_file():
        return []
    return [r for _, r in read_jsonl(path, torn_tail=True,
                                     advice="; remove it or use another output folder")]


def _repair(path: Path) -> list[dict]:
    """The records of a predictions file, rewritten whole if a killed run left a torn last
    line (so new lines append cleanly)."""
    records = read_predictions(path)
    if path.is_file() and not path.read_bytes().endswith(b"\n") and path.stat().st_size:
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def rank_files(out: Path) -> list[Path]:
    """The data-parallel ranks' prediction files not yet merged, of any world size."""
    return sorted(out.glob("predictions.rank*-of-*.jsonl"))


def run_eval(model, tokenizer, plan: EvalPlan, out_dir: str | Path, *, progress: bool = True,
             plots: bool = True, shard=None) -> dict | None:
    """Run ``plan`` (skipping predictions already in ``out_dir``), write the summary, the
    markdown table and the plots there, and return the summary. ``shard``: this rank's
    share of a data-parallel run (module docstring); ranks other than 0 return None."""
    plan.check()
    plan.check_scorers()
    plan.load_data()
    out = Path(out_dir)
    lead = shard is None or shard.rank == 0
    if lead:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        _check_settings(out, plan, model)
        _repair(out / PREDICTIONS)
    if shard is not None:
        shard.barrier()  # the folder, settings and merged file are ready
        if not lead:
            _check_settings(out, plan, model)
    path = out / PREDICTIONS if shard is None else out / shard.file_name
    records = (_repair(path) if shard is None else
               [r for f in [out / PREDICTIONS, *rank_files(out)]
                for r in (_repair(f) if f == path else read_predictions(f))])
    done = {record_key(r["task"], r["length"], r["mode"], r["id"]) for r in records}
    native = model.args.max_position_embeddings
    lengths = plan.lengths or [None]
    n_runs = sum(len(plan.modes) * (plan.samples or 0) for t in plan.tasks for _ in lengths)
    bar = tqdm(total=n_runs or None, desc="eval", unit="answer", disable=not progress)
    bar.update(sum(1 for r in records if r["task"] in plan.tasks and r["mode"] in plan.modes
                   and r["length"] in lengths))
    with writing(path):
        sink = path.open("a", encoding="utf-8")
    unit = -1  # the sample's index in the run's order: which rank answers it
    with sink:
        for length in lengths:  # shortest first: an interrupted run has every task's short cells
            for task in plan.tasks:
                spec = get_task(task)
                for make in sample_makers(plan, tokenizer, task, length):
                    unit += 1
                    if shard is not None and unit % shard.world_size != shard.rank:
                        continue
                    sample = make()
                    todo = [m for m in plan.modes if record_key(task, length, m, sample.id) not in done]
                    if not todo:
                        continue
                    ids = prompt_ids(tokenizer, spec, sample)
                    for mode in todo:
                        bar.set_postfix(task=task, length=length, mode=mode)
                        limit = limit_for(plan, mode, length, native, task)
                        used = ids if limit is None else truncate_ids(ids, limit, spec.max_new_tokens)
                        prediction, measured = predict(model, tokenizer, spec, used, mode, plan)
                        scored = first_line(prediction) if spec.first_line else prediction
                        record = dict(task=task, length=length, mode=mode, id=sample.id,
                                      score=score(task, scored, sample.answers,
                                                  all_classes=sample.meta.get("all_classes")),
                                      prediction=prediction, answers=list(sample.answers),
                                      prompt_tokens=len(ids), read_tokens=len(used),
                                      truncated=len(used) < len(ids), **measured,
                                      **{k: v for k, v in sample.meta.items()
                                         if k in ("depth", "seed", "needle_token")})
                        if shard is not None:
                            record["unit"] = unit  # the merge's order; dropped there
                        with writing(path):
                            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                            sink.flush()
                        records.append(record)
                        done.add(record_key(task, length, mode, sample.id))
                        bar.update(shard.world_size if shard is not None else 1)
    bar.close()
    if shard is not None:
        shard.wait_for_all()  # every rank's answers are written
        if not lead:
            return None
        merge_rank_files(out, plan)
    return report_only(plan, out, plots=plots)


def merge_rank_files(out: Path, plan: EvalPlan) -> None:
    """Append the ranks' new records to ``predictions.jsonl`` in the order one process
    writes them (sample index, then the plan's mode order), then remove the rank files."""
    path, files = out / PREDICTIONS, rank_files(out)
    merged = read_predictions(path)
    keys = {record_key(r["task"], r["length"], r["mode"], r["id"]) for r in merged}
    new = []
    for f in files:
        for r in read_predictions(f):
            key = record_key(r["task"], r["length"], r["mode"], r["id"])
            if key not in keys:  # a crash after a merge left its rank files: skip what is merged
                keys.add(key)
                new.append(r)
    modes = {m: i for i, m in enumerate(plan.modes)}
    new.sort(key=lambda r: (r.get("unit", -1), modes.get(r["mode"], len(modes))))
    for r in new:
        r.pop("unit", None)
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged + new))
    for f in files:
        with writing(f):
            f.unlink()


def report_only(plan: EvalPlan, out_dir: str | Path, *, plots: bool = True) -> dict:
    """Write summary.json, summary.md and the plots from the predictions already in
    ``out_dir`` (of an interrupted run, say), running nothing; returns the summary
    (``summary["files"]``: what it wrote, relative to ``out_dir``)."""
    out = Path(out_dir)
    path = out / SETTINGS
    if not path.is_file():
        raise InfLLMLiteError(f"{out} holds no evaluation run (no {SETTINGS})")
    records = read_predictions(out / PREDICTIONS)
    summary = summarize(records, plan, json.loads(path.read_text(encoding="utf-8")))
    write_report(out, summary, records, plots=plots)
    return summary


def _check_settings(out: Path, plan: EvalPlan, model) -> None:
    """Record what the predictions depend on (beyond which tasks, modes, lengths and samples
    run); refuse to add to predictions made with other settings, naming what changed. The
    attention kernel is not one of them (the kernels compute the same attention, held to one
    reference in the tests): each prediction records its own."""
    memory = plan.memory or MemoryConfig.for_model(model.args)
    settings = dict(seed=plan.seed, memory=memory.to_dict(), max_len=plan.max_len,
                    chunk_size=plan.chunk_size, native_window=model.args.max_position_embeddings,
                    layers=model.args.n_layers, hidden=model.args.dim, vocab=model.args.vocab_size)
    settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    path = out / SETTINGS
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        before.pop("attention_kernel", None)  # recorded by older runs; the kernels agree
        changed = settings_changes(before, settings)
        if changed:
            raise InfLLMLiteError(f"{out} was written with other settings: {', '.join(changed)}; "
                                  "use another output folder (--out) or the same options")
    else:
        write_atomic(path, json.dumps(settings, indent=1) + "\n")


def settings_changes(before: dict, now: dict, prefix: str = "") -> list[str]:
    """What differs between two settings dicts, one "key old -> new" a change, nested keys
    dotted ("memory.n_local 512 -> 256"); a key one side lacks reads "unset"."""
    changes = []
    for key in sorted(set(before) | set(now), key=str):
        old, new = before.get(key, _UNSET), now.get(key, _UNSET)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += settings_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key} {_setting(old)} -> {_setting(new)}")
    return changes


_UNSET = object()


def _setting(value) -> str:
    if value is _UNSET or value is None:
        return "unset" if value is _UNSET else "none"
    return json.dumps(value)
