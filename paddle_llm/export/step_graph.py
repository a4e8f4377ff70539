"""One decoding step with a KV cache, as a Layer that both dygraph serving and ``paddle.jit.save`` use.

Every family is driven through the same signature::

    step(input_ids [b, q], position_ids, attention_mask [b, 1, q, past + q] bool, [*past_keys, *past_values])
        -> (last_logits [b, vocab] float32, *keys, *values)

with one key and one value tensor per layer, in the layout ``cache_layout`` describes (PaddleNLP's own for a wrapped
model: ``[b, past, heads, dim]`` for Llama, ``[past, b, heads, dim]`` for ChatGLM); the outputs are the same tensors
grown by ``q`` positions.
The explicit 4-D mask lets one batch hold rows of different lengths (left padding) and lets requests join a batch
mid-flight. The same graph does prefill: the caller passes a past of one masked-out column, because with oneDNN (the
CPU default) a zero-length past makes the cache concat fail, and one graph means one copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import paddle
from paddle import nn
from paddle.static import InputSpec

from paddle_llm.export.llama_step import LlamaInferenceStep, llama_step_unsupported
from paddle_llm.export.manifest import STEP_LLAMA_INFERENCE, STEP_PADDLENLP, CacheLayout


def _llama_call(model, input_ids, position_ids, attention_mask, past):
    logits, present = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        past_key_values=past,
        use_cache=True,
        return_dict=False,
    )[:2]
    return logits, present


def _chatglm_call(model, input_ids, position_ids, attention_mask, past):
    # ChatGLM v1 returns (logits, (caches,)) and names its cache argument ``cache``.
    logits, rest = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        cache=past,
        use_cache=True,
        return_dict=False,
    )
    return logits, rest[0]


@dataclass(frozen=True)
class StepFamily:
    """How to run one family's PaddleNLP model for a step, and where its cache keeps batch and sequence.

    Attributes:
        call: ``(model, input_ids, position_ids, mask, past) -> (logits [b, q, vocab], [(key, value)] per layer)``.
        batch_axis, seq_axis: axes inside one layer's key tensor (heads are at axis 2).
        glm_positions: ChatGLM v1 takes ``position_ids`` as ``[b, 2, q]`` (position, block position).
    """

    call: Callable
    batch_axis: int
    seq_axis: int
    glm_positions: bool


STEP_FAMILIES: dict[str, StepFamily] = {
    "llama": StepFamily(call=_llama_call, batch_axis=0, seq_axis=1, glm_positions=False),
    "chatglm": StepFamily(call=_chatglm_call, batch_axis=1, seq_axis=0, glm_positions=True),
    # ChatGLM2's forward has Llama's signature, but keeps ChatGLM's sequence-first cache.
    "chatglm2": StepFamily(call=_llama_call, batch_axis=1, seq_axis=0, glm_positions=False),
}

def cache_layout(family_name: str, config, implementation: str = STEP_PADDLENLP) -> CacheLayout:
    """Read the cache geometry from a PaddleNLP config, for the step implementation that will run.

    Raises:
        ValueError: the family has no step definition.
    """
    step_family = step_family_of(family_name)
    num_heads = config.num_attention_heads
    if family_name == "llama":
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = config.hidden_size // num_heads
    elif family_name == "chatglm2":
        num_kv_heads = config.multi_query_group_num if config.multi_query_attention else num_heads
        head_dim = config.kv_channels
    else:
        num_kv_heads = num_heads
        head_dim = config.hidden_size // num_heads
    geometry = dict(num_layers=config.num_hidden_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
    if implementation == STEP_LLAMA_INFERENCE:
        # Head-major, the layout attention multiplies in: no transposes of the cache in a step.
        return CacheLayout(**geometry, batch_axis=0, head_axis=1, seq_axis=2)
    return CacheLayout(**geometry, batch_axis=step_family.batch_axis, seq_axis=step_family.seq_axis, head_axis=2)


def max_context_length(family_name: str, config) -> int:
    """The number of positions the model's rotary tables cover."""
    if family_name == "llama":
        return int(config.max_position_embeddings)
    return int(config.max_sequence_length)


