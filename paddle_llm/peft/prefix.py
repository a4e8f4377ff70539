"""Prefix tuning through PaddleNLP's ``PrefixModelForCausalLM``, with each family's past-key-value layout.

A prefix is a trained per-layer past (keys and values for ``num_prefix_tokens`` virtual tokens). Families keep their
cache differently, so the prefix encoder's output is reshaped per family (``ModelFamily.prefix_layout``), as
PaddleNLP's llm/utils does.
"""

from __future__ import annotations

import os

from paddle_llm.models.registry import FAMILIES, ModelFamily
from paddle_llm.peft.adapter_match import prefix_past_shape, require_matching, tensor_shapes

PREFIX_WEIGHTS = "prefix_model_state.pdparams"  # PaddleNLP's PREFIX_WEIGHTS_NAME


def apply_prefix(model, family: ModelFamily, num_prefix_tokens: int, prefix_path: str | None = None, prefix_projection: bool = False,
                 base_path: str | None = None):
    """Wrap ``model`` with a trainable prefix; everything else is frozen.

    Args:
        model: a PaddleNLP causal LM (not a pipeline model: PaddleNLP's prefix model refuses those).
        family: selects the past-key-value layout.
        num_prefix_tokens: virtual tokens in the prefix.
        prefix_path: load this saved prefix instead of creating a new one.
        prefix_projection: produce the prefix through a 2-layer MLP (more parameters, often steadier).
        base_path: where ``model`` came from (``--model_name_or_path``), named when a loaded prefix does not fit it.

    Returns:
        A ``paddlenlp.peft.PrefixModelForCausalLM``.

    Raises:
        FileNotFoundError: ``prefix_path`` is not a saved prefix, or has no weights.
        AdapterMismatchError: the saved prefix's past does not fit this base (layers, heads, head size), or its
            weights are not the ones its own config describes.
        ValueError: the family has no prefix layout.
    """
    import paddlenlp.peft.prefix as prefix_module
    from paddlenlp.peft import PrefixConfig, PrefixModelForCausalLM

    if family.prefix_layout is None:
        having = ", ".join(f.name for f in FAMILIES.values() if f.prefix_layout is not None)
        raise ValueError(f"no prefix layout for model family {family.name!r}; known families: {having}")
    layout = family.prefix_layout(model.config)
    postprocess = getattr(prefix_module, layout.postprocess_name)
    if family.prefix_needs_cache:
        model.config.use_cache = True
    if prefix_path:
        return _load_prefix(model, layout, prefix_path, postprocess, base_path)
    config = PrefixConfig(
        num_prefix_tokens=num_prefix_tokens,
        num_attention_heads=layout.num_attention_heads,
        num_hidden_layers=layout.num_hidden_layers,
        hidden_size=layout.hidden_size,
        multi_query_group_num=layout.multi_query_group_num,
        prefix_projection=prefix_projection,
        prefix_projection_hidden_size=layout.hidden_size,
        tensor_parallel_degree=getattr(model.config, "tensor_parallel_degree", 1),
        dtype=getattr(model.config, "dtype", None) or "float32",
    )
    return PrefixModelForCausalLM(model, config, postprocess)


def _load_prefix(model, layout, prefix_path: str, postprocess, base_path: str | None):
    """``PrefixModelForCausalLM.from_pretrained``, refusing a prefix saved for another base before loading it."""
    import paddle
    from paddlenlp.peft import PrefixConfig, PrefixModelForCausalLM

    for name in ("prefix_config.json", PREFIX_WEIGHTS):
        if not os.path.isfile(os.path.join(prefix_path, name)):
            # without weights PaddleNLP would log an error and start a fresh prefix instead of the one asked for
            raise FileNotFoundError(f"--prefix_path {prefix_path!r} has no {name}; pass the directory a prefix-tuning run saved")
    saved = PrefixConfig.from_pretrained(prefix_path)
    past = "past_key_values [layers, key/value, tokens, heads, head size]"
    require_matching("--prefix_path", prefix_path, base_path,
                     {past: prefix_past_shape(saved.num_hidden_layers, saved.num_attention_heads, saved.hidden_size,
                                              saved.multi_query_group_num, saved.num_prefix_tokens)},
                     {past: prefix_past_shape(layout.num_hidden_layers, layout.num_attention_heads, layout.hidden_size,
                                              layout.multi_query_group_num, saved.num_prefix_tokens)})
    prefix_model = PrefixModelForCausalLM.from_pretrained(model, prefix_path, postprocess)
    require_matching("--prefix_path", prefix_path, base_path,
                     tensor_shapes(paddle.load(os.path.join(prefix_path, PREFIX_WEIGHTS), return_numpy=True)),
                     tensor_shapes(prefix_model.prefix_encoder.state_dict()))
    return prefix_model
