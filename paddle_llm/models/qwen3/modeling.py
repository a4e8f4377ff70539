"""Qwen3 (dense) in Paddle: PaddleNLP's Llama with the layer options of ``models/llama/modeling.py`` (head_dim apart
from hidden/heads, optional q/k/v/o biases) and an RMSNorm over each query and key head before the rotary
embedding, as transformers' ``Qwen3Attention``. PaddleNLP 3.0.0b4 has no Qwen3.

The attention forward below is PaddleNLP's Llama attention for one process (its rotary tables, ``apply_rotary_pos_emb``,
``repeat_kv`` and ``attn_func``) with the two norms added; the parallel layouts it leaves out are refused by ``check``.
"""

from __future__ import annotations

import paddle
from paddle import nn
from paddlenlp.transformers.llama import modeling as llama_modeling

from paddle_llm.models.llama.modeling import LlamaForCausalLM, LlamaOptionsAttention


class Qwen3Config(llama_modeling.LlamaConfig):
    """``LlamaConfig`` under Qwen3's model_type; ``head_dim`` and ``attention_bias`` are read as fields."""

    model_type = "qwen3"


def head_norm(config, width: int) -> llama_modeling.LlamaRMSNorm:
    """PaddleNLP's RMSNorm over one head (``width`` = head_dim) instead of the hidden size."""
    norm = llama_modeling.LlamaRMSNorm(config)
    norm.hidden_size = width
    norm.weight = paddle.create_parameter(shape=[width], dtype=paddle.get_default_dtype(),
                                          default_initializer=nn.initializer.Constant(1.0))
    return norm


class Qwen3Attention(LlamaOptionsAttention):
    """Llama attention with ``q_norm`` and ``k_norm``: RMSNorm of each head of q and k, before the rotary embedding."""

    def __init__(self, config, layerwise_recompute: bool = False, skip_recompute_ops=None):
        super().__init__(config, layerwise_recompute, skip_recompute_ops)
        self.q_norm = head_norm(config, self.head_dim)
        self.k_norm = head_norm(config, self.head_dim)

    def forward(self, hidden_states, position_ids=None, past_key_value=None, attention_mask=None,
                output_attentions=False, use_cache=False, alibi=None, attn_mask_startend_row_indices=None,
                npu_is_casual=False):
        # Reshapes keep batch and sequence with 0, so a traced step has no shape ops.
        query = self.q_norm(self.q_proj(hidden_states).reshape([0, 0, self.num_heads, self.head_dim]))
        key = self.k_norm(self.k_proj(hidden_states).reshape([0, 0, self.num_key_value_heads, self.head_dim]))
        value = self.v_proj(hidden_states).reshape([0, 0, self.num_key_value_heads, self.head_dim])
        key_length = key.shape[-3] + (past_key_value[0].shape[-3] if past_key_value is not None else 0)
        cos, sin = self.rotary_emb(value, seq_len=key_length)
        query, key = llama_modeling.apply_rotary_pos_emb(query, key, cos, sin, position_ids)
        if past_key_value is not None:
            key = paddle.concat([past_key_value[0], key], axis=1)
            value = paddle.concat([past_key_value[1], value], axis=1)
        present = (key, value) if use_cache else None
        outputs = self.attn_func(
            query, self.config, llama_modeling.repeat_kv(key, self.num_key_value_groups),
            llama_modeling.repeat_kv(value, self.num_key_value_groups), attention_mask, output_attentions,
            alibi=alibi, attn_mask_startend_row_indices=attn_mask_startend_row_indices, sequence_parallel=False,
            reshard_layer=None, npu_is_casual=npu_is_casual,
        )
        attention_output, probabilities = outputs if output_attentions else (outputs, None)
        results = (self.o_proj(attention_output),)
        if output_attentions:
            results += (probabilities,)
        if use_cache:
            results += (present,)
        return results[0] if len(results) == 1 else results


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3's causal LM: Llama's with ``Qwen3Attention`` in every layer (parameters keep PaddleNLP's ``llama.``
    prefix)."""

    config_class = Qwen3Config
    attention_class = Qwen3Attention
