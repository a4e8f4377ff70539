"""Qwen3: its shape read from a config, for the estimator.

Parameters: Llama's with ``head_dim``-wide heads (``llama/estimate.py`` reads it) plus the q and k RMSNorm weights
(``2*head_dim`` per layer). The activation table is Llama's: the two head norms keep their inputs as the layer
norms do, which this table does not count separately (not measured on Qwen3).
"""

from __future__ import annotations

from paddle_llm.models.llama import estimate as llama_estimate

ACTIVATIONS = llama_estimate.ACTIVATIONS


def shape(fields: dict) -> dict:
    """The estimator's ``ModelShape`` fields for a Qwen3 config, with transformers' Qwen3Config defaults."""
    described = llama_estimate.shape(
        {
            "vocab_size": 151936,
            "intermediate_size": 22016,
            "head_dim": 128,
            "max_position_embeddings": 32768,
            **{name: value for name, value in fields.items() if value is not None},
        }
    )
    return dict(described, norm_params_per_layer=described["norm_params_per_layer"] + 2 * described["head_dim"])
