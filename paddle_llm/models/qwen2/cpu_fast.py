"""CPU fast paths of PaddleNLP's Qwen2: Llama's (``models/llama/cpu_fast.py``), applied to Qwen2's classes.

PaddleNLP's Qwen2 layers keep Llama's sublayer and attribute names and compute the same functions (the q/k/v
biases live inside the projections the fast attention calls), so Llama's replacements reproduce them; only the
configurations Qwen2 adds (sliding-window attention, attention dropout) keep PaddleNLP's attention.
"""

from __future__ import annotations

from paddle import nn

from paddle_llm.cpu.ops import parallel_reason
from paddle_llm.models.llama.cpu_fast import LlamaShapedLayers, apply_llama_shaped


def qwen2_attention_unsupported(attention, config) -> str | None:
    """Why PaddleNLP's Qwen2 attention layer is outside what the fast Llama attention reproduces, or None."""
    from paddlenlp.transformers.qwen2 import modeling as qwen2_modeling

    reason = parallel_reason(config)
    if reason:
        return reason
    if attention.fuse_attention_qkv:
        return "fuse_attention_qkv"
    if attention.use_fused_rope:
        return "fused rotary embedding"
    if type(attention.rotary_emb).forward is not qwen2_modeling.Qwen2RotaryEmbedding.forward:
        return f"{type(attention.rotary_emb).__name__} is not PaddleNLP's cached Qwen2RotaryEmbedding"
    if config.use_sliding_window:
        return "use_sliding_window"
    if config.attention_dropout:
        return "attention dropout"
    if config.recompute and config.recompute_granularity == "core_attn":
        return "core_attn recompute lives inside PaddleNLP's attention"
    return None


def apply(model: nn.Layer) -> list[str]:
    """Swap the fast paths into a PaddleNLP Qwen2's layers; returns what was replaced (``qwen2.<component> xN``)."""
    from paddlenlp.transformers.qwen2 import modeling as qwen2_modeling

    layers = LlamaShapedLayers(
        family="qwen2",
        rms_norm=qwen2_modeling.Qwen2RMSNorm,
        mlp=qwen2_modeling.Qwen2MLP,
        attention=qwen2_modeling.Qwen2Attention,
        causal_lm=qwen2_modeling.Qwen2ForCausalLM,
        attention_unsupported=qwen2_attention_unsupported,
    )
    return apply_llama_shaped(model, layers)
