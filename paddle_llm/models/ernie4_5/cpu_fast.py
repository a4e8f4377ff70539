"""CPU fast paths of ERNIE 4.5: Llama's (``models/llama/cpu_fast.py``) on ERNIE 4.5's model class (its layers are
Llama's; ``hf.py`` turns its rotary layout into Llama's)."""

from __future__ import annotations

from paddle import nn

from paddle_llm.models.llama.cpu_fast import LlamaShapedLayers, apply_llama_shaped, llama_attention_unsupported


def apply(model: nn.Layer) -> list[str]:
    """Swap the fast paths into an ERNIE 4.5's layers; returns what was replaced (``ernie4_5.<component> xN``)."""
    from paddlenlp.transformers.llama import modeling as llama_modeling

    from paddle_llm.models.ernie4_5 import modeling

    layers = LlamaShapedLayers(
        family="ernie4_5",
        rms_norm=llama_modeling.LlamaRMSNorm,
        mlp=llama_modeling.LlamaMLP,
        attention=llama_modeling.LlamaAttention,
        causal_lm=modeling.Ernie4_5ForCausalLM,
        attention_unsupported=llama_attention_unsupported,
    )
    return apply_llama_shaped(model, layers)
