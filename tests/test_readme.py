"""README.md's ```python blocks (and chat.py's docstring example) run as written: each in a
fresh namespace and a temporary directory of its own, all in one child process (one torch
import, one InfLLM compilation) under a time limit. Where a block reads a long input, the
value after ``README_TEST:`` on its line replaces the one a user would run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import infllm_lite.chat

README = Path(__file__).resolve().parents[1] / "README.md"
TIME_LIMIT_S = 900  # a bound against a hang; measured 8.7 min with the 2 cores shared by other test runs

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# `name = value   # comment; README_TEST: test_value`: the test runs `name = test_value`
_MARKED = re.compile(r"^(\s*\w+\s*=\s*)[^#\n]*?(\s*#[^\n]*README_TEST:\s*([0-9_.]+)[^\n]*)$", re.M)


def _readme_blocks() -> list[str]:
    return _BLOCK.findall(README.read_text(encoding="utf-8"))


def _chat_docstring_example() -> str:
    """The indented example in chat.py's module docstring."""
    doc = infllm_lite.chat.__doc__
    lines = doc[doc.index("\n\n") + 2:].splitlines()
    return textwrap.dedent("\n".join(line for line in lines if line.startswith("    ") or not line.strip()))


def for_test(code: str) -> str:
    """``code`` with each marked constant set to its README_TEST value."""
    return _MARKED.sub(lambda m: m[1] + m[3] + m[2], code)


BLOCKS = {f"README block {i + 1}": code for i, code in enumerate(_readme_blocks())}
BLOCKS["chat.py docstring"] = _chat_docstring_example()

_RUNNER = r"""
import contextlib, io, json, os, sys, time, traceback
blocks, root = json.load(open(sys.argv[1])), sys.argv[2]
results = {}
for name, code in blocks.items():
    cwd = os.path.join(root, name.replace(" ", "_").replace(".", "_"))
    os.makedirs(cwd)
    os.chdir(cwd)
    out, error, start = io.StringIO(), None, time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        error = traceback.format_exc()
    results[name] = dict(stdout=out.getvalue(), error=error, files=sorted(os.listdir(cwd)),
                         seconds=time.perf_counter() - start)
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """name -> stdout, error (a traceback or None), files left in its directory, seconds."""
    root = tmp_path_factory.mktemp("readme_blocks")
    (root / "blocks.json").write_text(json.dumps({name: for_test(code) for name, code in BLOCKS.items()}))
    try:
        proc = subprocess.run([sys.executable, "-c", _RUNNER, str(root / "blocks.json"), str(root)],
                              capture_output=True, text=True, timeout=TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        done = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
        pytest.fail(f"the blocks took over {TIME_LIMIT_S} s; finished: {sorted(done)}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "results.json").read_text())


def test_the_marked_constants_are_substituted():
    assert len(BLOCKS) == 6  # five in README.md, one in chat.py
    code = "n = 32_768          # 4x the window; README_TEST: 2048\nprint(n)\n"
    assert for_test(code) == "n = 2048          # 4x the window; README_TEST: 2048\nprint(n)\n"
    for code in BLOCKS.values():  # every marker sits on a `name = value` line, so none is ignored
        assert code.count("README_TEST:") == len(_MARKED.findall(code))


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_runs_as_written(runs, name):
    result = runs[name]
    assert result["error"] is None, result["error"]


def test_python_api_block_answers(runs):
    out = runs["README block 1"]["stdout"]
    assert "Paris" in out  # as the README shows
    key_line = next(line for line in out.splitlines() if re.search(r"\d{5}$", line))
    assert key_line.count(key_line[-5:]) >= 2, key_line  # InfLLM's answer contains the key


def test_memory_tiers_block_sends_blocks_to_disk(runs):
    out = runs["README block 2"]["stdout"]
    disk = re.search(r"blocks \((\d+) host, (\d+) disk", out)
    assert disk and int(disk[2]) > 0, out
    assert runs["README block 2"]["files"] == []  # the offload file went with its temporary directory


def test_chat_blocks_save_a_snapshot(runs):
    for name in ("README block 5", "chat.py docstring"):
        assert runs[name]["files"] == ["report.snap", "report.txt"], runs[name]["files"]
        assert runs[name]["stdout"].strip()
