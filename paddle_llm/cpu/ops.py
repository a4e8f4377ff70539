"""The building blocks of the CPU fast paths: the hot composites of PaddleNLP's models, fast on CPU and equal in value.

Why this exists: PaddleNLP writes these models for GPU, where every composite below is a fused kernel. On CPU,
Paddle 3.3.1's dygraph kernels for a few innocuous ops cost 10-100x the arithmetic they do. Measured on
[8, 128, 256] fp32 (swiglu: [8, 128, 688], gelu: [8, 128, 1024]), one thread, with ``configure_cpu_runtime``'s heap
setting (``benchmarks/cpu_train_speed.py`` times whole models):

========================================================  ==========  =============================================
op                                                        Paddle      what we use instead
========================================================  ==========  =============================================
``x.pow(2)`` forward                                      3.5 ms      ``paddle.square(x)``: 0.03 ms
``x * w`` (w [hidden]) forward + backward                 2.9 ms      hand-written backward; w's grad is a ones-row
                                                                      matrix-vector product: 0.03 ms
``q * cos`` (cos [1, s, 1, d]) forward + backward         3.2 ms      expand cos, then a same-shape multiply: 0.3 ms
``scores + mask`` (mask [b, 1, s, s]) forward             3.6 ms      expand the mask, then a same-shape add: 0.2 ms
rotate-half (slice, negate, concat) forward + backward    6.3 ms      roll with a sign-folded sin: 0.5 ms
``swiglu`` / ``gelu`` / ``layer_norm`` forward + backward 5.2 / 3.2   backwards written with same-shape elementwise
                                                          / 2.6 ms    ops (~0.05 ms each)
key/value ``tile`` for grouped heads, forward + backward  0.7 ms      none: grouped query heads share one matmul
========================================================  ==========  =============================================

So each composite is re-expressed with ops Paddle runs fast on CPU (square, same-shape elementwise, expand, roll,
matmul), and where autograd would pick a slow grad kernel, a ``PyLayer`` carries a hand-written backward.

Even the fast ops are one pass over memory each, on one thread. So RMSNorm, SwiGLU, the halves-swap rotary, the
masked attention softmax and the token cross entropy also exist as fused C++ kernels (``cpu/kernels.cc``: one
vectorised, multi-threaded pass per forward and per backward), compiled on first use. They are used whenever they
could be built; otherwise, or with ``PADDLE_LLM_CPU_KERNELS=0``, the pure-Paddle composites above run instead.
Alternating steps in one process on 2 cores, the kernels took a 64/2 Llama step from 42.6 to 37.7 ms and a 256/4
step from 232 to 185 ms. ChatGLM-6B's LayerNorm and GELU and ChatGLM2's pair rotary have no kernel.

Each family's package puts these together for its layers (``<family>/cpu_fast.py``), and
``paddle_llm.cpu.fast_paths.apply_cpu_fast_paths(model)`` applies them: it swaps bound ``forward`` methods and
sub-layers on one model instance: PaddleNLP's
classes and module globals are never touched, so a GPU model, or a second model in the same process, keeps
PaddleNLP's code. It does nothing unless the model's parameters live on CPU, and each replacement is made only for
the configurations it reproduces exactly (no tensor or sequence parallelism, no flash attention, fp32); anything
else keeps PaddleNLP's implementation and is logged. Forward values and gradients equal PaddleNLP's within 1e-5
(``tests/unit/test_cpu_fast.py``).

Under ``paddle.jit.to_static`` (``to_static_for_cpu_training``) the PyLayers are not used: Paddle 3.3.1's static
PyLayer segfaults on some of them and rejects a None gradient on others, so the static graph gets the same forward
maths as plain ops and Paddle's static autograd writes the backward. Compiling pays only for tiny models (see
``to_static_for_cpu_training``).

Process-wide CPU settings (threads, MKL's code path, the heap, Paddle's strided views) are not here: they live in
``paddle_llm.cpu.threads.configure_cpu_runtime`` because they must run before the first matrix multiply.
"""

from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass
from typing import Callable

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn
from paddle.autograd import PyLayer

from paddle_llm.cpu import kernels as cpu_kernels

logger = logging.getLogger(__name__)

