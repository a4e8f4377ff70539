"""ChatGLM2-6B for the estimator: its shape from a config, and the tensors its forward keeps for backward.

Parameters: embedding ``V*h``; per layer fused QKV ``h*(a*d + 2*g*d)`` (+bias with ``add_qkv_bias``), dense ``a*d*h``,
SwiGLU MLP ``h*2f + f*h``, two RMSNorms; final RMSNorm ``h``; separate output layer ``h*V``.
"""

from __future__ import annotations

from paddle_llm.models.memory_spec import (
    COMPUTE,
    DOWNCAST,
    FP32,
    ActivationTable,
    SavedTensor,
    linear,
    read_field,
    rms_norm_input_side,
    rms_norm_kept,
)

ROTARY_KEPT = (
    SavedTensor("query as the rotary products keep it", "hidden", 1, COMPUTE, "attention", True),
    SavedTensor("key as the rotary products keep it", "kv_hidden", 1, COMPUTE, "attention", True),
)

ACTIVATIONS = ActivationTable(
    layer=(
        *rms_norm_kept(2, FP32),
        *ROTARY_KEPT,
        SavedTensor("q transposed for Q @ K^T", "hidden", 1, COMPUTE, "attention", True, "eager"),
        SavedTensor("k and v repeated over groups (kept by the batched matmuls)", "hidden", 2, COMPUTE, "attention", True, "eager", True),
        SavedTensor("q, k, v repeated over groups (kept by fused attention)", "hidden", 3, COMPUTE, "attention", True, "flash"),
        SavedTensor("fused attention log-sum-exp", "heads", 1, FP32, "attention", True, "flash"),
        SavedTensor("attention context (kept by dense)", "hidden", 1, COMPUTE, "attention", True),
        SavedTensor("softmax probabilities in fp32", "scores", 1, FP32, "core_attention", True, "eager", True),
        SavedTensor("probabilities cast for P @ V", "scores", 1, DOWNCAST, "core_attention", True, "eager", True),
        SavedTensor("dense_h_to_4h output (its two halves are views kept by silu and the product)", "ffn", 2, COMPUTE, "mlp", True),
        SavedTensor("silu output and silu * gate (kept by the product and dense_4h_to_h)", "ffn", 2, COMPUTE, "mlp", True),
    ),
    first_stage=(),
    last_stage=(
        *rms_norm_kept(1, FP32),
        SavedTensor("hidden states around the output layer's [s,b,h] layout change (measured)", "hidden", 1, COMPUTE),
        SavedTensor("per-token loss and loss mask", "one", 2, FP32),
        SavedTensor("cross-entropy softmax over the vocabulary", "vocab", 1, FP32, tensor_parallel=True),
    ),
    frozen_input_savings=rms_norm_input_side(1, FP32),
    frozen_query_key_savings=ROTARY_KEPT,
    rotary_table_per_forward=True,
)



def shape(fields: dict) -> dict:
    """The estimator's ``ModelShape`` fields for a ChatGLM2 config; defaults are ChatGLMv2Config's (PaddleNLP 3.0.0b4)."""
    h = int(read_field(fields, ("hidden_size",), 4096))
    a = int(read_field(fields, ("num_attention_heads",), 32))
    d = int(read_field(fields, ("kv_channels",), 128))
    groups = int(read_field(fields, ("multi_query_group_num",), 1))
    if fields.get("multi_query_attention") is False:
        groups = a
    f = int(read_field(fields, ("ffn_hidden_size",), 13696))
    linear_bias = bool(read_field(fields, ("add_bias_linear",), False))
    qkv_bias = linear_bias or bool(read_field(fields, ("add_qkv_bias",), False))
    return dict(
        num_layers=int(read_field(fields, ("num_hidden_layers", "num_layers"), 28)),
        hidden_size=h,
        num_attention_heads=a,
        num_key_value_heads=groups,
        head_dim=d,
        intermediate_size=f,
        vocab_size=int(read_field(fields, ("vocab_size", "padded_vocab_size"), 65024)),
        max_position_embeddings=int(read_field(fields, ("seq_length", "max_sequence_length"), 2048)),
        tie_word_embeddings=False,
        linear_modules=(
            linear("self_attention.query_key_value", h, a * d + 2 * groups * d, qkv_bias, "column"),
            linear("self_attention.dense", a * d, h, linear_bias, "row"),
            linear("mlp.dense_h_to_4h", h, 2 * f, linear_bias, "column"),
            linear("mlp.dense_4h_to_h", f, h, linear_bias, "row"),
        ),
        norm_params_per_layer=2 * h,
        final_norm_params=h if read_field(fields, ("post_layer_norm",), True) else 0,
        supports_sequence_parallel=True,
        layer_module_prefix="chatglm_v2.encoder.layers.{i}",
    )
