"""``paddle-llm selftest`` on 2 CPU processes: it passes under data parallel, sharding stage 2 and tensor parallel,
and each injected fault (``PADDLE_LLM_SELFTEST_FAULT``, test-only) fails the row that covers it and no other.

The same code runs on GPUs; ``test_selftest_on_gpus`` runs it there with the GPU-only switches when a CUDA build
and a device are present.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_script, subprocess_env

# Every test launches two or more processes that build and train models.
pytestmark = pytest.mark.slow

SELFTEST = os.path.join(ROOT, "selftest.py")
LAYOUTS = {
    "data_parallel": [],
    "sharding_stage2": ["--sharding", "stage2"],
    "tensor_parallel_2": ["--tensor_parallel_degree", "2"],
}
DESCRIBED = {"data_parallel": "data parallel", "sharding_stage2": "sharding=stage2", "tensor_parallel_2": "tensor_parallel_degree=2"}
TRAINING_ROWS = {"loss curve (5 steps)", "gradient norm"}
ROUND_TRIP_ROW = "checkpoint round trip (step 3 -> 1 process)"
KERNEL_ROWS = {"kernel rms_norm (cpu_kernels) (float32)", "kernel swiglu (cpu_kernels) (float32)", "kernel attention softmax (cpu_kernels) (float32)"}
ALL_ROWS = TRAINING_ROWS | {ROUND_TRIP_ROW, "export parity (float32)"} | KERNEL_ROWS


def selftest(directory, flags: list[str], launcher: list[str], **env):
    """Run the selftest under ``paddle.distributed.launch`` (``launcher``: its device flags); return the process
    and the table as JSON rows by check name."""
    selftest_dir = str(directory / "selftest")
    result = run_script(
        ["-m", "paddle.distributed.launch", *launcher, "--log_dir", str(directory / "launch"), SELFTEST,
         "--model_name_or_path", "tiny-llama", *flags, "--selftest_dir", selftest_dir],
        timeout=900, check=False, **env,
    )
    report_path = os.path.join(selftest_dir, "selftest.json")
    assert os.path.isfile(report_path), f"exit {result.returncode}, no table:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    return result, {row["check"]: row for row in report["rows"]}


def failed(rows: dict) -> set[str]:
    return {check for check, row in rows.items() if not row["passed"]}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_selftest_passes_on_two_cpu_processes(tmp_path, layout):
    result, rows = selftest(tmp_path, LAYOUTS[layout] + ["--device", "cpu"], ["--nproc_per_node", "2"])
    assert set(rows) == ALL_ROWS
    assert failed(rows) == set(), rows
    assert result.returncode == 0
    table = open(tmp_path / "selftest" / "selftest.txt", encoding="utf-8").read()
    assert "selftest PASSED: 7/7 checks pass" in table
    assert f"2 process(es), {DESCRIBED[layout]}, float32 on cpu" in table


# The other layout flags (tests/integration/test_parallel_equivalence.py proves each against one process); left out
# of `make test` for time: `pytest -m extended`. layout -> (flags, processes, how the table describes it)
EXTENDED_LAYOUTS = {
    "tensor_parallel_2_sequence_parallel": (["--tensor_parallel_degree", "2", "--sequence_parallel", "1"], 2, "sequence_parallel=True"),
    "sharding_stage1_x_tensor_2": (["--tensor_parallel_degree", "2", "--sharding", "stage1"], 4, "tensor_parallel_degree=2, sharding=stage1"),
    "sharding_stage2_x_tensor_2": (["--tensor_parallel_degree", "2", "--sharding", "stage2"], 4, "tensor_parallel_degree=2, sharding=stage2"),
    "pipeline_4_x_virtual_2": (
        ["--pipeline_parallel_degree", "4", "--virtual_pp_degree", "2", "--gradient_accumulation_steps", "4"], 4, "virtual_pp_degree=2"
    ),
}


@pytest.mark.extended
@pytest.mark.parametrize("layout", EXTENDED_LAYOUTS)
def test_selftest_passes_on_cpu_processes_in_every_layout(tmp_path, layout):
    flags, processes, described = EXTENDED_LAYOUTS[layout]
    result, rows = selftest(tmp_path, flags + ["--device", "cpu"], ["--nproc_per_node", str(processes)])
    assert failed(rows) == set(), rows
    assert result.returncode == 0
    assert described in open(tmp_path / "selftest" / "selftest.txt", encoding="utf-8").read()


@pytest.mark.extended
def test_selftest_refuses_sep_parallel_with_checks_reason(tmp_path):
    result = run_script(["-m", "paddle_llm", "selftest", "--model_name_or_path", "tiny-llama", "--device", "cpu", "--sep_parallel_degree", "2",
                         "--selftest_dir", str(tmp_path)], check=False)
    assert result.returncode != 0
    assert "--sep_parallel_degree 2: PaddleNLP 3.0.0b4 reshards attention heads" in result.stdout + result.stderr


# fault -> (layout it is injected under, the rows that must fail)
FAULT_CASES = {
    "allreduce": ("data_parallel", TRAINING_ROWS),
    "shard": ("tensor_parallel_2", {ROUND_TRIP_ROW}),
    "kernel": ("sharding_stage2", KERNEL_ROWS),
}


@pytest.mark.parametrize("fault", FAULT_CASES)
def test_injected_fault_fails_its_row(tmp_path, fault):
    layout, expected = FAULT_CASES[fault]
    result, rows = selftest(tmp_path, LAYOUTS[layout] + ["--device", "cpu"], ["--nproc_per_node", "2"], PADDLE_LLM_SELFTEST_FAULT=fault)
    assert result.returncode == 1
    assert expected <= failed(rows), rows
    # the rows that cover other parts still pass: the table points at the part at fault
    assert not failed(rows) & (ALL_ROWS - expected - {ROUND_TRIP_ROW}), rows
    for check in expected:
        assert rows[check]["fix"].startswith("fix: ")
    if fault == "shard":
        assert failed(rows) == {ROUND_TRIP_ROW}
    if fault == "allreduce":
        # the fault hits the last rank only, and its own gradient norm says so at the first step
        assert "first disagreeing rank: step 1: rank 1 off the reference grad norm" in rows["gradient norm"]["detail"]


def test_two_nodes_name_the_rank_that_disagreed(tmp_path):
    """Two "machines" of one process each (``--master/--nnodes/--rank``, as the launch scripts do) sharing the
    selftest directory; the faulty all-reduce on the second machine's rank is named."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        master = f"127.0.0.1:{probe.getsockname()[1]}"
    selftest_dir = str(tmp_path / "selftest")
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "paddle.distributed.launch", "--master", master, "--nnodes", "2", "--rank", str(rank),
             "--nproc_per_node", "1", "--log_dir", str(tmp_path / f"log_node{rank}"), SELFTEST,
             "--model_name_or_path", "tiny-llama", "--device", "cpu", "--selftest_dir", selftest_dir],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=subprocess_env(PADDLE_LLM_SELFTEST_FAULT="allreduce"),
        )
        for rank in (0, 1)
    ]
    codes = [node.wait(timeout=900) for node in nodes]
    assert codes[0] == 1 and codes[1] == 0, codes  # rank 0 holds the verdict; the faulty rank trained fine itself
    with open(os.path.join(selftest_dir, "selftest.json"), encoding="utf-8") as f:
        rows = {row["check"]: row for row in json.load(f)["rows"]}
    assert TRAINING_ROWS <= failed(rows)
    assert "first disagreeing rank: step 1: rank 1 off the reference grad norm" in rows["gradient norm"]["detail"]