# The replacements restate PaddleNLP's forwards, so they were checked against these versions (the unit tests compare
# them with the installed PaddleNLP's forwards, and one test fails when these stop matching the installed ones).
VERIFIED_VERSIONS = {"paddlepaddle": "3.3.1", "paddlenlp": "3.0.0b4"}

# Marks a layer whose forward (or a model whose sub-layer) was replaced, so applying twice changes nothing.
REPLACED_MARK = "_paddle_llm_cpu_fast_path"

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC_COEFFICIENT = 0.044715


# ---------------------------------------------------------------------------------------------------------------
# Building blocks: fast on CPU, numerically equal to PaddleNLP's composites.
# ---------------------------------------------------------------------------------------------------------------


def _column_sum(values: paddle.Tensor) -> paddle.Tensor:
    """Sum ``[..., features]`` over every leading axis, giving ``[features]``.

    A ones-row matrix-vector product, because MKL's GEMV is ~10x faster than Paddle's CPU reduce over leading axes.
    """
    rows = values.reshape([-1, values.shape[-1]])
    ones = paddle.ones([1, rows.shape[0]], dtype=rows.dtype)
    return paddle.matmul(ones, rows).reshape([values.shape[-1]])


class _RMSNormFunction(PyLayer):
    """``x * rsqrt(mean(x^2) + eps) * weight`` with a hand-written backward.

    Autograd would use pow's grad and the broadcast-multiply grad of ``* weight``, the two slowest kernels in a
    PaddleNLP Llama step on CPU. The forward repeats PaddleNLP's operation order, so its values are identical.
    """

    @staticmethod
    def forward(ctx, x, weight, epsilon):
        inverse_rms = paddle.rsqrt(paddle.square(x).mean(-1, keepdim=True) + epsilon)
        normalized = inverse_rms * x
        ctx.save_for_backward(normalized, inverse_rms, weight)
        ctx.needs_grad = (not x.stop_gradient, not weight.stop_gradient)
        return normalized * weight

    @staticmethod
    def backward(ctx, grad_output):
        normalized, inverse_rms, weight = ctx.saved_tensor()
        grad_x = grad_weight = None
        if ctx.needs_grad[0]:
            grad_normalized = grad_output * weight
            projection = (grad_normalized * normalized).mean(-1, keepdim=True)
            grad_x = inverse_rms * (grad_normalized - normalized * projection)
        if ctx.needs_grad[1]:
            grad_weight = _column_sum(grad_output * normalized)
        return grad_x, grad_weight


def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, epsilon: float) -> paddle.Tensor:
    """RMSNorm over the last axis, as PaddleNLP's ``LlamaRMSNorm`` and ChatGLM2's ``RMSNorm`` compute it in fp32."""
    if not paddle.in_dynamic_mode():  # to_static: plain ops, see the module docstring
        return paddle.rsqrt(paddle.square(x).mean(-1, keepdim=True) + epsilon) * x * weight
    kernels = cpu_kernels.load()
    if kernels is not None:
        return kernels.paddle_llm_rms_norm(x, weight, epsilon)[0]
    return _RMSNormFunction.apply(x, weight, epsilon)


