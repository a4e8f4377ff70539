"""How a model family describes its memory to the estimator, as data: its shape and what its forward pass keeps.

Each family package writes ``<family>/estimate.py`` with these: ``shape(fields)`` (the dimensions and linear layers
of a config, see ``linear`` below) and ``ACTIVATIONS`` (an ``ActivationTable`` of ``SavedTensor`` rows). The estimator
(``paddle_llm.estimator.shapes`` and ``.activations``) evaluates them; the accounting and the measurements behind
the tables are described there. This module holds data only, so a family describes itself without importing the
estimator (which sits above ``models`` in the layer order).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ElementBytes:
    """Bytes per element of a kept tensor in fp32 training and under fp16/bf16 mixed precision (0: not kept)."""

    full_precision: float
    mixed_precision: float

    def bytes(self, mixed_precision: bool) -> float:
        return self.mixed_precision if mixed_precision else self.full_precision


COMPUTE = ElementBytes(4, 2)  # in the compute dtype
FP32 = ElementBytes(4, 4)  # fp32 whatever the compute dtype (softmax, norm statistics, loss)
FP32_UPCAST = ElementBytes(0, 4)  # an fp32 copy that only mixed precision makes; in fp32 it is the tensor itself
DOWNCAST = ElementBytes(0, 2)  # a compute-dtype copy of an fp32 tensor, only under mixed precision
MASK = ElementBytes(1, 1)  # a uint8 dropout mask
INT64 = ElementBytes(8, 8)
# Logits live next to the loss's softmax for a moment: fp32 in fp32 training; 16-bit logits plus their fp32 copy
# under mixed precision (PaddleNLP casts them to fp32 before the cross-entropy).
LOGITS_TRANSIENT = ElementBytes(4, 6)



@dataclass(frozen=True)
class SavedTensor:
    """Tensors of one kind that autograd keeps, measured per token.

    Attributes:
        what: which tensors and which op keeps them.
        width: elements per token: ``hidden`` (h), ``kv_hidden`` (key/value heads x head_dim), ``ffn`` (MLP width),
            ``scores`` (heads x key length: the attention matrix), ``heads``, ``head_dim``, ``vocab`` or ``one``.
        count: how many tensors of that width.
        element: bytes per element (see the constants above).
        region: ``norm``, ``attention``, ``core_attention``, ``mlp`` or ``adapter``: decides what recompute drops.
        tensor_parallel: split over tensor-parallel ranks (inside a column/row-parallel pair); otherwise replicated
            and split only by sequence parallelism.
        kernel: ``any``, or only with the ``eager`` attention or only with ``flash`` attention.
        spans_keys: runs over the key length (sequence plus prefix tokens) rather than the query length.
        layout: ``any``, or only without tensor parallelism (``single``) or only with it (``tensor_parallel``).
        whole_sequence: holds every token on every tensor-parallel rank even under sequence parallelism (an
            all-gathered input), so nothing splits it.
    """

    what: str
    width: str
    count: float
    element: ElementBytes
    region: str = "norm"
    tensor_parallel: bool = False
    kernel: str = "any"
    spans_keys: bool = False
    layout: str = "any"
    whole_sequence: bool = False


@dataclass(frozen=True)
class ActivationTable:
    """A family's kept tensors per layer, before the first layer and after the last one.

    Attributes:
        layer: per decoder layer.
        first_stage: kept by the embedding side (pipeline stage 0).
        last_stage: kept by the final norm, LM head and loss (last pipeline stage).
        rotary_table_per_forward: the family rebuilds its rotary table (``max_positions x head_dim`` fp32) in every
            forward pass and the graph keeps it (ChatGLM2).
        rotary_cache_per_layer: every attention layer owns persistent cos/sin caches of ``max_positions x head_dim``
            fp32 each, plus ``head_dim/2`` inverse frequencies (PaddleNLP's Llama).
        frozen_input_savings: what layer 0's first norm does not keep when its input needs no gradient (a frozen
            embedding, as in LoRA and prefix tuning): everything but its output.
        frozen_query_key_savings: what layer 0's rotary products do not keep under prefix tuning, where q and k
            come from frozen projections of a gradient-free input (only the prefix keys carry gradients).
        recompute_keeps_attention_mask: PaddleNLP passes the ``[b, 1, s, s]`` attention mask to the recomputed
            function, so recompute keeps it until the backward pass (without recompute it dies after the forward).
    """

    layer: tuple[SavedTensor, ...]
    first_stage: tuple[SavedTensor, ...]
    last_stage: tuple[SavedTensor, ...]
    frozen_input_savings: tuple[SavedTensor, ...]
    frozen_query_key_savings: tuple[SavedTensor, ...]
    rotary_table_per_forward: bool = False
    rotary_cache_per_layer: bool = False
    recompute_keeps_attention_mask: bool = True


def rms_norm_input_side(count: int, product_element: ElementBytes) -> tuple[SavedTensor, ...]:
    """PaddleNLP's eager RMSNorm, ``rsqrt(mean(x.astype(fp32)**2) + eps) * x * weight``, without its output."""
    return (
        SavedTensor("RMSNorm input as fp32 (pow keeps it; in fp32 training it is the input itself)", "hidden", count, FP32),
        SavedTensor("RMSNorm input promoted to fp32 for x * rsqrt", "hidden", count, FP32_UPCAST),
        SavedTensor("RMSNorm 1/rms per token", "one", count, FP32),
        SavedTensor("RMSNorm x * rsqrt (kept by * weight)", "hidden", count, product_element),
    )


def rms_norm_kept(count: int, product_element: ElementBytes) -> tuple[SavedTensor, ...]:
    return (
        *rms_norm_input_side(count, product_element),
        SavedTensor("RMSNorm output (kept by the next matmuls)", "hidden", count, COMPUTE),
    )


LAYER_NORM_INPUT_SIDE = (
    SavedTensor("LayerNorm input", "hidden", 1, COMPUTE),
    SavedTensor("LayerNorm mean and variance", "one", 2, FP32),
)


def read_field(fields: dict, names: tuple[str, ...], default):
    """The first present alias of a config field, or ``default`` (the PaddleNLP config class's own default, because
    that is what the model gets)."""
    for name in names:
        if fields.get(name) is not None:
            return fields[name]
    return default


def linear(name: str, in_features: int, out_features: int, bias: bool, parallel_style: str) -> tuple:
    """One linear layer of a decoder layer, as ``estimator.shapes.LinearModule`` takes it: the sublayer path as
    PaddleNLP names it (``self_attn.q_proj``), the full (unsplit) weight shape, whether it has a bias, and ``column``
    (output split over tensor-parallel ranks) or ``row`` (input split)."""
    return (name, in_features, out_features, bias, parallel_style)
