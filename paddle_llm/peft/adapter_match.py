"""Refusing an adapter saved for another base model, before anything is merged, exported, served or trained.

PaddleNLP 3.0.0b4 loads a LoRA or prefix adapter with ``set_state_dict``, which only warns and skips a tensor whose
shape differs, and a LoRA config whose targets match no layer of the base adds no adapter at all: the base then runs
unchanged and a merge "succeeds" with a zero difference. ``load_lora`` and ``apply_prefix`` call the checks here,
so every command that takes ``--lora_path`` or ``--prefix_path`` refuses such an adapter the same way.
"""

from __future__ import annotations

import os

from paddle_llm.config.parser import ArgumentError

ABSENT = "absent"


class AdapterMismatchError(ArgumentError):
    """An adapter whose tensors are not the ones its base model needs; the message names the first of them."""


def tensor_shapes(state: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a state dict (numpy arrays or Paddle tensors)."""
    return {name: tuple(int(n) for n in value.shape) for name, value in state.items()}


def first_mismatch(adapter: dict[str, tuple[int, ...]], base: dict[str, tuple[int, ...]]):
    """The first tensor (in the adapter's order, then the base's) that is absent on one side or shaped differently:
    ``(name, adapter shape, base shape)``, a missing side as ``ABSENT``; None when they agree."""
    for name in list(adapter) + [name for name in base if name not in adapter]:
        adapter_shape, base_shape = adapter.get(name, ABSENT), base.get(name, ABSENT)
        if adapter_shape != base_shape:
            return name, adapter_shape, base_shape
    return None


def require_matching(flag: str, adapter_path: str, base_path: str, adapter: dict, base: dict,
                     base_flag: str = "--model_name_or_path") -> None:
    """Raise ``AdapterMismatchError`` naming the first mismatching tensor and both directories.

    Args:
        flag: the flag that named the adapter (``--lora_path``, ``--prefix_path``).
        adapter: name -> shape of what the adapter directory holds.
        base_flag: the flag that named the base (``--model`` for ``serve``).
        base: name -> shape of what the base model needs there.
    """
    mismatch = first_mismatch(adapter, base)
    if mismatch is None:
        return
    name, adapter_shape, base_shape = mismatch
    raise AdapterMismatchError(
        f"{flag} {os.path.abspath(adapter_path)} does not fit {base_flag} {base_path}: tensor {name} is "
        f"{_shape_text(adapter_shape)} in the adapter but {_shape_text(base_shape)} for this base; pass the base model "
        "the adapter was trained on, or an adapter trained on this base")


def _shape_text(shape) -> str:
    return shape if shape == ABSENT else str(list(shape))


def prefix_past_shape(num_hidden_layers: int, num_attention_heads: int, hidden_size: int,
                      multi_query_group_num: int | None, num_prefix_tokens: int) -> tuple[int, ...]:
    """The past a prefix supplies: (layers, key and value, tokens, key/value heads, head size), as PaddleNLP's
    ``PrefixModelForCausalLM`` derives it from a ``PrefixConfig``."""
    heads = multi_query_group_num or num_attention_heads
    return (num_hidden_layers, 2, num_prefix_tokens, heads, hidden_size // num_attention_heads)