class _LayerNormFunction(PyLayer):
    """Paddle's own ``layer_norm`` forward, with a backward built from fast ops.

    Paddle's CPU ``layer_norm`` grad kernel takes 2.3 ms on [8, 128, 256]; this one ~0.6 ms. The statistics are
    recomputed in the backward because the Python API does not return the forward's mean and variance.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon):
        ctx.save_for_backward(x, weight, bias)
        ctx.epsilon = epsilon
        return F.layer_norm(x, x.shape[-1:], weight, bias, epsilon)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias = ctx.saved_tensor()
        centered = x - x.mean(-1, keepdim=True)
        inverse_std = paddle.rsqrt(paddle.square(centered).mean(-1, keepdim=True) + ctx.epsilon)
        normalized = centered * inverse_std
        grad_x = grad_weight = grad_bias = None
        if not x.stop_gradient:
            grad_normalized = grad_output * weight
            grad_x = inverse_std * (
                grad_normalized
                - grad_normalized.mean(-1, keepdim=True)
                - normalized * (grad_normalized * normalized).mean(-1, keepdim=True)
            )
        if not weight.stop_gradient:
            grad_weight = _column_sum(grad_output * normalized)
        if not bias.stop_gradient:
            grad_bias = _column_sum(grad_output)
        return grad_x, grad_weight, grad_bias


def layer_norm(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor, epsilon: float) -> paddle.Tensor:
    """LayerNorm over the last axis (ChatGLM-6B's norm), with a fast CPU backward."""
    if not paddle.in_dynamic_mode():  # to_static: plain ops, see the module docstring
        return F.layer_norm(x, x.shape[-1:], weight, bias, epsilon)
    return _LayerNormFunction.apply(x, weight, bias, epsilon)


class _SwiGLUFunction(PyLayer):
    """``silu(gate) * up``; Paddle's CPU ``swiglu`` kernel spends 3.5 ms in its backward on [8, 128, 672]."""

    @staticmethod
    def forward(ctx, gate, up):
        sigmoid = F.sigmoid(gate)
        silu = gate * sigmoid
        ctx.save_for_backward(gate, up, sigmoid, silu)
        return silu * up

    @staticmethod
    def backward(ctx, grad_output):
        gate, up, sigmoid, silu = ctx.saved_tensor()
        grad_gate = grad_up = None
        if not gate.stop_gradient:  # d silu / d gate = sigmoid * (1 + gate * (1 - sigmoid))
            grad_gate = grad_output * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        if not up.stop_gradient:
            grad_up = grad_output * silu
        return grad_gate, grad_up


def swiglu(gate: paddle.Tensor, up: paddle.Tensor) -> paddle.Tensor:
    """SwiGLU's gated product ``silu(gate) * up`` (Llama's and ChatGLM2's MLP)."""
    if not paddle.in_dynamic_mode():  # to_static: plain ops, see the module docstring
        return gate * F.sigmoid(gate) * up
    kernels = cpu_kernels.load()
    if kernels is not None:
        return kernels.paddle_llm_swiglu(gate, up)
    return _SwiGLUFunction.apply(gate, up)


class _TanhGELUFunction(PyLayer):
    """Paddle's tanh-approximated GELU forward, with a backward from fast ops (Paddle's: 2.5 ms on 1M values)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.gelu(x, approximate=True)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensor()
        x_squared = paddle.square(x)
        tanh_inner = paddle.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC_COEFFICIENT * x_squared * x))
        derivative = 0.5 * (1.0 + tanh_inner) + 0.5 * x * (1.0 - paddle.square(tanh_inner)) * _SQRT_2_OVER_PI * (
            1.0 + 3.0 * _GELU_CUBIC_COEFFICIENT * x_squared
        )
        return grad_output * derivative


def tanh_gelu(x: paddle.Tensor) -> paddle.Tensor:
    """``F.gelu(x, approximate=True)`` (ChatGLM-6B's MLP activation) with a fast CPU backward."""
    if not paddle.in_dynamic_mode():  # to_static: plain ops, see the module docstring
        return F.gelu(x, approximate=True)
    return _TanhGELUFunction.apply(x)


# Rotary embedding. Every variant here is "x * cos + rotate(x) * sin", where rotate() moves each rotated value to
# its partner's slot and negates one of the two. We fold that negation into a precomputed sin ("sign-folded sin"),
# so rotate() becomes a pure permutation that is its own inverse: the backward is then the same two multiplies and
# the same permutation, with no slice or concat (whose CPU grads are slow). cos and sin are expanded to x's shape
# before multiplying because Paddle's CPU broadcasting multiply is ~10x slower than an expand plus a same-shape one.


@dataclass(frozen=True)
class HalvesSwap:
    """Swap the two halves of each of ``blocks`` equal blocks of the last axis (Llama: 1 block, ChatGLM-6B: 2)."""

    blocks: int = 1

    def __call__(self, x: paddle.Tensor) -> paddle.Tensor:
        width = x.shape[-1] // (2 * self.blocks)
        blocked = x.reshape(x.shape[:-1] + [self.blocks, 2, width])
        return paddle.roll(blocked, shifts=1, axis=-2).reshape(x.shape)


swap_halves = HalvesSwap(blocks=1)


def pair_swap_matrix(head_dim: int, rotary_dim: int) -> paddle.Tensor:
    """The permutation matrix that swaps neighbours (0<->1, 2<->3, ...) within the first ``rotary_dim`` features.

    ChatGLM2 rotates interleaved pairs. Swapping a pair along the last axis with roll/flip/gather costs 0.5-2.5 ms
    on CPU; a matmul with this 0/1 matrix costs 0.3 ms and is exact (one product by 1, the rest by 0).
    """
    features = np.arange(rotary_dim)
    permutation = np.zeros([head_dim, head_dim], dtype="float32")
    permutation[features ^ 1, features] = 1.0
    return paddle.to_tensor(permutation)


def swap_pairs(x: paddle.Tensor, permutation: paddle.Tensor) -> paddle.Tensor:
    """Swap interleaved feature pairs with a permutation matrix from ``pair_swap_matrix``."""
    return paddle.matmul(x, permutation)


class _RotaryFunction(PyLayer):
    """``x * cos + swap(x) * sin`` for a self-inverse permutation ``swap``, with its two-multiply backward."""

    @staticmethod
    def forward(ctx, x, cos, sin, swap):
        ctx.save_for_backward(cos, sin)
        ctx.swap = swap
        return x * cos + swap(x) * sin

    @staticmethod
    def backward(ctx, grad_output):
        cos, sin = ctx.saved_tensor()
        # swap is a permutation and its own inverse, so its transpose is itself.
        return grad_output * cos + ctx.swap(grad_output * sin), None, None


def apply_rotary(x: paddle.Tensor, cos: paddle.Tensor, sign_folded_sin: paddle.Tensor, swap: Callable) -> paddle.Tensor:
    """Rotate ``x [d0, d1, heads, head_dim]`` by position; ``cos`` and ``sign_folded_sin`` are ``[d0 or 1, d1, 1,
    head_dim]``, shared by the heads."""
    kernels = cpu_kernels.load() if paddle.in_dynamic_mode() and isinstance(swap, HalvesSwap) else None
    if kernels is not None:
        return kernels.paddle_llm_rotary(x, cos.squeeze(2), sign_folded_sin.squeeze(2), swap.blocks)
    cos, sign_folded_sin = cos.expand(x.shape), sign_folded_sin.expand(x.shape)
    if not paddle.in_dynamic_mode():  # to_static: plain ops, see the module docstring
        return x * cos + swap(x) * sign_folded_sin
    return _RotaryFunction.apply(x, cos, sign_folded_sin, swap)


def sign_folded_sin_halves(sin: paddle.Tensor) -> paddle.Tensor:
    """Negate the first half of the last axis: rotate-half's ``[-x2, x1]`` becomes ``swap_halves(x) * sin``."""
    half = sin.shape[-1] // 2
    signs = paddle.concat([-paddle.ones([half], dtype=sin.dtype), paddle.ones([half], dtype=sin.dtype)])
    return sin * signs


def additive_upper_triangle_mask(batch: int, query_length: int, key_length: int, dtype) -> paddle.Tensor:
    """PaddleNLP's default causal mask when none is passed (``get_triangle_upper_mask``), built directly."""
    mask = paddle.full([batch, 1, query_length, key_length], paddle.finfo(dtype).min, dtype=dtype)
    mask = paddle.triu(mask, diagonal=1)
    mask.stop_gradient = True
    return mask


def masked_attention(
    query: paddle.Tensor,
    key: paddle.Tensor,
    value: paddle.Tensor,
    additive_mask: paddle.Tensor,
    *,
    query_scale: float = 1.0,
    score_scale: float = 1.0,
    score_multiplier: float | None = None,
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Softmax attention over ``[batch, heads, seq, head_dim]`` tensors, with grouped key/value heads.

    Scores are ``((query * query_scale) @ key^T) * score_scale [* score_multiplier] + additive_mask``, the three
    families' orders of operations. Key/value heads shared by several query heads (GQA, ChatGLM2's multi-query) are
    not repeated: the query heads of a group are stacked along the sequence axis instead, so one matmul serves the
    group and there is no tile, whose CPU backward is a slow reduce.

    Args:
        query: ``[b, query_heads, s, d]``.
        key, value: ``[b, kv_heads, s_kv, d]``; ``query_heads`` is a multiple of ``kv_heads``.
        additive_mask: 0 where attention is allowed, a large negative number elsewhere; broadcastable to
            ``[b, query_heads, s, s_kv]``. It is expanded, not broadcast, because Paddle's CPU broadcasting add is
            ~20x slower than an expand plus a same-shape add.
        query_scale, score_scale, score_multiplier: see above; 1.0 / None skip the multiply.

    Returns:
        ``(context [b, query_heads, s, d], probabilities [b, query_heads, s, s_kv])``.
    """
    batch, query_heads, query_length, head_dim = query.shape
    kv_heads, key_length = key.shape[1], key.shape[2]
    group = query_heads // kv_heads
    if query_scale != 1.0:
        query = query * query_scale
    grouped_query = query.reshape([batch, kv_heads, group * query_length, head_dim])
    scores = paddle.matmul(grouped_query, key, transpose_y=True).reshape([batch, query_heads, query_length, key_length])
    if score_scale != 1.0:
        scores = scores * score_scale
    if score_multiplier is not None:
        scores = scores * score_multiplier
    probabilities = _masked_softmax(scores, additive_mask)
    grouped_probabilities = probabilities.reshape([batch, kv_heads, group * query_length, key_length])
    context = paddle.matmul(grouped_probabilities, value).reshape([batch, query_heads, query_length, head_dim])
    return context, probabilities


def attention_in_projection_layout(
    query: paddle.Tensor,
    key: paddle.Tensor,
    value: paddle.Tensor,
    additive_mask: paddle.Tensor,
    *,
    sequence_first: bool = False,
    query_scale: float = 1.0,
    score_scale: float = 1.0,
    score_multiplier: float | None = None,
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``masked_attention`` on heads as the projections lay them out: ``[b, s, heads, d]`` (Llama), or
    ``[s, b, heads, d]`` with ``sequence_first`` (ChatGLM, ChatGLM2).

    Returns ``(context in the same layout, probabilities [b, query_heads, s, s_kv])``. The compiled attention kernel
    reads every head in place and applies the three scales as one; without it the heads are transposed for
    ``masked_attention`` and back.
    """
    batch, query_length = (query.shape[1], query.shape[0]) if sequence_first else query.shape[:2]
    key_length = key.shape[0] if sequence_first else key.shape[1]
    kernels = cpu_kernels.load() if paddle.in_dynamic_mode() else None
    if (
        kernels is not None
        and hasattr(kernels, "paddle_llm_attention")  # built only against Paddle's MKL
        and query.dtype == key.dtype == value.dtype == paddle.float32
        and _kernel_reads_mask(additive_mask, batch, query.shape[2], query_length, key_length)
    ):
        scale = query_scale * score_scale * (1.0 if score_multiplier is None else score_multiplier)
        context, probabilities = kernels.paddle_llm_attention(query, key, value, additive_mask, scale, sequence_first)
        return context, probabilities
    to_heads, from_heads = ([1, 2, 0, 3], [2, 0, 1, 3]) if sequence_first else ([0, 2, 1, 3], [0, 2, 1, 3])
    context, probabilities = masked_attention(
        query.transpose(to_heads),
        key.transpose(to_heads),
        value.transpose(to_heads),
        additive_mask,
        query_scale=query_scale,
        score_scale=score_scale,
        score_multiplier=score_multiplier,
    )
    return context.transpose(from_heads), probabilities


def _kernel_reads_mask(additive_mask: paddle.Tensor, batch: int, heads: int, queries: int, keys: int) -> bool:
    """Whether the compiled kernels can read this mask in place: float32, ``[b or 1, heads or 1, queries, keys]``."""
    shape = additive_mask.shape
    return (
        additive_mask.dtype == paddle.float32
        and len(shape) == 4
        and shape[0] in (1, batch)
        and shape[1] in (1, heads)
        and shape[2:] == [queries, keys]
    )


def _masked_softmax(scores: paddle.Tensor, additive_mask: paddle.Tensor) -> paddle.Tensor:
    """``softmax(scores + additive_mask)`` over the last axis; the compiled kernel reads a broadcast mask in place."""
    kernels = cpu_kernels.load() if paddle.in_dynamic_mode() else None
    if kernels is not None and scores.dtype == paddle.float32 and _kernel_reads_mask(additive_mask, *scores.shape):
        return kernels.paddle_llm_masked_softmax(scores, additive_mask)
    return F.softmax(scores + additive_mask.expand(scores.shape), axis=-1)


def causal_lm_token_losses(logits: paddle.Tensor, labels: paddle.Tensor, ignore_index: int) -> paddle.Tensor:
    """Per-token cross entropy ``[..., 1]`` in fp32; ignored labels give 0."""
    logits = logits.astype("float32")
    kernels = cpu_kernels.load() if paddle.in_dynamic_mode() and logits.place.is_cpu_place() else None
    if kernels is not None:
        return kernels.paddle_llm_token_cross_entropy(logits, labels.astype("int64"), ignore_index)[0]
    return F.cross_entropy(logits, labels.unsqueeze(-1), reduction="none", ignore_index=ignore_index)


class CausalLMLoss(nn.Layer):
    """The causal-LM loss of PaddleNLP's Llama and ChatGLM2 criteria, without a host sync or broadcast grads.

    Args:
        ignore_index: label value that contributes no loss.
        count_positive_losses: Llama's rule: average over tokens whose loss is > 0 (and return 0 when there are
            none). Otherwise ChatGLM2's rule: average over tokens whose label is not ``ignore_index``.
    """

    def __init__(self, ignore_index: int = -100, count_positive_losses: bool = True):
        super().__init__()
        self.ignore_index = ignore_index
        self.count_positive_losses = count_positive_losses

    def forward(self, prediction_scores, masked_lm_labels):
        with paddle.amp.auto_cast(False):
            token_losses = causal_lm_token_losses(prediction_scores, masked_lm_labels, self.ignore_index)
            if self.count_positive_losses:
                counted = (token_losses > 0).astype("float32")
                # PaddleNLP returns sum(loss * counted) (= 0) when nothing is counted: dividing by max(count, 1)
                # gives the same without the `if count == 0` host sync.
                return (token_losses * counted).sum() / counted.sum().clip(min=1.0)
            counted = (masked_lm_labels != self.ignore_index).astype("float32").unsqueeze(-1)
            return (token_losses * counted).sum() / counted.sum()




@dataclass(frozen=True)
class RotaryTables:
    """Rotary tables indexed by position: ``cos`` and ``sign_folded_sin``, both ``[positions, rotated features]``."""

    cos: paddle.Tensor
    sign_folded_sin: paddle.Tensor

    def lookup(self, position_ids: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Gather rows for integer ``position_ids`` (any shape); an embedding lookup, ~50x faster than indexing."""
        return F.embedding(position_ids, self.cos), F.embedding(position_ids, self.sign_folded_sin)


class Replacements:
    """Collects what one ``apply_cpu_fast_paths`` call replaced, counted per component."""

    def __init__(self, family: str):
        self.family = family
        self.counts: dict[str, int] = {}

    def add(self, component: str) -> None:
        self.counts[component] = self.counts.get(component, 0) + 1

    def skip(self, component: str, reason: str) -> None:
        logger.info("cpu fast path %s.%s not applied: %s", self.family, component, reason)

    def describe(self) -> list[str]:
        return [f"{self.family}.{component} x{count}" for component, count in self.counts.items()]


def bind_forward(layer: nn.Layer, forward: Callable) -> None:
    """Replace ``layer.forward`` on this instance only (``Layer.__call__`` looks it up on the instance)."""
    layer.forward = types.MethodType(forward, layer)
    setattr(layer, REPLACED_MARK, True)


def is_replaced(layer: nn.Layer) -> bool:
    return getattr(layer, REPLACED_MARK, False)


def is_float32(layer: nn.Layer) -> bool:
    return all(parameter.dtype == paddle.float32 for parameter in layer.parameters())


def parallel_reason(config) -> str | None:
    """Why a config is outside what the CPU paths reproduce (parallel layouts keep PaddleNLP's code), or None."""
    for field_name in ("tensor_parallel_degree", "sep_parallel_degree", "context_parallel_degree"):
        if getattr(config, field_name, 1) > 1:
            return f"{field_name} > 1"
    if getattr(config, "sequence_parallel", False):
        return "sequence_parallel"
    if getattr(config, "use_flash_attention", False):
        return "use_flash_attention"
    return None


def rms_norm_forward(self, hidden_states):
    """Forward of ``LlamaRMSNorm`` / ChatGLM2's ``RMSNorm`` (they differ only in the epsilon's name)."""
    epsilon = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.epsilon
    return rms_norm(hidden_states, self.weight, epsilon)
