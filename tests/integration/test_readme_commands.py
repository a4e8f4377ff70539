"""Every command shown in README.md and docs/**/*.md runs here, page by page, with tiny models on a CPU.

Commands are extracted from each page itself: the lines of ```bash blocks (``\\`` continuations joined, comments
dropped), ```python blocks (each run as a script), the ``$ `` lines of ```text blocks (whose documented output
must appear in the real output), and indented command lines. A page's commands run in order, in a scratch directory
of its own laid out like a checkout (the entry scripts, the shipped assets, the pins and the venv are linked in),
because later commands read what earlier ones wrote. Nothing is written into the repository.

One test per page (its id is the page's path). What a page reads that another page writes (the tour's ``data/`` and
``out/tiny`` checkpoint, the fine-tuning page's ``out/lora`` adapter) is listed in ``NEEDS`` and ``PRODUCED_BY``:
the producing page runs once per session (``pages``, a session fixture) and the paths are copied into the reading
page's scratch directory, so any one page's test runs alone and no page's commands run twice.

A command that cannot run here is either rewritten (``REWRITES``) or exempted (``EXEMPT``), each with its reason;
every other command runs as written (only the fixed ports 8000/50051 become free ones), so a command a page gains is
tested without touching this file.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest

from paddle_llm.serving.process import free_port
from tests.conftest import ROOT, subprocess_env

COMMAND_TIMEOUT = 300


def _pages() -> list[str]:
    """README.md, then every page under docs/, as paths relative to the repository."""
    docs = glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    return ["README.md"] + sorted(os.path.relpath(path, ROOT).replace(os.sep, "/") for path in docs)


def _read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


@dataclass(frozen=True)
class Command:
    kind: str  # "bash", "python", "text" ($ lines) or "indented"
    text: str  # as shown: continuations joined, a trailing comment dropped
    line: int
    documented_output: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rewrite:
    match: str  # a substring of exactly one command over all pages
    replacements: tuple[tuple[str, str], ...]
    reason: str


EXEMPT = {
    "make demo": "test_demo.py runs `paddle-llm demo` (the Makefile's demo target) and checks its targets; its two "
                 "outputs later commands read are stood in for (see DEMO_STAND_INS)",
    "make test": "the suite this test belongs to",
    "make test-quick": "the suite this test belongs to, without its slow tests",
    "OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/integration/test_readme_commands.py -q -k docs/serve.md":
        "this test itself",
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
            "the optional key is left out, so the serving page's client (api_key=\"unused\") is let in"),
    Rewrite("paddle-llm check --gpus 0,1,2,3,4,5,6,7", (("--device gpu", "--device cpu"),),
            "this Paddle build has no CUDA; check still validates the 8-rank layout (it starts no processes)"),
    Rewrite("selftest.py --model_name_or_path ./llama-2-7b", (("--gpus 0,1", "--nproc_per_node 2"), ("--device gpu", "--device cpu")),
            "no GPU here: the same selftest on 2 CPU processes (--bf16 and --use_flash_attention fall back with a warning each)"),
)

# The pages' fixed ports may be taken on a shared machine: each `paddle-llm serve` gets free ports instead, and a
# page's client snippets are pointed at them (a REST one at every REST server that page starts).
DOCUMENTED_REST_PORT = "8000"
DOCUMENTED_GRPC_PORT = "50051"

# `make demo` is exempt, but the fine-tuning, DPO and serving pages use what it leaves in demo_output/: the tour's
# pretrained checkpoint and the fine-tuning page's adapter are the same kinds of directories.
DEMO_STAND_INS = {"demo_output/pretrain": "out/tiny", "demo_output/finetune/lora": "out/lora"}

# The scale page's `./llama-2-7b` is a local model directory; estimating and checking read only its config.json.
LLAMA_2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
}

# Linked into each scratch directory so the pages' relative paths resolve as they do in a checkout.
CHECKOUT_FILES = ("run_pretrain.py", "finetune_generation.py", "run_finetune.py", "run_dpo.py", "selftest.py", "constraints.txt", "requirements.txt",
                  "requirements-dev.txt")

# What a page's commands read that another page's commands write: each path (in the scratch directory) -> the page
# that writes it. After a page runs, each path it is listed for here must exist.
PRODUCED_BY = {
    "my_tokenizer": "README.md",  # the tour's step 1
    "data": "README.md",  # step 2: data/demo.bin, .idx
    "out/tiny": "README.md",  # step 3, also demo_output/pretrain (DEMO_STAND_INS)
    "out/lora": "docs/finetune.md",  # also demo_output/finetune/lora
}

# Each page -> the paths it reads, copied from the producing page's scratch directory before its first command.
# A page not listed needs only the checkout (and the files _prepare_scratch writes).
NEEDS = {
    "docs/finetune.md": ("out/tiny",),
    "docs/dpo.md": ("out/tiny",),
    "docs/serve.md": ("out/tiny", "out/lora"),
    "docs/runs.md": ("out/tiny",),
}

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
    assert not pending, f"line {first}: a `\\` continuation runs off the end of its block"
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


def extract_commands(markdown: str, page: str = "the page") -> list[Command]:
    """Every command ``markdown`` shows, in order (see the module docstring for what counts)."""
    commands, kind, start, block = [], None, 0, []
    lines = markdown.splitlines()
    for number, line in enumerate(lines, 1):
        if kind is None:
            fence = FENCE.match(line)
            if fence:
                kind, start, block = fence.group(1), number + 1, []
                assert kind in FENCE_KINDS, f"{page} line {number}: ```{kind} blocks are not extracted; use one of {FENCE_KINDS}"
            elif line.startswith("    ") and line.strip() and (number == 1 or not lines[number - 2].strip()):
                commands.append(Command("indented", line.strip(), number))
        elif line.startswith("```"):
            commands += _block_commands(kind, start, block)
            kind = None
        else:
            block.append(line)
    assert kind is None, f"{page} ends inside a fenced block"
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
    """Command text as shown -> the text run here; fails on a rewrite no page needs any more, or one that matches
    more than one command (over all pages, so it applies whichever page its command moves to)."""
    rewritten = {}
    for rewrite in REWRITES:
        matching = [c.text for c in commands if rewrite.match in c.text]
        assert len(matching) == 1, f"rewrite {rewrite.match!r} ({rewrite.reason}) matches {len(matching)} commands"
        text = rewritten.get(matching[0], matching[0])
        for old, new in rewrite.replacements:
            assert old in text, f"rewrite {rewrite.match!r}: {old!r} is no longer in the command it matches"
            text = text.replace(old, new)
        rewritten[matching[0]] = text
    return rewritten


def _check_exemptions(commands: list[Command]) -> None:
    for text, reason in EXEMPT.items():
        count = sum(c.text == text for c in commands)
        assert count == 1, f"exemption {text!r} ({reason}) matches {count} commands over all pages (one expected)"


PAGES = _pages()
COMMANDS = {page: extract_commands(_read(page), page) for page in PAGES}
PAGES_WITH_COMMANDS = [page for page in PAGES if COMMANDS[page]]


def test_exemptions_rewrites_and_needs_match_the_pages():
    """Cheap, and first: each exemption and rewrite matches exactly one command over all pages, and the page
    dependencies name pages that exist."""
    every = [c for page in PAGES for c in COMMANDS[page]]
    _check_exemptions(every)
    _apply_rewrites(every)
    assert set(PRODUCED_BY.values()) <= set(PAGES_WITH_COMMANDS), PRODUCED_BY
    assert set(NEEDS) <= set(PAGES_WITH_COMMANDS), NEEDS
    for page, needs in NEEDS.items():
        assert set(needs) <= set(PRODUCED_BY), f"{page} needs a path no page is listed as writing: {needs}"
        assert page not in {PRODUCED_BY[need] for need in needs}, f"{page} needs its own output"


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


def _assert_documented_output(where: str, command: Command, stdout: str) -> None:
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
            raise AssertionError(f"{where}: documented output line {shown!r} is not in the "
                                 f"output (after line {position}):\n{stdout}")


class Servers:
    """A page's `paddle-llm serve` lines, started in the background and stopped (SIGTERM) at the end of the page."""

    def __init__(self, scratch, env, slug: str):
        self.scratch, self.env, self.slug = scratch, env, slug
        self.running: list[tuple[str, subprocess.Popen, str]] = []
        self.rest_ports: list[int] = []
        self.grpc_ports: list[int] = []

    def start(self, where: str, command: Command, text: str) -> None:
        port = free_port()
        text = text.replace(f"--port {DOCUMENTED_REST_PORT}", f"--port {port}")
        if f"--grpc_port {DOCUMENTED_GRPC_PORT}" in text:
            grpc_port = free_port()
            text = text.replace(f"--grpc_port {DOCUMENTED_GRPC_PORT}", f"--grpc_port {grpc_port}")
            self.grpc_ports.append(grpc_port)
        log_path = self.scratch / f"server-{self.slug}-{command.line}.log"
        with open(log_path, "wb") as log:
            # exec: the SIGTERM at the end must reach the server, not a shell around it
            process = subprocess.Popen(["bash", "-c", "exec " + text], cwd=self.scratch, env=self.env,
                                       stdout=log, stderr=subprocess.STDOUT)
        self.running.append((text, process, str(log_path)))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, f"{where}: {text}\nexited {process.returncode}:\n{_tail(log_path)}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                    self.rest_ports.append(port)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{where}: {text}\nnot healthy after 180 s:\n{_tail(log_path)}")

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


