"""Activation memory: what autograd keeps from the forward pass until the backward pass needs it.

The standard accounting is Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198), section 4 and table 2. For one GPT layer at 16-bit, with sequence length ``s``, micro-batch ``b``,
hidden size ``h``, ``a`` heads and tensor-parallel degree ``t``, the bytes kept are::

    no parallelism                         s*b*h * (34 + 5*a*s/h)
    tensor parallel                        s*b*h * (10 + 24/t + 5*a*s/(h*t))
    tensor + sequence parallel             s*b*h/t * (34 + 5*a*s/h)
    tensor parallel, selective recompute   s*b*h * (10 + 24/t)
    tensor + sequence parallel, selective  s*b*h/t * 34
    full recompute                         2*s*b*h (only the layer input; /t with sequence parallel)

The 34 are, in bytes per token per hidden unit: QKV input 2, Q and K 4, V 2, output-projection input 2, attention
dropout mask 1 (attention, 11); MLP input 2, GeLU input 8, second-linear input 8, dropout mask 1 (MLP, 19); two
LayerNorm inputs 4. The ``5*a*s/h`` are the softmax output (2), its dropout mask (1) and the dropout output (2), each
``a*s*s*b`` elements. Of the 34, the 10 outside tensor-parallel regions (LayerNorm, QKV/MLP inputs, dropout masks)
are replicated over tensor-parallel ranks unless sequence parallelism splits them along the sequence.

This module evaluates that accounting written as data, a ``SavedTensor`` per kept tensor
(``paddle_llm.models.memory_spec``), with one function for every family; each family's table is in its package
(``paddle_llm/models/<family>/estimate.py``). The ``generic`` table, here, *is* Korthikanti's (see ``korthikanti_layer_bytes`` and the tests, which
reproduce the table above). The Llama, ChatGLM and ChatGLM2 tables list what PaddleNLP 3.0.0b4's eager
implementations keep instead: they have no dropout, RMSNorm kept as three tensors, rotary embeddings and SwiGLU.
Under tensor parallelism Paddle's column-parallel linears each keep a copy of their whole-sequence input (one
``c_identity`` copy, or one all-gather under sequence parallelism, per linear), which sequence parallelism does not
split: Llama's five (q, k, v, gate, up) were checked on 2 CPU processes (``test_estimator_measured.py``).
Their fp32 coefficients were measured on Paddle 3.3.1 with the host allocator (``host_memory_stat_current_value``)
over a grid of shapes (hidden, heads, kv heads, MLP width, vocabulary, layers, sequence, batch), where the tables
match to within 0.5%; the mixed-precision bytes follow the same code paths (fp32 softmax and norm statistics,
compute-dtype matmul inputs) but are not measured here, since this project's CI has no GPU.

Selective recompute (``core_attn``) drops the ``core_attention`` region (the ``a*s*s`` tensors); ``full_attn`` drops
the attention block except its input; ``full`` keeps only each layer's input. The dropped tensors of *one* layer
come back during that layer's backward pass, next to the gradients of its widest intermediates (two MLP-wide
tensors, measured), a transient the estimator adds to the buffers. PaddleNLP hands the ``[b, 1, s, s]`` attention
mask to the recomputed function, so recompute keeps one more ``b*s*s`` tensor. Flash attention keeps ``q, k, v``
and a per-head log-sum-exp instead of any ``s*s`` tensor (Dao et al. 2022).

Parameter-efficient methods change a little more: LoRA keeps each adapter's ``x @ A`` (``r`` per token and
targeted module, Hu et al. 2021); with a frozen embedding, layer 0's input needs no gradient, so its first norm
keeps only its output; under prefix tuning layer 0's rotary products keep nothing either, and the attention runs
over ``s + prefix`` keys. All of these were checked against the allocator on a tiny and a 48M-parameter Llama
(``benchmarks/estimator_accuracy.py``: peaks within 0.5%).
"""

from __future__ import annotations

from dataclasses import dataclass

