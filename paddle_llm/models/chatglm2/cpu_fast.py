"""CPU fast paths of PaddleNLP's ChatGLM2: RMSNorm, SwiGLU, attention with pair rotary and multi-query groups, the loss.

The building blocks and why they are faster are in ``paddle_llm.cpu.ops``; ``apply`` swaps them into one
model instance (``paddle_llm.cpu.fast_paths.apply_cpu_fast_paths`` calls it).
"""

from __future__ import annotations

from functools import partial

import paddle
from paddle import nn

from paddle_llm.cpu.ops import (
    REPLACED_MARK,
    CausalLMLoss,
    Replacements,
    apply_rotary,
    attention_in_projection_layout,
    bind_forward,
    is_float32,
    is_replaced,
    pair_swap_matrix,
    parallel_reason,
    rms_norm_forward,
    swap_pairs,
    swiglu,
)


class _ChatGLM2RotaryTables(nn.Layer):
    """Replaces ChatGLM2's ``RotaryEmbedding``: a cached ``[positions, 2, head_dim]`` table (cos, sign-folded sin).

    PaddleNLP recomputes ``[positions, rotary_dim/2, 2]`` (cos, sin) on every forward and rotates the first
    ``rotary_dim`` features in interleaved pairs, passing the rest through. Our table spans the whole head: cos = 1
    and sin = 0 on the pass-through features, so ``x * cos + swap_pairs(x) * sin`` leaves them exactly unchanged and
    the attention needs no slice or concat. ``ChatGLMv2Model.forward`` indexes and transposes it by position as
    before, handing ``_chatglm2_attention_forward`` a ``[s, b, 2, head_dim]`` tensor.
    """

    def __init__(self, original: nn.Layer, head_dim: int, positions: int):
        super().__init__()
        # Keep the original's inv_freq buffer so the state dict keeps the keys checkpoints have.
        self.register_buffer("inv_freq", original.inv_freq)
        self.rotary_pairs = original.dim // 2
        self.head_dim = head_dim
        self._table = self._build(positions)

    def _build(self, positions: int) -> paddle.Tensor:
        # Same ops as RotaryEmbedding.forward_impl (n_elem = 2 * rotary_pairs), so the angles are identical.
        n_elem = 2 * self.rotary_pairs
        theta = 1.0 / (10000 ** (paddle.arange(0, n_elem, 2, dtype="float32") / n_elem))
        angles = paddle.outer(paddle.arange(0, positions, dtype="float32"), theta).astype("float32")
        cos_pairs = paddle.repeat_interleave(paddle.cos(angles), 2, axis=-1)
        sin = paddle.sin(angles)
        sign_folded_sin_pairs = paddle.stack([-sin, sin], axis=-1).reshape([positions, n_elem])
        pass_through = self.head_dim - n_elem
        cos = paddle.concat([cos_pairs, paddle.ones([positions, pass_through], dtype="float32")], axis=-1)
        sin = paddle.concat([sign_folded_sin_pairs, paddle.zeros([positions, pass_through], dtype="float32")], axis=-1)
        return paddle.stack([cos, sin], axis=1)

    def forward(self, max_seq_len, offset=0):
        if max_seq_len > self._table.shape[0]:
            self._table = self._build(max_seq_len)
        return self._table[:max_seq_len]


