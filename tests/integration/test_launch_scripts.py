"""The launch scripts in scripts/: each GPU command passes every pre-launch check at its real GPU count, and its CPU
twin (scripts/cpu/) runs the same command end to end; the pretraining twin also spans two "nodes" on one machine.
"""

from __future__ import annotations

import math
import os
import socket
import stat
import subprocess
import sys

import pytest

from tests.conftest import ROOT, read_metrics, subprocess_env

SCRIPTS = os.path.join(ROOT, "scripts")
INSTRUCTIONS = os.path.join(ROOT, "paddle_llm", "assets", "instructions")
# GPU script -> (its twin, GPUs the seed's row uses)
ROWS = {
    "pretrain_sharding_stage2.sh": ("cpu/pretrain_sharding_stage2.sh", 8),
    "finetune_full_tp4.sh": ("cpu/finetune_full_tp4.sh", 4),
    "finetune_lora.sh": ("cpu/finetune_lora.sh", 1),
    "finetune_prefix.sh": ("cpu/finetune_prefix.sh", 1),
    "finetune_pipeline_tp2_pp2.sh": ("cpu/finetune_pipeline_tp2_pp2.sh", 4),
}


def run_bash(script: str, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", os.path.join(SCRIPTS, script)], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=subprocess_env(PYTHON=sys.executable, **env),
    )


def assert_trained(output_dir: str, steps: int = 3):
    rows = read_metrics(output_dir)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1)), rows
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train)
    assert any("eval_loss" in r for r in rows), "the seed's --do_eval must evaluate"


@pytest.fixture
def check_instead_of_python(tmp_path):
    """A PYTHON that runs `paddle-llm check` on the script's command line instead of launching it."""
    shim = tmp_path / "python_check"
    shim.write_text(
        "#!/bin/sh\n"
        "# drop the interpreter and launcher prefix; `paddle-llm check` reads the launcher's flags itself\n"
        'while [ "$1" = "-u" ] || [ "$1" = "-m" ] || [ "$1" = "paddle.distributed.launch" ]; do shift; done\n'
        f'exec "{sys.executable}" -m paddle_llm.cli check "$@"\n'
    )
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return str(shim)


@pytest.mark.parametrize("script", ROWS)
def test_gpu_script_passes_every_check_at_its_gpu_count(script, check_instead_of_python, saved_tiny_models, demo_data, tmp_path):
    twin, gpus = ROWS[script]
    result = subprocess.run(
        ["bash", os.path.join(SCRIPTS, script)], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=subprocess_env(
            PYTHON=check_instead_of_python, MODEL=saved_tiny_models["llama"], INPUT_DIR=demo_data, DATASET=INSTRUCTIONS,
            OUTPUT_DIR=str(tmp_path / "out"), DEVICE="cpu",  # the GPU count comes from --gpus; this machine has none
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{gpus} process" in result.stdout, result.stdout


def test_gpu_scripts_name_what_they_need():
    result = run_bash("finetune_lora.sh", timeout=60, MODEL="")
    assert result.returncode != 0 and "set MODEL to a local model directory (paddle_llm never downloads)" in result.stderr


@pytest.fixture(scope="module")
def pretrain_twin(demo_data, tmp_path_factory) -> str:
    output = str(tmp_path_factory.mktemp("twins") / "pretrain")
    # Verbose: the check below reads what Paddle's sharding wrappers log, which the default output policy drops.
    result = run_bash("cpu/pretrain_sharding_stage2.sh", INPUT_DIR=demo_data, OUTPUT_DIR=output, PADDLE_LLM_VERBOSE=1)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.mark.slow  # a two-process launch
def test_pretrain_twin_runs_the_seed_command_with_sharding_stage2_on_two_processes(pretrain_twin):
    assert_trained(pretrain_twin)
    assert os.path.isfile(os.path.join(pretrain_twin, "checkpoint-3", "paddle_llm_complete.json"))
    log = open(os.path.join(pretrain_twin, "log_node0", "workerlog.0")).read()
    assert "group_sharded" in log  # the stage-2 wrappers really ran


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # two-process launches
def test_pretrain_twin_spans_two_nodes_like_one(pretrain_twin, demo_data, tmp_path):
    """Two "machines" of one process each (the launcher's --master/--nnodes/--rank), on this one machine."""
    output = str(tmp_path / "two_nodes")
    master = f"127.0.0.1:{_free_port()}"
    nodes = [
        subprocess.Popen(
            ["bash", os.path.join(SCRIPTS, "cpu/pretrain_sharding_stage2.sh")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=subprocess_env(PYTHON=sys.executable, INPUT_DIR=demo_data, OUTPUT_DIR=output, DEVICES="--nproc_per_node 1", NNODES=2, MASTER=master, NODE_RANK=rank),
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=900)
        assert node.returncode == 0, stderr[-3000:]
    assert_trained(output)
    one_machine, two_machines = read_metrics(pretrain_twin), read_metrics(output)
    assert len(one_machine) == len(two_machines)
    for expected, actual in zip(one_machine, two_machines):
        expected.pop("tokens_per_second", None), actual.pop("tokens_per_second", None)  # timing, not maths
        assert actual == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow  # a multi-process launch
@pytest.mark.parametrize("twin, outputs", [
    ("cpu/finetune_full_tp4.sh", ("model.safetensors.index.json",)),
    ("cpu/finetune_lora.sh", ("lora_config.json",)),
    ("cpu/finetune_prefix.sh", ("prefix_config.json",)),
])
def test_finetune_twin_runs(twin, outputs, tmp_path):
    output = str(tmp_path / "out")
    result = run_bash(twin, OUTPUT_DIR=output, WORK=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_trained(output)
    for name in outputs:
        assert os.path.exists(os.path.join(output, name)), (name, sorted(os.listdir(output)))


@pytest.mark.slow  # a two-process launch
def test_pipeline_finetune_twin_runs_on_two_processes(tmp_path):
    output = str(tmp_path / "out")
    result = run_bash("cpu/finetune_pipeline_tp2_pp2.sh", timeout=300, OUTPUT_DIR=output, WORK=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_trained(output)


@pytest.mark.slow
def test_pipeline_finetune_twin_runs_tensor_2_x_pipeline_2_on_four_processes(tmp_path):
    output = str(tmp_path / "out")
    result = run_bash("cpu/finetune_pipeline_tp2_pp2.sh", timeout=300, OUTPUT_DIR=output, WORK=str(tmp_path), TP=2, DEVICES="--nproc_per_node 4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_trained(output)
