"""RoPE scalings PaddleNLP's classes do not build (YaRN), for every Llama-like family: the frequencies and the
attention scaling from a config, and their installation into a built model's rotary tables.

YaRN (``rope_type: "yarn"``, https://arxiv.org/abs/2309.00071) blends interpolated and original frequencies over a
ramp of dimensions and scales cos/sin by an attention factor. ``yarn_frequencies`` follows transformers 5.25's
``_compute_yarn_parameters``: the correction range comes from ``original_max_position_embeddings`` (default
``max_position_embeddings``; transformers 4.46 always uses the latter), floored/ceiled unless ``truncate`` is false;
the attention factor is ``attention_factor``, else ``0.1 * ln(factor) + 1`` or the ``mscale`` / ``mscale_all_dim``
ratio; a missing ``factor`` is ``max_position_embeddings / original_max_position_embeddings``.

PaddleNLP's ``LlamaRotaryEmbedding`` and ``Qwen2RotaryEmbedding`` compute cos/sin once, in ``_set_cos_sin_cache``, from
their ``inv_freq``, into ``cos_cached`` / ``sin_cached``. ``install`` sets ``inv_freq``, re-runs that method and scales
the two tables, so the layers keep their classes: PaddleNLP's attention, our CPU fast paths
(``llama_rotary_tables``) and our decoding step read the scaled tables as they read plain ones. These are private
attributes of PaddleNLP 3.0.0b4 (``paddle_llm.cpu.ops.VERIFIED_VERSIONS``); ``tests/unit/test_hf_checkpoint.py``
checks the YaRN fixtures' logits against transformers', which fails if they change. Qwen3's and ERNIE 4.5's attention
(``modeling.py``'s ``LlamaOptionsAttention``) rebuilds the same class of table at its ``head_dim``, which ``install``
reads from the table (``rotary.dim``); the ``qwen3-yarn`` and ``ernie4_5-yarn`` fixtures check that.
"""

from __future__ import annotations

import math

import numpy as np

# What a YaRN scaling may carry besides rope_type (transformers 5.25's keys).
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate")


def _mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_frequencies(scaling: dict, head_dim: int, theta: float, max_positions: int) -> tuple[np.ndarray, float]:
    """``(inv_freq [head_dim / 2] float32, attention factor)`` of a YaRN ``scaling`` dict (rope_scaling /
    rope_parameters without rope_theta)."""
    original = int(scaling.get("original_max_position_embeddings") or max_positions)
    factor = scaling.get("factor") or max_positions / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim) if mscale and mscale_all_dim else _mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    # float32 throughout, as transformers computes them.
    position_freqs = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    extrapolation = np.float32(1.0) / position_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * position_freqs)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = np.float32(1.0) - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def install(model, config) -> None:
    """Put a YaRN ``config.rope_scaling`` into every rotary table of ``model`` (in place); other configs are left as
    PaddleNLP built them."""
    import paddle

    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type") != "yarn":
        return
    for layer in model.sublayers(include_self=True):
        rotary = getattr(layer, "rotary_emb", None)
        if rotary is None:
            continue
        inv_freq, attention_factor = yarn_frequencies(scaling, rotary.dim, float(config.rope_theta),
                                                      int(config.max_position_embeddings))
        rotary.inv_freq = paddle.to_tensor(inv_freq)
        rotary._set_cos_sin_cache(rotary.max_seq_len_cached)
        rotary.cos_cached = rotary.cos_cached * attention_factor
        rotary.sin_cached = rotary.sin_cached * attention_factor
