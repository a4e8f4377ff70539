"""Every command shown in README.md runs here, in README order, with tiny models on a CPU.

Commands are extracted from the README itself: the lines of ```bash blocks (``\\`` continuations joined, comments
dropped), ```python blocks (each run as a script), the ``$ `` lines of ```text blocks (whose documented output
must appear in the real output), and indented command lines. They run one after another in a scratch directory
laid out like a checkout (the entry scripts, the shipped assets, the pins and the venv are linked in), because
later commands read what earlier ones wrote (``data/demo``, ``out/tiny``, ``out/export`` ...). Nothing is written
into the repository.

A command that cannot run here is either rewritten (``REWRITES``) or exempted (``EXEMPT``), each with its reason;
every other command runs as written (only the fixed ports 8000/50051 become free ones), so a command the README
gains is tested without touching this file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest

from paddle_llm.serving.process import free_port
from tests.conftest import ROOT, subprocess_env

README = os.path.join(ROOT, "README.md")
COMMAND_TIMEOUT = 300


@dataclass(frozen=True)
class Command:
    kind: str  # "bash", "python", "text" ($ lines) or "indented"
    text: str  # as shown: continuations joined, a trailing comment dropped
    line: int
    documented_output: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rewrite:
    match: str  # a substring of exactly one README command
    replacements: tuple[tuple[str, str], ...]
    reason: str


EXEMPT = {
    "make demo": "test_demo.py runs `paddle-llm demo` (the Makefile's demo target) and checks its targets; its two "
                 "outputs later commands read are stood in for (see DEMO_STAND_INS)",
    "make test": "the suite this test belongs to",
    "python3 -m venv .venv && source .venv/bin/activate": "would recreate the venv this test is running in",
    "pip install paddlepaddle-gpu==3.3.1 -i https://www.paddlepaddle.org.cn/packages/stable/cu118/":
        "a CUDA wheel from Paddle's own index: no GPU and no access to that index here",
    "pip install -c /tmp/constraints-gpu.txt -r requirements.txt -r requirements-dev.txt && pip install --no-deps -e .":
        "installs into the running venv (the CPU equivalent is what `make` does before the suite starts)",
}

REWRITES = (
    Rewrite("grep -v '^paddlepaddle==' constraints.txt", (("/tmp/constraints-gpu.txt", "constraints-gpu.txt"),),
            "keeps the test's files inside its scratch directory"),
    Rewrite("paddle-llm serve --model out/export", ((" [--api_key KEY]", ""),),
            "the optional key is left out, so the README's client (api_key=\"unused\") is let in"),
    Rewrite("paddle-llm check --gpus 0,1,2,3,4,5,6,7", (("--device gpu", "--device cpu"),),
            "this Paddle build has no CUDA; check still validates the 8-rank layout (it starts no processes)"),
    Rewrite("selftest.py --model_name_or_path ./llama-2-7b", (("--gpus 0,1", "--nproc_per_node 2"), ("--device gpu", "--device cpu")),
            "no GPU here: the same selftest on 2 CPU processes (--bf16 and --use_flash_attention fall back with a warning each)"),
)

# The README's fixed ports may be taken on a shared machine: each `paddle-llm serve` gets free ports instead, and
# the README's client snippets are pointed at them (the REST one at every REST server the README starts).
README_REST_PORT = "8000"
README_GRPC_PORT = "50051"

# `make demo` is exempt, but the fine-tuning and serving sections use what it leaves in demo_output/: the tour's
# pretrained checkpoint and the fine-tuning section's adapter are the same kinds of directories.
DEMO_STAND_INS = {"demo_output/pretrain": "out/tiny", "demo_output/finetune/lora": "out/lora"}

# The README's `./llama-2-7b` is a local model directory; estimating and checking read only its config.json.
LLAMA_2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
}

# Linked into the scratch directory so the README's relative paths resolve as they do in a checkout.
CHECKOUT_FILES = ("run_pretrain.py", "finetune_generation.py", "run_dpo.py", "selftest.py", "constraints.txt", "requirements.txt",
                  "requirements-dev.txt")

FENCE = re.compile(r"^```(\S*)\s*$")
FENCE_KINDS = ("bash", "python", "text", "")  # a bare fence shows output or a tree, not commands
TRAILING_COMMENT = re.compile(r"\s+#\s.*$")


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    joined, pending, first = [], [], 0
    for number, line in lines:
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending.append(line.rstrip()[:-1].strip())
            continue
        joined.append((first, " ".join(pending + [line.strip()])))
        pending = []
    assert not pending, f"README line {first}: a `\\` continuation runs off the end of its block"
    return joined


def _block_commands(kind: str, start: int, lines: list[str]) -> list[Command]:
    numbered = list(enumerate(lines, start))
    if kind == "python":
        return [Command("python", "\n".join(lines), start)]
    if kind == "bash":
        code = [(n, line) for n, line in numbered if line.strip() and not line.lstrip().startswith("#")]
        return [Command("bash", TRAILING_COMMENT.sub("", text), n) for n, text in _join_continuations(code)]
    if kind == "text":
        commands, index = [], 0
        while index < len(numbered):
            number, line = numbered[index]
            if not line.startswith("$ "):
                index += 1
                continue
            shown = [(number, line[2:])]
            while shown[-1][1].rstrip().endswith("\\"):
                index += 1
                shown.append(numbered[index])
            index += 1
            output = []
            while index < len(numbered) and not numbered[index][1].startswith("$ "):
                if numbered[index][1].strip():
                    output.append(numbered[index][1].rstrip())
                index += 1
            commands.append(Command("text", _join_continuations(shown)[0][1], number, tuple(output)))
        return commands
    return []


def extract_commands(markdown: str) -> list[Command]:
    """Every command ``markdown`` shows, in order (see the module docstring for what counts)."""
    commands, kind, start, block = [], None, 0, []
    lines = markdown.splitlines()
    for number, line in enumerate(lines, 1):
        if kind is None:
            fence = FENCE.match(line)
            if fence:
                kind, start, block = fence.group(1), number + 1, []
                assert kind in FENCE_KINDS, f"README line {number}: ```{kind} blocks are not extracted; use one of {FENCE_KINDS}"
            elif line.startswith("    ") and line.strip() and (number == 1 or not lines[number - 2].strip()):
                commands.append(Command("indented", line.strip(), number))
        elif line.startswith("```"):
            commands += _block_commands(kind, start, block)
            kind = None
        else:
            block.append(line)
    assert kind is None, "README ends inside a fenced block"
    return commands


def test_extraction_rules():
    markdown = "\n".join([
        "Intro", "", "```bash", "# a comment", "tool a \\", "    --flag 1   # why", "", "tool b", "```",
        "```python", "print(1)", "print(2)", "```",
        "```text", "$ tool c \\", "    --x", "out 1", "", "out 2 ...", "$ tool d", "```",
        "```", "not a command", "```", "", "    tool e --y", "text after",
        "1. a list item", "   continued, not code",
    ])
    assert extract_commands(markdown) == [
        Command("bash", "tool a --flag 1", 5), Command("bash", "tool b", 8),
        Command("python", "print(1)\nprint(2)", 11),
        Command("text", "tool c --x", 15, ("out 1", "out 2 ...")), Command("text", "tool d", 20),
        Command("indented", "tool e --y", 26),
    ]
    with pytest.raises(AssertionError, match="not extracted"):
        extract_commands("```sh\nls\n```")  # a command the test would not see must not pass silently


def _apply_rewrites(commands: list[Command]) -> dict[str, str]:
    """README command text -> the text run here; fails on a rewrite the README no longer needs."""
    rewritten = {}
    for rewrite in REWRITES:
        matching = [c.text for c in commands if rewrite.match in c.text]
        assert len(matching) == 1, f"rewrite {rewrite.match!r} ({rewrite.reason}) matches {len(matching)} commands"
        text = rewritten.get(matching[0], matching[0])
        for old, new in rewrite.replacements:
            assert old in text, f"rewrite {rewrite.match!r}: {old!r} is no longer in the README command"
            text = text.replace(old, new)
        rewritten[matching[0]] = text
    return rewritten


def _prepare_scratch(scratch) -> None:
    for name in CHECKOUT_FILES:
        os.symlink(os.path.join(ROOT, name), scratch / name)
    (scratch / "paddle_llm").mkdir()
    os.symlink(os.path.join(ROOT, "paddle_llm", "assets"), scratch / "paddle_llm" / "assets")
    os.symlink(sys.prefix, scratch / ".venv")  # the README's `source .venv/bin/activate`
    # "Bring your own model" runs on the Hugging Face fixtures transformers wrote.
    (scratch / "tests" / "assets").mkdir(parents=True)
    os.symlink(os.path.join(ROOT, "tests", "assets", "hf"), scratch / "tests" / "assets" / "hf")
    (scratch / "llama-2-7b").mkdir()
    (scratch / "llama-2-7b" / "config.json").write_text(json.dumps(LLAMA_2_7B_CONFIG))
    for link, target in DEMO_STAND_INS.items():
        path = scratch / link
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(scratch / target, path.parent), path)


def _env() -> dict:
    # The venv's python and paddle-llm first on PATH, as after `source .venv/bin/activate`; PYTHONPATH keeps the
    # scratch directory's paddle_llm/assets link from shadowing the package.
    bin_dir = os.path.dirname(sys.executable)
    return subprocess_env(PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), VIRTUAL_ENV=sys.prefix, PYTHONPATH=ROOT)


def _assert_documented_output(command: Command, stdout: str) -> None:
    """Each documented line appears in the real output, in order; a line ending in "..." is a prefix."""
    actual = [line.rstrip() for line in stdout.splitlines()]
    position = 0
    for shown in command.documented_output:
        prefix = shown[:-3].rstrip() if shown.endswith("...") else None
        for index in range(position, len(actual)):
            if actual[index] == shown or (prefix is not None and actual[index].startswith(prefix)):
                position = index + 1
                break
        else:
            raise AssertionError(f"README line {command.line}: documented output line {shown!r} is not in the "
                                 f"output (after line {position}):\n{stdout}")


class Servers:
    """The README's `paddle-llm serve` lines, started in the background and stopped (SIGTERM) at the end."""

    def __init__(self, scratch, env):
        self.scratch, self.env = scratch, env
        self.running: list[tuple[str, subprocess.Popen, str]] = []
        self.rest_ports: list[int] = []
        self.grpc_ports: list[int] = []

    def start(self, command: Command, text: str) -> None:
        port = free_port()
        text = text.replace(f"--port {README_REST_PORT}", f"--port {port}")
        if f"--grpc_port {README_GRPC_PORT}" in text:
            grpc_port = free_port()
            text = text.replace(f"--grpc_port {README_GRPC_PORT}", f"--grpc_port {grpc_port}")
            self.grpc_ports.append(grpc_port)
        log_path = self.scratch / f"server-{command.line}.log"
        with open(log_path, "wb") as log:
            # exec: the SIGTERM at the end must reach the server, not a shell around it
            process = subprocess.Popen(["bash", "-c", "exec " + text], cwd=self.scratch, env=self.env,
                                       stdout=log, stderr=subprocess.STDOUT)
        self.running.append((text, process, str(log_path)))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, f"README line {command.line}: {text}\nexited {process.returncode}:\n{_tail(log_path)}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                    self.rest_ports.append(port)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"README line {command.line}: {text}\nnot healthy after 180 s:\n{_tail(log_path)}")

    def stop(self) -> list[tuple[str, int, str]]:
        for _, process, _ in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        stopped = []
        for text, process, log_path in self.running:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            stopped.append((text, process.returncode, log_path))
        return stopped


