"""``infllm-lite serve`` as a child process on a free localhost port, for tests, benchmarks
and notebooks: started, waited for (``/health``), always stopped (``SIGTERM``: conversations
are saved; then ``SIGKILL`` if it does not end in time). Needs no serve extra itself.

    with ServerProcess(["--attention", "full"]) as server:
        print(server.url)            # http://127.0.0.1:PORT/v1 for an OpenAI client
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..errors import InfLLMLiteError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str] = (), *, port: int | None = None, startup_timeout: float = 180.0,
                 log: Path | None = None, env: dict | None = None):
        self.args, self.port = list(args), port or free_port()
        self.startup_timeout, self.log, self.env = startup_timeout, log, env
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base + "/v1"

    def start(self) -> "ServerProcess":
        command = [sys.executable, "-m", "infllm_lite", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "warning", *self.args]
        self._log_file = open(self.log, "ab") if self.log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                raise InfLLMLiteError(f"the server exited with status {self.proc.returncode} before serving"
                                      + (f" (see {self.log})" if self.log else ""))
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise InfLLMLiteError(f"the server did not answer /health within {self.startup_timeout:.0f} s")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a graceful shutdown saves the conversations), SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_log()
        code, self.proc = self.proc.returncode, None
        return code

    def restart(self) -> "ServerProcess":
        self.stop()
        return self.start()

    def _close_log(self) -> None:
        if self._log_file not in (None, subprocess.DEVNULL):
            self._log_file.close()
        self._log_file = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
