"""The command line's front door: the demo in its own module, outputs checked before any
work, one-line refusals of options that do not apply and of bad numbers (named by their
flags), help that shows every default, what ``--compile`` and ``--stats`` print."""

import argparse
import os
import re
import stat
import sys
from pathlib import Path

import pytest

from infllm_lite import cli
from infllm_lite.cli import main
from infllm_lite.stats import GenerationStats

ROOT = Path(__file__).parents[1]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> bool:
    return err.startswith("error: ") and err.count("\n") == 1


@pytest.fixture
def missing(tmp_path):
    """A --model that does not exist: a command that got past its checks fails on it."""
    return tmp_path / "no-model"


@pytest.fixture
def fake_generate(monkeypatch):
    """cmd_generate without a model: load_from_args and generate replaced, calls recorded."""
    calls = []

    def generate(model, tokenizer, prompt, **kwargs):
        calls.append(dict(prompt=prompt, **kwargs))
        text = iter(["Par", "is"]) if kwargs.get("stream") else "Paris"
        return (text, GenerationStats(prompt_tokens=3, new_tokens=2)) if kwargs.get("return_stats") else text

    monkeypatch.setattr(sys.modules["infllm_lite.generate"], "generate", generate)
    monkeypatch.setattr("infllm_lite.cli.load_from_args", lambda args: ("model", "tokenizer"))
    monkeypatch.setattr("infllm_lite.demo.load_from_args", lambda args: ("model", "tokenizer"))
    return calls


# ---------------------------------------------------------------- 1. the demo

def test_the_demo_lives_in_its_own_module():
    from infllm_lite import demo
    for name in ("_warm_up_infllm", "_demo_question", "_demo_run", "_demo_report",
                 "_full_attention_skip_reason", "_full_attention_estimate", "_minutes", "FULL_PROBE"):
        assert not hasattr(cli, name), name
    assert callable(demo.run_demo) and callable(demo.full_attention_skip_reason)
    for module in (cli, demo):  # text comes from generate's one token-to-text path
        assert "incremental_decoder" not in Path(module.__file__).read_text()


def test_demo_question_streams_through_generate(capsys, fake_generate):
    code, out, err = run_cli(capsys, "demo", "--question", "Capital of France?")
    assert code == 0, err
    assert "question: Capital of France?\nanswer: Paris\n" in out
    assert "[3 prompt tokens, 2 new tokens in" in out
    (call,) = fake_generate
    assert call["prompt"] == [{"role": "user", "content": "Capital of France?"}]
    assert call["max_new_tokens"] == 128 and call["stream"] and call["return_stats"]


