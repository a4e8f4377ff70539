"""CPU fast paths of Qwen3: Llama's (``models/llama/cpu_fast.py``), whose attention applies the q/k head norms when
the layer has them, on Qwen3's classes."""

from __future__ import annotations

from paddle import nn

from paddle_llm.models.llama.cpu_fast import apply_to_llama_subclass


def apply(model: nn.Layer) -> list[str]:
    """Swap the fast paths into a Qwen3's layers; returns what was replaced (``qwen3.<component> xN``)."""
    from paddle_llm.models.qwen3 import modeling

    return apply_to_llama_subclass(model, "qwen3", modeling.Qwen3Attention, modeling.Qwen3ForCausalLM)
