"""The package's server launcher, with the test environment (threads, PYTHONPATH) filled in."""

from __future__ import annotations

import os

from paddle_llm.serving.process import ServerProcess as _ServerProcess
from tests.conftest import ROOT, subprocess_env


class ServerProcess(_ServerProcess):
    def __init__(self, args: list[str], log_path: str, extra_pythonpath: str | None = None):
        paths = [ROOT] + ([extra_pythonpath] if extra_pythonpath else []) + [os.environ.get("PYTHONPATH", "")]
        super().__init__(args, log_path, env=subprocess_env(PYTHONPATH=os.pathsep.join(p for p in paths if p)), cwd=ROOT)