def test_demo_help_names_the_kernel_the_cpu_runs(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "compiled FlexAttention" not in text
    assert "compiled window attention on the CPU" in text and "32768 tokens" in text


# ---------------------------------------------------------------- 2. outputs checked first

@pytest.fixture
def unwritable(tmp_path):
    """A folder no one can create, root included: its parent is a regular file."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    return blocker / "out"


def test_eval_out_that_cannot_be_written_fails_before_the_model(capsys, monkeypatch, unwritable):
    loads = []
    monkeypatch.setattr("infllm_lite.eval.command.load_from_args", lambda args: loads.append(args))
    code, _, err = run_cli(capsys, "eval", "--task", "passkey", "--lengths", "1k", "--samples", "1",
                           "--attention", "full", "--out", unwritable)
    assert code == 1 and one_error_line(err) and not loads
    assert f"--out {unwritable}: cannot write there (Not a directory)" in err
    code, _, err = run_cli(capsys, "eval", "--task", "passkey", "--out", unwritable.parent)
    assert code == 1 and "is a file, not a folder" in err and one_error_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_eval_out_in_a_read_only_folder(capsys, monkeypatch, tmp_path):
    loads = []
    monkeypatch.setattr("infllm_lite.eval.command.load_from_args", lambda args: loads.append(args))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        code, _, err = run_cli(capsys, "eval", "--task", "passkey", "--lengths", "1k",
                               "--out", locked / "out")
    finally:
        locked.chmod(0o700)
    assert code == 1 and "cannot write there" in err and not loads


def test_eval_out_is_created_when_missing(capsys, monkeypatch, tmp_path):
    runs = []
    monkeypatch.setattr("infllm_lite.eval.command.run_eval_command", runs.append)
    code, _, err = run_cli(capsys, "eval", "--task", "passkey", "--out", tmp_path / "a" / "b")
    assert code == 0, err
    assert (tmp_path / "a" / "b").is_dir() and runs[0].attention_kernel == "auto"


def test_convert_into_an_unwritable_folder_fails_before_dequantizing(capsys, monkeypatch, unwritable,
                                                                     gguf_path):
    reads = []
    monkeypatch.setattr("infllm_lite.weights.gguf.read_gguf", lambda *a, **k: reads.append(a))
    code, _, err = run_cli(capsys, "convert", gguf_path, unwritable)
    assert code == 1 and not reads and one_error_line(err)
    assert f"cannot write into {unwritable.parent}: it is a file, not a folder" in err
    code, _, err = run_cli(capsys, "convert", gguf_path, unwritable / "deeper")
    assert code == 1 and not reads and f"cannot write into {unwritable}: Not a directory" in err


# ---------------------------------------------------------------- 3. convert's permissions

def test_convert_gives_every_file_the_same_ordinary_permissions(monkeypatch, tmp_path):
    import torch

    from infllm_lite.weights import gguf
    ckpt = gguf.GGUFCheckpoint(config={"bos_token_id": 1, "eos_token_id": 2},
                               tensors={"model.norm.weight": torch.ones(4)},
                               tokenizer_json="{}", tokenizer_config={})
    monkeypatch.setattr(gguf, "read_gguf", lambda *a, **k: ckpt)
    old = os.umask(0o022)
    try:
        out = gguf.convert_gguf("any.gguf", tmp_path / "model", progress=False)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and "config.json" in modes
    assert set(modes.values()) == {0o644}, modes


# ---------------------------------------------------------------- 4. a folder is not a file

def test_a_folder_given_as_a_file_is_named_as_such(capsys, tmp_path, missing):
    code, _, err = run_cli(capsys, "generate", "--model", missing, "--prompt-file", tmp_path)
    assert code == 1 and one_error_line(err)
    assert f"prompt file {tmp_path} is a directory, not a file" in err
    code, _, err = run_cli(capsys, "chat", "--model", missing, "--file", tmp_path)
    assert code == 1 and f"document {tmp_path} is a directory, not a file" in err


# ---------------------------------------------------------------- 5. options that do not apply

MEMORY_FLAGS = [("--n-init", "4"), ("--n-local", "64"), ("--block-size", "16"), ("--topk", "2"),
                ("--max-cached-blocks", "8"), ("--cache-policy", "lru-s"),
                ("--max-host-bytes", "1GiB"), ("--offload-dir", "/tmp"),
                ("--attention-kernel", "torch")]
INFLLM_ONLY = [f for f in MEMORY_FLAGS if f[0] not in ("--n-init", "--n-local")]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("option, value", MEMORY_FLAGS)
def test_memory_options_are_refused_with_full_attention(capsys, missing, command, option, value):
    prompt = ["--prompt", "Hi"] if command == "generate" else []
    code, _, err = run_cli(capsys, command, "--model", missing, *prompt, "--attention", "full",
                           option, value)
    assert code == 1 and one_error_line(err), err
    assert f"{option} applies to --attention " in err and "only (here: full)" in err


@pytest.mark.parametrize("option, value", INFLLM_ONLY)
def test_infllm_only_options_are_refused_with_streaming(capsys, missing, option, value):
    code, _, err = run_cli(capsys, "generate", "--model", missing, "--prompt", "Hi",
                           "--attention", "streaming", option, value)
    assert code == 1 and one_error_line(err)
    assert f"{option} applies to --attention infllm only (here: streaming)" in err


def test_generate_refuses_a_kernel_with_its_default_full_attention(capsys, missing):
    code, _, err = run_cli(capsys, "generate", "--model", missing, "--prompt", "Hi",
                           "--attention-kernel", "window")
    assert code == 1 and "--attention-kernel applies to --attention infllm only (here: full)" in err


def test_compile_is_refused_outside_full_attention(capsys, missing):
    code, _, err = run_cli(capsys, "generate", "--model", missing, "--prompt", "Hi",
                           "--attention", "infllm", "--compile")
    assert code == 1 and "--compile applies to --attention full only (here: infllm)" in err


def test_options_that_apply_pass_the_check(capsys, missing):
    code, _, err = run_cli(capsys, "generate", "--model", missing, "--prompt", "Hi",
                           "--attention", "streaming", "--n-local", "64", "--n-init", "4")
    assert code == 1 and "does not exist" in err  # got as far as loading the model


@pytest.mark.parametrize("modes, refused", [
    ("full,streaming", True), ("full", True), ("full,infllm", False), ("infllm", False)])
def test_eval_refuses_an_option_only_if_no_mode_uses_it(capsys, monkeypatch, tmp_path, modes, refused):
    runs = []
    monkeypatch.setattr("infllm_lite.eval.command.run_eval_command", runs.append)
    code, _, err = run_cli(capsys, "eval", "--task", "passkey", "--out", tmp_path,
                           "--attention", modes, "--topk", "2")
    if refused:
        assert code == 1 and f"--topk applies to --attention infllm only (here: {modes})" in err
        assert not runs
    else:
        assert code == 0 and len(runs) == 1, err


@pytest.mark.parametrize("option, value", [("--n-local", "64"), ("--attention", "full"),
                                           ("--system", "Be brief.")])
def test_chat_load_refuses_what_the_snapshot_decides(capsys, missing, tmp_path, option, value):
    code, _, err = run_cli(capsys, "chat", "--model", missing, "--load", tmp_path / "c.snap", option, value)
    assert code == 1 and one_error_line(err)
    assert f"{option} does not apply with --load: the snapshot holds" in err


def test_offload_dir_is_checked_before_the_model(capsys, missing, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--model", missing, "--prompt", "Hi", "--attention",
                           "infllm", "--offload-dir", tmp_path / "nowhere")
    assert code == 1 and f"--offload-dir {tmp_path / 'nowhere'} does not exist; create it first" in err


# ---------------------------------------------------------------- 6. help and defaults

def _subparsers(parser):
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_option_shows_its_default_or_is_a_flag():
    for name, sub in _subparsers(cli.build_parser()).items():
        required_groups = [g for g in sub._mutually_exclusive_groups if g.required]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {action.option_strings or action.dest}"
            assert action.help, f"{where} has no help"
            needed = (not action.option_strings or action.required
                      or any(action in g._group_actions for g in required_groups))
            if action.nargs == 0 or needed:  # a flag, a positional, a required option
                continue
            assert "default" in action.help, f"{where}: {action.help!r} shows no default"


def test_generate_attention_has_choices_and_the_defaults_say_why_they_differ(capsys):
    parsers = _subparsers(cli.build_parser())
    actions = {name: {a.dest: a for a in p._actions} for name, p in parsers.items()}
    from infllm_lite.options import ATTENTION_MODES
    assert actions["generate"]["attention"].choices == ATTENTION_MODES
    assert "chat defaults to infllm" in actions["generate"]["attention"].help
    assert "chat's default is 512" in actions["generate"]["max_new_tokens"].help
    assert "default infllm: a conversation grows without bound" in actions["chat"]["attention"].help


def test_memory_defaults_in_help_are_the_embedded_model_s(smollm_dir):
    import json

    from infllm_lite.config import ModelArgs
    from infllm_lite.memory_config import MemoryConfig
    native = json.loads((smollm_dir / "config.json").read_text())["max_position_embeddings"]
    assert cli.EMBEDDED_NATIVE_WINDOW == native
    m = MemoryConfig.for_model(ModelArgs(max_position_embeddings=native))
    helps = {a.dest: a.help for a in _subparsers(cli.build_parser())["generate"]._actions}
    for dest in ("n_init", "n_local", "topk", "max_cached_blocks"):
        assert f"SmolLM2: {getattr(m, dest)})" in helps[dest], dest
    assert f"default {m.block_size}" in helps["block_size"]
    assert f"default {m.cache_policy}" in helps["cache_policy"]


def test_no_stream_prints_the_same_text_at_the_end(capsys, tiny_folder):
    base = ["generate", "--model", tiny_folder, "--prompt", "Hello", "--max-new-tokens", "6"]
    code, streamed, err = run_cli(capsys, *base)
    assert code == 0, err
    code, whole, err = run_cli(capsys, *base, "--no-stream")
    assert code == 0, err
    assert whole == streamed and len(whole) > 1


def test_stream_option_reaches_generate(capsys, fake_generate):
    code, out, _ = run_cli(capsys, "generate", "--prompt", "Hi", "--no-stream")
    assert code == 0 and out == "Paris\n" and fake_generate[-1]["stream"] is False
    code, out, _ = run_cli(capsys, "generate", "--prompt", "Hi")
    assert code == 0 and out == "Paris\n" and fake_generate[-1]["stream"] is True


# ---------------------------------------------------------------- 7. numbers, named by flag

@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "Hi", "--temperature", "-1"], "--temperature must be >= 0 (0 = greedy), got -1.0"),
    (["generate", "--prompt", "Hi", "--temperature", "nan"], "--temperature must be >= 0"),
    (["generate", "--prompt", "Hi", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["generate", "--prompt", "Hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["generate", "--prompt", "Hi", "--top-k", "-2"], "--top-k must be >= 0 (0 = off), got -2"),
    (["generate", "--prompt", "Hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["generate", "--prompt", "Hi", "--chunk-size", "0"], "--chunk-size must be at least 1, got 0"),
    (["generate", "--prompt", "Hi", "--attention", "infllm", "--block-size", "0"],
     "--block-size must be at least 1, got 0"),
    (["chat", "--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    (["chat", "--max-new-tokens", "-5"], "--max-new-tokens must be at least 1, got -5"),
    (["demo", "--length", "0"], "--length must be at least 1, got 0"),
    (["demo", "--depth", "1.5"], "--depth must be in [0, 1], got 1.5"),
    (["eval", "--task", "passkey", "--samples", "-1"], "--samples must be >= 0"),
    (["eval", "--task", "passkey", "--chunk-size", "-1"], "--chunk-size must be at least 1"),
    (["eval", "--task", "passkey", "--n-local", "0"], "--n-local must be at least 1, got 0"),
])
def test_bad_numbers_are_named_by_their_flags(capsys, missing, argv, message):
    code, _, err = run_cli(capsys, *argv, "--model", missing)
    assert code == 1 and one_error_line(err), err
    assert message in err


# ---------------------------------------------------------------- 8. --compile says so

def test_compile_prints_a_note_first(capsys, fake_generate):
    code, out, err = run_cli(capsys, "generate", "--prompt", "Hi", "--compile")
    assert code == 0 and out == "Paris\n"
    assert "compiling the decode step with torch.compile" in err and "cached on disk" in err
    assert fake_generate[-1]["compile"] is True
    code, _, err = run_cli(capsys, "generate", "--prompt", "Hi")
    assert code == 0 and "compiling" not in err


# ---------------------------------------------------------------- 9. --stats without blocks

def test_stats_without_any_block_used_say_so():
    from infllm_lite.memory import PoolStats
    idle = GenerationStats(prompt_tokens=5, new_tokens=2, memory=PoolStats()).summary()
    assert "no blocks used" in idle and "hit rate" not in idle
    busy = GenerationStats(memory=PoolStats(hits=3, misses=1, blocks=4)).summary()
    assert "hit rate 75.0% (3 hits, 1 misses)" in busy and "no blocks used" not in busy


# ---------------------------------------------------------------- 11. eval's dependencies

def test_rouge_is_an_eval_extra_and_make_install_includes_it():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("rouge")]
    assert sorted(re.split(r"[<>=]", d)[0] for d in project["optional-dependencies"]["eval"]) == [
        "rouge", "rouge-score"]
    assert '-e ".[dev,reference,eval,serve]"' in (ROOT / "Makefile").read_text()


def test_scaling_bench_uses_the_one_length_parser():
    text = (ROOT / "bench" / "scaling.py").read_text()
    assert "def parse_lengths" not in text and "from infllm_lite.options import parse_lengths" in text
    assert "def parse_lengths" not in (ROOT / "src" / "infllm_lite" / "cli.py").read_text()
