"""``infllm-lite generate`` on many prompts: --prompt, --prompt-file (repeatable) and
--prompts-jsonl run through one engine, each answer the one its prompt gets alone (greedy),
printed under its header in input order or written to --output; every bad file or option
refused in one line before the model loads."""

import json
from pathlib import Path

import pytest

from infllm_lite.cli import main
from test_front_door import one_error_line, run_cli  # the same CLI harness

MAX_NEW = "4"


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from infllm_lite import load_model
    return load_model(str(tiny_folder), progress=False)


@pytest.fixture
def files(tmp_path):
    """Two prompt files and a writer of jsonl files."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Hello", encoding="utf-8")
    b.write_text("The cat sat on", encoding="utf-8")

    def jsonl(name, *records, raw: str | None = None):
        path = tmp_path / name
        path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records),
                        encoding="utf-8")
        return path
    return a, b, jsonl


@pytest.fixture
def no_load(monkeypatch):
    """The model loader, recorded: a refusal must come before it."""
    loads = []

    def load(args):
        loads.append(args)
        raise AssertionError("the model was loaded")
    monkeypatch.setattr("infllm_lite.cli.load_from_args", load)
    return loads


def single_text(capsys, tiny_folder, *prompt):
    code, out, err = run_cli(capsys, "generate", "--model", tiny_folder, *prompt, "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    assert out.endswith("\n")
    return out[:-1]


# ---------------------------------------------------------------- answers

def test_two_prompt_files_give_the_single_runs_texts(capsys, tiny_folder, files):
    a, b, _ = files
    ta = single_text(capsys, tiny_folder, "--prompt-file", a)
    tb = single_text(capsys, tiny_folder, "--prompt-file", b)
    assert ta.strip() and tb.strip() and ta != tb
    base = ["generate", "--model", tiny_folder, "--prompt-file", a, "--prompt-file", b,
            "--max-new-tokens", MAX_NEW]
    code, streamed, err = run_cli(capsys, *base)
    assert code == 0 and not err.strip(), err
    assert streamed == f"==> {a} <==\n{ta}\n\n==> {b} <==\n{tb}\n"
    code, whole, err = run_cli(capsys, *base, "--no-stream")
    assert code == 0 and whole == streamed, err


def test_a_single_prompt_file_is_today_s_single_prompt(capsys, tiny_folder, files):
    a, _, _ = files
    assert (single_text(capsys, tiny_folder, "--prompt-file", a)
            == single_text(capsys, tiny_folder, "--prompt", "Hello"))  # no header, batch-1 path


def test_prompts_mix_in_command_line_order(capsys, tiny_folder, files):
    a, b, jsonl = files
    j = jsonl("p.jsonl", {"prompt": "The cat sat on", "id": "cat"})
    code, out, err = run_cli(capsys, "generate", "--model", tiny_folder, "--prompt", "Hello",
                             "--prompts-jsonl", j, "--prompt-file", a, "--no-stream",
                             "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    headers = [line for line in out.splitlines() if line.startswith("==> ")]
    assert headers == ["==> prompt 0 <==", "==> cat <==", f"==> {a} <=="]
    ta, tb = (single_text(capsys, tiny_folder, "--prompt", p) for p in ("Hello", "The cat sat on"))
    assert out == f"==> prompt 0 <==\n{ta}\n\n==> cat <==\n{tb}\n\n==> {a} <==\n{ta}\n"


def test_jsonl_with_ids_to_output_in_input_order(capsys, tiny_folder, tiny, files, tmp_path):
    from infllm_lite import generate
    model, tokenizer = tiny
    _, _, jsonl = files
    chat = [{"role": "user", "content": "Hi there"}]
    j = jsonl("prompts.jsonl", {"id": "q-1", "prompt": "Hello"}, {"prompt": "The cat sat on"},
              {"id": 7, "messages": chat, "note": "other keys are ignored"})
    j.write_text(j.read_text() + "\n")  # a blank line is skipped
    out_file = tmp_path / "answers.jsonl"
    code, out, err = run_cli(capsys, "generate", "--model", tiny_folder, "--prompts-jsonl", j,
                             "--output", out_file, "--max-new-tokens", MAX_NEW, "--stats")
    assert code == 0, err
    assert out == f"wrote {out_file} (3 answers)\n"
    assert "3 sequences" in err and "tok decoded" in err  # BatchStats.summary() on stderr
    records = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["q-1", 1, 7] and [r["index"] for r in records] == [0, 1, 2]
    expected = [generate(model, tokenizer, p, max_new_tokens=int(MAX_NEW))
                for p in ("Hello", "The cat sat on", chat)]
    assert [r["text"] for r in records] == expected
    for r in records:
        assert r["finish_reason"] in ("stop", "length") and r["finish_reason"] == r["stats"]["finish_reason"]
        assert 0 < r["stats"]["prompt_tokens"] and r["stats"]["new_tokens"] <= int(MAX_NEW)
        assert {"queued_seconds", "first_token_seconds", "total_seconds"} <= r["stats"].keys()
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, then renamed


def test_chat_prompt_files_are_user_messages(capsys, tiny_folder, tiny, files):
    from infllm_lite import generate
    model, tokenizer = tiny
    a, b, _ = files
    code, out, err = run_cli(capsys, "generate", "--model", tiny_folder, "--chat", "--system", "Be brief.",
                             "--prompt-file", a, "--prompt-file", b, "--no-stream", "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    ta, tb = (generate(model, tokenizer, [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": p}], max_new_tokens=int(MAX_NEW))
              for p in ("Hello", "The cat sat on"))
    assert out == f"==> {a} <==\n{ta}\n\n==> {b} <==\n{tb}\n"


def test_batch_options_reach_the_engine(capsys, tiny_folder, files):
    a, b, _ = files
    base = ["generate", "--model", tiny_folder, "--prompt-file", a, "--prompt-file", b,
            "--max-new-tokens", MAX_NEW, "--stats"]
    code, free, err = run_cli(capsys, *base)
    assert code == 0 and "(up to 2 at once)" in err, err
    code, one_at_a_time, err = run_cli(capsys, *base, "--max-sequences", "1", "--step-tokens", "2",
                                       "--memory-budget", "1GiB")
    assert code == 0 and "(up to 1 at once)" in err, err
    assert one_at_a_time == free  # the same answers, however the engine schedules them


# ---------------------------------------------------------------- refusals, before the model loads

def test_bad_prompt_files_are_refused_before_the_model(capsys, monkeypatch, no_load, files, tmp_path):
    a, _, _ = files
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    locked = tmp_path / "locked.txt"
    locked.write_text("Hi", encoding="utf-8")
    read_text = Path.read_text

    def unreadable(self, *args, **kwargs):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", unreadable)
    cases = [
        (tmp_path / "nope.txt", f"prompt file {tmp_path / 'nope.txt'} does not exist"),
        (tmp_path, f"prompt file {tmp_path} is a directory, not a file"),
        (empty, f"prompt file {empty} is empty"),
        (latin1, f"prompt file {latin1} is not UTF-8 text"),
        (locked, f"prompt file {locked}: cannot read it (Permission denied)"),
    ]
    for bad, message in cases:
        code, out, err = run_cli(capsys, "generate", "--prompt-file", a, "--prompt-file", bad)
        assert code == 1 and one_error_line(err) and message in err and not out, (bad, err)
    assert not no_load


@pytest.mark.parametrize("raw, message", [
    ('{"prompt": "Hi"}\n{"prompt": "Hi"\n', "line 2: not valid JSON"),
    ('{"prompt": "Hi"}\n\n["Hi"]\n', "line 3: expected a JSON object, got list"),
    ('{"text": "Hi"}\n', 'line 1: needs "prompt" (a text) or "messages" (a chat), found neither'),
    ('{"prompt": "Hi", "messages": []}\n', "line 1: needs \"prompt\" (a text) or \"messages\" (a chat), not both"),
    ('{"prompt": "  "}\n', 'line 1: "prompt" is empty'),
    ('{"prompt": 3}\n', 'line 1: "prompt" must be a string, got int'),
    ('{"messages": []}\n', 'line 1: "messages" must be a non-empty list'),
    ('{"messages": [{"role": "user"}]}\n', "line 1: message 0 is not a"),
    ('{"prompt": "Hi", "id": [1]}\n', 'line 1: "id" must be a string or an integer, got [1]'),
    ("\n\n", "holds no prompts"),
])
def test_bad_jsonl_is_refused_naming_file_and_line(capsys, no_load, files, raw, message):
    _, _, jsonl = files
    path = jsonl("bad.jsonl", raw=raw)
    code, out, err = run_cli(capsys, "generate", "--prompts-jsonl", path)
    assert code == 1 and one_error_line(err) and not out, err
    assert str(path) in err and message in err, err
    assert not no_load


def test_missing_jsonl_and_no_prompt_at_all(capsys, no_load, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--prompts-jsonl", tmp_path / "none.jsonl")
    assert code == 1 and one_error_line(err) and f"prompts file {tmp_path / 'none.jsonl'} does not exist" in err
    code, _, err = run_cli(capsys, "generate", "--max-new-tokens", "3")
    assert code == 1 and one_error_line(err)
    assert "no prompt: give --prompt TEXT, --prompt-file FILE or --prompts-jsonl FILE" in err
    code, _, err = run_cli(capsys, "generate", "--prompt", "Hi", "--prompt", " ")
    assert code == 1 and "prompt 1 (a --prompt) is empty" in err
    assert not no_load


@pytest.mark.parametrize("option, value", [("--memory-budget", "1GiB"), ("--max-sequences", "2"),
                                           ("--step-tokens", "64")])
def test_batch_options_are_refused_with_one_prompt(capsys, no_load, files, option, value):
    a, _, _ = files
    for prompt in (["--prompt", "Hi"], ["--prompt-file", a]):
        code, _, err = run_cli(capsys, "generate", *prompt, option, value)
        assert code == 1 and one_error_line(err), err
        assert (f"{option} applies to a batch only: several prompts, --prompts-jsonl or --output "
                "(here: one prompt)") in err
    assert not no_load


@pytest.mark.parametrize("option, value, message", [
    ("--max-sequences", "0", "--max-sequences must be at least 1, got 0"),
    ("--step-tokens", "-3", "--step-tokens must be at least 1, got -3"),
])
def test_batch_numbers_are_named_by_their_flags(capsys, no_load, option, value, message):
    code, _, err = run_cli(capsys, "generate", "--prompt", "Hi", "--prompt", "Ho", option, value)
    assert code == 1 and one_error_line(err) and message in err, err
    assert not no_load


@pytest.mark.parametrize("value", ["lots", "0"])
def test_a_memory_budget_that_is_not_a_size_is_a_usage_error(capsys, no_load, value):
    with pytest.raises(SystemExit) as exit_:  # argparse, like --max-host-bytes: exit status 2
        run_cli(capsys, "generate", "--prompt", "Hi", "--prompt", "Ho", "--memory-budget", value)
    assert exit_.value.code == 2
    assert f"argument --memory-budget: '{value}' is not a size in bytes" in capsys.readouterr().err
    assert not no_load


def test_bad_outputs_and_compile_are_refused_before_the_model(capsys, no_load, files, tmp_path):
    a, b, jsonl = files
    j = jsonl("p.jsonl", {"prompt": "Hi"})
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    cases = [
        (["--output", tmp_path / "nowhere" / "o.jsonl"],
         f"--output {tmp_path / 'nowhere'} does not exist; create it first"),
        (["--output", blocker / "o.jsonl"], f"--output {blocker} is a file, not a folder"),
        (["--output", tmp_path], f"--output {tmp_path} is a folder, not a file"),
        (["--output", j], f"--output {j} is also an input"),
        (["--compile"], "--compile applies to a single prompt (here: a batch of 3)"),
    ]
    for extra, message in cases:
        code, out, err = run_cli(capsys, "generate", "--prompt-file", a, "--prompt-file", b,
                                 "--prompts-jsonl", j, *extra)
        assert code == 1 and one_error_line(err) and message in err and not out, (extra, err)
    assert not no_load
    assert not (tmp_path / "nowhere").exists()


def test_generate_help_tells_the_batch_form(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--prompt TEXT", "--prompt-file FILE", "--prompts-jsonl FILE", "--output FILE.jsonl",
                   "--memory-budget SIZE", "--max-sequences N", "--step-tokens N"):
        assert option in text, option
    assert "in the order given" in text and "'==> NAME <=='" in text
    from infllm_lite.engine import DEFAULT_STEP_TOKENS
    assert "one continuous-batching engine" in text and f"(default {DEFAULT_STEP_TOKENS})" in text


def test_a_later_answer_that_ends_first_waits_for_its_turn(capsys, tiny_folder, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("Hello " * 24, encoding="utf-8")  # read in many small steps below
    t_long = single_text(capsys, tiny_folder, "--prompt-file", long)
    t_short = single_text(capsys, tiny_folder, "--prompt", "Hi")
    code, out, err = run_cli(capsys, "generate", "--model", tiny_folder, "--prompt-file", long,
                             "--prompt", "Hi", "--step-tokens", "3", "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    assert out == f"==> {long} <==\n{t_long}\n\n==> prompt 1 <==\n{t_short}\n"
