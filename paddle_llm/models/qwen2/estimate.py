"""Qwen2: its shape read from a config, and the tensors its PaddleNLP forward keeps for backward (for the estimator).

Parameters: Llama's plus the q/k/v biases (``h + 2*h_kv`` per layer); the LM head is the embedding when
``tie_word_embeddings`` (Qwen2.5 up to 3B). PaddleNLP's eager Qwen2 keeps the tensors its Llama keeps (the same
RMSNorm, rotary products, repeated key/value heads, fp32 softmax and SwiGLU; a bias add keeps nothing), so the
activation table is Llama's, measured on Llama and not separately on Qwen2.
"""

from __future__ import annotations

from paddle_llm.models.llama import estimate as llama_estimate
from paddle_llm.models.memory_spec import linear

ACTIVATIONS = llama_estimate.ACTIVATIONS


def shape(fields: dict) -> dict:
    """The estimator's ``ModelShape`` fields for a Qwen2 config: Llama's reading, with Qwen2Config's defaults
    (PaddleNLP 3.0.0b4) where they differ from LlamaConfig's."""
    described = llama_estimate.shape(
        {
            "intermediate_size": 22016,
            "vocab_size": 151936,
            "max_position_embeddings": 32768,
            **{name: value for name, value in fields.items() if value is not None},
        }
    )
    # Llama's layers, with biases on q, k and v.
    qkv = tuple(linear(name, inputs, outputs, True, style) for name, inputs, outputs, _, style in described["linear_modules"][:3])
    return dict(described, linear_modules=qkv + described["linear_modules"][3:], layer_module_prefix="qwen2.layers.{i}")
