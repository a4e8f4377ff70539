"""ERNIE 4.5 (dense): its shape read from a config, for the estimator.

Parameters: Llama's (``llama/estimate.py`` reads ``head_dim``) with a bias on every projection under ``use_bias``;
the activation table is Llama's, since the layers are (not measured on ERNIE 4.5 separately).
"""

from __future__ import annotations

from paddle_llm.models.llama import estimate as llama_estimate

ACTIVATIONS = llama_estimate.ACTIVATIONS
# transformers' Ernie4_5Config defaults (ERNIE-4.5-0.3B's shape).
DEFAULTS = {"vocab_size": 103424, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 18,
            "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128, "tie_word_embeddings": True,
            "max_position_embeddings": 131072}


def shape(fields: dict) -> dict:
    """The estimator's ``ModelShape`` fields for an ERNIE 4.5 config (transformers' ``use_bias`` or our
    ``attention_bias`` / ``mlp_bias``)."""
    bias = bool(fields.get("use_bias", fields.get("attention_bias", False)))
    return llama_estimate.shape({**DEFAULTS, **{k: v for k, v in fields.items() if v is not None},
                                 "attention_bias": bias, "mlp_bias": bias})
