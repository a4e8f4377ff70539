"""CPU fast paths: each family's hot composites re-expressed with ops Paddle runs fast on CPU, on one model instance.

The building blocks, and the measurements that say why, are in ``paddle_llm.cpu.ops``; each family's
replacements are in its package (``<family>/cpu_fast.py``, named by ``ModelFamily.cpu_fast_paths``). This module
applies a family's to one model; ``models.registry.family_of_model`` finds the family of a model at hand.
"""

from __future__ import annotations

import logging

import paddle
from paddle import nn

from paddle_llm.cpu import kernels as cpu_kernels

logger = logging.getLogger(__name__)


def model_is_on_cpu(model: nn.Layer) -> bool:
    """True when the model's parameters live on CPU (the device check ``apply_cpu_fast_paths`` relies on)."""
    parameters = model.parameters()
    if parameters:
        return parameters[0].place.is_cpu_place()
    return paddle.device.get_device() == "cpu"


def to_static_for_cpu_training(model_or_function):
    """Compile a model (or a loss function) with ``paddle.jit.to_static`` the way that works for these models.

    Apply it after ``apply_cpu_fast_paths``. It uses full-graph (AST) mode: the default bytecode (SOT) mode, which
    PaddleNLP's ``--to_static`` flag uses, fails on the tensor-parallel probe in Llama's LM head. Gradients flow
    through the compiled program, so the optimizer step is unchanged, and the state dict keeps its keys.

    Whether it pays (``benchmarks/cpu_train_speed.py --to_static``): only for tiny models on long runs. On the
    64/2 Llama it removed ~30% of the step (the Python cost of small ops); from 256/4 up it was no faster or slower
    than the fast dygraph paths; and the first call spends ~5 s compiling. So the trainer does not use it by default.

    Args:
        model_or_function: a ``paddle.nn.Layer`` (its ``forward`` is compiled) or a function of tensors.

    Returns:
        The compiled layer or function.
    """
    return paddle.jit.to_static(model_or_function, full_graph=True)


def apply_cpu_fast_paths(model: nn.Layer, family) -> list[str]:
    """Swap in the CPU implementations of a PaddleNLP model's hot composites (its family's ``cpu_fast_paths``).

    Call it once after building (or loading) the model and before training or ``paddle.jit.to_static``. It changes
    only this model instance; the state dict, saved checkpoints and outputs are unchanged (values within 1e-5).

    Args:
        model: a PaddleNLP causal LM of a registered family (or its base model, or a PEFT wrapper of it).
        family: its ``models.registry.ModelFamily`` (None for a model of no known family).

    Returns:
        The replacements made, e.g. ``["llama.rms_norm x9", "llama.attention_rotary_mask x4", ...]``; empty when
        the model is not on CPU, of no family with fast paths, or already converted. Components left to PaddleNLP
        (parallel layouts, flash attention, non-fp32) are logged at INFO level with the reason.
    """
    if not model_is_on_cpu(model):
        return []
    if family is None or family.cpu_fast_paths is None:
        what = "a model of no known family" if family is None else f"a {family.name} model, a family without them"
        logger.info("cpu fast paths: %s is %s; left unchanged", type(model).__name__, what)
        return []
    cpu_kernels.load()  # compile now (once per machine) rather than inside the first training step
    return family.cpu_fast_paths(model)
