"""Faults at the adapter and serving boundaries (issue 22, part D): each one is a single line naming what is wrong and
what to do, a non-zero exit, nothing written and every input file byte-for-byte as it was.

* a LoRA or prefix adapter saved for a base of another shape, or with targets this base does not have, is refused
  by ``merge-lora``, ``export`` and ``finetune`` (the first mismatching tensor, both shapes and both directories);
* a merge that changes no logit of the base while the adapter is non-zero is an error;
* a REST or gRPC port already taken is refused before the model loads, naming the flag;
* a missing or truncated program or weights file (``model.json``, ``model.pdiparams``, ...) at serve names the file
  and the export to rerun.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket

import numpy as np
import pytest

from tests.conftest import ROOT, run_script
from tests.integration.tiny_checkpoint import make_checkpoint, make_lora_adapter, make_prefix_adapter

FINETUNE = os.path.join(ROOT, "finetune_generation.py")


def tree_hashes(*paths: str) -> dict[str, str]:
    """sha256 of every file under ``paths``: what a failed command must leave exactly as it was."""
    hashes = {}
    for top in paths:
        for directory, _, files in os.walk(top):
            for name in files:
                path = os.path.join(directory, name)
                with open(path, "rb") as f:
                    hashes[path] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def run_refused(args: list[str], inputs: list[str], output: str | None = None):
    """Run ``args``; assert exit code 2, no traceback, untouched inputs and no output; return stderr."""
    before = tree_hashes(*inputs)
    result = run_script(args, check=False)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert tree_hashes(*inputs) == before
    if output is not None:
        assert not os.path.exists(output)
    return result.stderr


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama base, one of another width with a LoRA and a prefix adapter saved for it, a Qwen2 base's LoRA adapter
    (other layer names: other targets) and a float32 export of the base."""
    workdir = tmp_path_factory.mktemp("faults")
    paths = {
        "base": make_checkpoint("tiny-llama", str(workdir / "base"), train_steps=2),
        "wide": make_checkpoint("tiny-llama", str(workdir / "wide"), train_steps=2, hidden_size=96, intermediate_size=192),
        "qwen2": make_checkpoint("tiny-qwen2", str(workdir / "qwen2"), train_steps=2),
    }
    paths["lora_wide"] = make_lora_adapter(paths["wide"], str(workdir / "lora_wide"))
    paths["lora_qwen2"] = make_lora_adapter(paths["qwen2"], str(workdir / "lora_qwen2"))
    paths["prefix_wide"] = make_prefix_adapter(paths["wide"], str(workdir / "prefix_wide"))
    paths["export"] = str(workdir / "export")
    run_script(["-m", "paddle_llm", "export", "--model_name_or_path", paths["base"], "--output_path", paths["export"]])
    return paths


LORA_WIDE = "tensor llama.layers.0.self_attn.q_proj.lora_A is [96, 4] in the adapter but [128, 4] for this base"
LORA_QWEN2 = "tensor qwen2.layers.0.self_attn.q_proj.lora_A is [128, 4] in the adapter but absent for this base"
PREFIX_WIDE = ("tensor past_key_values [layers, key/value, tokens, heads, head size] is [2, 2, 4, 4, 24] in the adapter "
               "but [2, 2, 4, 4, 32] for this base")


def assert_names_adapter_and_base(stderr: str, program: str, flag: str, adapter: str, base: str, tensor: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith(program)]
    assert len(lines) == 1, stderr[-3000:]
    assert f"{flag} {os.path.abspath(adapter)} does not fit --model_name_or_path {base}" in lines[0], lines[0]
    assert tensor in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("adapter, tensor", [("lora_wide", LORA_WIDE), ("lora_qwen2", LORA_QWEN2)], ids=["other-shape", "other-targets"])
def test_merge_lora_refuses_an_adapter_of_another_base(models, tmp_path, adapter, tensor):
    output = str(tmp_path / "merged")
    stderr = run_refused(["-m", "paddle_llm", "merge-lora", "--model_name_or_path", models["base"], "--lora_path",
                          models[adapter], "--output_path", output], [models["base"], models[adapter]], output)
    assert_names_adapter_and_base(stderr, "paddle-llm merge-lora: error: ", "--lora_path", models[adapter], models["base"], tensor)


@pytest.mark.slow
@pytest.mark.parametrize("export_format", ["paddle", "hf"])
def test_export_refuses_a_lora_adapter_of_another_base(models, tmp_path, export_format):
    output = str(tmp_path / "export")
    stderr = run_refused(["-m", "paddle_llm", "export", "--format", export_format, "--model_name_or_path", models["base"],
                          "--lora_path", models["lora_wide"], "--output_path", output],
                         [models["base"], models["lora_wide"]], output)
    assert_names_adapter_and_base(stderr, "paddle-llm export: ", "--lora_path", models["lora_wide"], models["base"], LORA_WIDE)


