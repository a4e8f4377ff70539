"""CPU fast paths of Qwen3: Llama's (``models/llama/cpu_fast.py``), whose attention applies the q/k head norms when
the layer has them, on Qwen3's classes."""

from __future__ import annotations

from paddle import nn

from paddle_llm.models.llama.cpu_fast import LlamaShapedLayers, apply_llama_shaped, llama_attention_unsupported


def apply(model: nn.Layer) -> list[str]:
    """Swap the fast paths into a Qwen3's layers; returns what was replaced (``qwen3.<component> xN``)."""
    from paddlenlp.transformers.llama import modeling as llama_modeling

    from paddle_llm.models.qwen3 import modeling

    layers = LlamaShapedLayers(
        family="qwen3",
        rms_norm=llama_modeling.LlamaRMSNorm,
        mlp=llama_modeling.LlamaMLP,
        attention=modeling.Qwen3Attention,
        causal_lm=modeling.Qwen3ForCausalLM,
        attention_unsupported=llama_attention_unsupported,
    )
    return apply_llama_shaped(model, layers)