def _run(args: list[str], where: str, shown: str, scratch, env) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=scratch, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert result.returncode == 0, (f"{where} exited {result.returncode}:\n{shown}\n"
                                    f"--- stdout tail ---\n{result.stdout[-3000:]}\n--- stderr tail ---\n{result.stderr[-4000:]}")
    return result


def _python_variants(text: str, servers: Servers) -> list[str]:
    """The snippet once per server of its page it talks to (the documented ports replaced), or as it is."""
    variants = [text]
    if f"127.0.0.1:{DOCUMENTED_REST_PORT}" in text:
        assert servers.rest_ports, "a REST client snippet comes before any `paddle-llm serve` line on its page"
        variants = [text.replace(f"127.0.0.1:{DOCUMENTED_REST_PORT}", f"127.0.0.1:{port}") for port in servers.rest_ports]
    if f"127.0.0.1:{DOCUMENTED_GRPC_PORT}" in text:
        assert servers.grpc_ports, "a gRPC client snippet comes before any `paddle-llm serve --grpc_port` line on its page"
        variants = [v.replace(f"127.0.0.1:{DOCUMENTED_GRPC_PORT}", f"127.0.0.1:{port}") for v in variants for port in servers.grpc_ports]
    return variants


def _copy(source, destination) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, destination, symlinks=True)
    else:
        shutil.copy2(source, destination)