from paddle_llm.estimator.shapes import GENERIC_FAMILY, ModelShape, generic_shape
from paddle_llm.models.memory_spec import (
    COMPUTE,
    FP32,
    LAYER_NORM_INPUT_SIDE,
    LOGITS_TRANSIENT,
    MASK,
    ActivationTable,
    SavedTensor,
)
from paddle_llm.models.registry import family_named

# What selective recompute drops from the kept set (and rebuilds one layer at a time in the backward pass); full
# recompute drops everything but the layer input.
RECOMPUTED_REGIONS = {
    "core_attn": ("core_attention",),
    "full_attn": ("attention", "core_attention"),
}


# Korthikanti et al. 2022, section 4.1 (per layer) and 4.3 (input embeddings and output layer).
_GENERIC = ActivationTable(
    layer=(
        SavedTensor("LayerNorm inputs", "hidden", 2, COMPUTE),
        SavedTensor("QKV matmul input", "hidden", 1, COMPUTE),
        SavedTensor("Q and K", "hidden", 2, COMPUTE, "attention", True),
        SavedTensor("V", "hidden", 1, COMPUTE, "attention", True),
        SavedTensor("output projection input", "hidden", 1, COMPUTE, "attention", True),
        SavedTensor("attention dropout mask", "hidden", 1, MASK, "attention"),
        SavedTensor("flash attention log-sum-exp", "heads", 1, FP32, "attention", True, "flash"),
        SavedTensor("softmax output", "scores", 1, COMPUTE, "core_attention", True, "eager", True),
        SavedTensor("softmax dropout mask", "scores", 1, MASK, "core_attention", True, "eager", True),
        SavedTensor("softmax dropout output", "scores", 1, COMPUTE, "core_attention", True, "eager", True),
        SavedTensor("MLP input", "hidden", 1, COMPUTE, "mlp"),
        SavedTensor("GeLU input", "ffn", 1, COMPUTE, "mlp", True),
        SavedTensor("second linear input", "ffn", 1, COMPUTE, "mlp", True),
        SavedTensor("MLP dropout mask", "hidden", 1, MASK, "mlp"),
    ),
    first_stage=(SavedTensor("embedding dropout mask", "hidden", 1, MASK),),
    last_stage=(
        SavedTensor("final LayerNorm input and output", "hidden", 2, COMPUTE),
        SavedTensor("cross-entropy logits in fp32", "vocab", 1, FP32, tensor_parallel=True),
    ),
    frozen_input_savings=LAYER_NORM_INPUT_SIDE[:1],
    frozen_query_key_savings=(),  # no rotary embedding
    recompute_keeps_attention_mask=False,  # Megatron builds a causal mask inside the fused softmax
)



def activation_table(family: str) -> ActivationTable:
    """The kept-tensor table of a family (its ``ModelFamily.activations``), or Korthikanti's for ``generic``."""
    if family == GENERIC_FAMILY:
        return _GENERIC
    return family_named(family, "activations").activations


# Full recompute keeps each layer's input and nothing else (Korthikanti et al. 2022, section 5: 2*s*b*h at 16-bit).
LAYER_INPUT = SavedTensor("layer input (kept by full recompute)", "hidden", 1, COMPUTE)
# LoRA's x @ A, kept by @ B: r elements per token and targeted module (Hu et al. 2021), never split.
LORA_INTERMEDIATE = SavedTensor("LoRA x @ A (kept by @ B)", "adapter", 1, COMPUTE, "adapter")
# While a layer runs backward, the gradients of its widest intermediates (the MLP's) exist next to its activations;
# measured on the Llama grid as two MLP-wide tensors.
BACKWARD_WORKSPACE = SavedTensor("gradients of the MLP intermediates", "ffn", 2, COMPUTE, "mlp", True)


