"""Qwen2's decoding step for export: an attention function a traced graph can hold.

PaddleNLP's Qwen2 ``scaled_dot_product_attention`` checks ``attn_weights.shape != [bsz, heads, q_len, kv_len]`` in
every mode; traced with dynamic batch and lengths those dimensions are tensors, and the comparison needs their values
("bool(Tensor) is not supported in static graph mode"). Llama's copy of the function runs the check only in dygraph.
``prepare_for_tracing`` gives each attention layer of the model being exported the same computation without the
checks (PaddleNLP's non-flash path in evaluation: no dropout); export's parity check compares the traced graph with
PaddleNLP's untouched forward.
"""

from __future__ import annotations

import math

import paddle
import paddle.nn.functional as F
from paddle import nn


def traceable_attention(query_states, config, key_states, value_states, attention_mask, output_attentions, **unused):
    """Qwen2's eager attention for evaluation: ``softmax(q k^T / sqrt(d) + mask) v`` with the softmax in float32.

    Args:
        query_states, key_states, value_states: ``[batch, seq, heads, head_dim]``, key/value heads already repeated.
        attention_mask: additive ``[batch, 1, q_len, kv_len]`` (what ``Qwen2Model`` makes of the step's bool mask).
        output_attentions: also return the probabilities.
        unused: the flags PaddleNLP passes for training-only paths (recompute, sequence parallel, dropout).
    """
    query = query_states.transpose([0, 2, 1, 3])
    key = key_states.transpose([0, 2, 1, 3])
    value = value_states.transpose([0, 2, 1, 3])
    scores = paddle.matmul(query / math.sqrt(query_states.shape[-1]), key.transpose([0, 1, 3, 2])) + attention_mask
    probabilities = F.softmax(scores.astype("float32"), axis=-1).astype(query.dtype)
    output = paddle.matmul(probabilities, value).transpose([0, 2, 1, 3])
    output = output.reshape([0, 0, -1])  # [batch, seq, heads * head_dim]; 0 keeps a dimension as it is
    return (output, probabilities) if output_attentions else output


def prepare_for_tracing(model: nn.Layer, config) -> None:
    """Swap ``traceable_attention`` into every Qwen2 attention layer of ``model`` (in place; numerics unchanged)."""
    for layer in model.qwen2.layers:
        layer.self_attn.attn_func = traceable_attention
