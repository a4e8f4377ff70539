"""Memory estimator and layout planner: pure functions over model shapes and training setups.

The trainer prints an estimate before the first step with::

    from paddle_llm.estimator import estimate_training_memory, format_estimate
    print(format_estimate(estimate_training_memory(config_fields, method="lora", precision="bf16", ...)))

or, from its flags, with the out-of-memory warning and the planner's suggestion::

    from paddle_llm.estimator import setup_from_flags, shape_of, startup_report
    print(startup_report(shape_of(config_fields), setup_from_flags(flags), model_name_or_path))

``paddle-llm estimate`` (``command.main``) is the CLI; ``measure`` checks the estimates against real CPU runs.
"""

from paddle_llm.estimator.deepspeed_compat import zero2_model_states, zero3_model_states
from paddle_llm.estimator.flags import flags_for_setup, setup_from_flags
from paddle_llm.estimator.memory import (
    DeviceMemory,
    MemoryEstimate,
    TrainingSetup,
    estimate,
    estimate_training_memory,
    format_estimate,
    shape_of,
)
from paddle_llm.estimator.planner import CostModel, Plan, plan_layouts, startup_report
from paddle_llm.estimator.shapes import ModelShape, parse_count, shape_from_config, shape_from_num_params

__all__ = [
    "CostModel",
    "DeviceMemory",
    "MemoryEstimate",
    "ModelShape",
    "Plan",
    "TrainingSetup",
    "estimate",
    "estimate_training_memory",
    "flags_for_setup",
    "format_estimate",
    "parse_count",
    "plan_layouts",
    "setup_from_flags",
    "shape_from_config",
    "shape_from_num_params",
    "shape_of",
    "startup_report",
    "zero2_model_states",
    "zero3_model_states",
]
