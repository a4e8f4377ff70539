"""Run a training layout and compare it with a reference run, step by step.

One implementation for two users: ``tests/integration/test_parallel_equivalence.py`` (every layout against one
process, in CI) and ``paddle-llm selftest`` (the planned layout against one fp32 device, on the user's hardware).
A run writes ``metrics.jsonl`` (``callbacks.MetricsFileCallback``); two runs agree when every step's loss and
gradient norm agree within a relative tolerance. This module imports no Paddle: it builds command lines and reads
files, so the test process and the selftest's coordinating process stay light.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from paddle_llm.trainer.rank_records import rank_records_path

METRICS_FILE = "metrics.jsonl"  # callbacks.METRICS_FILE, named here without importing Paddle
COMPARED_METRICS = ("loss", "grad_norm")
# Variables ``paddle.distributed.launch`` sets for its workers. A one-process run started from inside a launched
# worker (the selftest's reference) drops them, or it would try to join the job as that worker's rank.
LAUNCH_VARIABLES = (
    "PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ENDPOINTS", "PADDLE_CURRENT_ENDPOINT",
    "PADDLE_RANK_IN_NODE", "PADDLE_LOCAL_DEVICE_IDS", "PADDLE_WORLD_DEVICE_IDS", "PADDLE_MASTER", "PADDLE_NNODES",
    "PADDLE_GLOBAL_SIZE", "PADDLE_LOCAL_SIZE", "PADDLE_GLOBAL_RANK", "PADDLE_LOCAL_RANK", "PADDLE_JOB_ID",
    "PADDLE_DISTRI_BACKEND", "PADDLE_TRAINERS", "PADDLE_POD_ID", "PADDLE_CLUSTER_TRAIN",
)


@dataclass(frozen=True)
class Run:
    """One training run: the script (a path, or ``-m module [subcommand]``), its process count and its flags."""

    script: str
    processes: int
    flags: dict = field(default_factory=dict)


def command_line(run: Run, output_dir: str, base_flags: list[str]) -> list[str]:
    """``python``'s arguments for ``run`` (under ``paddle.distributed.launch`` when it has several processes),
    with ``base_flags`` first and ``run.flags`` overriding them; worker logs go to ``OUTPUT_DIR/launch_log``."""
    flags = base_flags + [str(token) for name, value in run.flags.items() for token in (f"--{name}", value)]
    prefix = []
    if run.processes > 1:
        prefix = ["-m", "paddle.distributed.launch", "--nproc_per_node", str(run.processes), "--log_dir", os.path.join(output_dir, "launch_log")]
    script = run.script.split() if run.script.startswith("-m ") else [run.script]
    return prefix + script + flags


def standalone_environment(environment: dict | None = None) -> dict:
    """``environment`` (default: this process's) without the launch variables: a child started with it is a job
    of its own, not a rank of the job this process belongs to."""
    return {name: value for name, value in (os.environ if environment is None else environment).items() if name not in LAUNCH_VARIABLES}


def steps(output_dir: str) -> dict[int, dict]:
    """The training rows of ``OUTPUT_DIR/metrics.jsonl`` by step (evaluation rows left out)."""
    with open(os.path.join(output_dir, METRICS_FILE), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["step"]: row for row in rows if "loss" in row}


def relative_difference(actual: float, expected: float) -> float:
    """``|actual - expected| / |expected|`` (absolute when ``expected`` is 0); inf when either is missing."""
    if actual is None or expected is None:
        return float("inf")
    return abs(actual - expected) / (abs(expected) or 1.0)


@dataclass(frozen=True)
class MetricComparison:
    """One metric of a run against the reference over the compared steps.

    Attributes:
        worst: the largest relative difference; ``worst_step`` is where.
        first_over: the first step whose difference exceeds ``tolerance`` (None: none does).
        missing: compared steps absent from either run.
    """

    metric: str
    tolerance: float
    worst: float
    worst_step: int | None
    first_over: int | None
    missing: tuple[int, ...] = ()

    @property
    def passed(self) -> bool:
        return self.first_over is None and not self.missing

    def describe(self) -> str:
        if self.missing:
            return f"{self.metric}: steps {list(self.missing)} missing"
        where = f" at step {self.worst_step}" if self.worst_step is not None else ""
        first = f", first over at step {self.first_over}" if self.first_over is not None else ""
        return f"{self.metric}: max rel diff {self.worst:.2e}{where}{first} (tolerance {self.tolerance:.0e})"


def compare_metric(actual: dict[int, dict], expected: dict[int, dict], compared_steps, metric: str, tolerance: float) -> MetricComparison:
    """Compare ``metric`` of two runs' ``steps()`` over ``compared_steps``."""
    compared_steps = list(compared_steps)
    missing = tuple(step for step in compared_steps if step not in actual or step not in expected)
    worst, worst_step, first_over = 0.0, None, None
    for step in compared_steps:
        if step in missing:
            continue
        difference = relative_difference(actual[step].get(metric), expected[step].get(metric))
        if worst_step is None or difference > worst:
            worst, worst_step = difference, step
        if difference > tolerance and first_over is None:
            first_over = step
    return MetricComparison(metric, tolerance, worst, worst_step, first_over, missing)


def compare_runs(actual_dir: str, expected_dir: str, compared_steps, tolerance: float, metrics=COMPARED_METRICS) -> list[MetricComparison]:
    """Compare two runs' ``metrics.jsonl``, one ``MetricComparison`` per metric; a run with steps beyond
    ``compared_steps`` counts them as missing from the reference (it trained more than asked)."""
    actual, expected = steps(actual_dir), steps(expected_dir)
    compared_steps = list(compared_steps)
    extra = tuple(sorted(set(actual) - set(compared_steps)))
    comparisons = [compare_metric(actual, expected, compared_steps, metric, tolerance) for metric in metrics]
    if extra:
        comparisons = [MetricComparison(c.metric, c.tolerance, c.worst, c.worst_step, c.first_over, c.missing + extra) for c in comparisons]
    return comparisons


# ---------------------------------------------------------------------------------------------------------------
# Per-rank records: which rank disagreed first
# ---------------------------------------------------------------------------------------------------------------

def read_rank_records(directory: str, world_size: int) -> dict[int, list[dict]]:
    """rank -> its records (``step``, ``local_grad_norm``, ``replica``, ``full_gradients``); a rank whose file is
    missing (another node's disk) maps to an empty list."""
    records = {}
    for rank in range(world_size):
        path = rank_records_path(directory, rank)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                records[rank] = [json.loads(line) for line in f if line.strip()]
        else:
            records[rank] = []
    return records


def first_disagreeing_ranks(records: dict[int, list[dict]], reference: dict[int, dict], tolerance: float) -> str:
    """Which rank disagreed first, in words.

    A rank that holds the whole model's gradients (data parallel alone) must measure the reference's gradient
    norm on its own; ranks holding the same part of the model (data-parallel replicas under tensor parallel or
    sharding) must measure the same norm as each other. The first step where either fails names its ranks.
    """
    by_step: dict[int, dict[int, dict]] = {}
    for rank, rows in records.items():
        for row in rows:
            by_step.setdefault(row["step"], {})[rank] = row
    absent = sorted(rank for rank, rows in records.items() if not rows)
    comparable = False
    for step in sorted(by_step):
        rows = by_step[step]
        whole = {rank: row for rank, row in rows.items() if row["full_gradients"]}
        if whole and step in reference:
            comparable = True
            expected = reference[step]["grad_norm"]
            off = [rank for rank, row in whole.items() if relative_difference(row["local_grad_norm"], expected) > tolerance]
            if off:
                values = ", ".join(f"rank {rank} {whole[rank]['local_grad_norm']:.6g}" for rank in off)
                return f"step {step}: rank {', '.join(map(str, off))} off the reference grad norm {expected:.6g} ({values})"
        replicas: dict[str, list[int]] = {}
        for rank, row in rows.items():
            if not row["full_gradients"]:
                replicas.setdefault(json.dumps(row["replica"]), []).append(rank)
        for ranks in replicas.values():
            if len(ranks) < 2:
                continue
            comparable = True
            values = [rows[rank]["local_grad_norm"] for rank in ranks]
            if max(relative_difference(value, values[0]) for value in values) > tolerance:
                shown = ", ".join(f"rank {rank} {rows[rank]['local_grad_norm']:.6g}" for rank in ranks)
                return f"step {step}: replicas of one model part disagree ({shown})"
    missing = f"; no records from rank {', '.join(map(str, absent))} (put --output_dir on storage every node sees)" if absent else ""
    if not comparable:
        return "not attributable: no two ranks of this layout hold the same gradients" + missing
    return "every rank agreed with the reference and its replicas" + missing
