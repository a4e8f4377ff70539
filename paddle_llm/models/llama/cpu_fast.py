"""CPU fast paths of PaddleNLP's Llama: RMSNorm, SwiGLU, attention with rotary, mask and grouped heads, and the loss.

The building blocks and why they are faster are in ``paddle_llm.cpu.ops``; ``apply`` swaps them into one
model instance (``paddle_llm.cpu.fast_paths.apply_cpu_fast_paths`` calls it). ``apply_llama_shaped`` does the same
for another family's PaddleNLP model built like Llama.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import paddle
from paddle import nn

from paddle_llm.cpu.ops import (
    CausalLMLoss,
    Replacements,
    RotaryTables,
    additive_upper_triangle_mask,
    apply_rotary,
    attention_in_projection_layout,
    bind_forward,
    is_float32,
    is_replaced,
    parallel_reason,
    rms_norm_forward,
    sign_folded_sin_halves,
    swap_halves,
    swiglu,
)


def _llama_mlp_forward(self, x):
    """``LlamaMLP.forward``: SwiGLU with the fast gated product."""
    if self.fuse_attention_ffn:
        gate, up = paddle.chunk(self.gate_up_fused_proj(x), 2, axis=-1)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(swiglu(gate, up))


def _llama_attention_forward(
    self,
    hidden_states,
    position_ids=None,
    past_key_value=None,
    attention_mask=None,
    output_attentions=False,
    use_cache=False,
    alibi=None,
    attn_mask_startend_row_indices=None,
    npu_is_casual=False,
):
    """``LlamaAttention.forward`` for one CPU process: the same maths, with fast rotary, mask and GQA (for any
    Llama-shaped attention: it reads only the attributes Llama's has, and Qwen3's head norms where present)."""
    batch, query_length, _ = hidden_states.shape
    query = self.q_proj(hidden_states).reshape([0, 0, self.num_heads, self.head_dim])
    key = self.k_proj(hidden_states).reshape([0, 0, self.num_key_value_heads, self.head_dim])
    value = self.v_proj(hidden_states).reshape([0, 0, self.num_key_value_heads, self.head_dim])
    if getattr(self, "q_norm", None) is not None:  # Qwen3's RMSNorm of each query and key head, before the rotation
        query, key = self.q_norm(query), self.k_norm(key)

    tables: RotaryTables = self._paddle_llm_rotary_tables
    if position_ids is None:  # PaddleNLP's pipeline path: positions 0..kv_len-1, sliced to the query length
        cos, sin = tables.cos[None, :query_length], tables.sign_folded_sin[None, :query_length]
    else:
        cos, sin = tables.lookup(position_ids)  # [b, s, head_dim]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    query = apply_rotary(query, cos, sin, swap_halves)
    key = apply_rotary(key, cos, sin, swap_halves)

    if past_key_value is not None:
        key = paddle.concat([past_key_value[0], key], axis=1)
        value = paddle.concat([past_key_value[1], value], axis=1)
    present = (key, value) if use_cache else None

    key_length = key.shape[1]
    if attention_mask is None:
        attention_mask = additive_upper_triangle_mask(batch, query_length, key_length, query.dtype)
    elif attention_mask.shape[0] != 1:
        attention_mask = attention_mask.reshape([batch, 1, query_length, key_length])
    context, probabilities = attention_in_projection_layout(
        query, key, value, attention_mask, query_scale=1.0 / math.sqrt(self.head_dim)
    )
    attention_output = self.o_proj(context.reshape([batch, query_length, -1]))

    outputs = (attention_output,)
    if output_attentions:
        outputs += (probabilities,)
    if use_cache:
        outputs += (present,)
    return outputs[0] if len(outputs) == 1 else outputs


def llama_attention_unsupported(attention, config) -> str | None:
    """Why PaddleNLP's Llama attention layer is outside what the CPU composites (and the export step) reproduce."""
    from paddlenlp.transformers.llama import modeling as llama_modeling

    reason = parallel_reason(config)
    if reason:
        return reason
    if attention.fuse_attention_qkv:
        return "fuse_attention_qkv"
    if not config.rope or config.use_long_sequence_strategies or attention.use_fused_rope:
        return "rotary embedding is not PaddleNLP's cached LlamaRotaryEmbedding"
    if type(attention.rotary_emb).forward is not llama_modeling.LlamaRotaryEmbedding.forward:
        return f"{type(attention.rotary_emb).__name__} recomputes its tables per call"
    if config.alibi:
        return "alibi"
    if attention.kv_indices is not None or attention.reshard_layer is not None:
        return "split key/value heads"
    if config.recompute and config.recompute_granularity == "core_attn":
        return "core_attn recompute lives inside PaddleNLP's attention"
    return None


