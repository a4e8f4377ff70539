"""The completion marker's sizes and checksums: what ``checkpoint_problems`` reports and what
``set_aside_damaged_checkpoints`` moves (never deletes). Plain files, no training."""

from __future__ import annotations

import json
import os

from paddle_llm.trainer.checkpoint import COMPLETE_MARKER, checkpoint_problems, mark_complete, set_aside_damaged_checkpoints


def saved_checkpoint(output_dir, step: int) -> str:
    path = os.path.join(output_dir, f"checkpoint-{step}")
    os.makedirs(os.path.join(path, "sub"))
    with open(os.path.join(path, "model_state.pdparams"), "wb") as f:
        f.write(os.urandom(10_000))
    with open(os.path.join(path, "sub", "trainer_state.json"), "w") as f:
        json.dump({"global_step": step}, f)
    mark_complete(path, step)
    return path


def test_the_marker_records_every_file_and_a_fresh_checkpoint_verifies(tmp_path):
    path = saved_checkpoint(tmp_path, 4)
    recorded = json.load(open(os.path.join(path, COMPLETE_MARKER)))
    assert recorded["global_step"] == 4
    assert sorted(recorded["files"]) == ["model_state.pdparams", os.path.join("sub", "trainer_state.json")]
    assert recorded["files"]["model_state.pdparams"]["size"] == 10_000
    assert checkpoint_problems(path) == []


def test_truncated_changed_and_missing_files_are_named(tmp_path):
    path = saved_checkpoint(tmp_path, 4)
    with open(os.path.join(path, "model_state.pdparams"), "r+b") as f:
        f.truncate(10)
    with open(os.path.join(path, "sub", "trainer_state.json"), "w") as f:
        json.dump({"global_step": 9}, f)  # same size, other contents
    assert checkpoint_problems(path) == [
        "model_state.pdparams has 10 bytes, 10000 were saved",
        f"{os.path.join('sub', 'trainer_state.json')} has the saved size but different contents (checksum mismatch)",
    ]
    os.remove(os.path.join(path, "model_state.pdparams"))
    assert checkpoint_problems(path)[0] == "model_state.pdparams is missing"


def test_a_marker_without_checksums_is_trusted_as_before(tmp_path):
    path = saved_checkpoint(tmp_path, 4)
    with open(os.path.join(path, COMPLETE_MARKER), "w") as f:
        json.dump({"global_step": 4}, f)
    assert checkpoint_problems(path) == []


def test_damaged_newest_checkpoints_are_moved_aside_down_to_one_that_verifies(tmp_path):
    oldest, middle, newest = (saved_checkpoint(tmp_path, step) for step in (4, 8, 12))
    for path in (middle, newest):
        os.remove(os.path.join(path, "model_state.pdparams"))
    os.makedirs(tmp_path / "damaged-checkpoint-12")  # set aside by an earlier run: kept too
    moved = set_aside_damaged_checkpoints(str(tmp_path))
    assert [(before, after) for before, after, _ in moved] == [
        (newest, str(tmp_path / "damaged-checkpoint-12.1")),
        (middle, str(tmp_path / "damaged-checkpoint-8")),
    ]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "damaged-checkpoint-12", "damaged-checkpoint-12.1", "damaged-checkpoint-8"]
    assert set_aside_damaged_checkpoints(str(tmp_path)) == []


def test_an_explicit_resume_from_a_damaged_checkpoint_is_refused_with_what_is_wrong(tmp_path):
    import types

    import pytest

    from paddle_llm.config.parser import ArgumentError
    from paddle_llm.recipes.spine import resume_checkpoint

    path = saved_checkpoint(tmp_path, 4)
    with open(os.path.join(path, "model_state.pdparams"), "r+b") as f:
        f.truncate(10)
    arguments = types.SimpleNamespace(resume_from_checkpoint=path, do_train=True, overwrite_output_dir=False, output_dir=str(tmp_path))
    with pytest.raises(ArgumentError, match=r"--resume_from_checkpoint .*checkpoint-4: damaged \(model_state.pdparams has 10 bytes, 10000 were saved\); pass an earlier checkpoint"):
        resume_checkpoint(arguments)
