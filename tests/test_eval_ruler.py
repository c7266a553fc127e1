"""RULER's tasks generated here (eval/ruler.py): sizes in the model's tokens, needles where
asked, determinism by seed, RULER's two metrics, and one run of the eval runner."""

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.eval import metrics
from infllm_lite.eval.datasets import load_official
from infllm_lite.eval.plan import EvalPlan
from infllm_lite.eval.report import plot_depth_heatmaps, plot_scores
from infllm_lite.eval.ruler import NIAH, QA_TASKS, RULER_TASKS, make_ruler_sample
from infllm_lite.eval.runner import PREDICTIONS, run_eval, sample_makers
from infllm_lite.eval.synthetic import (DEPTH_TASKS, GENERATED_TASKS, SYNTHETIC_TASKS,
                                        make_synthetic_sample)
from infllm_lite.eval.tasks import get_task
from infllm_lite.generate import encode_prompt

GENERATED = [t for t in RULER_TASKS if t not in QA_TASKS]


def _ids(tokenizer, sample):
    return encode_prompt(tokenizer, sample.prompt)  # the raw text, as the runner feeds it


@pytest.mark.parametrize("n_tokens", [1024, 4096, 8192])
@pytest.mark.parametrize("task", GENERATED)
def test_length_within_two_percent(tokenizer, task, n_tokens):
    sample = make_ruler_sample(task, tokenizer, n_tokens, depth=0.3, seed=7)
    ids = _ids(tokenizer, sample)
    assert len(ids) == sample.meta["n_tokens"]
    # niah_multikey_3's haystack unit, a needle of two UUIDs, is ~60 tokens: 2% from 3K on
    unit = 64 if task == "niah_multikey_3" else 0
    assert abs(len(ids) - n_tokens) <= max(0.02 * n_tokens, unit / 2)
    assert sample.meta["length"] == n_tokens and sample.meta["depth"] == 0.3
    # the runner's entry point gives the same sample
    assert make_synthetic_sample(task, tokenizer, n_tokens, 0.3, 7) == sample


@pytest.mark.parametrize("task", GENERATED)
def test_deterministic_by_seed(tokenizer, task):
    a = make_ruler_sample(task, tokenizer, 2048, 0.5, seed=1)
    assert make_ruler_sample(task, tokenizer, 2048, 0.5, seed=1) == a
    b = make_ruler_sample(task, tokenizer, 2048, 0.5, seed=2)
    assert b.prompt != a.prompt and b.answers != a.answers and b.id != a.id


@pytest.mark.parametrize("task", list(NIAH))
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_needles_where_asked(tokenizer, task, depth):
    cfg = NIAH[task]
    s = make_ruler_sample(task, tokenizer, 3000, depth, seed=4)
    assert len(s.answers) == cfg.v * cfg.q
    needles = re.findall(r"One of the special magic (?:numbers?|uuids?) for (\S+) is: (\S+)\.", s.prompt)
    for value in s.answers:  # each value once, in its needle
        assert s.prompt.count(value) == 1 and value in {v for _, v in needles}
    asked = {k for k, v in needles if v in s.answers}
    assert len(asked) == cfg.q
    question = s.prompt[s.prompt.rindex("What "):]
    assert all(k in question for k in asked)
    if cfg.haystack != "needle":
        assert len(needles) == max(cfg.k, cfg.q) * cfg.v  # the needles and no others
    else:  # a haystack of needles of other keys
        assert len(needles) > 20 and all(k not in asked for k, v in needles if v not in s.answers)
    ids = _ids(tokenizer, s)
    at = s.meta["needle_token"]
    assert "One" in tokenizer.decode(ids[at:at + 2])
    fraction = at / len(ids)
    assert abs(fraction - depth) < 0.15, fraction  # the first asked needle at its depth
    assert s.prompt.endswith("mentioned in the provided text " + ("are" if cfg.v * cfg.q > 1 else "is"))


def test_vt_cwe_fwe_answers_in_the_text(tokenizer):
    vt = make_ruler_sample("vt", tokenizer, 4096, 0.5, seed=3)
    main = vt.prompt[vt.prompt.rindex("Memorize and track"):]
    first, *rest = vt.answers
    value = re.search(rf"VAR {first} = (\d+)", main).group(1)
    for a, b in zip(vt.answers, rest):
        assert f"VAR {b} = VAR {a} " in main
    assert f"assigned the value {value} in the text above" in main and main.endswith("they are: ")
    cwe = make_ruler_sample("cwe", tokenizer, 4096, 0.5, seed=3)
    listing = cwe.prompt[cwe.prompt.rindex("Below is a numbered list"):]
    counts = {}
    for word in re.findall(r"\d+\. (\S+)", listing.split("\nQuestion:")[0]):
        counts[word] = counts.get(word, 0) + 1
    assert len(cwe.answers) == 10 and all(counts[w] == 30 for w in cwe.answers)
    assert all(c == 3 for w, c in counts.items() if w not in cwe.answers)
    fwe = make_ruler_sample("fwe", tokenizer, 4096, 0.5, seed=3)
    words = fwe.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
    freq = sorted(set(words), key=words.count, reverse=True)
    assert freq[0] == "..." and freq[1:4] == list(fwe.answers)


