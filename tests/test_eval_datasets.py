"""The official InfiniteBench and LongBench tasks: settings, prompts built from official
records (the fixtures are made-up records in the official format), references in the metric's
form, the reference's truncation, and the loaders' errors."""

import json
import zipfile
from pathlib import Path

import huggingface_hub
import pytest
from hypothesis import given
from hypothesis import strategies as st

from infllm_lite.errors import InfLLMLiteError
from infllm_lite.eval.datasets import (infinitebench_answers, load_infinitebench, load_longbench,
                                       load_official)
from infllm_lite.eval.tasks import (INFINITEBENCH_TASKS, LONGBENCH_TASKS, TASKS, get_task,
                                    kv_retrieval_key, math_find_prefix, truncate_ids)

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_records(benchmark: str, task: str) -> list[dict]:
    lines = (FIXTURES / benchmark / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def offline(monkeypatch):
    """No network: every hub download fails as it does offline."""
    def fail(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)


# ---- task settings ----------------------------------------------------------------------

def test_task_list_and_settings():
    assert set(TASKS) == set(INFINITEBENCH_TASKS) | set(LONGBENCH_TASKS)
    assert len(INFINITEBENCH_TASKS) == 9 and len(LONGBENCH_TASKS) == 16
    assert {n for n, s in TASKS.items() if not s.chat} == {"trec", "triviaqa", "samsum", "lcc",
                                                          "repobench-p"}
    assert {n for n, s in TASKS.items() if s.first_line} == {"trec", "triviaqa", "samsum"}
    assert {n: s.stop for n, s in TASKS.items() if s.stop} == {"samsum": ("\n",)}
    assert all(s.metric == n and s.name == n for n, s in TASKS.items())
    assert all(TASKS[n].benchmark == "infinitebench" for n in INFINITEBENCH_TASKS)
    assert all(TASKS[n].benchmark == "longbench" for n in LONGBENCH_TASKS)
    assert {n: TASKS[n].max_new_tokens for n in ("passkey", "kv_retrieval", "longbook_sum_eng",
                                                 "narrativeqa", "multifieldqa_en", "gov_report",
                                                 "trec", "samsum", "lcc")} == {
        "passkey": 32, "kv_retrieval": 100, "longbook_sum_eng": 1536, "narrativeqa": 128,
        "multifieldqa_en": 64, "gov_report": 512, "trec": 64, "samsum": 128, "lcc": 64}


def test_unknown_task_lists_the_known_ones():
    known = "unknown task 'qaspr'; known tasks: passkey, .*qasper.*repobench-p"
    with pytest.raises(InfLLMLiteError, match=known):
        get_task("qaspr")
    with pytest.raises(InfLLMLiteError, match="unknown task"):
        load_official("qaspr", FIXTURES)


def test_a_loader_refuses_the_other_benchmarks_task():
    with pytest.raises(InfLLMLiteError, match="'qasper' is a longbench task"):
        load_infinitebench("qasper", FIXTURES)
    with pytest.raises(InfLLMLiteError, match="'passkey' is a infinitebench task"):
        load_longbench("passkey", FIXTURES)


# ---- fixtures in the official format, every task loads -----------------------------------

@pytest.mark.parametrize("task", INFINITEBENCH_TASKS)
def test_infinitebench_fixture_format(task):
    records = fixture_records("infinitebench", task)
    assert 2 <= len(records) <= 3
    for r in records:
        assert set(r) == {"id", "context", "input", "answer", "options"}
        assert isinstance(r["id"], int) and isinstance(r["context"], str)
        assert isinstance(r["answer"], list) and isinstance(r["options"], list)
        assert len(r["options"]) == (4 if task in ("longbook_choice_eng", "code_debug") else 0)


@pytest.mark.parametrize("task", LONGBENCH_TASKS)
def test_longbench_fixture_format(task):
    records = fixture_records("longbench", task)
    assert 2 <= len(records) <= 3
    for r in records:
        assert set(r) == {"input", "context", "answers", "length", "dataset", "language",
                          "all_classes", "_id"}
        assert r["dataset"] == task and r["language"] == "en" and isinstance(r["length"], int)
        assert isinstance(r["answers"], list) and all(isinstance(a, str) for a in r["answers"])
        assert r["all_classes"] is None or isinstance(r["all_classes"], list)


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_loads_in_file_order(task):
    spec = TASKS[task]
    records = fixture_records(spec.benchmark, task)
    samples = load_official(task, FIXTURES)  # found in FIXTURES/<benchmark>/<task>.jsonl
    assert len(samples) == len(records)
    for sample, record in zip(samples, records):
        assert sample.task == task
        assert sample.id == str(record["id"] if spec.benchmark == "infinitebench" else record["_id"])
        assert record["context"] in sample.prompt
        assert "{context}" not in sample.prompt and "{input}" not in sample.prompt
        assert "{OPTION_A}" not in sample.prompt and "{question}" not in sample.prompt
        assert sample.answers and all(isinstance(a, str) for a in sample.answers)
        assert isinstance(sample.meta["length"], int)


def test_the_task_folder_itself_works_too():
    direct = load_longbench("qasper", FIXTURES / "longbench")
    assert direct == load_longbench("qasper", FIXTURES)


# ---- prompts, filled in by hand ------------------------------------------------------------

def test_kv_retrieval_prompt():
    sample = load_official("kv_retrieval", FIXTURES)[0]
    assert sample.prompt == (
        'Extract the value corresponding to the specified key '
        '"2a8d601d-1d69-4e64-9f90-8ad825a74195" in the JSON object below.\n\n'
        'JSON data:\n'
        '{"9f0c3b8e-2d4a-4c1b-8e7f-1a2b3c4d5e6f": "c81f0e3a-7b2d-4e9c-a1f0-5d6e7f8a9b0c", '
        '"2a8d601d-1d69-4e64-9f90-8ad825a74195": "bb3b41c3-ccb5-4b4f-a0ea-55e2f8c3e4d1", '
        '"e1f2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a5b": "4d5e6f70-8192-4a3b-9c4d-5e6f7a8b9c0d"}\n\n'
        '\nKey: "2a8d601d-1d69-4e64-9f90-8ad825a74195"\n'
        'The value associated with the specified key is: ')
    assert sample.answers == ("bb3b41c3-ccb5-4b4f-a0ea-55e2f8c3e4d1",)


def test_math_find_prompts():
    samples = load_official("math_find", FIXTURES)
    assert samples[0].prompt == (
        "What is the largest number in the following list?\n\n"
        "[12, 5, 99, 43, 7, 61, 30]\n\n"
        "You should answer with only one number, no other words. "
        "The largest number of the list is: ")
    assert samples[1].prompt.startswith("What is the smallest number in the following list?\n\n")
    assert samples[2].prompt.startswith("What is the second largest number in the following list?")
    assert [s.answers for s in samples] == [("99",), ("3",), ("70",)]


def test_longbook_choice_prompt_lists_the_options():
    sample = load_official("longbook_choice_eng", FIXTURES)[1]
    assert sample.prompt == (
        "Read the book and answer the question.\n\n"
        "Chapter 1. Mira Holt kept a lighthouse on the cold northern coast. Every evening she "
        "climbed the ninety steps with a lamp and a book. One winter a sailor named Tobias Wren "
        "washed ashore, and she nursed him through the storm.\n\n"
        "Chapter 2. In spring Tobias repaired the lighthouse bell and left on a fishing boat "
        "bound for the south.\n\n"
        "Question: Who kept the lighthouse?\n\n"
        "Only one of the following options is correct, tell me the answer using one single "
        "letter (A, B, C, or D). Don't say anything else.\n"
        "A. Tobias Wren\nB. A fisherman\nC. Mira Holt\nD. Nobody")
    assert sample.answers == ("Mira Holt", "C")


def test_code_debug_prompt_lists_the_options():
    sample = load_official("code_debug", FIXTURES)[0]
    assert "\n\nWhich funtion has deliberate error?\nA. add\nB. scale\nC. mean\nD. clamp\n\n" \
           "Give me your answer" in sample.prompt
    assert sample.answers == ("mean", "C")


def test_narrativeqa_prompt_is_infllms_own_wording():
    sample = load_official("narrativeqa", FIXTURES)[0]
    assert sample.prompt == (
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question asconcisely as you can, using a single phrase if possible. Do not "
        "provide any explanation.\n\n"
        "Story: Old Peter lived at the edge of the forest with his granddaughter Lena. Each "
        "autumn they gathered walnuts and sold them at the market in Brenn. One year a grey wolf "
        "followed them home, and Lena fed it bread until it became tame.\n\n"
        "Now, answer the question based on the story asconcisely as you can, using a single "
        "phrase if possible. Do not provide any explanation.\n\n"
        "Question: What did Lena feed the wolf?\n\n"
        "Answer:")


def test_trec_prompt_and_classes():
    sample = load_official("trec", FIXTURES)[0]
    assert sample.prompt == (
        "Please determine the type of the question below. Here are some examples of "
        "questions.\n\n"
        "Question: What is the capital of Peru?\nType: City\n"
        "Question: When did the Berlin Wall fall?\nType: Date\n"
        "Question: What does NASA stand for?\nType: Abbreviation\n"
        "\n"
        "Question: Which country has the most lakes?\nType:")
    assert sample.answers == ("Country",)
    assert "Country" in sample.meta["all_classes"] and len(sample.meta["all_classes"]) == 11


def test_lcc_prompt():
    sample = load_official("lcc", FIXTURES)[0]
    assert sample.prompt == ('Please complete the code given below. \n'
                             'import math\n\n\ndef area(r):\n    """Area of a circle of radius r."""\n'
                             'Next line of code:\n')
    assert sample.answers == ("    return math.pi * r * r",)


# ---- InfiniteBench record parts --------------------------------------------------------------

def test_kv_retrieval_key_is_the_quoted_slice():
    question = '\nKey: "2a8d601d-1d69-4e64-9f90-8ad825a74195"\nThe value associated with ...'
    assert kv_retrieval_key(question) == '"2a8d601d-1d69-4e64-9f90-8ad825a74195"'
    with pytest.raises(InfLLMLiteError, match=r"no quoted 36-character key at \[6:44\]"):
        kv_retrieval_key('Key: "2a8d601d-1d69-4e64-9f90-8ad825a74195"\nThe value ...')


def test_math_find_prefix():
    lead = "You should answer with only one number, no other words. "
    assert math_find_prefix(lead + "The third smallest number of the list is: ") == \
        "What is the third smallest number in the following list?"
    with pytest.raises(InfLLMLiteError, match="math_find input names no target"):
        math_find_prefix("What is the largest number?")


def test_choice_answers_in_every_official_form():
    options = ["alpha", "beta", "gamma", "delta"]
    for answer in ("gamma", ["gamma"], ["gamma", "C"]):
        record = {"answer": answer, "options": options}
        assert infinitebench_answers("longbook_choice_eng", record) == ("gamma", "C")
        assert infinitebench_answers("code_debug", record) == ("gamma", "C")
    with pytest.raises(InfLLMLiteError, match="not one of the options"):
        infinitebench_answers("code_debug", {"answer": ["epsilon"], "options": options})


def test_answers_in_the_metrics_form():
    assert infinitebench_answers("passkey", {"answer": "12345"}) == ("12345",)
    assert infinitebench_answers("math_find", {"answer": [7.5]}) == ("7.5",)
    assert load_official("longbook_qa_eng", FIXTURES)[0].answers == ("ninety", "90")
    assert load_official("longdialogue_qa_eng", FIXTURES)[0].answers == ("BEN",)
    assert load_official("passage_retrieval_en", FIXTURES)[1].answers == ("Paragraph 3",)
    assert load_official("passage_count", FIXTURES)[0].answers == ("2",)
    qasper = load_official("qasper", FIXTURES)[1]
    assert qasper.answers == ("yes", "Yes") and qasper.meta["all_classes"] is None
    passkey = load_official("passkey", FIXTURES)[0]
    assert passkey.meta == {"id": 0, "length": 69, "all_classes": None}


# ---- truncation --------------------------------------------------------------------------------

def test_truncation_keeps_the_head_and_the_tail():
    ids = list(range(1000))
    kept = truncate_ids(ids, max_len=600, max_new=100)
    assert kept == list(range(128)) + list(range(1000 - 372, 1000))
    assert len(kept) == 500


def test_short_prompts_are_untouched():
    ids = list(range(500))
    assert truncate_ids(ids, max_len=600, max_new=100) == ids
    assert truncate_ids((), max_len=600, max_new=100) == []


def test_truncation_needs_room_after_the_prefix():
    with pytest.raises(InfLLMLiteError, match="leaves no room"):
        truncate_ids(list(range(10)), max_len=160, max_new=32)  # 128: nothing after the prefix
    assert len(truncate_ids(list(range(1000)), max_len=161, max_new=32)) == 129


@given(n=st.integers(0, 3000), max_len=st.integers(129, 2500), max_new=st.integers(0, 600),
       keep=st.integers(0, 200))
def test_truncation_lengths(n, max_len, max_new, keep):
    budget = max_len - max_new
    ids = list(range(n))
    if budget <= keep:
        with pytest.raises(InfLLMLiteError):
            truncate_ids(ids, max_len, max_new, keep_prefix=keep)
        return
    kept = truncate_ids(ids, max_len, max_new, keep_prefix=keep)
    assert len(kept) == min(n, budget)
    if n <= budget:
        assert kept == ids
    else:
        assert kept[:keep] == ids[:keep] and kept[keep:] == ids[n - (budget - keep):]


# ---- missing, downloaded and broken files ------------------------------------------------------

def test_missing_file_offline_says_where_to_put_it(tmp_path, offline):
    with pytest.raises(InfLLMLiteError) as err:
        load_official("passkey", tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"no {tmp_path}/passkey.jsonl, {tmp_path}/infinitebench/passkey.jsonl" in message
    assert "Failed to resolve 'huggingface.co'" in message
    assert ("put passkey.jsonl of https://huggingface.co/datasets/xinrongzhang2022/InfiniteBench "
            f"at {tmp_path}/passkey.jsonl") in message

    with pytest.raises(InfLLMLiteError) as err:
        load_official("qasper", tmp_path)
    message = str(err.value)
    assert f"{tmp_path}/longbench/qasper.jsonl" in message and "THUDM/LongBench/data.zip" in message
    assert f"put data/qasper.jsonl out of data.zip of https://huggingface.co/datasets/THUDM/LongBench " \
           f"at {tmp_path}/qasper.jsonl" in message

    with pytest.raises(InfLLMLiteError, match="pass data_dir=DIR"):
        load_official("qasper")


def test_infinitebench_download(monkeypatch, tmp_path):
    calls = []

    def download(repo_id, filename, repo_type=None):
        calls.append((repo_id, filename, repo_type))
        return str(FIXTURES / "infinitebench" / filename)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    samples = load_official("math_find", tmp_path)  # not in tmp_path: downloaded
    assert calls == [("xinrongzhang2022/InfiniteBench", "math_find.jsonl", "dataset")]
    assert samples == load_official("math_find", FIXTURES)


def test_longbench_download_unpacks_data_zip_once(monkeypatch, tmp_path):
    monkeypatch.setenv("INFLLM_LITE_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(FIXTURES / "longbench" / "trec.jsonl", "data/trec.jsonl")
        zf.writestr("data/trec_e.jsonl", "not this one\n")
    calls = []

    def download(repo_id, filename, repo_type=None):
        calls.append((repo_id, filename, repo_type))
        return str(archive)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    samples = load_official("trec")
    assert calls == [("THUDM/LongBench", "data.zip", "dataset")]
    assert samples == load_official("trec", FIXTURES)
    assert (tmp_path / "cache" / "longbench" / "trec.jsonl").is_file()
    archive.unlink()  # the unpacked copy serves the next load
    assert load_official("trec") == samples
    zipfile.ZipFile(archive, "w").close()
    with pytest.raises(InfLLMLiteError, match="holds no qasper.jsonl"):
        load_official("qasper")


def test_corrupt_line_names_file_and_line(tmp_path):
    lines = (FIXTURES / "longbench" / "qasper.jsonl").read_text().splitlines()
    path = tmp_path / "qasper.jsonl"
    path.write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    with pytest.raises(InfLLMLiteError, match=rf"{path}, line 2: not valid JSON"):
        load_longbench("qasper", tmp_path)


def test_record_without_a_field_names_file_line_and_field(tmp_path):
    record = fixture_records("infinitebench", "longbook_choice_eng")[0]
    del record["options"]
    path = tmp_path / "longbook_choice_eng.jsonl"
    path.write_text("\n" + json.dumps(record) + "\n")
    with pytest.raises(InfLLMLiteError, match=rf"{path}, line 2: .*no field 'options'"):
        load_infinitebench("longbook_choice_eng", tmp_path)


def test_blank_lines_are_skipped_and_missing_ids_are_line_indices(tmp_path):
    records = fixture_records("infinitebench", "passkey")
    for r in records:
        del r["id"]
    lines = [json.dumps(records[0]), "  ", json.dumps(records[1])]
    (tmp_path / "passkey.jsonl").write_text("\n".join(lines) + "\n")
    samples = load_infinitebench("passkey", tmp_path)
    assert [s.id for s in samples] == ["0", "2"]
    assert [s.answers for s in samples] == [("71432",), ("90817",)]
