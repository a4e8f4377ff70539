"""The per-rank records a run started by ``paddle-llm selftest`` writes, and the test-only faults it injects.

The run side (``selftest_probe.RankRecordCallback``) and the reading side (``tools.equivalence``) share these names;
this module imports no Paddle, so the selftest's coordinating process stays light.
"""

from __future__ import annotations

import os

# Set by ``paddle-llm selftest`` in the environment of the runs it starts: a directory where each rank appends one
# line per optimizer step (``selftest_probe.RankRecordCallback``).
RECORDS_VARIABLE = "PADDLE_LLM_SELFTEST_RECORDS"
# Test-only: a fault the selftest must catch (``tests/integration/test_selftest.py``). Never set it for a real run.
FAULT_VARIABLE = "PADDLE_LLM_SELFTEST_FAULT"
FAULTS = {
    "allreduce": "every gradient the last rank gets from the all-reduce is off by 5% of its mean magnitude",
    "shard": "the last model shard of the saved checkpoint has one tensor off by 1e-2",
    "kernel": "every fused kernel's output is off by 1e-3 relative",
}


def injected_fault() -> str | None:
    """The test-only fault named by ``PADDLE_LLM_SELFTEST_FAULT`` (None when unset).

    Raises:
        ValueError: an unknown fault name.
    """
    fault = os.environ.get(FAULT_VARIABLE) or None
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"{FAULT_VARIABLE}={fault!r} is not a fault the selftest knows: use one of {', '.join(FAULTS)}")
    return fault


def rank_records_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}.jsonl")
