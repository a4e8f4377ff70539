"""What a training run started by ``paddle-llm selftest`` records per rank, and the test-only gradient fault.

``add_run_callbacks`` adds ``RankRecordCallback`` only when the selftest set ``rank_records.RECORDS_VARIABLE`` in the
run's environment, so other runs never pay for it.
"""

from __future__ import annotations

import json
import os

import paddle
from paddle.distributed import fleet
from paddlenlp.trainer import TrainerCallback

from paddle_llm.trainer.callbacks import global_grad_norm
from paddle_llm.trainer.rank_records import RECORDS_VARIABLE, injected_fault, rank_records_path

# rank_records.FAULTS["allreduce"]: an offset, not a scale, because Adam's update ignores a gradient's scale.
GRADIENT_FAULT_OFFSET = 0.05


def _replica() -> tuple[dict, bool]:
    """This rank's part of the model (tensor, pipeline and sharding coordinates) and whether it holds whole
    gradients (data parallel alone)."""
    try:
        hcg = fleet.get_hybrid_communicate_group()
    except AssertionError:  # fleet's public getter asserts when fleet.init never ran (one process)
        return {}, True
    replica = {
        "tensor": hcg.get_model_parallel_rank(),
        "pipeline": hcg.get_stage_id(),
        "sharding": hcg.get_sharding_parallel_rank(),
    }
    degrees = (hcg.get_model_parallel_world_size(), hcg.get_pipe_parallel_world_size(), hcg.get_sharding_parallel_world_size())
    return replica, degrees == (1, 1, 1)


class RankRecordCallback(TrainerCallback):
    """Appends ``{step, local_grad_norm, replica, full_gradients}`` per optimizer step to this rank's file.

    The local norm is over the gradients this rank holds when the optimizer starts: after the data-parallel
    all-reduce, so replicas must agree, and under data parallel alone it must equal the reference's norm.
    """

    def __init__(self, directory: str, fault: str | None):
        self.directory = directory
        self.fault = fault
        self.local_grad_norm: float | None = None

    def on_optimizer_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        parameters = [parameter for parameter in model.parameters() if parameter.grad is not None]
        rank, world = paddle.distributed.get_rank(), paddle.distributed.get_world_size()
        if self.fault == "allreduce" and world > 1 and rank == world - 1:
            with paddle.no_grad():
                for parameter in parameters:
                    parameter.grad.add_(GRADIENT_FAULT_OFFSET * parameter.grad.abs().mean())
        self.local_grad_norm = global_grad_norm(parameters)

    def on_step_end(self, args, state, control, **kwargs):
        if self.local_grad_norm is None:
            return
        replica, full = _replica()
        row = {"step": state.global_step, "local_grad_norm": self.local_grad_norm, "replica": replica, "full_gradients": full}
        os.makedirs(self.directory, exist_ok=True)
        with open(rank_records_path(self.directory, paddle.distributed.get_rank()), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.local_grad_norm = None


def selftest_callbacks() -> list[TrainerCallback]:
    """The selftest's callbacks for this run: none unless ``paddle-llm selftest`` started it."""
    directory = os.environ.get(RECORDS_VARIABLE)
    return [RankRecordCallback(directory, injected_fault())] if directory else []
