"""Portability smoke test: export, serve and train on a CPU without AVX-512, on any host.

QEMU's user mode with ``-cpu Haswell`` (AVX2, FMA, no AVX-512) executes only what a Haswell can, so a kernel that
uses AVX-512 dies with SIGILL here exactly as on an AMD EPYC before Zen 4, whatever CPU runs the test. Processes
it starts with exec (the C++ compiler) run natively; fork stays emulated. Each emulated command costs 1-2 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import httpx
import pytest

from paddle_llm.cpu import features as cpu_features
from paddle_llm.inference.manifest import load_manifest
from tests.conftest import ROOT, RUN_PRETRAIN, subprocess_env
from tests.integration.server_process import ServerProcess
from tests.integration.tiny_checkpoint import make_checkpoint

QEMU = shutil.which("qemu-x86_64")
HASWELL = [QEMU, "-cpu", "Haswell"] if QEMU else []
SIGILL_EXIT_CODES = (-signal.SIGILL, 128 + signal.SIGILL)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(QEMU is None, reason="needs qemu-x86_64 (apt-get install qemu-user; .ci/run installs it)"),
]

HOST_HAS_AVX512 = cpu_features.fused_rms_norm_allowed(cpu_features.detect())
# With a C++ compiler the compiled kernels build (for the emulated CPU too) and export writes their program.
KERNELS_PROGRAMS = [{"file": "model.kernels.json", "params": "model.kernels.pdiparams", "needs": ["paddle_llm_cpu_kernels"]}
                    ] if shutil.which("g++") or shutil.which("c++") else []


def on_haswell(args: list[str], timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(HASWELL + [sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(**env), cwd=ROOT)


def assert_ran(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode not in SIGILL_EXIT_CODES, f"{what}: illegal instruction on an AVX2 CPU\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{what}: exit {result.returncode}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("tiny-llama", str(tmp_path_factory.mktemp("portability") / "ckpt"))


def test_export_with_parity_check_on_an_avx2_cpu(checkpoint, tmp_path):
    output = str(tmp_path / "export")
    result = on_haswell(["-m", "paddle_llm", "export", "--model_name_or_path", checkpoint, "--output_path", output])
    assert_ran(result, "export")
    assert "parity PASSED" in result.stdout + result.stderr
    # The compiled kernels build for this CPU (AVX2) and the parity check ran their packed matmul against PaddleNLP.
    assert load_manifest(output).programs == KERNELS_PROGRAMS + [{"file": "model.json", "needs": []}]
    assert load_manifest(output).parity["programs"] == [program["file"] for program in load_manifest(output).programs]


def test_a_graph_exported_here_serves_on_an_avx2_cpu(checkpoint, tmp_path):
    """Exported on this host (with the AVX-512 program if it has AVX-512), served on a CPU without it."""
    output = str(tmp_path / "export")
    exported = subprocess.run([sys.executable, "-m", "paddle_llm", "export", "--model_name_or_path", checkpoint,
                               "--output_path", output], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT)
    assert exported.returncode == 0, exported.stderr[-3000:]
    programs = [program["file"] for program in load_manifest(output).programs]
    assert programs == [p["file"] for p in KERNELS_PROGRAMS] + ["model.avx512f.json"] * HOST_HAS_AVX512 + ["model.json"]

    server = ServerProcess(["--model", output], str(tmp_path / "server.log"))
    server.command = HASWELL + server.command
    server.start(timeout=600)  # emulated, the server takes minutes to come up
    try:
        reply = httpx.post(server.url + "/v1/completions", timeout=300,
                           json={"model": "export", "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0})
    finally:
        server.stop()
    log = open(server.log_path, encoding="utf-8", errors="replace").read()
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"].strip(), reply.json()
    # The packed weights' kernel, built for AVX2 on the emulated CPU, serves; the AVX-512 program is passed over.
    if HOST_HAS_AVX512:
        served = programs[0]
        assert f"serving {served}: this CPU (avx2) lacks avx512f, which model.avx512f.json needs" in log, log[-3000:]


def test_training_fast_paths_on_an_avx2_cpu_never_load_a_kernel_built_for_this_host(demo_data, tmp_path):
    """The compiled kernels are keyed by the CPU's features: a kernel cache the host filled (with AVX-512 code, on an
    AVX-512 host) is shared with the emulated AVX2 CPU, which must build and load its own."""
    cache = str(tmp_path / "kernel-cache")
    argv = [RUN_PRETRAIN, "--model_name_or_path", "tiny-llama", "--input_dir", demo_data, "--max_steps", "3",
            "--max_seq_length", "32", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "100",
            "--do_train", "--device", "cpu"]
    native = subprocess.run([sys.executable, *argv, "--output_dir", str(tmp_path / "native")], capture_output=True,
                            text=True, env=subprocess_env(PADDLE_LLM_KERNEL_CACHE=cache), cwd=ROOT)
    assert native.returncode == 0, native.stderr[-3000:]
    emulated = on_haswell([*argv, "--output_dir", str(tmp_path / "haswell")], PADDLE_LLM_KERNEL_CACHE=cache)
    assert_ran(emulated, "pretrain")
    assert "compiled CPU kernels" in emulated.stdout + emulated.stderr
    builds = [name for name in os.listdir(cache) if os.path.isdir(os.path.join(cache, name))]
    assert len(builds) == (2 if HOST_HAS_AVX512 else 1), builds
    with open(os.path.join(tmp_path / "haswell", "metrics.jsonl"), encoding="utf-8") as metrics:
        assert [json.loads(line)["step"] for line in metrics if '"loss"' in line] == [1, 2, 3]