@pytest.mark.slow
def test_export_refuses_a_prefix_of_another_base(models, tmp_path):
    output = str(tmp_path / "export")
    stderr = run_refused(["-m", "paddle_llm", "export", "--model_name_or_path", models["base"], "--prefix_path",
                          models["prefix_wide"], "--output_path", output], [models["base"], models["prefix_wide"]], output)
    assert_names_adapter_and_base(stderr, "paddle-llm export: ", "--prefix_path", models["prefix_wide"], models["base"], PREFIX_WIDE)


@pytest.mark.slow
@pytest.mark.parametrize("flags, adapter, tensor", [
    (["--lora", "True", "--lora_path"], "lora_wide", LORA_WIDE),
    (["--prefix_tuning", "True", "--prefix_path"], "prefix_wide", PREFIX_WIDE),
], ids=["lora", "prefix"])
def test_finetune_refuses_an_adapter_of_another_base(models, tmp_path, flags, adapter, tensor):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text('{"src": "1 plus 1 =", "tgt": "two"}\n' * 8)
    output = str(tmp_path / "out")
    stderr = run_refused([FINETUNE, "--model_name_or_path", models["base"], "--dataset_name_or_path", str(data),
                          "--output_dir", output, "--do_train", *flags, models[adapter], "--max_steps", "1",
                          "--report_to", "none", "--disable_tqdm", "1", "--device", "cpu", "--src_length", "16",
                          "--tgt_length", "8"], [models["base"], models[adapter], str(data)])
    assert_names_adapter_and_base(stderr, "paddle-llm finetune: error: ", flags[-1], models[adapter], models["base"], tensor)
    assert not os.path.exists(os.path.join(output, "lora_model_state.pdparams"))
    assert not os.path.exists(os.path.join(output, "prefix_model_state.pdparams"))


def test_a_merge_that_leaves_the_base_unchanged_with_a_non_zero_adapter_is_an_error():
    from paddle_llm.peft.merge import require_merge_changed_base

    logits = np.random.default_rng(0).standard_normal((1, 4, 8)).astype("float32")
    with pytest.raises(ValueError, match=r"--lora_path 'adapter': merging changed no logit of the base"):
        require_merge_changed_base(logits, logits.copy(), adapter_is_zero=False, lora_path="adapter")
    require_merge_changed_base(logits, logits.copy(), adapter_is_zero=True, lora_path="adapter")  # a zero adapter: a no-op is right
    require_merge_changed_base(logits, logits + 1e-6, adapter_is_zero=False, lora_path="adapter")


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("flag", ["--port", "--grpc_port"])
def test_serve_refuses_a_port_in_use_before_loading_the_model(tmp_path, flag):
    # The port check comes before the model is read, so an empty directory stands in for a checkpoint: a run that
    # reached the model would fail on it with another message.
    model = tmp_path / "model"
    model.mkdir()
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        ports = {"--port": str(free_port()), "--grpc_port": str(free_port()), flag: str(port)}
        stderr = run_refused(["-m", "paddle_llm", "serve", "--model", str(model), "--engine", "dygraph",
                              *[item for pair in ports.items() for item in pair]], [str(model)])
    assert stderr.strip().splitlines() == [
        f"paddle-llm serve: error: {flag} {port}: 127.0.0.1:{port} is not free (Address already in use); pick another {flag}"]
    for other in ports.values():  # nothing is left listening
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", int(other)))


def damaged_copy(export_dir: str, destination: str, damage) -> str:
    shutil.copytree(export_dir, destination)
    damage(destination)
    return destination


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def programs(export_dir: str) -> list[str]:
    return [os.path.join(export_dir, name) for name in os.listdir(export_dir) if name.startswith("model") and name.endswith(".json")]


def weights_files(export_dir: str) -> list[str]:
    # model.pdiparams, and model.kernels.pdiparams where the compiled kernels' program was written
    return [os.path.join(export_dir, name) for name in os.listdir(export_dir) if name.endswith(".pdiparams")]


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    (lambda d: [truncate(p) for p in weights_files(d)],
     ".pdiparams is truncated or damaged (Paddle Inference: (Unavailable) Cannot read tensor desc size)"),
    (lambda d: [truncate(p) for p in programs(d)], ".json is truncated or damaged (not valid JSON: "),
    (lambda d: [os.remove(p) for p in programs(d)], ".json is missing"),
], ids=["truncated-params", "truncated-program", "missing-program"])
def test_serve_names_a_damaged_graph_file_and_the_export_to_rerun(models, tmp_path, damage, message):
    export = damaged_copy(models["export"], str(tmp_path / "export"), damage)
    stderr = run_refused(["-m", "paddle_llm", "serve", "--model", export, "--port", str(free_port())], [export])
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"paddle-llm serve: error: {export}/model"), stderr[-3000:]
    assert message in lines[0]
    assert f"export it again (`paddle-llm export --model_name_or_path {models['base']} --output_path DIR`)" in lines[0]
