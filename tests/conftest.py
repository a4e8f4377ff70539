"""Shared fixtures: the shipped corpus preprocessed once, tiny saved models, and a runner for the real scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PRETRAIN = os.path.join(ROOT, "run_pretrain.py")
DEMO_CORPUS = os.path.join(ROOT, "paddle_llm", "assets", "demo_corpus.jsonl")


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # tests run side by side on 2 cores
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONFAULTHANDLER"] = "1"  # a crash (SIGABRT, SIGSEGV) prints every thread's Python stack to its log
    # This checkout's paddle_llm, also for scripts outside the root (tests/integration/finetune_contract.py), whose
    # sys.path starts at their own directory: a .venv shared between checkouts has its editable install elsewhere.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(args: list[str], timeout: int = 600, check: bool = True, **env) -> subprocess.CompletedProcess:
    """Run a Python command line in a fresh interpreter (Paddle keeps global state per process)."""
    result = subprocess.run(
        [sys.executable] + args, capture_output=True, text=True, timeout=timeout, env=subprocess_env(**env), cwd=ROOT
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"exit {result.returncode}: {' '.join(args)}\n--- stderr tail ---\n{result.stderr[-4000:]}{_worker_log_tails(args)}"
        )
    return result


@pytest.fixture
def refused(capsys, monkeypatch):
    """``refused(recipe, argv)``: run ``recipe``'s command-line flow (``Recipe.main``: parse, validate, one line per
    problem, exit code) in this process on a configuration it must refuse, as one process (not launched); return the
    exit code and what it printed to stderr. Nothing is built or trained: a configuration that gets past validation
    fails the test instead of starting a run. The validation is what the root scripts run; tests that need the
    script itself (``run_script``) keep a fresh interpreter."""
    import dataclasses

    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)

    def refuse(recipe, argv: list[str]) -> tuple[int, str]:
        def fit(plan):
            raise AssertionError(f"{recipe.program} accepted {argv}: the test expected it to refuse the configuration")

        capsys.readouterr()
        exit_code = dataclasses.replace(recipe, fit=fit, announce=None).main([str(token) for token in argv])
        return exit_code, capsys.readouterr().err

    return refuse


def _worker_log_tails(args: list[str], characters: int = 3000) -> str:
    """The end of each worker's log of a ``paddle.distributed.launch`` command: the launcher's own stderr only
    says which rank failed, the rank's log says why."""
    if "--log_dir" not in args:
        return ""
    log_dir = args[args.index("--log_dir") + 1]
    tails = []
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        if name.startswith("workerlog."):
            with open(os.path.join(log_dir, name), errors="replace") as log:
                tails.append(f"\n--- {name} tail ---\n{log.read()[-characters:]}")
    return "".join(tails)


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(output_dir: str) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(output_dir) if "loss" in row}


def write_chinese_corpus(path: str, documents: int = 600, characters: int = 2400) -> str:
    """A jsonl corpus of templated Chinese sentences over ``characters`` distinct CJK ideographs, each about equally
    frequent, so SentencePiece needs a piece for nearly every one (a few thousand, as for real Chinese text)."""
    ideographs = [chr(0x4E00 + i) for i in range(characters)]
    templates = ("今天我们在{a}{b}学习{c}{d}，明天去{e}{f}。", "{a}{b}说{c}{d}的{e}{f}很好。", "这本书讲的是{a}{b}和{c}{d}在{e}{f}的故事。")
    with open(path, "w", encoding="utf-8") as f:
        for document in range(documents):
            sentences = []
            for sentence in range(8):
                start = (document * 8 + sentence) * 6
                slots = {slot: ideographs[(start + 7 * i) % characters] for i, slot in enumerate("abcdef")}
                sentences.append(templates[(document + sentence) % len(templates)].format(**slots))
            f.write(json.dumps({"text": "".join(sentences)}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def chinese_data(tmp_path_factory) -> tuple[str, str]:
    """A 3,000-piece tokenizer trained on a generated Chinese corpus, and that corpus preprocessed with it:
    (tokenizer directory, data prefix)."""
    from paddle_llm.data.preprocess import preprocess
    from paddle_llm.data.tokenizer import train_tokenizer

    directory = tmp_path_factory.mktemp("chinese")
    corpus = write_chinese_corpus(str(directory / "corpus.jsonl"))
    tokenizer = train_tokenizer(corpus, str(directory / "tokenizer"), vocab_size=3000)["output_dir"]
    prefix = str(directory / "data")
    preprocess(corpus, prefix, tokenizer, append_eos=True, show_progress=False)
    return tokenizer, prefix


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    """The shipped corpus preprocessed with the shipped tokenizer: a data prefix."""
    from paddle_llm.data.preprocess import preprocess

    prefix = str(tmp_path_factory.mktemp("data") / "demo")
    preprocess(DEMO_CORPUS, prefix, "tiny-llama", append_eos=True, show_progress=False)
    return prefix


def save_tiny_models(directory, shapes: dict[str, dict] | None = None, **env) -> dict[str, str]:
    """Each tiny preset saved with random weights and the tokenizer, its config fields overridden by
    ``shapes[family]`` when given: family -> model directory."""
    script = (
        "import json, sys, paddle\n"
        "from paddle_llm.models.registry import resolve_model, build_config, build_model, load_tokenizer\n"
        "paddle.seed(0)\n"
        "for name, shape, out in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):\n"
        "    source = resolve_model(name)\n"
        "    model = build_model(source, build_config(source, **json.loads(shape)), load_weights=False)\n"
        "    model.save_pretrained(out)\n"
        "    load_tokenizer(name).save_pretrained(out)\n"
    )
    targets = {family: str(directory / family) for family in ("llama", "chatglm", "chatglm2", "qwen2")}
    args = []
    for family, path in targets.items():
        args += [f"tiny-{family}", json.dumps((shapes or {}).get(family, {})), path]
    run_script(["-c", script] + args, **env)
    return targets


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    """``paddle-llm demo --dpo`` run once, as a user's shell runs it (the README's first command): (its output
    directory, the finished process). ``test_demo`` checks what it printed; the fine-tuning demo's own entry point
    starts from the model it pretrained (``OUTPUT/pretrain``) instead of pretraining again."""
    from tests.integration.test_output import USER_SHELL

    output_dir = str(tmp_path_factory.mktemp("demo") / "demo")
    result = run_script(["-m", "paddle_llm", "demo", "--output_dir", output_dir, "--disable_tqdm", "--dpo"], timeout=900, check=False, **USER_SHELL)
    return output_dir, result


@pytest.fixture(scope="session")
def saved_tiny_models(tmp_path_factory) -> dict[str, str]:
    """Each tiny preset saved with random weights and the tokenizer: family -> model directory."""
    return save_tiny_models(tmp_path_factory.mktemp("models"))
