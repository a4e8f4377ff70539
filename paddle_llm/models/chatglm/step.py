"""ChatGLM-6B's rotary table in a form a traced graph can hold, for export."""

from __future__ import annotations

import paddle
from paddle import nn


class StaticGLMRotary(nn.Layer):
    """ChatGLM v1's rotary embedding with its cos/sin table built once, for tracing.

    PaddleNLP's version grows a Python-side cache from ``position_ids.max()`` during forward; traced, that turns into
    a tensor-valued branch that assigns attributes, and the table made while tracing one program leaks into the next
    ("Not found key in IRMapping"). The table below holds the same values (cos/sin of ``t * inv_freq`` computed
    element-wise), only for every position up front.
    """

    def __init__(self, original: nn.Layer, max_positions: int):
        super().__init__()
        self.position_encoding_2d = original.position_encoding_2d
        self.dtype_name = original.default_dtype
        positions = paddle.arange(0, max_positions, dtype="float32")
        freqs = paddle.einsum("i,j->ij", positions, original.inv_freq.astype("float32"))
        angles = paddle.concat([freqs, freqs], axis=-1)
        # Kept in float32: the CPU build's gather has no half-precision kernel. Casting after the lookup gives the
        # same values as PaddleNLP's cast-then-lookup.
        self.register_buffer("cos_table", angles.cos())
        self.register_buffer("sin_table", angles.sin())

    def _lookup(self, position_ids):
        # [s, b] -> [2 (cos, sin), s, b, 1, dim], as PaddleNLP's get_rotary_embeds returns.
        cos = self.cos_table[position_ids].unsqueeze(2).astype(self.dtype_name)
        sin = self.sin_table[position_ids].unsqueeze(2).astype(self.dtype_name)
        return paddle.stack([cos, sin], axis=0)

    def forward(self, position_ids):
        if self.position_encoding_2d:
            block_position_ids = position_ids[:, 1, :].transpose([1, 0])
            token_position_ids = position_ids[:, 0, :].transpose([1, 0])
            return paddle.stack([self._lookup(token_position_ids), self._lookup(block_position_ids)], axis=0)
        return self._lookup(position_ids.transpose([1, 0]))


def prepare_for_tracing(model: nn.Layer, config) -> None:
    """Swap in the trace-friendly rotary table (in place; numerics unchanged)."""
    transformer = model.chatglm.transformer
    transformer.rotary_embeddings = StaticGLMRotary(transformer.rotary_embeddings, config.max_sequence_length)
