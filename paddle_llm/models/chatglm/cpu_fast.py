"""CPU fast paths of PaddleNLP's ChatGLM-6B (v1): LayerNorm, tanh GELU, and attention with one-pass 2-D rotary.

The building blocks and why they are faster are in ``paddle_llm.cpu.ops``; ``apply`` swaps them into one
model instance (``paddle_llm.cpu.fast_paths.apply_cpu_fast_paths`` calls it).
"""

from __future__ import annotations

import math

import paddle
from paddle import nn

from paddle_llm.cpu.ops import (
    HalvesSwap,
    Replacements,
    RotaryTables,
    apply_rotary,
    attention_in_projection_layout,
    bind_forward,
    is_float32,
    layer_norm,
    parallel_reason,
    sign_folded_sin_halves,
    tanh_gelu,
)


def _layer_norm_forward(self, x):
    """``nn.LayerNorm.forward`` with the fast backward."""
    return layer_norm(x, self.weight, self.bias, self._epsilon)


class _ChatGLMRotaryTables(nn.Layer):
    """Replaces ChatGLM-6B's ``RotaryEmbeddings``: returns cos and sign-folded sin for the whole head, packed.

    PaddleNLP's returns ``[2 (position/block), 2 (cos/sin), s, b, 1, head_dim/2]`` for its attention to slice and
    rotate each half; ours returns ``[2 (cos/sign-folded sin), s, b, 1, head_dim]`` (the position half, then the
    block half) for ``_chatglm_attention_forward``, which rotates the whole head in one pass.
    """

    def __init__(self, inv_freq: paddle.Tensor, position_encoding_2d: bool, positions: int):
        super().__init__()
        self.inv_freq = inv_freq
        self.position_encoding_2d = position_encoding_2d
        self._tables = self._build(positions)

    def _build(self, positions: int) -> RotaryTables:
        # Same ops as PaddleNLP's RotaryEmbeddings.forward, so the values are identical.
        steps = paddle.arange(start=0, end=positions, dtype="float32")
        frequencies = paddle.einsum("i,j->ij", steps, self.inv_freq)
        angles = paddle.concat([frequencies, frequencies], axis=-1)
        return RotaryTables(cos=angles.cos(), sign_folded_sin=sign_folded_sin_halves(angles.sin()))

    def forward(self, position_ids):
        # Grow for positions past max_sequence_length as PaddleNLP does; a static graph keeps the tables it has.
        if paddle.in_dynamic_mode():
            positions_needed = int(position_ids.max()) + 1
            if positions_needed > self._tables.cos.shape[0]:
                self._tables = self._build(positions_needed)
        if self.position_encoding_2d:  # position_ids [b, 2, s]: token positions, then block positions
            cos_position, sin_position = self._tables.lookup(position_ids[:, 0, :].transpose([1, 0]))
            cos_block, sin_block = self._tables.lookup(position_ids[:, 1, :].transpose([1, 0]))
            cos = paddle.concat([cos_position, cos_block], axis=-1)
            sin = paddle.concat([sin_position, sin_block], axis=-1)
        else:
            cos, sin = self._tables.lookup(position_ids.transpose([1, 0]))
        return paddle.stack([cos, sin]).unsqueeze(3)  # [2, s, b, 1, head_dim]


def _chatglm_attention_forward(
    self, hidden_states, attention_mask, position_ids, use_cache=False, cache=None, layer_id=0, rotary_embeds=None
):
    """``ChatGLMAttention.forward`` (non-flash path) with one-pass 2-D rotary and the fast mask/softmax."""
    query_length, batch = hidden_states.shape[:2]
    mixed = self.query_key_value(hidden_states).reshape(
        [query_length, batch, self.num_attention_heads, self.attention_head_size * 3]
    )
    query, key, value = paddle.split(mixed, 3, axis=-1)
    swap = HalvesSwap(blocks=2 if self.position_encoding_2d else 1)
    cos, sin = rotary_embeds[0], rotary_embeds[1]
    query = apply_rotary(query, cos, sin, swap)
    key = apply_rotary(key, cos, sin, swap)

    if cache is not None:
        key = paddle.concat([cache[0], key], axis=0)
        value = paddle.concat([cache[1], value], axis=0)
    cache_kv = (key, value) if use_cache else None

    scale_coefficient = float(layer_id) + 1.0
    context, probabilities = attention_in_projection_layout(
        query,
        key,
        value,
        attention_mask,
        sequence_first=True,
        query_scale=1.0 / (math.sqrt(self.attention_head_size) * scale_coefficient) if self.attention_scale else 1.0,
        score_multiplier=scale_coefficient,
    )
    context = context.reshape([query_length, batch, -1])
    return self.dense(context), cache_kv, probabilities


def apply(model: nn.Layer) -> list[str]:
    """Swap the fast paths into ``model``'s layers; returns what was replaced (``<family>.<component> xN``)."""
    from paddlenlp.transformers.chatglm import modeling as chatglm_modeling

    replaced = Replacements("chatglm")
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, chatglm_modeling.ChatGLMStack):
            stack = layer
            if isinstance(stack.rotary_embeddings, _ChatGLMRotaryTables):
                continue
            reason = parallel_reason(stack.config) or (None if is_float32(stack) else "not fp32")
            if stack.config.use_long_sequence_strategies:
                reason = "use_long_sequence_strategies"
            if reason:
                replaced.skip("attention_rotary_mask", reason)
                continue
            stack.rotary_embeddings = _ChatGLMRotaryTables(
                stack.rotary_embeddings.inv_freq, stack.position_encoding_2d, stack.config.max_sequence_length
            )
            norms = [stack.final_layernorm]
            for block in stack.layers:
                bind_forward(block.attention, _chatglm_attention_forward)
                replaced.add("attention_rotary_mask")
                norms += [block.input_layernorm, block.post_attention_layernorm]
                if stack.config.activation != "geglu":
                    block.mlp.activation = tanh_gelu
                    replaced.add("mlp_gelu")
            for norm in norms:
                bind_forward(norm, _layer_norm_forward)
                replaced.add("layer_norm")
    return replaced.describe()
