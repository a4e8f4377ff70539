"""Mistral for the estimator: Llama's shape and activation table, with MistralConfig's defaults (Mistral-7B)."""

from __future__ import annotations

from paddle_llm.models.llama import estimate as llama_estimate


def shape(fields: dict) -> dict:
    """The estimator's ``ModelShape`` fields for a Mistral config (defaults: transformers' MistralConfig)."""
    return llama_estimate.shape(
        {
            "intermediate_size": 14336,
            "num_key_value_heads": 8,
            "max_position_embeddings": 32768,
            **{name: value for name, value in fields.items() if value is not None},
        }
    )