@dataclass(frozen=True)
class ActivationContext:
    """The knobs activation memory depends on, for one micro-batch on one device.

    Attributes:
        seq_length, micro_batch_size: tokens per micro-batch are ``seq_length * micro_batch_size``.
        prefix_tokens: virtual tokens prefix tuning prepends to every layer's keys and values.
        mixed_precision: fp16/bf16 compute.
        tensor_parallel_degree: ``t``.
        sequence_parallel: split the replicated tensors along the sequence over the ``t`` ranks too.
        flash_attention: no ``s*s`` tensors.
        recompute_granularity: ``None`` (no recompute), ``core_attn``, ``full_attn`` or ``full``.
        adapter_width: LoRA rank times targeted modules per layer (0 without LoRA).
        frozen_embedding: the embedding is frozen (LoRA, prefix tuning), so layer 0's input needs no gradient.
    """

    seq_length: int
    micro_batch_size: int
    prefix_tokens: int
    mixed_precision: bool
    tensor_parallel_degree: int
    sequence_parallel: bool
    flash_attention: bool
    recompute_granularity: str | None
    adapter_width: int = 0
    frozen_embedding: bool = False


def _width(tensor: SavedTensor, shape: ModelShape, ctx: ActivationContext, key_length: int) -> int:
    widths = {
        "adapter": ctx.adapter_width,
        "hidden": shape.hidden_size,
        "kv_hidden": shape.kv_hidden_size,
        "ffn": shape.intermediate_size,
        "scores": shape.num_attention_heads * key_length,
        "heads": shape.num_attention_heads,
        "head_dim": shape.head_dim,
        "vocab": shape.vocab_size,
        "one": 1,
    }
    return widths[tensor.width]


def saved_bytes(tensors: tuple[SavedTensor, ...], shape: ModelShape, ctx: ActivationContext) -> float:
    """Bytes the given kept tensors take for one micro-batch on one tensor-parallel rank.

    Each tensor takes ``tokens * width * count * bytes_per_element / divisor`` bytes, where ``tokens = s*b``; the
    divisor is ``t`` inside tensor-parallel regions, ``t`` everywhere with sequence parallelism (except for
    ``whole_sequence`` tensors, which an all-gather made whole), else 1; logits and the loss run over the whole
    sequence, split over the vocabulary only when ``t`` divides it. Tensors of the other attention kernel or the
    other layout (with or without tensor parallelism) are skipped; ``spans_keys`` tensors run over
    ``s + prefix_tokens`` keys.
    """
    kernel = "flash" if ctx.flash_attention else "eager"
    t = ctx.tensor_parallel_degree
    tokens = ctx.seq_length * ctx.micro_batch_size
    key_length = ctx.seq_length + ctx.prefix_tokens
    total = 0.0
    layout = "tensor_parallel" if t > 1 else "single"
    for tensor in tensors:
        if tensor.kernel not in ("any", kernel) or tensor.layout not in ("any", layout):
            continue
        width = _width(tensor, shape, ctx, key_length)
        if tensor.spans_keys and tensor.width != "scores":
            width = width * key_length / ctx.seq_length
        if tensor.width == "vocab":
            # The LM head gathers the sequence back; the vocabulary (and the loss) is split only when t divides it.
            divisor = t if (tensor.tensor_parallel and shape.vocab_size % t == 0) else 1
        elif tensor.whole_sequence:
            divisor = t if tensor.tensor_parallel else 1
        else:
            divisor = t if (tensor.tensor_parallel or ctx.sequence_parallel) else 1
        total += tokens * width * tensor.count * tensor.element.bytes(ctx.mixed_precision) / divisor
    return total


@dataclass(frozen=True)
class LayerActivations:
    """Per-layer activation bytes for one micro-batch.

    Attributes:
        kept: held from the layer's forward until its backward.
        rebuilt: recomputed during the layer's backward (0 without recompute): a transient for one layer at a time.
    """

    kept: float
    rebuilt: float