def llama_rotary_tables(rotary_embedding) -> RotaryTables:
    """The cos and sign-folded sin rows of PaddleNLP's cached Llama rotary tables (``cos_cached`` / ``sin_cached``,
    ``[1, positions, 1, head_dim]``)."""
    cos = rotary_embedding.cos_cached.squeeze([0, 2])  # [positions, head_dim]
    return RotaryTables(cos=cos, sign_folded_sin=sign_folded_sin_halves(rotary_embedding.sin_cached.squeeze([0, 2])))


@dataclass(frozen=True)
class LlamaShapedLayers:
    """The PaddleNLP layer classes of a model built like Llama (same sublayer and attribute names, same maths), so
    the fast paths below apply to it too.

    Attributes:
        family: names the replacements (``<family>.rms_norm x5``).
        rms_norm, mlp, attention, causal_lm: the classes whose instances are converted.
        attention_unsupported: ``(attention, config) -> reason or None``: what the fast attention does not reproduce.
    """

    family: str
    rms_norm: type
    mlp: type
    attention: type
    causal_lm: type
    attention_unsupported: Callable[[nn.Layer, object], str | None]


def apply_llama_shaped(model: nn.Layer, layers: LlamaShapedLayers) -> list[str]:
    """Swap the fast paths into a Llama-shaped model's layers.

    Returns:
        What was replaced, as ``<family>.<component> xN``.
    """
    replaced = Replacements(layers.family)
    for layer in model.sublayers(include_self=True):
        if is_replaced(layer):
            continue
        config = getattr(layer, "config", None)
        if isinstance(layer, layers.rms_norm):
            if config.use_fused_rms_norm or not is_float32(layer):
                replaced.skip("rms_norm", "fused RMSNorm requested or not fp32")
                continue
            bind_forward(layer, rms_norm_forward)
            replaced.add("rms_norm")
        elif isinstance(layer, layers.mlp):
            # Only the elementwise gate changes, so every projection layout (fused, tensor parallel) is covered.
            bind_forward(layer, _llama_mlp_forward)
            replaced.add("mlp_swiglu")
        elif isinstance(layer, layers.attention):
            reason = layers.attention_unsupported(layer, config) or (None if is_float32(layer) else "not fp32")
            if reason:
                replaced.skip("attention_rotary_mask", reason)
                continue
            layer._paddle_llm_rotary_tables = llama_rotary_tables(layer.rotary_emb)
            bind_forward(layer, _llama_attention_forward)
            replaced.add("attention_rotary_mask")
        elif isinstance(layer, layers.causal_lm):
            criterion = layer.criterion
            if isinstance(criterion, CausalLMLoss):
                continue
            if criterion.enable_parallel_cross_entropy or parallel_reason(layer.config):
                replaced.skip("loss", "parallel cross entropy")
                continue
            layer.criterion = CausalLMLoss(ignore_index=criterion.ignore_index, count_positive_losses=True)
            replaced.add("loss")
    return replaced.describe()


def apply(model: nn.Layer) -> list[str]:
    """Swap the fast paths into a PaddleNLP Llama's layers; returns what was replaced (``llama.<component> xN``)."""
    from paddlenlp.transformers.llama import modeling as llama_modeling

    return apply_to_llama_subclass(model, "llama", llama_modeling.LlamaAttention, llama_modeling.LlamaForCausalLM)


def apply_to_llama_subclass(model: nn.Layer, family: str, attention: type, causal_lm: type) -> list[str]:
    """The fast paths on a family whose attention and causal LM subclass PaddleNLP's Llama (Qwen3, ERNIE 4.5: the
    norms and MLP are PaddleNLP's Llama classes); returns what was replaced (``<family>.<component> xN``)."""
    from paddlenlp.transformers.llama import modeling as llama_modeling

    layers = LlamaShapedLayers(
        family=family,
        rms_norm=llama_modeling.LlamaRMSNorm,
        mlp=llama_modeling.LlamaMLP,
        attention=attention,
        causal_lm=causal_lm,
        attention_unsupported=llama_attention_unsupported,
    )
    return apply_llama_shaped(model, layers)
