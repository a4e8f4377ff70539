"""A Llama decoding step written for Paddle Inference: the same maths as PaddleNLP's model in a third of the ops.

Why: one decoding step of a small or medium model costs the executor's per-op time, not arithmetic. Traced from
PaddleNLP's ``LlamaForCausalLM``, the step graph has ~350 executed ops for 4 layers (separate q/k/v and gate/up
projections, rotate-half as slice/negate/concat, per-layer mask conversion, RMSNorm with a weight multiply). This
layer computes the same function with fewer, larger ops, all decided once at export:

- q, k and v are one matmul, gate and up another, and the 1/sqrt(head_dim) attention scale is folded into the q
  columns;
- RMSNorm is Paddle's fused kernel, one op instead of five, where asked: its only CPU kernel needs AVX-512, so a
  graph that must run on any x86-64 CPU composes it (``config.cpu_features`` decides);
- rotary embedding rotates q and k together, with rotate-half as a ``roll`` against a sign-folded sin table
  (``models.cpu_ops``' formulation), and the cos/sin rows are gathered once per step, not per layer;
- the boolean mask becomes one additive bias per step, shared by every layer, and the rotary rows and the bias are
  expanded once per step to full shape (broadcasting multiplies and adds are slow on CPU);
- the cache is head-major (``[b, kv_heads, positions, head_dim]`` per layer), the layout attention multiplies in,
  and a step never copies it: attention reads the past and the new positions separately, and only the new
  positions' keys and values leave the graph (the caller writes them into its preallocated cache).

The signature is ``step_graph.KVCacheStep``'s, so the engine and the parity check drive both alike;
``step_graph.cache_layout`` describes the head-major cache to them. ``llama_step_unsupported`` names any
configuration this layer does not reproduce; those models are traced from PaddleNLP's code as before. Equality with PaddleNLP is what export's parity check verifies (logits
within 1e-4, identical greedy tokens), ``tests/integration/test_export.py`` runs it, and
``tests/unit/test_llama_step.py`` compares logits and caches to 1e-5.
"""

from __future__ import annotations

import math
from types import ModuleType

import paddle
import paddle.nn.functional as F
from paddle import nn
from paddle.incubate.nn.functional import fused_rms_norm as paddle_fused_rms_norm

from paddle_llm.cpu.kernels import pack_panels
from paddle_llm.models.llama.cpu_fast import llama_attention_unsupported, llama_rotary_tables

# Added to masked scores: exp() of it underflows to exactly 0 in float32, as PaddleNLP's finfo.min does.
_MASKED_SCORE = -1e30


def llama_step_unsupported(model: nn.Layer, dtype: str) -> str | None:
    """Why ``model`` must be traced from PaddleNLP's code instead of this layer, or None when it can use it."""
    if dtype != "float32":
        return f"{dtype} export (this step is written for float32)"
    config = model.config
    for layer in model.llama.layers:
        reason = llama_attention_unsupported(layer.self_attn, config)
        if reason:
            return reason
        if layer.mlp.fuse_attention_ffn:
            return "fuse_attention_ffn"
        if getattr(config, "hidden_act", "silu") != "silu":
            return f"hidden_act {config.hidden_act}"
    return None


