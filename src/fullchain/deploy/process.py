"""A model server in a child process on a free 127.0.0.1 port: started, waited for, drained with SIGTERM.

Used by `ds run`'s serve-and-load stage, `ds bench serve` and the tests, so each talks to a real server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from fullchain.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess([...ds serve args...]) as server:` -> `server.url`; exits through SIGTERM."""

    def __init__(self, args: list[str], port: int | None = None, ready_path: str = "/readyz",
                 timeout_s: float = 60.0, log: Path | None = None, module: str = "fullchain.cli"):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", module, *args, "--port", str(self.port)]
        self.ready_path, self.timeout_s, self.log = ready_path, timeout_s, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        return self.launch().wait_ready()

    def launch(self) -> ServerProcess:
        """Start the process without waiting (several servers can then load their models side by side)."""
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self) -> ServerProcess:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"server exited with {self.proc.returncode} before it was ready: "
                                f"{' '.join(self.command)}" + (f" (log: {self.log})" if self.log else ""))
            try:
                if httpx.get(self.url + self.ready_path, timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise UserError(f"server not ready within {self.timeout_s:.0f}s: {' '.join(self.command)}")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait for the drain, return the exit code (kill after `timeout_s`)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