def _tail(path, lines: int = 40) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _run(args: list[str], command: Command, shown: str, scratch, env) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=scratch, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, (f"README line {command.line} exited {result.returncode}:\n{shown}\n"
                                    f"--- stdout tail ---\n{result.stdout[-3000:]}\n--- stderr tail ---\n{result.stderr[-4000:]}")
    return result


def _python_variants(text: str, servers: Servers) -> list[str]:
    """The snippet once per server it talks to (the README's ports replaced), or as it is."""
    variants = [text]
    if f"127.0.0.1:{README_REST_PORT}" in text:
        assert servers.rest_ports, "a REST client snippet comes before any `paddle-llm serve` line"
        variants = [text.replace(f"127.0.0.1:{README_REST_PORT}", f"127.0.0.1:{port}") for port in servers.rest_ports]
    if f"127.0.0.1:{README_GRPC_PORT}" in text:
        assert servers.grpc_ports, "a gRPC client snippet comes before any `paddle-llm serve --grpc_port` line"
        variants = [v.replace(f"127.0.0.1:{README_GRPC_PORT}", f"127.0.0.1:{port}") for v in variants for port in servers.grpc_ports]
    return variants


def test_every_readme_command_runs(tmp_path):
    with open(README, encoding="utf-8") as f:
        commands = extract_commands(f.read())
    stale = set(EXEMPT) - {c.text for c in commands}
    assert not stale, f"exemptions for commands the README no longer shows: {stale}"
    rewritten = _apply_rewrites(commands)
    scratch = tmp_path / "checkout"
    scratch.mkdir()
    _prepare_scratch(scratch)
    env = _env()
    servers = Servers(scratch, env)
    repository_entries = set(os.listdir(ROOT))
    scratch_layout = set(os.listdir(scratch))
    ran, exempted = [], []
    try:
        for command in commands:
            if command.text in EXEMPT:
                exempted.append(command.text)
                continue
            text = rewritten.get(command.text, command.text)
            if command.kind == "python":
                for variant in _python_variants(text, servers):
                    script = scratch / f"readme_line_{command.line}.py"
                    script.write_text(variant)
                    result = _run([sys.executable, str(script)], command, variant, scratch, env)
                    assert result.stdout.strip(), f"README line {command.line}: the snippet printed nothing"
            elif text.startswith("paddle-llm serve "):
                servers.start(command, text)
            else:
                result = _run(["bash", "-c", text], command, text, scratch, env)
                _assert_documented_output(command, result.stdout)
            ran.append(command.text)
    finally:
        stopped = servers.stop()
    for text, code, log_path in stopped:
        assert code == 0, f"{text}\nexited {code} on SIGTERM (graceful shutdown expected):\n{_tail(log_path)}"
    assert sorted(ran + exempted) == sorted(c.text for c in commands)
    # What the commands wrote in the scratch directory must not have appeared in the repository too.
    written = set(os.listdir(scratch)) - scratch_layout
    assert written >= {"my_tokenizer", "data", "out"}
    leaked = (written & set(os.listdir(ROOT))) - repository_entries
    assert not leaked, f"README commands wrote into the repository: {sorted(leaked)}"
