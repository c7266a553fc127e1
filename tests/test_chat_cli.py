"""``infllm-lite chat`` driven through a pseudo-terminal: it answers and streams, obeys every
command, survives Ctrl-C in the middle of an answer, and exits on /exit and on Ctrl-D."""

import os
import re
import sys

import pexpect
import pytest

PROMPT = "you> "


def _spawn(tiny_folder, *extra, max_new_tokens=3000):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TERM="dumb")
    args = ["-m", "infllm_lite", "chat", "--model", str(tiny_folder), "--n-init", "4", "--n-local", "64",
            "--block-size", "16", "--topk", "2", "--attention-kernel", "torch",
            "--max-new-tokens", str(max_new_tokens), *extra]
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=120,
                          dimensions=(50, 200))
    child.expect_exact(PROMPT)
    return child


def _command(child, line, expected):
    child.sendline(line)
    child.expect(expected)
    child.expect_exact(PROMPT)


def test_chat_session_in_a_terminal(tiny_folder, tmp_path):
    child = _spawn(tiny_folder)
    # streams: the first words show while the answer goes on; Ctrl-C ends it, the chat stays
    child.sendline("Tell me a very long story.")
    child.expect_exact("assistant> ")
    child.expect(r"\S{3}")  # the answer has started
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    _command(child, "/stats", r"tokens: (\d+)  messages: 2  attention: infllm")
    snap = tmp_path / "chat.snap"
    _command(child, f"/save {snap}", r"saved \d+ tokens and 2 messages to")
    assert snap.is_file()
    _command(child, "/reset", "conversation cleared")
    _command(child, "/stats", r"tokens: 0  messages: 0")
    _command(child, f"/load {snap}", r"loaded \d+ tokens and 2 messages")
    _command(child, "/help", r"/save FILE.*\n.*/load FILE")
    _command(child, "/nonsense", "unknown command /nonsense")
    _command(child, "/save", "error: /save needs a file name")
    _command(child, f"/load {tmp_path / 'missing.snap'}", "error: .*does not exist")
    child.sendline("And another one?")  # answers again after all that (and stops again)
    child.expect_exact("assistant> ")
    child.expect(r"\S{3}")
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    _command(child, "/stats", r"messages: 4")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_document_then_ctrl_d(tiny_folder, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse keeper of Brenn counted ships every night. " * 50)
    child = _spawn(tiny_folder, "--file", str(doc), max_new_tokens=8)
    assert re.search(r"read .*doc.txt \(\d+ tokens\)", child.before)
    _command(child, "/stats", r"blocks: [1-9]")
    child.sendline("Who counted ships?")
    child.expect_exact("assistant> ")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("argv, message", [
    (["--file", "/nonexistent/doc.txt"], "document /nonexistent/doc.txt does not exist"),
    (["--load", "/nonexistent/c.snap"], "does not exist"),
])
def test_bad_start(tiny_folder, argv, message):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = pexpect.run(f"{sys.executable} -m infllm_lite chat --model {tiny_folder} " + " ".join(argv),
                      env=env, encoding="utf-8", withexitstatus=True, timeout=120)
    text, status = out
    assert status == 1 and message in text
