"""Fused kernels against the composed ops they replace: forward values and input gradients, on this machine.

``paddle-llm selftest`` runs the cases a planned run will use: on GPU the kernels its flags ask for
(``--use_fused_rms_norm``, ``--use_flash_attention``, ``--use_fused_rope``), in its precision; on CPU the fused C++
kernels every fp32 CPU run uses (``cpu_ops``: RMSNorm, SwiGLU, the attention softmax). A build that lacks a kernel,
or computes it wrongly (flash attention on a card it does not support), fails its case here rather than hours
into a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import paddle
import paddle.nn.functional as F
from paddle.incubate.nn.functional import fused_rms_norm, fused_rotary_position_embedding
from paddle.nn.functional.flash_attention import flash_attention

from paddle_llm.cpu import kernels as cpu_kernels
from paddle_llm.cpu import ops as cpu_ops

EPSILON = 1e-6
BATCH, SEQUENCE, HEADS, HEAD_DIM = 2, 16, 4, 16
HIDDEN = HEADS * HEAD_DIM
# Largest relative difference (max |fused - composed| / max |composed|, over the output and every input gradient)
# each precision allows: fp32 kernels only reorder sums; half precision rounds every intermediate to 8 or 11 bits.
TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}


@dataclass(frozen=True)
class KernelCase:
    """One fused kernel: its name, what asks for it, and ``inputs -> output`` for the fused and composed forms."""

    name: str
    asked_by: str
    shapes: tuple[tuple[int, ...], ...]
    fused: Callable
    composed: Callable


def _composed_rms_norm(x, weight):
    return paddle.rsqrt(paddle.square(x).mean(-1, keepdim=True) + EPSILON) * x * weight


def _composed_swiglu(gate, up):
    return gate * F.sigmoid(gate) * up


def _causal_mask(dtype) -> paddle.Tensor:
    return cpu_ops.additive_upper_triangle_mask(BATCH, SEQUENCE, SEQUENCE, dtype)


def _composed_attention(query, key, value):
    """Causal softmax attention over ``[b, heads, s, d]``."""
    scores = paddle.matmul(query, key, transpose_y=True) / HEAD_DIM**0.5 + _causal_mask(query.dtype)
    return paddle.matmul(F.softmax(scores.astype("float32"), axis=-1).astype(query.dtype), value)


def _cpu_attention(query, key, value):
    return cpu_ops.masked_attention(query, key, value, _causal_mask(query.dtype), query_scale=HEAD_DIM**-0.5)[0]


def _flash_attention(query, key, value):
    """Paddle's flash attention, which takes ``[b, s, heads, d]``."""
    output = flash_attention(query.transpose([0, 2, 1, 3]), key.transpose([0, 2, 1, 3]), value.transpose([0, 2, 1, 3]), causal=True)[0]
    return output.transpose([0, 2, 1, 3])


def _first(result):
    return result[0] if isinstance(result, (tuple, list)) else result


def _fused_rms_norm(x, weight):
    return _first(fused_rms_norm(x, weight, None, EPSILON, begin_norm_axis=x.ndim - 1))


def _rotary_tables(dtype) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Llama's cos/sin tables, ``[1, s, 1, d]``, each half repeated (the rotate-half layout)."""
    inverse = 1.0 / (10000 ** (paddle.arange(0, HEAD_DIM, 2, dtype="float32") / HEAD_DIM))
    angles = paddle.outer(paddle.arange(SEQUENCE, dtype="float32"), inverse)
    angles = paddle.concat([angles, angles], axis=-1)[None, :, None, :]
    return paddle.cos(angles).astype(dtype), paddle.sin(angles).astype(dtype)


def _composed_rope(query, key):
    cos, sin = _rotary_tables(query.dtype)

    def rotate(x):
        first, second = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
        return x * cos + paddle.concat([-second, first], axis=-1) * sin

    return paddle.concat([rotate(query), rotate(key)], axis=-1)


def _fused_rope(query, key):
    cos, sin = _rotary_tables(query.dtype)
    rotated_query, rotated_key, _ = fused_rotary_position_embedding(query, key, None, sin=sin, cos=cos, use_neox_rotary_style=False)
    return paddle.concat([rotated_query, rotated_key], axis=-1)


_ATTENTION_SHAPES = ((BATCH, HEADS, SEQUENCE, HEAD_DIM),) * 3
_ROPE_SHAPES = ((BATCH, SEQUENCE, HEADS, HEAD_DIM),) * 2
_NORM_SHAPES = ((BATCH, SEQUENCE, HIDDEN), (HIDDEN,))
CPU_CASES = (
    KernelCase("rms_norm (cpu_kernels)", "every fp32 CPU run", _NORM_SHAPES, lambda x, w: cpu_ops.rms_norm(x, w, EPSILON), _composed_rms_norm),
    KernelCase("swiglu (cpu_kernels)", "every fp32 CPU run", ((BATCH, SEQUENCE, HIDDEN),) * 2, cpu_ops.swiglu, _composed_swiglu),
    KernelCase("attention softmax (cpu_kernels)", "every fp32 CPU run", _ATTENTION_SHAPES, _cpu_attention, _composed_attention),
)
GPU_CASES = {
    "use_fused_rms_norm": KernelCase("fused_rms_norm", "--use_fused_rms_norm", _NORM_SHAPES, _fused_rms_norm, _composed_rms_norm),
    "use_flash_attention": KernelCase("flash_attention", "--use_flash_attention", _ATTENTION_SHAPES, _flash_attention, _composed_attention),
    "use_fused_rope": KernelCase("fused_rotary_position_embedding", "--use_fused_rope", _ROPE_SHAPES, _fused_rope, _composed_rope),
}


def cases_for(values: dict, device: str) -> list[KernelCase]:
    """The kernels a run with flag ``values`` uses on ``device`` ("cpu" or "gpu")."""
    if device == "cpu":
        return list(CPU_CASES)
    return [case for flag, case in GPU_CASES.items() if values.get(flag)]


def cpu_kernels_built() -> bool:
    """Whether the CPU cases compare compiled kernels (else ``cpu_ops`` runs its composites: nothing to compare)."""
    return cpu_kernels.load() is not None


def _output_and_gradients(function: Callable, inputs: list[paddle.Tensor], cotangent_seed: int) -> list[paddle.Tensor]:
    leaves = [tensor.detach().clone() for tensor in inputs]
    for leaf in leaves:
        leaf.stop_gradient = False
    output = function(*leaves)
    paddle.seed(cotangent_seed)
    (output * paddle.randn(output.shape).astype(output.dtype)).sum().backward()
    return [output.detach()] + [leaf.grad for leaf in leaves]


def measure(case: KernelCase, dtype: str, distortion: float = 0.0) -> float:
    """The largest relative difference between ``case``'s fused and composed forms over the output and the input
    gradients (random inputs, seed 0). ``distortion`` scales the fused output by ``1 + distortion``: the selftest's
    test-only kernel fault."""
    paddle.seed(0)
    inputs = [paddle.randn(shape).astype(dtype) for shape in case.shapes]
    fused = case.fused if not distortion else (lambda *tensors: case.fused(*tensors) * (1.0 + distortion))
    worst = 0.0
    for got, expected in zip(_output_and_gradients(fused, inputs, 1), _output_and_gradients(case.composed, inputs, 1)):
        got, expected = got.astype("float32"), expected.astype("float32")
        scale = float(expected.abs().max()) or 1.0
        worst = max(worst, float((got - expected).abs().max()) / scale)
    return worst