def _cuda_devices() -> int:
    import paddle

    return paddle.device.cuda.device_count() if paddle.device.is_compiled_with_cuda() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_devices() == 0, reason="needs a CUDA build of Paddle and a GPU")
def test_selftest_on_gpus(tmp_path):
    gpus = min(2, _cuda_devices())
    flags = ["--device", "gpu", "--bf16", "1", "--fp16_opt_level", "O2", "--use_flash_attention", "1", "--use_fused_rms_norm", "1"]
    if gpus == 2:
        flags += ["--tensor_parallel_degree", "2"]
    result, rows = selftest(tmp_path, flags, ["--gpus", ",".join(map(str, range(gpus)))])
    assert {"kernel flash_attention (bfloat16)", "kernel fused_rms_norm (bfloat16)"} <= set(rows)
    assert failed(rows) == set(), rows
    assert result.returncode == 0


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_devices() < 2, reason="needs a CUDA build of Paddle and 2 GPUs")
def test_selftest_context_parallel_on_gpus(tmp_path):
    # context parallel needs flash attention (PaddleNLP), which has no CPU kernel: check refuses it on CPU
    flags = ["--device", "gpu", "--context_parallel_degree", "2", "--use_flash_attention", "1"]
    result, rows = selftest(tmp_path, flags, ["--gpus", "0,1"])
    assert failed(rows) == set(), rows
    assert result.returncode == 0
