"""Llama for the estimator: its shape from a config, and the tensors its PaddleNLP forward keeps for backward.

Parameters: embedding ``V*h``; per layer q/k/v/o (``2*h*a*d + 2*h*h_kv``, ``d`` = ``head_dim`` or h/a, with biases
under ``attention_bias``), gate/up/down (``3*h*f``, biased under ``mlp_bias``), two
RMSNorm weights (``2*h``); final RMSNorm ``h``; LM head ``h*V`` unless ``tie_word_embeddings``.
"""

from __future__ import annotations

from paddle_llm.models.memory_spec import (
    COMPUTE,
    DOWNCAST,
    FP32,
    INT64,
    ActivationTable,
    SavedTensor,
    linear,
    read_field,
    rms_norm_input_side,
)

ROTARY_KEPT = (
    SavedTensor("q and rotate_half(q) (kept by the rotary products)", "hidden", 2, COMPUTE, "attention", True),
    SavedTensor("k and rotate_half(k)", "kv_hidden", 2, COMPUTE, "attention", True),
    SavedTensor("cos and sin gathered by position_ids", "head_dim", 2, FP32, "attention"),
)

# Under tensor parallelism every column-parallel linear takes its own copy of its input: ``mp_ops._c_identity`` copies
# (its kernel returns a new tensor), and under sequence parallelism ``ColumnSequenceParallelLinear`` all-gathers the
# sequence once per linear (``AllGatherOp``) and keeps the gathered input for its weight gradient. So q, k, v, gate
# and up keep five whole-sequence copies of the two norm outputs, which themselves are then freed.
NORM_OUTPUTS_KEPT = (
    SavedTensor("RMSNorm outputs (kept by the next matmuls)", "hidden", 2, COMPUTE, layout="single"),
    SavedTensor("q/k/v inputs: one copy of the norm output each", "hidden", 3, COMPUTE, "attention", layout="tensor_parallel", whole_sequence=True),
    SavedTensor("gate/up inputs: one copy of the norm output each", "hidden", 2, COMPUTE, "mlp", layout="tensor_parallel", whole_sequence=True),
)

ACTIVATIONS = ActivationTable(
    layer=(
        *rms_norm_input_side(2, COMPUTE),
        *NORM_OUTPUTS_KEPT,
        *ROTARY_KEPT,
        SavedTensor("q / sqrt(d) (kept by Q @ K^T)", "hidden", 1, COMPUTE, "attention", True, "eager"),
        SavedTensor("k and v repeated to every head (kept by the two matmuls)", "hidden", 2, COMPUTE, "attention", True, "eager", True),
        SavedTensor("q (kept by flash attention)", "hidden", 1, COMPUTE, "attention", True, "flash"),
        SavedTensor("k and v (kept by flash attention, no head repeat)", "kv_hidden", 2, COMPUTE, "attention", True, "flash", True),
        SavedTensor("flash attention log-sum-exp", "heads", 1, FP32, "attention", True, "flash"),
        SavedTensor("attention output (kept by o_proj)", "hidden", 1, COMPUTE, "attention", True),
        SavedTensor("softmax probabilities in fp32", "scores", 1, FP32, "core_attention", True, "eager", True),
        SavedTensor("probabilities cast back for P @ V", "scores", 1, DOWNCAST, "core_attention", True, "eager", True),
        SavedTensor("gate and up projections (kept by swiglu)", "ffn", 2, COMPUTE, "mlp", True),
        SavedTensor("swiglu output (kept by down_proj)", "ffn", 1, COMPUTE, "mlp", True),
    ),
    first_stage=(),
    last_stage=(
        *rms_norm_input_side(1, COMPUTE),
        # The LM head's input (under tensor parallelism its c_identity copy, gathered first under sequence parallel).
        SavedTensor("final RMSNorm output (kept by the LM head)", "hidden", 1, COMPUTE, whole_sequence=True),
        SavedTensor("cross-entropy softmax over the vocabulary", "vocab", 1, FP32, tensor_parallel=True),
        SavedTensor("labels copy", "one", 1, INT64),
    ),
    frozen_input_savings=rms_norm_input_side(1, COMPUTE),
    frozen_query_key_savings=ROTARY_KEPT,
    rotary_cache_per_layer=True,
)



def shape(fields: dict) -> dict:
    """The estimator's ``ModelShape`` fields for a Llama config; defaults are LlamaConfig's (PaddleNLP 3.0.0b4)."""
    h = int(read_field(fields, ("hidden_size",), 4096))
    a = int(read_field(fields, ("num_attention_heads",), 32))
    kv = int(read_field(fields, ("num_key_value_heads",), a))
    f = int(read_field(fields, ("intermediate_size",), 11008))
    d = int(read_field(fields, ("head_dim",), None) or h // a)
    attention_bias = bool(read_field(fields, ("attention_bias",), False))
    mlp_bias = bool(read_field(fields, ("mlp_bias",), False))
    return dict(
        num_layers=int(read_field(fields, ("num_hidden_layers", "num_layers"), 32)),
        hidden_size=h,
        num_attention_heads=a,
        num_key_value_heads=kv,
        head_dim=d,
        intermediate_size=f,
        vocab_size=int(read_field(fields, ("vocab_size",), 32000)),
        max_position_embeddings=int(read_field(fields, ("max_position_embeddings",), 2048)),
        tie_word_embeddings=bool(read_field(fields, ("tie_word_embeddings",), False)),
        linear_modules=(
            linear("self_attn.q_proj", h, a * d, attention_bias, "column"),
            linear("self_attn.k_proj", h, kv * d, attention_bias, "column"),
            linear("self_attn.v_proj", h, kv * d, attention_bias, "column"),
            linear("self_attn.o_proj", a * d, h, attention_bias, "row"),
            linear("mlp.gate_proj", h, f, mlp_bias, "column"),
            linear("mlp.up_proj", h, f, mlp_bias, "column"),
            linear("mlp.down_proj", f, h, mlp_bias, "row"),
        ),
        norm_params_per_layer=2 * h,
        final_norm_params=h,
        supports_sequence_parallel=True,
        layer_module_prefix="llama.layers.{i}",
    )
