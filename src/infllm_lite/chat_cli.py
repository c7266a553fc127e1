"""The terminal chat of ``infllm-lite chat``: answers streamed token by token, the whole
conversation kept in the attention memory, commands for snapshots and statistics."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from .chat import ChatSession
from .errors import InfLLMLiteError
from .parallel.model import rank_path

HELP = """commands:
  /reset        forget the conversation (the system message stays)
  /save FILE    save the memory and the conversation to FILE
  /load FILE    continue a conversation saved with /save
  /stats        tokens in memory, memory blocks per tier (all layers), bytes held
  /help         this list
  /exit         leave (Ctrl-D too); Ctrl-C stops an answer and keeps the conversation"""
# under torchrun (``chat --tensor-parallel``) Ctrl-C reaches every rank and ends the chat
HELP_TENSOR_PARALLEL = HELP.replace("Ctrl-C stops an answer and keeps the conversation", "Ctrl-C ends the chat")


class Alone:
    """A chat in one process: nobody to tell a line to or to agree with
    (:class:`infllm_lite.parallel.chat.ChatPeers` is the tensor-parallel one)."""

    interruptible = True  # Ctrl-C stops an answer

    def share_line(self, read):
        return read()

    def settle(self, error, *, length=None):
        return None if error is None else str(error)


def run_chat(session: ChatSession, *, stdin=None, out=None, peers=None) -> int:
    """Read lines, answer them, obey the commands, until /exit or end of input.
    ``peers``: the ranks of a tensor-parallel chat (default :class:`Alone`): rank 0 reads
    and every rank runs each step."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    peers = peers or Alone()
    interactive = stdin.isatty()
    say = lambda text="": print(text, file=out, flush=True)  # noqa: E731
    say("type a message, or /help for commands")
    while True:
        line = peers.share_line(lambda: _read_line(stdin, out, interactive, peers.interruptible))
        if line is None:
            say()
            return 0
        if not line:
            continue
        error, after, reply, answered = None, session, None, not line.startswith("/")
        try:
            if answered:
                _answer(session, line, out, peers.interruptible)
            else:
                after, reply = _command(session, line)
        except InfLLMLiteError as e:
            error = e
        message = peers.settle(error, length=session.state.length if answered else None)
        if message is not None:
            if after is not session and after is not None:  # loaded here, failed elsewhere: undone
                after.state.close()
            say(f"error: {message}")
            continue
        if reply:
            say(HELP_TENSOR_PARALLEL if reply is HELP and not peers.interruptible else reply)
        if after is None:
            return 0
        if after is not session:  # /load: the conversation it replaces lets go of its memory
            session.state.close()
            session = after


def _read_line(stdin, out, interactive: bool, interruptible: bool) -> str | None:
    """The user's next line, stripped ('' after a Ctrl-C at the prompt, which raises when
    not ``interruptible``); None at the end of input."""
    try:
        if interactive:
            line = input("you> ")
        else:
            out.write("you> ")
            out.flush()
            line = stdin.readline()
            if not line:
                return None
    except EOFError:
        return None
    except KeyboardInterrupt:  # at the prompt: a fresh line
        if not interruptible:
            raise
        print(file=out, flush=True)
        return ""
    return line.strip()


def _answer(session: ChatSession, text: str, out, interruptible: bool = True) -> None:
    """Stream the answer; Ctrl-C ends it after the current token (when ``interruptible``)."""
    def interrupt(signum, frame):
        session.stop()

    previous = signal.signal(signal.SIGINT, interrupt) if interruptible else None
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
        if interruptible:
            signal.signal(signal.SIGINT, previous)


def _command(session: ChatSession, line: str) -> tuple[ChatSession | None, str | None]:
    """Run one /command: (the session to go on with, None to exit; the text to show)."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return None, None
    if name == "/help":
        return session, HELP
    if name == "/reset":
        session.reset()
        return session, "conversation cleared"
    if name == "/stats":
        stats = session.stats()
        text = "  ".join(f"{k}: {_human(k, v)}" for k, v in stats.items())
        tp = getattr(session.model, "tp", None)
        if tp is not None:  # a rank holds its heads only
            text += f"  ranks: {tp.world_size} (bytes: rank {tp.rank}'s)"
        return session, text
    if name in ("/save", "/load"):
        if not arg:
            raise InfLLMLiteError(f"{name} needs a file name")
        if name == "/save":
            path = session.save(rank_path(Path(arg), session.model))
            return session, (f"saved {session.state.length} tokens and {len(session.messages)} messages "
                             f"to {snapshot_name(Path(arg), path, session.model)}")
        loaded = load_session(Path(arg), session)
        return loaded, f"loaded {loaded.state.length} tokens and {len(loaded.messages)} messages from {arg}"
    return session, f"unknown command {name}; /help lists them"


def load_session(path: Path, session: ChatSession, **options) -> ChatSession:
    """The conversation saved at ``path`` (a tensor-parallel rank: its own file,
    :func:`~infllm_lite.parallel.model.rank_path`), with ``session``'s model, kernel,
    answer length and sampling; its random generator goes on, so a seeded chat stays
    reproducible (and its ranks draw alike)."""
    options = dict(kernel=session.kernel, max_new_tokens=session.max_new_tokens,
                   **{k: v for k, v in session.sampling.items() if k != "generator"}, **options)
    loaded = ChatSession.load(rank_path(path, session.model), session.model, session.tokenizer, **options)
    loaded.sampling["generator"] = session.sampling["generator"]
    return loaded


def snapshot_name(given: Path, saved: Path, model) -> str:
    """How a message names a snapshot: the file, or for a tensor-parallel model the
    pattern of the ranks' files."""
    tp = getattr(model, "tp", None)
    if tp is None:
        return str(saved)
    return f"{given.with_name(f'{given.stem}.rank*-of-{tp.world_size}{given.suffix}')} (one file per rank)"


def _human(key: str, value) -> str:
    if key == "bytes":
        return f"{value / 2**20:.1f} MiB"
    if key == "hit_rate":
        return f"{value:.1%}"
    return str(value)
