"""Run ``paddle-llm serve`` as a child process on 127.0.0.1 and wait until it answers ``/health``.

Used by the demo, the notebook and the integration tests: each needs a real server it starts and stops itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_port_free(host: str, port: int, flag: str) -> None:
    """Fail before anything starts when ``host:port`` is taken: uvicorn would only log the bind error after the
    model loaded, and grpcio raises its own message (and C-core log lines) instead of naming our flag.

    Raises:
        RuntimeError: naming ``flag``.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT leftover is free
        try:
            sock.bind((host, port))
        except OSError as err:
            raise RuntimeError(f"{flag} {port}: {host}:{port} is not free ({err.strerror}); pick another {flag}") from None


class ServerProcess:
    """``python -m paddle_llm serve ... --port P --grpc_port G`` with its output in a log file.

    Args:
        args: serve flags after the ports (``--model DIR`` ...).
        log_path: where the server's stdout and stderr go.
        env: the child's environment (default: this process's).
        cwd: the child's working directory.
    """

    def __init__(self, args: list[str], log_path: str, env: dict | None = None, cwd: str | None = None):
        self.port = free_port()
        self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [sys.executable, "-m", "paddle_llm", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                        "--grpc_port", str(self.grpc_port), *args]
        self.env = dict(os.environ) if env is None else env
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        """Start and wait for ``/health``.

        Raises:
            RuntimeError: the server exited or stayed unhealthy; the message holds the end of its log.
        """
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown) without waiting."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it hangs. Returns the exit code."""
        if self.process is None:
            return None
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self._log is not None:
            self._log.close()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