def test_ruler_metrics_hand_computed():
    assert metrics.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == 2 / 3
    assert metrics.string_match_all("ABC-def", ["abc-DEF"]) == 1.0
    assert metrics.string_match_all("nothing", ["x"]) == 0.0
    assert metrics.string_match_part("Paris, France", ["london", "paris"]) == 1.0
    assert metrics.string_match_part("Rome", ["london", "paris"]) == 0.0
    # through the dispatcher, as the runner scores: the whole list, not the max over it
    assert metrics.score("niah_multivalue", "1 2", ["1", "2", "3", "4"]) == 0.5
    assert metrics.score("vt", "AAAAA BBBBB", ["AAAAA", "BBBBB"]) == 1.0
    assert metrics.score("qa_1", "it is in Denver", ["Denver Broncos", "denver"]) == 1.0


def _squad(path):
    paragraphs = [{"context": f"Paragraph {i} says the {i}th answer is word{i}.",
                   "qas": [{"question": f"What is the {i}th answer?", "is_impossible": False,
                            "answers": [{"text": f"word{i}"}]}]} for i in range(60)]
    path.write_text(json.dumps({"data": [{"paragraphs": paragraphs[:30]},
                                         {"paragraphs": paragraphs[30:]}]}))


def test_qa_from_data_dir_and_a_clear_message_without(tokenizer, tmp_path):
    with pytest.raises(InfLLMLiteError, match="squad.json.*--data-dir"):
        make_synthetic_sample("qa_1", tokenizer, 1024, 0.5, seed=0)
    with pytest.raises(InfLLMLiteError, match="hotpotqa.json"):
        make_synthetic_sample("qa_2", tokenizer, 1024, 0.5, seed=0, data_dir=tmp_path)
    _squad(tmp_path / "squad.json")
    s = make_synthetic_sample("qa_1", tokenizer, 1024, 0.5, seed=0, data_dir=tmp_path)
    assert abs(len(_ids(tokenizer, s)) - 1024) <= 0.02 * 1024
    (i,) = re.findall(r"What is the (\d+)th answer\?", s.prompt)
    assert s.answers == (f"word{i}",) and f"says the {i}th answer is word{i}." in s.prompt
    assert s.prompt.endswith(" Answer:")


def _ruler_postprocess_pred(predict_str: str) -> str:
    """NVIDIA/RULER scripts/eval/evaluate.py ``postprocess_pred``, as written there."""
    predict_str = predict_str.strip()
    np_pattern = re.compile(r'[\x00-\x1f]')
    predict_str = np_pattern.sub('\n', predict_str).strip()
    return predict_str


def test_ruler_postprocess_hand_computed():
    clean = metrics.ruler_postprocess
    assert clean(" 1234567\n") == "1234567"
    # NUL and SOH are no whitespace to strip: newlines first, then stripped; US (0x1f) is
    assert clean("\x00\x01 7654321 \x1f") == "7654321"
    assert clean("a\tb\r\nc") == "a\nb\n\nc"  # every control character inside a newline
    assert clean("\x1b[1mBold\x1b[0m") == "[1mBold\n[0m"
    assert clean("\x7fdel\u00e9") == "\x7fdel\u00e9"  # DEL and non-ASCII untouched
    assert clean("\u00a0x\u2003") == "x"  # Unicode spaces at the ends go (Python's strip)
    # applied before RULER's metrics, and only there: a tab no longer hides a line break
    assert metrics.string_match_part("Paris\tFrance", ["paris\nfrance"]) == 0.0
    assert metrics.score("qa_1", "Paris\tFrance", ["paris\nfrance"]) == 1.0
    assert metrics.score("niah_multivalue", "1\x002\t3", ["1\n2", "2\n3", "x"]) == 2 / 3
    assert metrics.score("kv_retrieval", "a\tb", ["a\nb"]) == 0.0  # not InfiniteBench's


@given(st.text(st.sampled_from("ab 7-.\t\n\r\x00\x0b\x0c\x1b\x1c\x1f\x7f\x85\xa0\u2028\u3000")))
def test_ruler_postprocess_is_rulers(text):
    assert metrics.ruler_postprocess(text) == _ruler_postprocess_pred(text)


