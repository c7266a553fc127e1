"""torchrun's ranks, for tests that launch it: torchrun starts each rank in a session of
its own, so killing torchrun (or its process group) leaves the ranks running."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun's ranks)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_with_ranks(proc: subprocess.Popen, ranks=(), marker: bytes = b"--tensor-parallel") -> None:
    """SIGKILL torchrun ``proc``, its group, the ranks it has now and the ranks seen
    earlier (``ranks``: only those whose command line still holds ``marker``, not a
    reused pid), then reap it."""
    seen = [pid for pid in ranks if marker in _cmdline(pid)]
    for pid in {*seen, *children(proc.pid)}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