def step_family_of(family_name: str) -> StepFamily:
    """Raises: ValueError naming the family when it has no step definition."""
    try:
        return STEP_FAMILIES[family_name]
    except KeyError:
        raise ValueError(f"no KV-cache step for model family {family_name!r}; known: {', '.join(STEP_FAMILIES)}") from None


class KVCacheStep(nn.Layer):
    """Wraps a PaddleNLP causal LM as the uniform one-step function described in the module docstring."""

    def __init__(self, model: nn.Layer, family_name: str, num_layers: int):
        super().__init__()
        self.model = model
        self.step_family = step_family_of(family_name)
        self.num_layers = num_layers

    def forward(self, input_ids, position_ids, attention_mask, caches):
        past = list(zip(caches[: self.num_layers], caches[self.num_layers:]))
        logits, present = self.step_family.call(self.model, input_ids, position_ids, attention_mask, past)
        # Only the last position's logits leave the graph: that is all sampling needs, and it saves copying
        # [b, q, vocab] out of every prefill.
        return (logits[:, -1, :].astype("float32"), *[key for key, _ in present], *[value for _, value in present])


@dataclass(frozen=True)
class StepBuild:
    """A step layer to serve or trace, and the cache layout it takes.

    Attributes:
        layer: ``LlamaInferenceStep`` or ``KVCacheStep``.
        layout: its per-layer cache geometry.
        implementation: ``STEP_LLAMA_INFERENCE`` or ``STEP_PADDLENLP`` (recorded in the export manifest).
        kept_because: why PaddleNLP's forward was kept, or "".
    """

    layer: nn.Layer
    layout: CacheLayout
    implementation: str
    kept_because: str


def build_step_layer(model: nn.Layer, family_name: str, dtype: str, fused_rms_norm: bool = False) -> StepBuild:
    """The step for ``model``: ``LlamaInferenceStep`` for the Llama models it reproduces (the same function in a third
    of the ops), PaddleNLP's forward inside ``KVCacheStep`` for every other model.

    ``fused_rms_norm``: Paddle's fused RMSNorm in ``LlamaInferenceStep``, for a CPU that
    ``config.cpu_features.fused_rms_norm_allowed``; the default step runs on any CPU."""
    config = model.config
    kept_because = f"no inference step for {family_name}"
    if family_name == "llama":
        kept_because = llama_step_unsupported(model, dtype)
        if kept_because is None:
            layout = cache_layout(family_name, config, STEP_LLAMA_INFERENCE)
            return StepBuild(LlamaInferenceStep(model, fused_rms_norm), layout, STEP_LLAMA_INFERENCE, "")
    layer = KVCacheStep(model, family_name, config.num_hidden_layers)
    return StepBuild(layer, cache_layout(family_name, config, STEP_PADDLENLP), STEP_PADDLENLP, kept_because)


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


def prepare_for_tracing(model: nn.Layer, family_name: str, config) -> None:
    """Swap in trace-friendly sublayers where a family needs them (in place; numerics unchanged)."""
    if family_name == "chatglm":
        transformer = model.chatglm.transformer
        transformer.rotary_embeddings = StaticGLMRotary(transformer.rotary_embeddings, max_context_length(family_name, config))


def input_specs(family_name: str, dtype: str, num_layers: int) -> list:
    """InputSpecs of the step graph: every batch, query and past length is dynamic."""
    glm = step_family_of(family_name).glm_positions
    position_shape = [None, 2, None] if glm else [None, None]
    # One list argument: to_static rejects *args, and flattens a list into the graph's trailing inputs.
    caches = [InputSpec([None] * 4, dtype, f"past_{kind}_{layer}") for kind in ("key", "value") for layer in range(num_layers)]
    return [
        InputSpec([None, None], "int64", "input_ids"),
        InputSpec(position_shape, "int64", "position_ids"),
        InputSpec([None, 1, None, None], "bool", "attention_mask"),
        caches,
    ]


def save_step_graph(step: nn.Layer, family_name: str, dtype: str, num_layers: int, path_prefix: str) -> None:
    """Trace ``step`` with dynamic shapes and write ``{path_prefix}.json`` + ``{path_prefix}.pdiparams``."""
    specs = input_specs(family_name, dtype, num_layers)
    static_step = paddle.jit.to_static(step, input_spec=specs, full_graph=True)
    paddle.jit.save(static_step, path_prefix)