def test_registered_for_the_runner():
    for task in RULER_TASKS:
        spec = get_task(task)
        assert spec.benchmark == "ruler" and not spec.chat and task in GENERATED_TASKS
        assert task in metrics.RULER_METRICS and task not in SYNTHETIC_TASKS
    assert get_task("niah_single_1").max_new_tokens == 128 and get_task("vt").max_new_tokens == 30
    assert EvalPlan(tasks=["niah_single_1"], lengths=[1024]).generated("niah_single_1")
    # InfiniteBench's three, a plain tuple as before RULER
    assert type(SYNTHETIC_TASKS) is tuple and SYNTHETIC_TASKS == ("passkey", "number_string",
                                                                  "kv_retrieval")
    assert GENERATED_TASKS == SYNTHETIC_TASKS + RULER_TASKS


FIXTURES = Path(__file__).parent / "fixtures"


def test_official_reads_infinitebench_files_and_still_generates_ruler(tokenizer):
    """RULER has no official files: with ``official`` its tasks are generated, passkey read
    from the files; load_official says so for a RULER task."""
    plan = EvalPlan(tasks=["passkey", "niah_single_1"], modes=["full"], lengths=[1024],
                    samples=1, data_dir=str(FIXTURES), official=True)
    plan.check()
    assert plan.generated("niah_single_1") and not plan.generated("passkey")
    assert list(plan.load_data()) == ["passkey"]
    (make,) = sample_makers(plan, tokenizer, "niah_single_1", 1024)
    assert make() == make_ruler_sample("niah_single_1", tokenizer, 1024, 0.5, seed=1024 * 101)
    (make,) = sample_makers(plan, tokenizer, "passkey", 1024)
    assert make().id == "0"  # the fixture's record
    with pytest.raises(InfLLMLiteError, match="niah_single_1 is a RULER task: RULER has no "
                                              "official files.*generated here"):
        load_official("niah_single_1", FIXTURES)


def _plan_dict(tasks, modes=("infllm", "full"), official=False):
    return dict(tasks=list(tasks), modes=list(modes), lengths=[1024, 2048], official=official)


def test_depth_heatmaps_only_where_a_depth_places_the_needle(tmp_path):
    """niah and qa put the needle (gold documents) at the depth; vt, cwe, fwe do not: no
    heatmap for them, nor for official records (no depth)."""
    pytest.importorskip("matplotlib").use("Agg")
    assert set(DEPTH_TASKS) == {"passkey", "number_string", "kv_retrieval", *NIAH, *QA_TASKS}
    tasks = ["niah_single_1", "vt", "cwe", "fwe", "qa_1", "passkey", "narrativeqa"]
    records = [dict(task=t, mode="full", length=1024, depth=d, score=float(d < 0.5))
               for t in tasks[:-1] for d in (0.05, 0.95)]
    records += [dict(task="narrativeqa", mode="full", length=1024, score=1.0)]
    written = plot_depth_heatmaps(tmp_path, dict(plan=_plan_dict(tasks, ["full"])), records)
    assert [p.name for p in written] == [f"{t}_depth_heatmap.png" for t in
                                         ("niah_single_1", "qa_1", "passkey")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    # official passkey records carry no depth: no heatmap either
    official = [dict(r, task="passkey") for r in records if r["task"] == "narrativeqa"]
    assert plot_depth_heatmaps(tmp_path / "o", dict(plan=_plan_dict(["passkey"], official=True)),
                               official) == []


def test_score_plot_draws_every_mode(tmp_path, monkeypatch):
    """Four modes, four lines (the styles once ran out after three, dropping the fourth)."""
    pytest.importorskip("matplotlib").use("Agg")
    import matplotlib.pyplot as plt
    modes = ["infllm", "streaming", "lm-infinite", "full"]
    cells = [dict(task="vt", mode=m, length=n, score=50.0) for m in modes for n in (1024, 2048)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    (path,) = plot_scores(tmp_path, dict(plan=_plan_dict(["vt"], modes, official=True),
                                         cells=cells))
    assert path.is_file()
    (ax,) = figures[0].axes
    assert [line.get_label() for line in ax.get_lines()] == modes
    assert ax.get_xlabel() == "prompt tokens"  # vt is generated even with --official


def test_eval_runner_end_to_end(smollm, tmp_path):
    """One niah_single_1 sample at 1K tokens on the embedded model with InfLLM: predictions,
    summary and plots as for the other generated tasks."""
    model, tokenizer = smollm
    plan = EvalPlan(tasks=["niah_single_1"], modes=["infllm"], lengths=[1024], samples=1)
    summary = run_eval(model, tokenizer, plan, tmp_path, progress=False)
    (record,) = [json.loads(line) for line in (tmp_path / PREDICTIONS).read_text().splitlines()]
    assert record["task"] == "niah_single_1" and abs(record["prompt_tokens"] - 1024) <= 21
    assert record["score"] == 1.0, record
    assert "niah_single_1_depth_heatmap.png" in summary["files"]
    assert "**niah_single_1**" in (tmp_path / "summary.md").read_text()
    run_eval(model, tokenizer, plan, tmp_path, progress=False)  # resumes: nothing to redo
    assert len((tmp_path / PREDICTIONS).read_text().splitlines()) == 1
