"""The command line: it works, and bad input gets one clear line and a non-zero exit."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from infllm_lite.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_the_library_s_text(capsys, tiny_folder):
    from infllm_lite import generate, load_model
    model, tokenizer = load_model(str(tiny_folder), progress=False)
    expected = generate(model, tokenizer, "Hello", max_new_tokens=5)
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "Hello",
                             "--max-new-tokens", "5")
    assert code == 0 and not err.strip()
    assert expected.strip() and out == expected + "\n"  # the same greedy text, then a newline


def test_generate_chat_answers_on_the_embedded_model(capsys, smollm_dir):
    code, out, _ = run_cli(capsys, "generate", "--chat", "--prompt",
                           "What is the capital of France?", "--max-new-tokens", "20")
    assert code == 0 and "Paris" in out


def _copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def _no_config(folder, tmp_path):
    dst = _copy(folder, tmp_path)
    (dst / "config.json").unlink()
    return dst


def _gpt2(folder, tmp_path):
    dst = _copy(folder, tmp_path)
    config = json.loads((dst / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _truncated_weights(folder, tmp_path):
    dst = _copy(folder, tmp_path)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    return dst


def _wrong_shape(folder, tmp_path):
    dst = _copy(folder, tmp_path)
    config = json.loads((dst / "config.json").read_text())
    config["intermediate_size"] = 128
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _truncated_gguf(folder, tmp_path):
    from infllm_lite.weights.embedded import embedded_gguf_path
    dst = tmp_path / "broken.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        dst.write_bytes(f.read(5_000_000))
    return dst


@pytest.mark.parametrize("make_model, message", [
    (lambda folder, tmp: tmp / "missing", "does not exist"),
    (_no_config, "has no config.json"),
    (_gpt2, "unsupported architecture"),
    (_truncated_weights, "model.safetensors"),
    (_wrong_shape, "tensor 'layers.0.mlp.gate_proj.weight' has shape (96, 64)"),
    (_truncated_gguf, "broken.gguf"),
])
def test_bad_models_give_one_clear_line(capsys, tiny_folder, tmp_path, make_model, message):
    src = make_model(tiny_folder, tmp_path)
    code, _, err = run_cli(capsys, "generate", "--model", str(src), "--prompt", "Hi")
    assert code == 1
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_prompts_give_one_clear_line(capsys, tiny_folder, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café crème".encode("latin-1"))
    cases = [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "Hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--prompt-file", str(latin1)], "is not UTF-8 text"),
        (["--prompt-file", str(tmp_path / "nope.txt")], "does not exist"),
        (["--prompt", "Hi", "--temperature", "-1"], "--temperature must be >= 0"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, "generate", "--model", str(tiny_folder), *argv)
        assert code == 1, argv
        assert err.startswith("error: ") and message in err, (argv, err)
    with pytest.raises(SystemExit) as exit_:  # argparse: a usage error naming the choices
        run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "Hi", "--attention", "sparse")
    assert exit_.value.code == 2
    assert "invalid choice: 'sparse' (choose from 'full', 'streaming', 'lm-infinite', 'infllm')" in capsys.readouterr().err


def test_convert_rejects_a_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "x.gguf"), str(tmp_path / "out"))
    assert code == 1 and "does not exist" in err


def test_the_installed_command_exits_non_zero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "infllm_lite", "generate", "--model",
                           str(tmp_path / "missing"), "--prompt", "Hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:")


def test_help_explains_each_command():
    proc = subprocess.run([sys.executable, "-m", "infllm_lite", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for command, summary in (("generate", "continue a prompt"), ("convert", "convert a GGUF file"),
                             ("demo", "long-context demo: find a pass key"), ("chat", "chat in the terminal"),
                             ("eval", "evaluate on InfiniteBench / LongBench")):
        assert re.search(rf"^\s+{command}\s+{re.escape(summary)}", proc.stdout, re.M), command


def _help(capsys, command) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_chat_help_lists_the_commands_and_the_options(capsys):
    text = _help(capsys, "chat")
    assert "Inside: /reset, /save FILE, /load FILE, /stats, /help, /exit; Ctrl-C stops an answer." in text
    for option in ("--attention {full,streaming,lm-infinite,infllm}", "--file DOC", "--load FILE", "--system TEXT",
                   "--max-new-tokens N", "--n-local N", "--attention-kernel"):
        assert option in text, option
    assert "default infllm" in text and "default 512" in text


def test_eval_help_says_what_it_writes_and_how_to_resume(capsys):
    text = _help(capsys, "eval")
    assert "--task T[,T...]" in text and "--report-only" in text and "--max-len [MODE=]N|none" in text
    assert "OUT/predictions.jsonl" in text and "run the same command again to resume" in text
    assert "summary.json, summary.md and PNG plots" in text
    assert "(default infllm,streaming,full)" in text and "(default eval_out)" in text


def test_generate_with_infllm_memory_options(capsys, tiny_folder):
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "Hello " * 50,
                             "--attention", "infllm", "--n-local", "16", "--n-init", "4",
                             "--block-size", "4", "--topk", "2", "--max-new-tokens", "4",
                             "--attention-kernel", "flex-eager")  # the product code, without a compile
    assert code == 0 and out.strip(), err
    code, out_window, err = run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "Hello " * 50,
                                    "--attention", "infllm", "--n-local", "16", "--n-init", "4",
                                    "--block-size", "4", "--topk", "2", "--max-new-tokens", "4",
                                    "--attention-kernel", "window-eager")
    assert code == 0 and out_window == out, err  # the same greedy tokens through the other kernel


def test_repr_topk_reaches_the_memory_config_and_is_checked(capsys, tiny_folder):
    from types import SimpleNamespace

    from infllm_lite.cli import build_parser
    from infllm_lite.cli_support import memory_config_from_args
    from infllm_lite.config import ModelArgs
    args = build_parser().parse_args(["eval", "--task", "passkey", "--lengths", "1k", "--repr-topk", "8",
                                      "--topk", "8"])
    config = memory_config_from_args(args, SimpleNamespace(args=ModelArgs(max_position_embeddings=8192)))
    assert (config.repr_topk, config.topk, config.n_local) == (8, 8, 512)  # the rest stays for_model's
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "Hello " * 50,
                           "--attention", "infllm", "--n-local", "16", "--n-init", "4", "--block-size", "4",
                           "--repr-topk", "5", "--max-new-tokens", "2")
    assert code != 0 and "repr_topk" in err, err  # more representatives than a block holds: refused
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "Hi",
                           "--attention", "streaming", "--repr-topk", "2")
    assert code != 0 and "--repr-topk applies to --attention infllm only" in err, err
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "Hi",
                           "--attention", "infllm", "--repr-topk", "0")
    assert code != 0 and "--repr-topk must be at least 1, got 0" in err, err


def test_the_kernel_choices_are_the_library_s():
    from infllm_lite.cli import build_parser
    from infllm_lite.options import ATTENTION_KERNELS  # the one list the library checks against
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("generate", "chat", "eval"):
        kernel = next(a for a in sub[command]._actions if a.dest == "attention_kernel")
        assert kernel.choices is ATTENTION_KERNELS
    assert not hasattr(__import__("infllm_lite.cli", fromlist=["x"]), "_UNITS")  # no copy of parse_bytes


def test_generate_with_memory_tier_options_prints_stats(capsys, tiny_folder, tmp_path):
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "Hello " * 60,
                             "--attention", "infllm", "--n-local", "16", "--n-init", "4",
                             "--block-size", "4", "--topk", "2", "--max-cached-blocks", "3",
                             "--cache-policy", "lru-s", "--max-host-bytes", "1KiB",
                             "--offload-dir", str(tmp_path), "--max-new-tokens", "4", "--stats",
                             "--attention-kernel", "flex-eager")
    assert code == 0 and out.strip(), err
    assert "hit rate" in err and "disk" in err, err
    assert list(tmp_path.iterdir()) == []  # the offload file is removed when generation ends
    with pytest.raises(SystemExit):  # argparse: usage error, exit status 2
        run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "Hi", "--attention", "infllm",
                "--max-host-bytes", "lots")
    assert "not a size in bytes" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "Hello " * 60,
                           "--attention", "infllm", "--offload-dir", str(tmp_path / "missing"),
                           "--max-host-bytes", "1KiB", "--n-local", "16", "--block-size", "4",
                           "--topk", "2", "--n-init", "4")
    assert code == 1 and "--offload-dir" in err and "does not exist; create it first" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_folder), "--prompt", "Hi",
                           "--attention", "infllm", "--block-size", "0")
    assert code == 1 and "--block-size must be at least 1" in err
