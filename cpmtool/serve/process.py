"""Start a `cpmtool serve` child process and wait until it answers (for `bench speed --launch` and tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cpmtool.errors import CpmtoolError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS's choice)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log: Path  # the server's stderr

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextmanager
def launch_server(model: str, *, args: Sequence[str] = (), host: str = "127.0.0.1", port: int | None = None,
                  env: dict | None = None, startup_timeout: float = 900.0) -> Iterator[ServerProcess]:
    """Run `python -m cpmtool serve --model MODEL ARGS` until the block ends; yields once /health is 200.

    Raises:
        CpmtoolError: the server exited or did not answer within `startup_timeout` seconds (its log
            tail is in the message).
    """
    import httpx

    port = port or free_port(host)
    url = f"http://{host}:{port}"
    log_fd, log_name = tempfile.mkstemp(prefix="cpmtool-serve-", suffix=".log")
    cmd = [sys.executable, "-m", "cpmtool", "serve", "--model", model, "--host", host, "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_fd,
                            env={**os.environ, **(env or {})})
    os.close(log_fd)
    server = ServerProcess(url, proc, Path(log_name))
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise CpmtoolError(f"the server exited with status {proc.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise CpmtoolError(f"the server did not answer within {startup_timeout:.0f}s:\n{server.log_tail()}")
            time.sleep(0.25)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        Path(log_name).unlink(missing_ok=True)
