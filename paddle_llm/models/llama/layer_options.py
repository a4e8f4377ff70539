"""The Llama layer options PaddleNLP's Llama lacks (``head_dim`` other than hidden/heads, ``attention_bias``,
``mlp_bias``), read from a config's fields without importing Paddle: ``check`` (through
``ModelFamily.layer_options``), ``estimate`` and the cache geometry ask here, ``modeling.py`` builds them."""

from __future__ import annotations

def head_dim(fields: dict) -> int:
    """The width of one attention head: ``head_dim`` when the config has one, else hidden_size / heads."""
    return int(fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"])


def requested(fields: dict) -> list[str]:
    """The layer options a config sets, as ``name value`` strings (empty: PaddleNLP's layers compute it)."""
    options = []
    heads, hidden = fields.get("num_attention_heads"), fields.get("hidden_size")
    if fields.get("head_dim") and heads and hidden and fields["head_dim"] * heads != hidden:
        options.append(f"head_dim {fields['head_dim']}")
    options += [f"{name} true" for name in ("attention_bias", "mlp_bias") if fields.get(name)]
    return options
