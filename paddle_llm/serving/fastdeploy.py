"""``--engine fastdeploy``: FastDeploy 2.x's OpenAI server as a subprocess, with our REST and gRPC front ends before it.

FastDeploy 2.x (Baidu's LLM server, GPU-only, installed from Paddle's index as ``fastdeploy-gpu``) loads a checkpoint
directory, which ``paddle-llm export --format fastdeploy`` writes. We launch::

    python -m fastdeploy.entrypoints.openai.api_server --model DIR --port P [extra args]

wait for its ``/health``, then proxy ``/v1/*`` to it (keeping our API key, ``/metrics`` and gRPC). The real package is
recognised by its ``fastdeploy.entrypoints`` module: the PyPI package named ``fastdeploy`` is an unrelated project.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Iterator

import httpx

from paddle_llm.serving.engine import StreamEvent
from paddle_llm.serving.openai.protocol import RequestError

ENTRYPOINT_PACKAGE = "fastdeploy.entrypoints"
SERVER_MODULE = "fastdeploy.entrypoints.openai.api_server"
INSTALL_HINT = (
    "FastDeploy 2.x is not installed in this environment. It needs an NVIDIA GPU (SM80/90 or SM86/89, CUDA >= 12.3) "
    "and installs from Paddle's package index as `fastdeploy-gpu` (see the FastDeploy docs); the PyPI package named "
    "`fastdeploy` is a different project. On CPU, serve with --engine paddle (an export) or --engine dygraph."
)


class FastDeployUnavailableError(RuntimeError):
    """FastDeploy 2.x is not importable, or its server did not come up."""


def find_fastdeploy() -> str:
    """Locate FastDeploy 2.x's server entry point without importing it (its import needs a GPU).

    Returns:
        The path of the package providing ``fastdeploy.entrypoints``.

    Raises:
        FastDeployUnavailableError: no ``fastdeploy`` package, or one without ``entrypoints`` (the unrelated one).
    """
    try:
        spec = importlib.util.find_spec(ENTRYPOINT_PACKAGE)
    except (ModuleNotFoundError, ValueError):
        spec = None
    if spec is None:
        other = importlib.util.find_spec("fastdeploy")
        found = f" (found an unrelated `fastdeploy` at {other.origin})" if other is not None else ""
        raise FastDeployUnavailableError(INSTALL_HINT + found)
    return os.path.dirname(spec.origin or "")


class FastDeployServer:
    """One FastDeploy OpenAI server subprocess."""

    def __init__(self, model_dir: str, port: int, extra_args: list[str] | None = None, python: str = sys.executable,
                 log_path: str | None = None):
        """
        Args:
            model_dir: a ``--format fastdeploy`` export.
            port: where FastDeploy listens (we connect to 127.0.0.1).
            extra_args: passed through (e.g. ``--max-model-len 4096 --tensor-parallel-size 2``).
            python: interpreter that has FastDeploy.
            log_path: FastDeploy's stdout/stderr go here (default: ``<model_dir>/fastdeploy.log``).
        """
        self.model_dir = model_dir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.command = [python, "-m", SERVER_MODULE, "--model", model_dir, "--port", str(port), *(extra_args or [])]
        self.log_path = log_path or os.path.join(model_dir, "fastdeploy.log")
        self.process: subprocess.Popen | None = None

    def start(self, startup_timeout: float = 900.0) -> "FastDeployServer":
        """Launch the server and wait until ``/health`` answers 200.

        Raises:
            FastDeployUnavailableError: it exited or did not become healthy in time (the log tail is included).
        """
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FastDeployUnavailableError(
                    f"FastDeploy exited with code {self.process.returncode} while starting:\n{self._log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise FastDeployUnavailableError(
            f"FastDeploy did not answer {self.url}/health within {startup_timeout:.0f}s:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_seconds: float = 30.0) -> None:
        """SIGTERM, wait up to ``grace_seconds`` for in-flight requests, then SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class FastDeployBackend:
    """``stream(kind, body)`` over FastDeploy's HTTP API, so our gRPC service can front it."""

    def __init__(self, url: str):
        self.client = httpx.Client(base_url=url, timeout=httpx.Timeout(None, connect=10.0))
        models = self.client.get("/v1/models").json().get("data") or [{}]
        self.model_name = models[0].get("id")

    def stream(self, kind: str, body: dict) -> "HttpEventStream":
        """Raises: RequestError with FastDeploy's status and message when it refuses the request."""
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        payload = dict(body, stream=True, stream_options={"include_usage": True})
        payload.setdefault("model", self.model_name)
        response = self.client.send(self.client.build_request("POST", path, json=payload), stream=True)
        if response.status_code >= 400:
            detail = response.read().decode("utf-8", errors="replace")
            response.close()
            try:
                message = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = detail
            raise RequestError(f"FastDeploy: {message}", status=response.status_code if response.status_code < 500 else 502)
        return HttpEventStream(response, kind)


class HttpEventStream:
    """Server-sent chunks from an OpenAI-compatible server as ``StreamEvent``s (the last one carries usage)."""

    def __init__(self, response, kind: str):
        self.response = response
        self.kind = kind

    def cancel(self) -> None:
        self.response.close()

    def __iter__(self) -> Iterator[StreamEvent]:
        finish_reason, usage = None, {}
        try:
            for line in self.response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if self.kind == "chat" else choice.get("text")
                    finish_reason = choice.get("finish_reason") or finish_reason
                    if text:
                        yield StreamEvent(text, (), None, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        finally:
            self.response.close()
        yield StreamEvent("", (), finish_reason or "stop", usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
