"""Preemption: SIGTERM/SIGINT during training saves a checkpoint at the step boundary, exits 75 and resumes to the
loss curve of an uninterrupted run; a second signal exits at once; kill -9 during a save resumes from the previous
checkpoint. Real training runs of tiny-llama on the demo data, one process and two under Paddle's launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import RUN_PRETRAIN, ROOT, read_metrics, run_script, subprocess_env, train_losses
from tests.integration.test_pretrain import pretrain_flags

EXIT_PREEMPTED = 75
COMMON = dict(max_steps=24, save_steps=100, logging_steps=1, eval_steps=1000)


def start(command: list[str], log_path: str) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable] + command, cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)


def wait_for_step(process: subprocess.Popen, output_dir: str, step: int) -> None:
    """Until metrics.jsonl records ``step`` (the run is inside its training loop)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    while process.poll() is None:
        if os.path.exists(path) and any(row.get("step", 0) >= step for row in read_metrics(output_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended (exit {process.returncode}) before step {step}")


def marked_checkpoints(output_dir: str) -> list[int]:
    return sorted(
        int(name.split("-")[1])
        for name in os.listdir(output_dir)
        if name.startswith("checkpoint-") and os.path.exists(os.path.join(output_dir, name, "paddle_llm_complete.json"))
    )


@pytest.fixture(scope="module")
def reference_losses(demo_data, tmp_path_factory) -> dict[int, float]:
    reference = str(tmp_path_factory.mktemp("reference"))
    run_script([RUN_PRETRAIN] + pretrain_flags(demo_data, reference, **COMMON))
    return train_losses(reference)


def assert_same_curve(resumed: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(resumed) == sorted(reference)  # no step missing, none twice
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-6), step


@pytest.mark.slow
@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_step_boundary_and_the_rerun_continues_the_curve(demo_data, tmp_path, reference_losses, sent):
    output = str(tmp_path / "run")
    command = [RUN_PRETRAIN] + pretrain_flags(demo_data, output, **COMMON)
    process = start(command, str(tmp_path / "log"))
    wait_for_step(process, output, 3)
    process.send_signal(sent)
    assert process.wait(timeout=300) == EXIT_PREEMPTED
    log = (tmp_path / "log").read_text()
    [stopped] = marked_checkpoints(output)
    assert 3 <= stopped < COMMON["max_steps"]
    assert max(train_losses(output)) == stopped  # it stopped at the boundary it saved, nothing trained after
    assert f"checkpoint-{stopped} (step {stopped}); exit code 75. Rerun the same command to resume from it: python {RUN_PRETRAIN} --model_name_or_path tiny-llama" in log
    assert "Traceback" not in log

    resumed = run_script(command)
    assert f"resuming from {os.path.join(output, f'checkpoint-{stopped}')}" in resumed.stderr
    assert_same_curve(train_losses(output), reference_losses)


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """Rank -> pid of the workers Paddle's launcher started."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    ranks = {}
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        if b"PADDLE_TRAINER_ID" in env:
            ranks[int(env[b"PADDLE_TRAINER_ID"])] = pid
    return ranks


def launch(demo_data: str, output_dir: str, log_dir: str) -> list[str]:
    return ["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", log_dir, RUN_PRETRAIN] + pretrain_flags(
        demo_data, output_dir, **COMMON, per_device_train_batch_size=2
    )


@pytest.mark.slow
def test_two_processes_agree_on_the_step_when_one_rank_is_signalled(demo_data, tmp_path):
    reference = str(tmp_path / "reference")
    output = str(tmp_path / "run")
    run_script(launch(demo_data, reference, str(tmp_path / "reference_log")))
    command = launch(demo_data, output, str(tmp_path / "log"))
    launcher = start(command, str(tmp_path / "launcher.log"))
    wait_for_step(launcher, output, 3)
    os.kill(worker_pids(launcher.pid)[1], signal.SIGTERM)  # a scheduler that reached one worker only
    assert launcher.wait(timeout=300) == EXIT_PREEMPTED
    rank_0_log = (tmp_path / "log" / "workerlog.0").read_text()
    rank_1_log = (tmp_path / "log" / "workerlog.1").read_text()
    [stopped] = marked_checkpoints(output)
    assert max(train_losses(output)) == stopped
    assert "received SIGTERM" in rank_1_log and "received SIGTERM" not in rank_0_log
    assert f"another rank was signalled: saved {os.path.join(output, f'checkpoint-{stopped}')} (step {stopped}); exit code 75" in rank_0_log
    assert "python -m paddle.distributed.launch --nproc_per_node 2 " + RUN_PRETRAIN in rank_0_log
    assert "all 2 ranks finished" in rank_0_log

    run_script(command)
    assert "resuming from" in (tmp_path / "log" / "workerlog.0").read_text()
    assert_same_curve(train_losses(output), train_losses(reference))


def wait_for_text(process: subprocess.Popen, log_path: str, text: str) -> None:
    while text not in open(log_path).read():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before printing {text!r}"
        time.sleep(0.001)


def assert_marked_checkpoints_verify(output_dir: str) -> None:
    from paddle_llm.trainer.checkpoint import checkpoint_problems

    for step in marked_checkpoints(output_dir):
        assert checkpoint_problems(os.path.join(output_dir, f"checkpoint-{step}")) == [], step


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_the_previous_checkpoint_is_resumed(demo_data, tmp_path, reference_losses):
    output, log_path = str(tmp_path / "run"), str(tmp_path / "log")
    command = [RUN_PRETRAIN] + pretrain_flags(demo_data, output, **{**COMMON, "save_steps": 2})
    process = start(command, log_path)
    wait_for_step(process, output, 3)
    # Freeze the run between the signals so the second one arrives before the first is served.
    process.send_signal(signal.SIGSTOP)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    wait_for_text(process, log_path, "received SIGTERM: saving a checkpoint after this step")
    process.send_signal(signal.SIGSTOP)
    time.sleep(1.5)  # past the window in which the launcher's repeats count as the first signal
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    assert process.wait(timeout=300) == -signal.SIGTERM
    assert "received SIGTERM again: exiting now" in open(log_path).read()
    assert_marked_checkpoints_verify(output)
    latest = max(marked_checkpoints(output))

    resumed = run_script(command)
    assert f"resuming from {os.path.join(output, f'checkpoint-{latest}')}" in resumed.stderr
    assert_same_curve(train_losses(output), reference_losses)


@pytest.mark.slow
def test_kill_9_during_a_save_resumes_from_the_previous_checkpoint(demo_data, tmp_path, reference_losses):
    output = str(tmp_path / "run")
    command = [RUN_PRETRAIN] + pretrain_flags(demo_data, output, **{**COMMON, "save_steps": 2})
    process = start(command, str(tmp_path / "log"))
    for step in range(4, COMMON["max_steps"], 2):  # the first save after step 2 that is caught before its marker
        checkpoint = os.path.join(output, f"checkpoint-{step}")
        while not os.path.isdir(checkpoint):
            assert process.poll() is None, "the run ended before a save was caught in progress"
            time.sleep(0.001)
        process.send_signal(signal.SIGSTOP)
        if not os.path.exists(os.path.join(checkpoint, "paddle_llm_complete.json")):
            break
        process.send_signal(signal.SIGCONT)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.path.isdir(checkpoint) and not os.path.exists(os.path.join(checkpoint, "paddle_llm_complete.json"))

    resumed = run_script(command)
    assert f"removed {checkpoint}: its save never finished" in resumed.stderr
    assert f"resuming from {os.path.join(output, f'checkpoint-{step - 2}')}" in resumed.stderr
    assert_same_curve(train_losses(output), reference_losses)


@pytest.mark.slow
def test_a_signalled_launcher_forwards_it_and_both_ranks_save_the_same_step(demo_data, tmp_path):
    """Paddle's launcher, signalled itself, sends SIGTERM to each worker up to three times 0.2 s apart and exits
    with the signal's number (15) once they ended: its repeats must not count as a second signal."""
    output = str(tmp_path / "run")
    launcher = start(launch(demo_data, output, str(tmp_path / "log")), str(tmp_path / "launcher.log"))
    wait_for_step(launcher, output, 3)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=300) == signal.SIGTERM
    [stopped] = marked_checkpoints(output)
    assert_marked_checkpoints_verify(output)
    for rank in (0, 1):
        rank_log = (tmp_path / "log" / f"workerlog.{rank}").read_text()
        assert "received SIGTERM: saving a checkpoint after this step" in rank_log
        assert "received SIGTERM again" not in rank_log
    assert f"saved {os.path.join(output, f'checkpoint-{stopped}')} (step {stopped}); exit code 75" in (tmp_path / "log" / "workerlog.0").read_text()