def _chatglm2_attention_forward(
    self, hidden_states, attention_mask, rotary_pos_emb, kv_cache=None, use_cache=True, output_attentions=False
):
    """``SelfAttention.forward`` (non-flash, no sequence parallel) with pair-swap rotary and grouped MQA."""
    query_length, batch = hidden_states.shape[:2]
    head_dim = self.hidden_size_per_attention_head
    query, key, value = self.query_key_value(hidden_states).split(
        [
            self.num_attention_heads_per_partition * head_dim,
            head_dim * self.num_multi_query_groups_per_partition,
            head_dim * self.num_multi_query_groups_per_partition,
        ],
        axis=-1,
    )
    query = query.reshape([0, 0, self.num_attention_heads_per_partition, head_dim])
    key = key.reshape([0, 0, self.num_multi_query_groups_per_partition, head_dim])
    value = value.reshape([0, 0, self.num_multi_query_groups_per_partition, head_dim])

    if rotary_pos_emb is not None:  # [s, b, 2, head_dim] from _ChatGLM2RotaryTables
        rotary = rotary_pos_emb[:query_length]
        cos, sin = rotary[:, :, 0:1, :], rotary[:, :, 1:2, :]
        swap = partial(swap_pairs, permutation=self._paddle_llm_pair_swap)
        query = apply_rotary(query, cos, sin, swap)
        key = apply_rotary(key, cos, sin, swap)

    if use_cache:
        if kv_cache is not None:
            key = paddle.concat((kv_cache[0], key), axis=0)
            value = paddle.concat((kv_cache[1], value), axis=0)
        kv_cache = (key, value)
    else:
        kv_cache = None

    core = self.core_attention
    context, _ = attention_in_projection_layout(
        query,
        key,
        value,
        attention_mask,
        sequence_first=True,
        score_scale=1.0 / core.norm_factor,
        score_multiplier=core.coeff,
    )
    context = context.reshape([query_length, batch, core.hidden_size_per_partition])
    return self.dense(context), kv_cache


def _chatglm2_mlp_forward(self, hidden_states):
    """ChatGLM2 ``MLP.forward``: the fused up/gate projection split in two, then the fast SwiGLU."""
    gate, up = paddle.chunk(self.dense_h_to_4h(hidden_states), 2, axis=-1)
    return self.dense_4h_to_h(swiglu(gate, up))


def apply(model: nn.Layer) -> list[str]:
    """Swap the fast paths into ``model``'s layers; returns what was replaced (``<family>.<component> xN``)."""
    from paddlenlp.transformers.chatglm_v2 import modeling as chatglm2_modeling

    replaced = Replacements("chatglm2")
    for layer in model.sublayers(include_self=True):
        if is_replaced(layer):
            continue
        config = getattr(layer, "config", None)
        if isinstance(layer, chatglm2_modeling.RMSNorm):
            if not is_float32(layer):
                replaced.skip("rms_norm", "not fp32")
                continue
            bind_forward(layer, rms_norm_forward)
            replaced.add("rms_norm")
        elif isinstance(layer, chatglm2_modeling.MLP):
            if layer.dense_h_to_4h.weight.shape[-1] % 2 or not is_float32(layer):
                replaced.skip("mlp_swiglu", "unexpected projection shape or not fp32")
                continue
            bind_forward(layer, _chatglm2_mlp_forward)
            replaced.add("mlp_swiglu")
        elif isinstance(layer, chatglm2_modeling.ChatGLMv2Model):
            reason = parallel_reason(config) or (None if is_float32(layer) else "not fp32")
            if config.use_long_sequence_strategies:
                reason = "use_long_sequence_strategies"
            if config.attention_dropout:
                reason = "attention dropout"
            if reason:
                replaced.skip("attention_rotary_mask", reason)
                continue
            attentions = [block.self_attention for block in layer.encoder.layers]
            head_dim = attentions[0].hidden_size_per_attention_head
            rotary = _ChatGLM2RotaryTables(layer.rotary_pos_emb, head_dim, config.max_sequence_length)
            layer.rotary_pos_emb = rotary
            permutation = pair_swap_matrix(head_dim, 2 * rotary.rotary_pairs)
            for attention in attentions:
                attention._paddle_llm_pair_swap = permutation
                bind_forward(attention, _chatglm2_attention_forward)
                replaced.add("attention_rotary_mask")
            setattr(layer, REPLACED_MARK, True)
        elif isinstance(layer, chatglm2_modeling.ChatGLMv2ForCausalLM):
            if isinstance(layer.criterion, CausalLMLoss):
                continue
            if config.tensor_parallel_degree > 1 and config.tensor_parallel_output:
                replaced.skip("loss", "parallel cross entropy")
                continue
            layer.criterion = CausalLMLoss(ignore_index=-100, count_positive_losses=False)
            replaced.add("loss")
    return replaced.describe()