class LlamaInferenceStep(nn.Layer):
    """``(input_ids, position_ids, mask, [*past_keys, *past_values]) -> (last_logits, *new_keys, *new_values)`` for a
    Llama model, each cache ``[batch, kv_heads, positions, head_dim]``; the outputs hold the ``q`` new positions."""

    def __init__(self, model: nn.Layer, fused_rms_norm: bool, packed_matmul: ModuleType | None = None):
        """
        Args:
            model: a PaddleNLP ``LlamaForCausalLM`` that ``llama_step_unsupported`` accepts.
            fused_rms_norm: use Paddle's fused RMSNorm (AVX-512 CPUs only; ~10% faster decoding at hidden 512).
                An attribute, switchable between traces: export saves both programs over the same buffers.
            packed_matmul: the compiled CPU kernels (``cpu.kernels.load()``): the weight matrices are stored in
                panels (``cpu.kernels.pack_panels``) and multiplied by its ``paddle_llm_packed_matmul``, 25-30%
                faster than MKL for the few rows of a decoding step. Its buffers differ, so it saves its own weights.
        """
        super().__init__()
        self.fused_rms_norm = fused_rms_norm
        self.packed_matmul = packed_matmul
        self.weight_columns: dict[str, int] = {}
        config = model.config
        llama = model.llama
        first_attention = llama.layers[0].self_attn
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = first_attention.head_dim  # hidden/heads, or the config's own head_dim
        self.epsilon = float(config.rms_norm_eps)
        self.num_layers = len(llama.layers)
        tables = llama_rotary_tables(first_attention.rotary_emb)
        self.register_buffer("cos_table", tables.cos)
        self.register_buffer("sin_table", tables.sign_folded_sin)
        self.register_buffer("embedding", llama.embed_tokens.weight.detach())

        query_scale = 1.0 / math.sqrt(self.head_dim)
        # attention_bias / mlp_bias (models/llama/modeling.py): biases of the same fused shapes, added after each matmul.
        self.attention_bias = first_attention.q_proj.bias is not None
        self.mlp_bias = llama.layers[0].mlp.gate_proj.bias is not None
        for index, layer in enumerate(llama.layers):
            attention, mlp = layer.self_attn, layer.mlp
            self.register_buffer(f"attention_norm_{index}", layer.input_layernorm.weight.detach())
            qkv = paddle.concat([attention.q_proj.weight * query_scale, attention.k_proj.weight,
                                 attention.v_proj.weight], axis=1)
            self._register_weight(f"qkv_{index}", qkv)
            self._register_weight(f"out_{index}", attention.o_proj.weight)
            self.register_buffer(f"mlp_norm_{index}", layer.post_attention_layernorm.weight.detach())
            gate_up = paddle.concat([mlp.gate_proj.weight, mlp.up_proj.weight], axis=1)
            self._register_weight(f"gate_up_{index}", gate_up)
            self._register_weight(f"down_{index}", mlp.down_proj.weight)
            if self.attention_bias:
                qkv_bias = paddle.concat([attention.q_proj.bias * query_scale, attention.k_proj.bias, attention.v_proj.bias])
                self.register_buffer(f"qkv_bias_{index}", qkv_bias.detach())
                self.register_buffer(f"out_bias_{index}", attention.o_proj.bias.detach())
            if self.mlp_bias:
                self.register_buffer(f"gate_up_bias_{index}", paddle.concat([mlp.gate_proj.bias, mlp.up_proj.bias]).detach())
                self.register_buffer(f"down_bias_{index}", mlp.down_proj.bias.detach())
        self.register_buffer("final_norm", llama.norm.weight.detach())
        lm_head = model.lm_head.weight.detach()
        if model.lm_head.transpose_y:  # tied to the [vocab, hidden] embedding
            lm_head = lm_head.transpose([1, 0])
        self._register_weight("lm_head", lm_head)

    def _register_weight(self, name: str, weight: paddle.Tensor) -> None:
        """A ``[in, out]`` weight matrix as a buffer, in panels when the step multiplies with the compiled kernel."""
        weight = weight.detach()
        self.weight_columns[name] = weight.shape[1]
        if self.packed_matmul is not None:
            weight = paddle.to_tensor(pack_panels(weight.numpy()))
        self.register_buffer(name, weight)

    def _weight_matmul(self, x, name: str):
        if self.packed_matmul is None:
            return paddle.matmul(x, getattr(self, name))
        return self.packed_matmul.paddle_llm_packed_matmul(x, getattr(self, name), self.weight_columns[name])

    def _normalized(self, x, weight):
        if self.fused_rms_norm:
            return paddle_fused_rms_norm(x, weight, None, self.epsilon, begin_norm_axis=x.ndim - 1)[0]
        return x * paddle.rsqrt((x * x).mean(axis=-1, keepdim=True) + self.epsilon) * weight

    def _attention(self, hidden, cos, sin, score_bias, past_length, past_key, past_value, index):
        # Reshapes use 0 (keep this axis) and -1 rather than sizes read from shape(): no shape ops in the graph.
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._weight_matmul(self._normalized(hidden, getattr(self, f"attention_norm_{index}")), f"qkv_{index}")
        if self.attention_bias:
            qkv = qkv + getattr(self, f"qkv_bias_{index}")
        # [b, q, heads, dim] -> [b, heads, q, dim] once, for q, k and v together.
        qkv = qkv.reshape([0, 0, heads + 2 * kv_heads, head_dim]).transpose([0, 2, 1, 3])
        rotated, v = paddle.split(qkv, [heads + kv_heads, kv_heads], axis=1)
        rotated = rotated * cos + paddle.roll(rotated, shifts=head_dim // 2, axis=-1) * sin
        q, k = paddle.split(rotated, [heads, kv_heads], axis=1)
        grouped = heads != kv_heads
        if grouped:  # the query heads of one kv head become extra query rows, so one matmul serves the group
            q = q.reshape([0, kv_heads, -1, head_dim])
        # The past and the new positions are attended separately and never concatenated: a concat would copy the
        # whole cache of every layer at every step, the cost that grew with the batch.
        scores = paddle.concat([paddle.matmul(q, past_key, transpose_y=True), paddle.matmul(q, k, transpose_y=True)],
                               axis=-1) + score_bias
        probabilities = F.softmax(scores, axis=-1)
        context = (paddle.matmul(paddle.slice(probabilities, axes=[3], starts=[0], ends=past_length), past_value)
                   + paddle.matmul(paddle.slice(probabilities, axes=[3], starts=past_length, ends=[2**31 - 1]), v))
        if grouped:
            context = context.reshape([0, heads, -1, head_dim])
        context = context.transpose([0, 2, 1, 3])
        output = self._weight_matmul(context.reshape([0, 0, heads * head_dim]), f"out_{index}")
        if self.attention_bias:
            output = output + getattr(self, f"out_bias_{index}")
        return hidden + output, k, v

    def _mlp(self, hidden, index):
        gate_up = self._weight_matmul(self._normalized(hidden, getattr(self, f"mlp_norm_{index}")), f"gate_up_{index}")
        if self.mlp_bias:
            gate_up = gate_up + getattr(self, f"gate_up_bias_{index}")
        down = self._weight_matmul(F.swiglu(gate_up), f"down_{index}")
        return hidden + (down + getattr(self, f"down_bias_{index}") if self.mlp_bias else down)

    def forward(self, input_ids, position_ids, attention_mask, caches):
        layers = self.num_layers
        hidden = F.embedding(input_ids, self.embedding)
        # Paddle's CPU multiply and add are several times slower when they broadcast, so the rotary tables and the
        # mask bias are expanded once per step to the shapes every layer uses them at.
        rotated_heads = self.num_heads + self.num_kv_heads
        cos = F.embedding(position_ids, self.cos_table).unsqueeze(1).expand([-1, rotated_heads, -1, -1])
        sin = F.embedding(position_ids, self.sin_table).unsqueeze(1).expand([-1, rotated_heads, -1, -1])
        # [b, 1, q, kv] -> [b, kv_heads, groups * q, kv]: the row order _attention's grouped query uses.
        groups = self.num_heads // self.num_kv_heads
        score_bias = (1.0 - attention_mask.astype("float32")) * _MASKED_SCORE
        score_bias = paddle.tile(score_bias, [1, self.num_kv_heads, groups, 1])
        # Where the probabilities stop covering the past and start covering the new positions, as the 1-element
        # tensor slice takes for a bound: read once per step, not per layer (a shape, a slice and a stack each).
        past_length = paddle.shape(caches[0])[2:3]
        keys, values = [], []
        for index in range(layers):
            hidden, key, value = self._attention(hidden, cos, sin, score_bias, past_length, caches[index],
                                                 caches[layers + index], index)
            hidden = self._mlp(hidden, index)
            keys.append(key)
            values.append(value)
        logits = self._weight_matmul(self._normalized(hidden[:, -1, :], self.final_norm), "lm_head")
        return (logits, *keys, *values)


def build(model: nn.Layer, dtype: str, fused_rms_norm: bool,
          packed_matmul: ModuleType | None = None) -> tuple[LlamaInferenceStep | None, str]:
    """``StepSpec.inference_step`` for Llama: this layer for ``model``, or None and why PaddleNLP's forward is kept."""
    reason = llama_step_unsupported(model, dtype)
    if reason is not None:
        return None, reason
    return LlamaInferenceStep(model, fused_rms_norm, packed_matmul), ""
