"""One decoding step with a KV cache, as a Layer that both dygraph serving and ``paddle.jit.save`` use.

Every family is driven through the same signature::

    step(input_ids [b, q], position_ids, attention_mask [b, 1, q, past + q] bool, [*past_keys, *past_values])
        -> (last_logits [b, vocab] float32, *new_keys, *new_values)

with one key and one value tensor per layer, in the layout ``cache_layout`` describes (PaddleNLP's own for a wrapped
model, from the family's ``StepSpec``: ``[b, past, heads, dim]`` for Llama, ``[past, b, heads, dim]`` for ChatGLM); the
outputs hold only the ``q`` new positions, which the caller writes into its preallocated cache
(``runtime.StepDecoder``): returning the grown cache would copy all of it out of every step
(``manifest.STEP_INTERFACE`` 2; version-1 exports returned it and are refused with a re-export message).
The explicit 4-D mask lets one batch hold rows of different lengths and lets requests join a batch mid-flight: the
past is the cache's preallocated columns, each row's unwritten ones masked out. The same graph does prefill; the past
is never empty (the cache has at least one column), because with oneDNN (the CPU default) a zero-length past makes
the cache concat fail, and one graph means one copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import paddle
from paddle import nn
from paddle.static import InputSpec

from paddle_llm.inference.manifest import STEP_LLAMA_INFERENCE, STEP_PADDLENLP, CacheLayout
from paddle_llm.models.registry import FAMILIES, ModelFamily
from paddle_llm.models.step import StepSpec


def step_spec(family: ModelFamily) -> StepSpec:
    """The family's ``StepSpec``.

    Raises:
        ValueError: naming the family when it has no step definition.
    """
    if family.step is None:
        having = ", ".join(f.name for f in FAMILIES.values() if f.step is not None)
        raise ValueError(f"no step for model family {family.name!r}; known families: {having}")
    return family.step


def cache_layout(family: ModelFamily, config, implementation: str = STEP_PADDLENLP) -> CacheLayout:
    """Read the cache geometry from a PaddleNLP config, for the step implementation that will run.

    Raises:
        ValueError: the family has no step definition.
    """
    spec = step_spec(family)
    num_kv_heads, head_dim = spec.kv_geometry(config)
    geometry = dict(num_layers=config.num_hidden_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
    if implementation == STEP_LLAMA_INFERENCE:
        # Head-major, the layout attention multiplies in: no transposes of the cache in a step.
        return CacheLayout(**geometry, batch_axis=0, head_axis=1, seq_axis=2)
    return CacheLayout(**geometry, batch_axis=spec.batch_axis, seq_axis=spec.seq_axis, head_axis=2)


def max_context_length(family: ModelFamily, config) -> int:
    """The number of positions the model's rotary tables cover."""
    return family.max_context_length(config)


class KVCacheStep(nn.Layer):
    """Wraps a PaddleNLP causal LM as the uniform one-step function described in the module docstring."""

    def __init__(self, model: nn.Layer, family: ModelFamily, num_layers: int):
        super().__init__()
        self.model = model
        self.step_spec = step_spec(family)
        self.num_layers = num_layers

    def forward(self, input_ids, position_ids, attention_mask, caches):
        past = list(zip(caches[: self.num_layers], caches[self.num_layers:]))
        logits, present = self.step_spec.call(self.model, input_ids, position_ids, attention_mask, past)
        # Only the last position's logits leave the graph: that is all sampling needs, and it saves copying
        # [b, q, vocab] out of every prefill. PaddleNLP's forward grows the cache; only the new positions leave.
        past_length = paddle.shape(caches[0])[self.step_spec.seq_axis]
        new = [paddle.slice(cache, axes=[self.step_spec.seq_axis], starts=[past_length], ends=[2**31 - 1])
               for cache in [key for key, _ in present] + [value for _, value in present]]
        return (logits[:, -1, :].astype("float32"), *new)


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


def build_step_layer(model: nn.Layer, family: ModelFamily, dtype: str, fused_rms_norm: bool = False,
                     packed_matmul: ModuleType | None = None) -> StepBuild:
    """The step for ``model``: the family's own inference step where it reproduces the model (Llama's
    ``LlamaInferenceStep``: the same function in a third of the ops), PaddleNLP's forward inside ``KVCacheStep`` for
    every other model.

    ``fused_rms_norm``: Paddle's fused RMSNorm in the inference step, for a CPU that
    ``cpu.features.fused_rms_norm_allowed``; the default step runs on any CPU. ``packed_matmul``: the compiled CPU
    kernels, whose panel-packed weight matmul the inference step then uses (its weights are stored packed)."""
    config = model.config
    spec = step_spec(family)
    kept_because = f"no inference step for {family.name}"
    if spec.inference_step is not None:
        layer, kept_because = spec.inference_step(model, dtype, fused_rms_norm, packed_matmul)
        if layer is not None:
            return StepBuild(layer, cache_layout(family, config, STEP_LLAMA_INFERENCE), STEP_LLAMA_INFERENCE, "")
    layer = KVCacheStep(model, family, config.num_hidden_layers)
    return StepBuild(layer, cache_layout(family, config, STEP_PADDLENLP), STEP_PADDLENLP, kept_because)


def prepare_for_tracing(model: nn.Layer, family: ModelFamily, config) -> None:
    """Swap in trace-friendly sublayers where a family needs them (in place; numerics unchanged)."""
    prepare = step_spec(family).prepare_for_tracing
    if prepare is not None:
        prepare(model, config)


def input_specs(family: ModelFamily, dtype: str, num_layers: int) -> list:
    """InputSpecs of the step graph: every batch, query and past length is dynamic."""

    glm = step_spec(family).glm_positions
    position_shape = [None, 2, None] if glm else [None, None]
    # One list argument: to_static rejects *args, and flattens a list into the graph's trailing inputs.
    caches = [InputSpec([None] * 4, dtype, f"past_{kind}_{layer}") for kind in ("key", "value") for layer in range(num_layers)]
    return [
        InputSpec([None, None], "int64", "input_ids"),
        InputSpec(position_shape, "int64", "position_ids"),
        InputSpec([None, 1, None, None], "bool", "attention_mask"),
        caches,
    ]


def save_step_graph(step: nn.Layer, family: ModelFamily, dtype: str, num_layers: int, path_prefix: str) -> None:
    """Trace ``step`` with dynamic shapes and write ``{path_prefix}.json`` + ``{path_prefix}.pdiparams``."""
    specs = input_specs(family, dtype, num_layers)
    static_step = paddle.jit.to_static(step, input_spec=specs, full_graph=True)
    paddle.jit.save(static_step, path_prefix)
