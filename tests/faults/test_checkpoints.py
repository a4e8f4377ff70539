"""Checkpoints verify themselves: a damaged latest checkpoint (truncated weights, corrupt trainer_state.json, a
missing file) is moved aside with a warning naming it and what is wrong, and the run resumes from the previous
complete one to the uninterrupted loss curve; nothing damaged is deleted, and --save_total_limit rotation keeps
the verified checkpoints. A disk that fills during a save ends with one message. Real tiny-llama runs."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import RUN_PRETRAIN, run_script, train_losses
from tests.faults.test_preemption import assert_same_curve, marked_checkpoints
from tests.integration.test_pretrain import pretrain_flags

COMMON = dict(max_steps=12, save_steps=4, logging_steps=1, eval_steps=1000, save_total_limit=2)


@pytest.fixture(scope="module")
def finished_run(demo_data, tmp_path_factory) -> str:
    """A run that saved checkpoint-4, -8 and -12 and rotated to the last two."""
    output = str(tmp_path_factory.mktemp("finished") / "run")
    run_script([RUN_PRETRAIN] + pretrain_flags(demo_data, output, **COMMON))
    assert marked_checkpoints(output) == [8, 12]
    return output


def truncate_weights(checkpoint: str) -> str:
    path = os.path.join(checkpoint, "model_state.pdparams")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return "model_state.pdparams has"


def corrupt_trainer_state(checkpoint: str) -> str:
    path = os.path.join(checkpoint, "trainer_state.json")
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text.replace('"global_step": 12', '"global_step": 99'))  # same size, different contents
    return "trainer_state.json has the saved size but different contents"


def remove_optimizer_state(checkpoint: str) -> str:
    [name] = [name for name in os.listdir(checkpoint) if name.endswith(".pdopt")]
    os.remove(os.path.join(checkpoint, name))
    return f"{name} is missing"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate_weights, corrupt_trainer_state, remove_optimizer_state])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumed(demo_data, finished_run, tmp_path, damage):
    output = str(tmp_path / "run")
    shutil.copytree(finished_run, output)
    damaged = os.path.join(output, "checkpoint-12")
    problem = damage(damaged)
    damaged_files = {name: open(os.path.join(damaged, name), "rb").read() for name in os.listdir(damaged)}

    result = run_script([RUN_PRETRAIN] + pretrain_flags(demo_data, output, **COMMON))
    set_aside = os.path.join(output, "damaged-checkpoint-12")
    assert f"{damaged} is damaged ({problem}" in result.stderr
    assert f"moved to {set_aside}" in result.stderr
    assert f"resuming from {os.path.join(output, 'checkpoint-8')}" in result.stderr
    assert "Traceback" not in result.stderr
    # nothing damaged is deleted or changed; rotation (limit 2) kept the verified checkpoints
    assert {name: open(os.path.join(set_aside, name), "rb").read() for name in os.listdir(set_aside)} == damaged_files
    assert marked_checkpoints(output) == [8, 12]
    assert_same_curve(train_losses(output), train_losses(finished_run))


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs: room for one tiny-llama checkpoint (8 MiB with its optimizer state), not two."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    yield str(mount_point)
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.slow
def test_a_full_disk_during_a_save_says_what_was_saved_and_what_is_needed(demo_data, small_disk):
    output = os.path.join(small_disk, "run")
    result = run_script([RUN_PRETRAIN] + pretrain_flags(demo_data, output, **{**COMMON, "save_total_limit": 5}), check=False)
    assert result.returncode == 4, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [message] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert message.startswith(f"paddle-llm pretrain: error: disk full while saving {os.path.join(output, 'checkpoint-8')} (step 8): on disk ")
    assert f"the last complete checkpoint {os.path.join(output, 'checkpoint-4')} is intact and a rerun resumes from it" in message
    assert f"a checkpoint needs about 7.9 MiB (the size of {os.path.join(output, 'checkpoint-4')})" in message, message
    assert marked_checkpoints(output) == [4]
