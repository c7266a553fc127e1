"""The evaluation runner: predictions per task × length × mode × sample, resumable, with the
reference's truncation, a summary, tables and plots; the ``infllm-lite eval`` command."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from infllm_lite.cli import main
from infllm_lite.cli_support import parse_max_len
from infllm_lite.errors import InfLLMLiteError
from infllm_lite.eval import metrics, runner
from infllm_lite.eval.plan import MODES
from infllm_lite.eval.report import markdown_tables
from infllm_lite.eval.runner import PREDICTIONS, EvalPlan, report_only, run_eval
from infllm_lite.memory_config import MemoryConfig
from infllm_lite.options import ATTENTION_MODES, parse_lengths

FIXTURES = Path(__file__).parent / "fixtures"
# small enough that 600-token prompts fill blocks, retrieve and drop tokens
TINY_MEMORY = MemoryConfig(n_init=4, n_local=64, block_size=16, topk=2, exc_block_size=32,
                           chunk_size=256, max_cached_blocks=4)


def _plan(**kw):
    base = dict(tasks=["passkey", "kv_retrieval"], modes=["infllm", "streaming", "full"],
                lengths=[600], samples=2, memory=TINY_MEMORY, attention_kernel="torch")
    base.update(kw)
    return EvalPlan(**base)


def _lines(out):
    return [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]


def test_runs_every_cell_and_writes_the_report(tiny, tmp_path):
    model, tokenizer = tiny
    summary = run_eval(model, tokenizer, _plan(max_len={"full": 400}), tmp_path, progress=False)
    records = _lines(tmp_path)
    assert len(records) == 2 * 2 * 3
    assert {(r["task"], r["mode"]) for r in records} == {
        (t, m) for t in ("passkey", "kv_retrieval") for m in ("infllm", "streaming", "full")}
    for r in records:
        assert 0.0 <= r["score"] <= 1.0 and r["depth"] in (0.05, 0.95)
        assert r["attention_kernel"] == ("torch" if r["mode"] == "infllm" else None)
        assert abs(r["prompt_tokens"] - 600) <= 0.05 * 600
        if r["mode"] == "full":  # truncated to the limit: first 128 and the last ones
            assert r["truncated"] and r["read_tokens"] <= 400
        else:
            assert not r["truncated"] and r["read_tokens"] == r["prompt_tokens"]
    # every mode read the same prompts
    for task in ("passkey", "kv_retrieval"):
        ids = {m: sorted(r["id"] for r in records if r["task"] == task and r["mode"] == m)
               for m in ("infllm", "streaming", "full")}
        assert ids["infllm"] == ids["streaming"] == ids["full"]
    cells = {(c["task"], c["mode"]): c for c in summary["cells"]}
    assert all(c["n"] == 2 and c["length"] == 600 for c in cells.values())
    assert cells[("passkey", "full")]["truncated"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["cells"] == summary["cells"]
    table = (tmp_path / "summary.md").read_text()
    assert "**passkey**" in table and "| infllm |" in table and "†" in table
    pngs = ["score_vs_length.png", "passkey_depth_heatmap.png", "kv_retrieval_depth_heatmap.png"]
    for png in pngs:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["files"] == [*pngs, "summary.md", "summary.json"]


def test_resumes_without_redoing_work(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    plan = _plan(tasks=["passkey"], modes=["streaming", "full"])
    run_eval(model, tokenizer, plan, tmp_path, progress=False, plots=False)
    first = _lines(tmp_path)
    assert len(first) == 4
    # a killed run: the last answer lost, the one before it torn mid-line
    lines = (tmp_path / PREDICTIONS).read_text().splitlines()
    (tmp_path / PREDICTIONS).write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    calls = []
    real = runner.predict

    def counting(*args, **kw):
        calls.append(args[4])  # the mode
        return real(*args, **kw)

    monkeypatch.setattr(runner, "predict", counting)
    run_eval(model, tokenizer, plan, tmp_path, progress=False, plots=False)
    assert len(calls) == 2
    again = _lines(tmp_path)
    assert len(again) == 4
    timings = ("prefill_seconds", "prefill_tokens_per_s", "decode_tokens_per_s")

    def answers(records):
        return sorted(json.dumps({k: v for k, v in r.items() if k not in timings}, sort_keys=True)
                      for r in records)

    assert answers(again) == answers(first)  # the same predictions, each once
    # nothing left to do
    run_eval(model, tokenizer, plan, tmp_path, progress=False, plots=False)
    assert len(calls) == 2
    # the report alone, from the predictions, through the CLI (no model loaded)
    (tmp_path / "summary.json").unlink()
    assert main(["eval", "--task", "passkey", "--lengths", "600", "--samples", "2", "--attention",
                 "streaming,full", "--out", str(tmp_path), "--report-only", "--no-plots",
                 "--model", str(tmp_path / "no-model-needed")]) == 0
    cells = json.loads((tmp_path / "summary.json").read_text())["cells"]
    assert [c["n"] for c in cells] == [2, 2]
    # another attention kernel may continue them (each prediction records its own) ...
    run_eval(model, tokenizer, replace(plan, attention_kernel="window-eager"), tmp_path, progress=False,
             plots=False)
    # ... other settings do not mix with them
    other = _plan(tasks=["passkey"], modes=["streaming", "full"], seed=1)
    with pytest.raises(InfLLMLiteError, match="seed"):
        run_eval(model, tokenizer, other, tmp_path, progress=False, plots=False)


def test_other_settings_are_refused_naming_only_what_changed(tiny, tmp_path):
    model, tokenizer = tiny
    plan = _plan(tasks=["passkey"], modes=["full"], samples=1)
    run_eval(model, tokenizer, plan, tmp_path, progress=False, plots=False)
    other = replace(plan, chunk_size=128, memory=replace(TINY_MEMORY, n_local=32))
    with pytest.raises(InfLLMLiteError) as e:
        run_eval(model, tokenizer, other, tmp_path, progress=False, plots=False)
    message = str(e.value)
    assert message == (f"{tmp_path} was written with other settings: chunk_size none -> 128, "
                       "memory.n_local 64 -> 32; use another output folder (--out) or the same "
                       "options")
    assert len(_lines(tmp_path)) == 1  # nothing added


def test_table_marks_truncation_only_when_some_prompt_was(tmp_path):
    cell = dict(task="passkey", length=600, mode="full", n=2, score=50.0)
    clean = markdown_tables([dict(cell, truncated=0)], ["passkey"], [600], ["full"])
    assert "†" not in clean and "truncated" not in clean
    cut = markdown_tables([dict(cell, truncated=1)], ["passkey"], [600], ["full"])
    assert "50† (2)" in cut and "† some prompts were truncated" in cut


def test_report_names_every_file_it_writes(tiny, tmp_path, capsys):
    """The last line of ``infllm-lite eval --report-only`` names the summaries and each plot
    (none with --no-plots)."""
    model, tokenizer = tiny
    run_eval(model, tokenizer, _plan(tasks=["passkey"], modes=["full"], samples=1), tmp_path,
             progress=False, plots=False)
    argv = ["eval", "--task", "passkey", "--lengths", "600", "--samples", "1", "--attention",
            "full", "--out", str(tmp_path), "--report-only", "--model", str(tmp_path / "none")]
    assert main([*argv, "--no-plots"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"wrote {tmp_path / 'summary.md'}, {tmp_path / 'summary.json'}"
    pytest.importorskip("matplotlib")
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    pngs = [tmp_path / "score_vs_length.png", tmp_path / "passkey_depth_heatmap.png"]
    assert last == "wrote " + ", ".join(map(str, [*pngs, tmp_path / "summary.md",
                                                  tmp_path / "summary.json"]))
    assert all(png.is_file() for png in pngs)


def test_unwritable_output_is_one_clear_error(tiny, tmp_path):
    model, tokenizer = tiny
    plan = _plan(tasks=["passkey"], modes=["full"], samples=1)
    (tmp_path / "file").write_text("")
    with pytest.raises(InfLLMLiteError, match=f"cannot write {tmp_path / 'file' / 'out'}"):
        run_eval(model, tokenizer, plan, tmp_path / "file" / "out", progress=False, plots=False)
    (tmp_path / "a" / PREDICTIONS).mkdir(parents=True)  # the predictions cannot be appended
    with pytest.raises(InfLLMLiteError, match=f"cannot write {tmp_path / 'a' / PREDICTIONS}"):
        run_eval(model, tokenizer, plan, tmp_path / "a", progress=False, plots=False)
    run_eval(model, tokenizer, plan, tmp_path / "b", progress=False, plots=False)
    (tmp_path / "b" / "summary.md").unlink()
    (tmp_path / "b" / "summary.md").mkdir()  # the report cannot be rewritten
    with pytest.raises(InfLLMLiteError, match=f"cannot write {tmp_path / 'b' / 'summary.md'}"):
        report_only(plan, tmp_path / "b", plots=False)


@pytest.mark.parametrize("modules, task", [(["rouge"], "gov_report"),
                                           (["rouge_score", "rouge_score.rouge_scorer"],
                                            "longbook_sum_eng")])
def test_missing_rouge_names_the_extra_before_loading_the_model(tmp_path, capsys, monkeypatch,
                                                                modules, task):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import fails
    loads = []
    monkeypatch.setattr("infllm_lite.eval.command.load_from_args", lambda args: loads.append(args))
    code = main(["eval", "--task", f"qasper,{task}", "--data-dir", str(FIXTURES),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and not loads
    assert err.count("\n") == 1 and task in err and "pip install 'infllm-lite[eval]'" in err
    metrics._rouge.cache_clear()
    metrics._lsum_scorer.cache_clear()
    with pytest.raises(InfLLMLiteError, match=r"pip install 'infllm-lite\[eval\]'"):
        metrics.score(task, "a summary", ["the summary"])
    monkeypatch.undo()
    metrics._rouge.cache_clear()
    metrics._lsum_scorer.cache_clear()


def test_eval_modes_are_the_attention_modes():
    assert set(MODES) == set(ATTENTION_MODES) and MODES[0] == "infllm"


def test_official_tasks_from_fixtures(tiny, tmp_path):
    """Official jsonl files (LongBench and InfiniteBench layouts): chat and raw prompts, the
    first-line rule, and a length as a truncation limit."""
    model, tokenizer = tiny
    plan = EvalPlan(tasks=["narrativeqa", "trec"], modes=["full"], lengths=None, samples=None,
                    data_dir=str(FIXTURES))
    summary = run_eval(model, tokenizer, plan, tmp_path, progress=False, plots=False)
    records = _lines(tmp_path)
    assert records and all(r["length"] is None for r in records)
    assert {r["task"] for r in records} == {"narrativeqa", "trec"}
    assert all(c["n"] >= 2 for c in summary["cells"])
    official = EvalPlan(tasks=["passkey", "kv_retrieval"], modes=["full"], samples=1,
                        data_dir=str(FIXTURES), official=True)
    run_eval(model, tokenizer, official, tmp_path / "official", progress=False, plots=False)
    assert [(r["task"], r["id"]) for r in _lines(tmp_path / "official")] == [
        ("passkey", "0"), ("kv_retrieval", "0")]  # the fixtures' records, not generated ones
    limited = EvalPlan(tasks=["narrativeqa"], modes=["full"], lengths=[300], samples=1,
                       data_dir=str(FIXTURES))
    run_eval(model, tokenizer, limited, tmp_path / "limited", progress=False, plots=False)
    (r,) = _lines(tmp_path / "limited")
    assert r["length"] == 300 and r["read_tokens"] <= 300 - 128  # room for 128 new tokens


@pytest.mark.parametrize("bad, match", [
    (dict(tasks=[]), "no tasks"),
    (dict(tasks=["nosuchtask"]), "nosuchtask"),
    (dict(modes=["dense"]), "unknown attention mode 'dense'"),
    (dict(modes=[]), "no attention modes"),
    (dict(lengths=None), "need lengths"),
    (dict(lengths=[0]), "positive"),
    (dict(samples=0), "samples"),
    (dict(max_len={"full": 0}), "truncation"),
    (dict(max_len={"full": 150}), "too small for passkey"),  # 128 kept + 32 new
    (dict(tasks=["narrativeqa"], lengths=[250]), "too small for narrativeqa"),
])
def test_bad_plans_fail_before_work(bad, match):
    with pytest.raises(InfLLMLiteError, match=match):
        _plan(**bad).check()


def test_parse_lengths_and_limits():
    assert parse_lengths("4k, 8K,16384") == [4096, 8192, 16384]
    with pytest.raises(InfLLMLiteError, match="4q"):
        parse_lengths("4q")
    assert parse_max_len(["full=none", "16k"], ["infllm", "full"]) == {"full": 16384, "infllm": 16384}
    assert parse_max_len(["16k", "full=none"], ["infllm", "full"]) == {"full": None, "infllm": 16384}


def test_cli_eval(tiny_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["eval", "--task", "number_string", "--lengths", "500", "--samples", "1",
                 "--attention", "streaming,full", "--model", str(tiny_folder), "--out", str(out),
                 "--n-local", "64", "--n-init", "4", "--no-plots"])
    assert code == 0
    captured = capsys.readouterr()
    assert "**number_string**" in captured.out
    assert captured.out.strip().splitlines()[-1] == "wrote " + ", ".join(
        str(out / name) for name in (PREDICTIONS, "summary.md", "summary.json"))
    assert len(_lines(out)) == 2
    assert json.loads((out / "summary.json").read_text())["plan"]["memory"]["n_local"] == 64


def test_report_names_the_run_not_the_rewrite():
    from infllm_lite.eval.report import run_command
    run = ["/venv/bin/infllm-lite", "eval", "--task", "passkey", "--out", "d"]
    assert run_command(run) == "infllm-lite eval --task passkey --out d"
    assert run_command(run + ["--report-only"]) == run_command(run)


def test_cli_eval_missing_data_fails_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    loads = []
    monkeypatch.setattr("infllm_lite.eval.command.load_from_args", lambda args: loads.append(args))
    code = main(["eval", "--task", "narrativeqa", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 1 and not loads
    err = capsys.readouterr().err
    assert "narrativeqa" in err and "no network" in err


@pytest.mark.parametrize("argv, match", [
    (["--task", "nosuch", "--lengths", "1k"], "nosuch"),
    (["--task", "passkey"], "need lengths"),
    (["--task", "passkey", "--lengths", "1k", "--attention", "dense"], "attention mode"),
])
def test_cli_eval_bad_input(tmp_path, capsys, argv, match):
    # fails before loading any model (the model path does not exist)
    code = main(["eval", *argv, "--model", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert code == 1
    assert match in capsys.readouterr().err


def test_embedded_model_end_to_end(smollm, tmp_path):
    """Two short generated passkey samples on the embedded model with InfLLM (compiled
    flex): the key is found at both depths."""
    model, tokenizer = smollm
    plan = EvalPlan(tasks=["passkey"], modes=["infllm"], lengths=[1024], samples=2)
    summary = run_eval(model, tokenizer, plan, tmp_path, progress=False)
    records = _lines(tmp_path)
    assert len(records) == 2
    for r in records:
        assert r["score"] == 1.0, r
    assert {c["score"] for c in summary["cells"]} == {100.0}
