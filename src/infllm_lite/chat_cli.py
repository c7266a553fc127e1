"""The terminal chat of ``infllm-lite chat``: answers streamed token by token, the whole
conversation kept in the attention memory, commands for snapshots and statistics."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from .chat import ChatSession
from .errors import InfLLMLiteError

HELP = """commands:
  /reset        forget the conversation (the system message stays)
  /save FILE    save the memory and the conversation to FILE
  /load FILE    continue a conversation saved with /save
  /stats        tokens in memory, memory blocks per tier (all layers), bytes held
  /help         this list
  /exit         leave (Ctrl-D too); Ctrl-C stops an answer and keeps the conversation"""


def run_chat(session: ChatSession, *, stdin=None, out=None) -> int:
    """Read lines, answer them, obey the commands, until /exit or end of input."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    interactive = stdin.isatty()
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731
    say("type a message, or /help for commands")
    while True:
        try:
            if interactive:
                line = input("you> ")
            else:
                out.write("you> ")
                out.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            say()
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line
            say()
            continue
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                session = _command(session, line, say)
                if session is None:
                    return 0
            else:
                _answer(session, line, out)
        except InfLLMLiteError as e:
            say(f"error: {e}")


def _answer(session: ChatSession, text: str, out) -> None:
    """Stream the answer; Ctrl-C ends it after the current token."""
    def interrupt(signum, frame):
        session.stop()

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        out.write("assistant> ")
        out.flush()
        for piece in session.send(text, stream=True):
            out.write(piece)
            out.flush()
        if session.stopped:
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
    finally:
        signal.signal(signal.SIGINT, previous)


def _command(session: ChatSession, line: str, say) -> ChatSession | None:
    """Run one /command; returns the session to go on with (None: exit)."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return None
    if name == "/help":
        say(HELP)
    elif name == "/reset":
        session.reset()
        say("conversation cleared")
    elif name == "/stats":
        stats = session.stats()
        say("  ".join(f"{k}: {_human(k, v)}" for k, v in stats.items()))
    elif name in ("/save", "/load"):
        if not arg:
            raise InfLLMLiteError(f"{name} needs a file name")
        if name == "/save":
            path = session.save(Path(arg))
            say(f"saved {session.state.length} tokens and {len(session.messages)} messages to {path}")
        else:
            session = ChatSession.load(Path(arg), session.model, session.tokenizer, kernel=session.kernel,
                                       max_new_tokens=session.max_new_tokens,
                                       **{k: v for k, v in session.sampling.items() if k != "generator"})
            say(f"loaded {session.state.length} tokens and {len(session.messages)} messages from {arg}")
    else:
        say(f"unknown command {name}; /help lists them")
    return session


def _human(key: str, value) -> str:
    if key == "bytes":
        return f"{value / 2**20:.1f} MiB"
    if key == "hit_rate":
        return f"{value:.1%}"
    return str(value)