def layer_activations(shape: ModelShape, ctx: ActivationContext) -> LayerActivations:
    """Kept and rebuilt bytes of one decoder layer (see the module docstring for the sources)."""
    table = activation_table(shape.family).layer + ((LORA_INTERMEDIATE,) if ctx.adapter_width else ())
    everything = saved_bytes(table, shape, ctx)
    if ctx.recompute_granularity is None:
        return LayerActivations(kept=everything, rebuilt=0.0)
    if ctx.recompute_granularity == "full":
        return LayerActivations(kept=saved_bytes((LAYER_INPUT,), shape, ctx), rebuilt=everything)
    dropped = RECOMPUTED_REGIONS[ctx.recompute_granularity]
    rebuilt = saved_bytes(tuple(t for t in table if t.region in dropped), shape, ctx)
    return LayerActivations(kept=everything - rebuilt, rebuilt=rebuilt)


def first_stage_bytes(shape: ModelShape, ctx: ActivationContext) -> float:
    """Bytes kept by the embedding side per micro-batch.

    That is the family's first-stage tensors and a per-forward rotary table, minus what layer 0 need not keep when
    nothing before it needs a gradient: its first norm's input side with a frozen embedding, and under prefix
    tuning its rotary products too. (The prefix keys and values themselves are views the concat does not keep.)
    """
    table = activation_table(shape.family)
    rotary = shape.max_position_embeddings * shape.head_dim * 4 if table.rotary_table_per_forward else 0
    savings = table.frozen_input_savings if ctx.frozen_embedding else ()
    if ctx.prefix_tokens:
        savings += table.frozen_query_key_savings
    return saved_bytes(table.first_stage, shape, ctx) + rotary - saved_bytes(savings, shape, ctx)


def recompute_mask_bytes(shape: ModelShape, ctx: ActivationContext) -> float:
    """The ``[b, 1, s, s + prefix]`` attention mask recompute keeps alive (eager attention only)."""
    if ctx.recompute_granularity is None or ctx.flash_attention:
        return 0.0
    if not activation_table(shape.family).recompute_keeps_attention_mask:
        return 0.0
    key_length = ctx.seq_length + ctx.prefix_tokens
    return ctx.micro_batch_size * ctx.seq_length * key_length * COMPUTE.bytes(ctx.mixed_precision)


def backward_workspace_bytes(shape: ModelShape, ctx: ActivationContext) -> float:
    """Gradients that exist next to one layer's activations while it runs backward."""
    return saved_bytes((BACKWARD_WORKSPACE,), shape, ctx)


def last_stage_bytes(shape: ModelShape, ctx: ActivationContext) -> float:
    """Bytes kept by the final norm, LM head and loss per micro-batch."""
    return saved_bytes(activation_table(shape.family).last_stage, shape, ctx)


def logits_transient_bytes(shape: ModelShape, ctx: ActivationContext) -> float:
    """The logits, alive next to the loss's softmax for a moment at the end of the forward pass."""
    logits = SavedTensor("logits", "vocab", 1, LOGITS_TRANSIENT, tensor_parallel=True)
    return saved_bytes((logits,), shape, ctx)


def rotary_cache_bytes(shape: ModelShape, layers: int) -> int:
    """Persistent cos/sin caches (fp32) when every attention layer owns them (PaddleNLP's Llama)."""
    if not activation_table(shape.family).rotary_cache_per_layer:
        return 0
    per_layer = 2 * shape.max_position_embeddings * shape.head_dim * 4 + shape.head_dim // 2 * 4
    return layers * per_layer


def korthikanti_layer_bytes(
    seq_length: int,
    micro_batch_size: int,
    hidden_size: int,
    num_attention_heads: int,
    tensor_parallel_degree: int = 1,
    sequence_parallel: bool = False,
    recompute_granularity: str | None = None,
) -> float:
    """Korthikanti et al. 2022, table 2, evaluated from the generic table at 16-bit (see the module docstring).

    ``core_attn`` is the paper's selective recompute; ``full`` its full recompute.
    """
    shape = generic_shape(1, hidden_size, num_attention_heads, vocab_size=1)
    ctx = ActivationContext(
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        prefix_tokens=0,
        mixed_precision=True,
        tensor_parallel_degree=tensor_parallel_degree,
        sequence_parallel=sequence_parallel,
        flash_attention=False,
        recompute_granularity=recompute_granularity,
    )
    return layer_activations(shape, ctx).kept