def _run_page(page: str, scratch, rewritten: dict[str, str]) -> None:
    """Run every command ``page`` shows, in order, in ``scratch`` (prepared, with the page's NEEDS copied in)."""
    commands = COMMANDS[page]
    slug = re.sub(r"[^A-Za-z0-9]+", "_", page)
    env = _env()
    servers = Servers(scratch, env, slug)
    repository_entries = set(os.listdir(ROOT))
    ran, exempted = [], []
    try:
        for command in commands:
            where = f"{page} line {command.line}"
            if command.text in EXEMPT:
                exempted.append(command.text)
                continue
            text = rewritten.get(command.text, command.text)
            if command.kind == "python":
                for variant in _python_variants(text, servers):
                    script = scratch / f"{slug}_line_{command.line}.py"
                    script.write_text(variant)
                    result = _run([sys.executable, str(script)], where, variant, scratch, env)
                    assert result.stdout.strip(), f"{where}: the snippet printed nothing"
            elif text.startswith("paddle-llm serve "):
                servers.start(where, command, text)
            else:
                result = _run(["bash", "-c", text], where, text, scratch, env)
                _assert_documented_output(where, command, result.stdout)
            ran.append(command.text)
    finally:
        stopped = servers.stop()
    for text, code, log_path in stopped:
        assert code == 0, f"{page}: {text}\nexited {code} on SIGTERM (graceful shutdown expected):\n{_tail(log_path)}"
    assert sorted(ran + exempted) == sorted(c.text for c in commands)
    for path, producer in PRODUCED_BY.items():
        if producer == page:
            assert (scratch / path).exists(), f"{page} is listed as writing {path} (PRODUCED_BY), but its commands did not"
    # What the commands wrote in the scratch directory must not have appeared in the repository too.
    leaked = set(os.listdir(ROOT)) - repository_entries
    assert not leaked, f"{page}'s commands wrote into the repository: {sorted(leaked)}"


class PageRuns:
    """Runs each page at most once per session, after the pages that write what it needs; remembers each page's
    scratch directory (or its failure, re-raised for its own test and reported by the pages that need it)."""

    def __init__(self, base):
        self.base = base
        every = [c for page in PAGES for c in COMMANDS[page]]
        _check_exemptions(every)
        self.rewritten = _apply_rewrites(every)
        self.scratch: dict[str, object] = {}
        self.failed: dict[str, BaseException] = {}

    def run(self, page: str):
        """``page``'s scratch directory, after its commands ran (running them, and its prerequisites, if not yet)."""
        if page in self.failed:
            raise self.failed[page]
        if page in self.scratch:
            return self.scratch[page]
        sources = {}
        for need in NEEDS.get(page, ()):
            producer = PRODUCED_BY[need]
            try:
                sources[need] = self.run(producer) / need
            except BaseException:  # noqa: BLE001 - reported once, in the producer's own test
                pytest.fail(f"{page} needs {need}, which {producer} writes, and {producer}'s commands failed "
                            f"(see the test {producer})", pytrace=False)
        scratch = self.base / re.sub(r"[^A-Za-z0-9]+", "_", page)
        scratch.mkdir()
        _prepare_scratch(scratch)
        for need, source in sources.items():
            _copy(source, scratch / need)
        try:
            _run_page(page, scratch, self.rewritten)
        except BaseException as err:
            self.failed[page] = err
            raise
        self.scratch[page] = scratch
        return scratch


@pytest.fixture(scope="session")
def pages(tmp_path_factory) -> PageRuns:
    return PageRuns(tmp_path_factory.mktemp("pages"))


@pytest.mark.slow  # every command of the page, with the tour's training and serving before it
@pytest.mark.parametrize("page", PAGES_WITH_COMMANDS, ids=PAGES_WITH_COMMANDS)
def test_every_command_on_the_page_runs(page, pages):
    pages.run(page)
