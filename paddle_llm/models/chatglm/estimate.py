"""ChatGLM-6B (v1) for the estimator: its shape from a config, and the tensors its forward keeps for backward.

Parameters: embedding ``V*h`` shared with the LM head; per layer fused QKV ``h*3h + 3h``, dense ``h*h + h``, MLP
``h*f + f + f*h + h``, two LayerNorms (``4*h``); final LayerNorm ``2*h``.
"""

from __future__ import annotations

from paddle_llm.models.memory_spec import (
    COMPUTE,
    DOWNCAST,
    FP32,
    LAYER_NORM_INPUT_SIDE,
    ActivationTable,
    SavedTensor,
    linear,
    read_field,
)

ROTARY_KEPT = (
    SavedTensor("q and k halves and their rotations (2D rotary products)", "hidden", 4, COMPUTE, "attention", True),
)

ACTIVATIONS = ActivationTable(
    layer=(
        SavedTensor("LayerNorm inputs", "hidden", 2, COMPUTE),
        SavedTensor("LayerNorm mean and variance", "one", 4, FP32),
        SavedTensor("LayerNorm outputs (kept by the next matmuls)", "hidden", 2, COMPUTE),
        *ROTARY_KEPT,
        SavedTensor("scaled q and transposed k (kept by Q @ K^T)", "hidden", 2, COMPUTE, "attention", True, "eager"),
        SavedTensor("v (kept by P @ V)", "hidden", 1, COMPUTE, "attention", True, "eager", True),
        SavedTensor("q, k, v (kept by fused attention)", "hidden", 3, COMPUTE, "attention", True, "flash"),
        SavedTensor("fused attention log-sum-exp", "heads", 1, FP32, "attention", True, "flash"),
        SavedTensor("attention context (kept by dense)", "hidden", 1, COMPUTE, "attention", True),
        SavedTensor("softmax probabilities in fp32", "scores", 1, FP32, "core_attention", True, "eager", True),
        SavedTensor("probabilities cast for P @ V", "scores", 1, DOWNCAST, "core_attention", True, "eager", True),
        SavedTensor("dense_h_to_4h output (kept by GELU)", "ffn", 1, COMPUTE, "mlp", True),
        SavedTensor("GELU output (kept by dense_4h_to_h)", "ffn", 1, COMPUTE, "mlp", True),
    ),
    # Position and block rotary tables gathered for every token, [2, 2, s, b, d/2], plus the gathered intermediate.
    first_stage=(SavedTensor("2D rotary cos/sin gathered per token", "head_dim", 2.5, FP32),),
    last_stage=(
        SavedTensor("final LayerNorm input and output", "hidden", 2, COMPUTE),
        SavedTensor("final LayerNorm mean and variance", "one", 2, FP32),
        SavedTensor("cross-entropy softmax over the vocabulary", "vocab", 1, FP32, tensor_parallel=True),
    ),
    frozen_input_savings=LAYER_NORM_INPUT_SIDE,
    frozen_query_key_savings=ROTARY_KEPT,
)



def shape(fields: dict) -> dict:
    """The estimator's ``ModelShape`` fields for a ChatGLM config; defaults are ChatGLMConfig's (PaddleNLP 3.0.0b4)."""
    h = int(read_field(fields, ("hidden_size",), 4096))
    a = int(read_field(fields, ("num_attention_heads",), 32))
    f = int(read_field(fields, ("inner_hidden_size",), 4 * h))
    return dict(
        num_layers=int(read_field(fields, ("num_hidden_layers", "num_layers"), 28)),
        hidden_size=h,
        num_attention_heads=a,
        num_key_value_heads=a,
        head_dim=h // a,
        intermediate_size=f,
        vocab_size=int(read_field(fields, ("vocab_size",), 130528)),
        max_position_embeddings=int(read_field(fields, ("max_sequence_length",), 2048)),
        tie_word_embeddings=True,  # ChatGLMHead reuses word_embeddings.weight
        linear_modules=(
            linear("attention.query_key_value", h, 3 * h, True, "column"),
            linear("attention.dense", h, h, True, "row"),
            linear("mlp.dense_h_to_4h", h, f, True, "column"),
            linear("mlp.dense_4h_to_h", f, h, True, "row"),
        ),
        norm_params_per_layer=4 * h,  # two LayerNorms, weight and bias
        final_norm_params=2 * h,
        supports_sequence_parallel=False,
        layer_module_prefix="chatglm.transformer.layers.{i}",
    )
