"""Prefix tuning through PaddleNLP's ``PrefixModelForCausalLM``, with each family's past-key-value layout.

A prefix is a trained per-layer past (keys and values for ``num_prefix_tokens`` virtual tokens). Families keep their
cache differently, so the prefix encoder's output is reshaped per family, as PaddleNLP's llm/utils does:

- Llama: batch-first ``[batch, prefix, heads, head_dim]`` (``llama_postprocess_past_key_value``);
- ChatGLM and ChatGLM2: sequence-first ``[prefix, batch, heads, head_dim]``
  (``chatglm_postprocess_past_key_value``); ChatGLM2 has one key/value per *query group*
  (``multi_query_group_num``), so its prefix is that many heads wide, not ``num_attention_heads``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixLayout:
    """What the prefix encoder must produce for one family."""

    num_attention_heads: int
    num_hidden_layers: int
    hidden_size: int
    multi_query_group_num: int | None
    postprocess_name: str  # a function in paddlenlp.peft.prefix


def prefix_layout(family_name: str, config) -> PrefixLayout:
    """Read the prefix shape of a family from its model config."""
    if family_name == "llama":
        kv_heads = getattr(config, "num_key_value_heads", None)
        groups = kv_heads if kv_heads and kv_heads != config.num_attention_heads else None  # grouped-query attention
        return PrefixLayout(config.num_attention_heads, config.num_hidden_layers, config.hidden_size, groups, "llama_postprocess_past_key_value")
    if family_name == "chatglm":
        return PrefixLayout(config.num_attention_heads, config.num_hidden_layers, config.hidden_size, None, "chatglm_postprocess_past_key_value")
    if family_name == "chatglm2":
        groups = config.multi_query_group_num if getattr(config, "multi_query_attention", False) else None
        return PrefixLayout(config.num_attention_heads, config.num_hidden_layers, config.hidden_size, groups, "chatglm_postprocess_past_key_value")
    raise ValueError(f"prefix tuning has no past-key-value layout for model family {family_name!r}")


def apply_prefix(model, family_name: str, num_prefix_tokens: int, prefix_path: str | None = None, prefix_projection: bool = False):
    """Wrap ``model`` with a trainable prefix; everything else is frozen.

    Args:
        model: a PaddleNLP causal LM (not a pipeline model: PaddleNLP's prefix model refuses those).
        family_name: selects the past-key-value layout.
        num_prefix_tokens: virtual tokens in the prefix.
        prefix_path: load this saved prefix instead of creating a new one.
        prefix_projection: produce the prefix through a 2-layer MLP (more parameters, often steadier).

    Returns:
        A ``paddlenlp.peft.PrefixModelForCausalLM``.

    Raises:
        FileNotFoundError: ``prefix_path`` is not a saved prefix.
    """
    import paddlenlp.peft.prefix as prefix_module
    from paddlenlp.peft import PrefixConfig, PrefixModelForCausalLM

    layout = prefix_layout(family_name, model.config)
    postprocess = getattr(prefix_module, layout.postprocess_name)
    if family_name == "chatglm2":
        # ChatGLM2's attention prepends a past to its keys only when use_cache is on; off, the prefix is ignored.
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
