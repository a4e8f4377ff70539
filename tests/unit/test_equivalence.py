"""The comparison behind the parallel-equivalence tests and ``paddle-llm selftest``: metrics and per-rank records."""

from __future__ import annotations

import json

import pytest

from paddle_llm.trainer.rank_records import FAULT_VARIABLE, injected_fault, rank_records_path
from paddle_llm.tools.equivalence import (
    Run,
    command_line,
    compare_metric,
    compare_runs,
    first_disagreeing_ranks,
    read_rank_records,
    standalone_environment,
)

REFERENCE = {1: {"loss": 7.0, "grad_norm": 2.0}, 2: {"loss": 6.0, "grad_norm": 1.5}, 3: {"loss": 5.0, "grad_norm": 1.0}}


def test_compare_metric_finds_the_worst_and_the_first_step_over_tolerance():
    actual = {1: {"loss": 7.0}, 2: {"loss": 6.0 * (1 + 2e-5)}, 3: {"loss": 5.0 * (1 + 5e-5)}}
    comparison = compare_metric(actual, REFERENCE, [1, 2, 3], "loss", 1e-5)
    assert not comparison.passed
    assert comparison.first_over == 2 and comparison.worst_step == 3
    assert comparison.worst == pytest.approx(5e-5)
    assert compare_metric(actual, REFERENCE, [1], "loss", 1e-5).passed


def test_missing_and_extra_steps_fail(tmp_path):
    for name, rows in (("short", [REFERENCE[1]]), ("long", list(REFERENCE.values()) + [{"loss": 4.0, "grad_norm": 1.0}]), ("reference", REFERENCE.values())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, **row}) + "\n" for i, row in enumerate(rows)))
    short = compare_runs(str(tmp_path / "short"), str(tmp_path / "reference"), [1, 2, 3], 1e-5)
    assert [c.missing for c in short] == [(2, 3), (2, 3)] and not any(c.passed for c in short)
    long = compare_runs(str(tmp_path / "long"), str(tmp_path / "reference"), [1, 2, 3], 1e-5)
    assert [c.missing for c in long] == [(4,), (4,)]
    assert all(c.passed for c in compare_runs(str(tmp_path / "reference"), str(tmp_path / "reference"), [1, 2, 3], 0.0))


def _records(tmp_path, per_rank: dict[int, list[tuple[float, dict, bool]]]):
    for rank, rows in per_rank.items():
        with open(rank_records_path(str(tmp_path), rank), "w") as f:
            for step, (norm, replica, full) in enumerate(rows, start=1):
                f.write(json.dumps({"step": step, "local_grad_norm": norm, "replica": replica, "full_gradients": full}) + "\n")
    return read_rank_records(str(tmp_path), max(per_rank) + 1)


def test_data_parallel_rank_off_the_reference_is_named(tmp_path):
    records = _records(tmp_path, {0: [(2.0, {}, True), (1.5, {}, True)], 1: [(2.0, {}, True), (1.6, {}, True)]})
    assert first_disagreeing_ranks(records, REFERENCE, 1e-5).startswith("step 2: rank 1 off the reference grad norm 1.5")


def test_replicas_of_one_model_part_must_agree(tmp_path):
    # tensor parallel 2 x data parallel 2: ranks 0 and 2 hold tensor rank 0, ranks 1 and 3 tensor rank 1
    part = [{"tensor": 0}, {"tensor": 1}]
    records = _records(tmp_path, {
        0: [(1.0, part[0], False)], 1: [(1.2, part[1], False)], 2: [(1.0, part[0], False)], 3: [(1.3, part[1], False)],
    })
    assert first_disagreeing_ranks(records, REFERENCE, 1e-5) == "step 1: replicas of one model part disagree (rank 1 1.2, rank 3 1.3)"


def test_unattributable_layouts_and_missing_ranks_say_so(tmp_path):
    records = _records(tmp_path, {0: [(1.0, {"tensor": 0}, False)]})
    records[1] = []
    message = first_disagreeing_ranks(records, REFERENCE, 1e-5)
    assert message.startswith("not attributable") and "no records from rank 1" in message


def test_command_line_and_standalone_environment():
    run = Run("-m paddle_llm pretrain", 2, {"sharding": "stage2"})
    assert command_line(run, "out", ["--device", "cpu"]) == [
        "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", "out/launch_log",
        "-m", "paddle_llm", "pretrain", "--device", "cpu", "--sharding", "stage2",
    ]
    assert command_line(Run("run.py", 1), "out", []) == ["run.py"]
    environment = standalone_environment({"PADDLE_TRAINER_ID": "1", "PADDLE_TRAINERS_NUM": "2", "PADDLE_LLM_VERBOSE": "1", "PATH": "/bin"})
    assert environment == {"PADDLE_LLM_VERBOSE": "1", "PATH": "/bin"}


def test_injected_fault_names_are_checked(monkeypatch):
    monkeypatch.delenv(FAULT_VARIABLE, raising=False)
    assert injected_fault() is None
    monkeypatch.setenv(FAULT_VARIABLE, "shard")
    assert injected_fault() == "shard"
    monkeypatch.setenv(FAULT_VARIABLE, "disk")
    with pytest.raises(ValueError, match="allreduce, shard, kernel"):
        injected_fault()
