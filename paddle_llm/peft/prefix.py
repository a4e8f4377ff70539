"""Prefix tuning through PaddleNLP's ``PrefixModelForCausalLM``, with each family's past-key-value layout.

A prefix is a trained per-layer past (keys and values for ``num_prefix_tokens`` virtual tokens). Families keep their
cache differently, so the prefix encoder's output is reshaped per family (``ModelFamily.prefix_layout``), as
PaddleNLP's llm/utils does.
"""

from __future__ import annotations

import os

from paddle_llm.models.registry import FAMILIES, ModelFamily


def apply_prefix(model, family: ModelFamily, num_prefix_tokens: int, prefix_path: str | None = None, prefix_projection: bool = False):
    """Wrap ``model`` with a trainable prefix; everything else is frozen.

    Args:
        model: a PaddleNLP causal LM (not a pipeline model: PaddleNLP's prefix model refuses those).
        family: selects the past-key-value layout.
        num_prefix_tokens: virtual tokens in the prefix.
        prefix_path: load this saved prefix instead of creating a new one.
        prefix_projection: produce the prefix through a 2-layer MLP (more parameters, often steadier).

    Returns:
        A ``paddlenlp.peft.PrefixModelForCausalLM``.

    Raises:
        FileNotFoundError: ``prefix_path`` is not a saved prefix.
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
        if not os.path.isfile(os.path.join(prefix_path, "prefix_config.json")):
            raise FileNotFoundError(f"--prefix_path {prefix_path!r} has no prefix_config.json; pass the directory a prefix-tuning run saved")
        return PrefixModelForCausalLM.from_pretrained(model, prefix_path, postprocess)
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
