"""Model shapes: the few numbers that decide training memory, read from a config or guessed from a parameter count.

A :class:`ModelShape` is built from

* a config dict (a preset from ``paddle_llm.config.presets`` or a parsed ``config.json``) with
  :func:`shape_from_config`, through the family's ``estimate_shape``. Families disagree on field names
  (``num_hidden_layers`` / ``num_layers``, ``vocab_size`` / ``padded_vocab_size``...), so every field is read through
  its aliases and falls back to the default of the PaddleNLP config class (PaddleNLP 3.0.0b4), because that default is
  what the model gets;
* a bare parameter count (``--num_params 7e9``) with :func:`shape_from_num_params`. The count is trusted for the
  model states; the layer shape, which only the activations need, comes from the hints given, and otherwise from
  the common aspect ratio ``hidden = 128 * layers`` (Llama-2 7B and 13B, GPT-3 6.7B and 13B all have it).

Parameter counts follow the PaddleNLP modules exactly (checked against ``sum(p.numel())`` in the tests). Each family
describes its own (``paddle_llm/models/<family>/estimate.py``); the one defined here is

* generic (GPT, from ``--num_params``): the Megatron GPT layer of Korthikanti et al. 2022, QKV ``h*3h``, dense
  ``h*h``, MLP ``h*4h + 4h*h`` with biases and two LayerNorms.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from paddle_llm.models.registry import FAMILIES, ModelFamily

GENERIC_FAMILY = "generic"

# The ratio hidden_size / num_layers of Llama-2 7B (4096/32) and 13B (5120/40), used to guess a shape from a count.
HIDDEN_PER_LAYER_GUESS = 128
HEAD_DIM_GUESS = 128
VOCAB_SIZE_GUESS = 32000


@dataclass(frozen=True)
class LinearModule:
    """One linear layer inside a decoder layer.

    Attributes:
        name: the sublayer path inside the decoder layer, as PaddleNLP names it (``self_attn.q_proj``).
        in_features, out_features: the full (unsplit) weight shape.
        bias: whether the layer has a bias.
        parallel_style: ``column`` (output split over tensor-parallel ranks) or ``row`` (input split).
    """

    name: str
    in_features: int
    out_features: int
    bias: bool
    parallel_style: str

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    @property
    def in_mlp(self) -> bool:
        """Every family names its MLP sublayer ``mlp``; everything else belongs to attention."""
        return self.name.startswith("mlp.")

    def params_per_rank(self, tensor_parallel_degree: int) -> int:
        """Weights are split over tensor-parallel ranks; a row-parallel bias is replicated (Megatron layout)."""
        weight = self.in_features * self.out_features // tensor_parallel_degree
        if not self.bias:
            return weight
        if self.parallel_style == "column":
            return weight + self.out_features // tensor_parallel_degree
        return weight + self.out_features


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that memory depends on.

    Attributes:
        family: ``llama``, ``chatglm``, ``chatglm2`` or ``generic``; selects the activation table.
        num_layers, hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size, vocab_size:
            the usual dimensions (``intermediate_size`` is the MLP width ``f``; ``head_dim`` is ``d``).
        max_position_embeddings: the length rotary tables are built for.
        tie_word_embeddings: the LM head reuses the input embedding.
        linear_modules: the linear layers of one decoder layer.
        norm_params_per_layer, final_norm_params: normalisation weights (and biases for LayerNorm).
        supports_sequence_parallel: PaddleNLP implements ``--sequence_parallel`` for this family.
        layer_module_prefix: how PaddleNLP names decoder layer ``i`` (``llama.layers.{i}``), for LoRA regexes.
        declared_num_params: a count given by the user (``--num_params``); trusted over the shape's own count.
        declared_largest_layer_params: likewise for ``--largest_layer_params``.
        guessed: which dimensions were guessed rather than given, to report them.
    """

    family: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    linear_modules: tuple[LinearModule, ...]
    norm_params_per_layer: int
    final_norm_params: int
    supports_sequence_parallel: bool
    layer_module_prefix: str
    declared_num_params: int | None = None
    declared_largest_layer_params: int | None = None
    guessed: tuple[str, ...] = field(default=())

    @property
    def kv_hidden_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Parameters of the output projection that are not shared with the embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def non_layer_params(self) -> int:
        return self.embedding_params + self.lm_head_params + self.final_norm_params

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer; with a declared total, the total minus embeddings spread over layers."""
        if self.declared_num_params is not None:
            return (self.declared_num_params - self.non_layer_params) // self.num_layers
        return sum(m.params for m in self.linear_modules) + self.norm_params_per_layer

    @property
    def num_params(self) -> int:
        if self.declared_num_params is not None:
            return self.declared_num_params
        return self.non_layer_params + self.num_layers * self.layer_params

    @property
    def largest_layer_params(self) -> int:
        """DeepSpeed's "largest layer": the most parameters any single module owns directly (not recursively).

        That is the embedding (or untied LM head) or the widest linear layer; ZeRO-3 gathers one such module at a time.
        """
        if self.declared_largest_layer_params is not None:
            return self.declared_largest_layer_params
        return max([self.embedding_params, *(m.params for m in self.linear_modules)])

    def lora_targets(self, targets: tuple[str, ...]) -> tuple[LinearModule, ...]:
        """The linear modules a LoRA target list selects.

        A target matches a module when it equals the module's last name (``q_proj``) or its full name
        (``self_attn.q_proj``), or when, as a PaddleNLP regular expression (``.*q_proj.*``), it matches the module's
        qualified name (``llama.layers.0.self_attn.q_proj``). An empty tuple selects every linear module, as
        PaddleNLP's ``llm`` recipes do by default.

        Raises:
            ValueError: a target matches nothing; the message lists the module names.
        """
        if not targets:
            return self.linear_modules
        selected: list[LinearModule] = []
        for target in targets:
            matches = [m for m in self.linear_modules if _target_matches(target, m, self.layer_module_prefix)]
            if not matches:
                names = ", ".join(m.name.rsplit(".", 1)[-1] for m in self.linear_modules)
                raise ValueError(
                    f"--lora_target_modules entry {target!r} matches no linear layer of this {self.family} model; "
                    f"use module names from: {names} (or PaddleNLP regexes such as '.*q_proj.*')"
                )
            selected.extend(m for m in matches if m not in selected)
        return tuple(selected)

    def describe(self) -> str:
        """One line: family, parameter count and dimensions, marking guessed ones."""
        guessed = f" (guessed: {', '.join(self.guessed)}; pass them as flags to be exact)" if self.guessed else ""
        return (
            f"{self.family}, {format_count(self.num_params)} parameters, {self.num_layers} layers, hidden "
            f"{self.hidden_size}, {self.num_attention_heads} heads ({self.num_key_value_heads} kv), MLP "
            f"{self.intermediate_size}, vocab {self.vocab_size}{guessed}"
        )


def _target_matches(target: str, module: LinearModule, layer_module_prefix: str) -> bool:
    if target in (module.name, module.name.rsplit(".", 1)[-1]):
        return True
    qualified = f"{layer_module_prefix.format(i=0)}.{module.name}"
    try:
        return re.fullmatch(target, qualified) is not None
    except re.error:
        return False


def generic_shape(num_layers: int, hidden_size: int, num_attention_heads: int, vocab_size: int) -> ModelShape:
    """The Megatron GPT layer of Korthikanti et al. 2022: MLP width ``4h``, biases, LayerNorm, untied head."""
    h = hidden_size
    linear = (
        LinearModule("attention.query_key_value", h, 3 * h, True, "column"),
        LinearModule("attention.dense", h, h, True, "row"),
        LinearModule("mlp.dense_h_to_4h", h, 4 * h, True, "column"),
        LinearModule("mlp.dense_4h_to_h", 4 * h, h, True, "row"),
    )
    return ModelShape(
        family=GENERIC_FAMILY,
        num_layers=num_layers,
        hidden_size=h,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        head_dim=h // num_attention_heads,
        intermediate_size=4 * h,
        vocab_size=vocab_size,
        max_position_embeddings=0,
        tie_word_embeddings=False,
        linear_modules=linear,
        norm_params_per_layer=4 * h,
        final_norm_params=2 * h,
        supports_sequence_parallel=True,
        layer_module_prefix="layers.{i}",
    )


def shape_from_config(fields: dict, family: ModelFamily) -> ModelShape:
    """Read a model's shape from its config fields.

    Args:
        fields: a preset dict or a parsed ``config.json``.
        family: the model's family (``models.registry.ModelFamily``); its ``estimate_shape`` reads the fields.

    Raises:
        ValueError: the family has no estimate, or the heads do not divide the hidden size.
    """
    if family.estimate_shape is None:
        having = ", ".join(f.name for f in FAMILIES.values() if f.estimate_shape is not None)
        raise ValueError(f"no estimate shape for model family {family.name!r}; known families: {having}")
    described = dict(family.estimate_shape(fields))
    described["linear_modules"] = tuple(LinearModule(*module) for module in described["linear_modules"])
    shape = ModelShape(family=family.name, **described)
    _check_heads(shape)
    return shape


def shape_from_num_params(
    num_params: int,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    vocab_size: int | None = None,
    largest_layer_params: int | None = None,
) -> ModelShape:
    """A generic GPT shape for a bare parameter count, completing missing dimensions from the given ones.

    With neither ``num_layers`` nor ``hidden_size``, ``12 * L * h**2`` (the layer parameters of a GPT layer) is
    solved with ``h = 128 * L``; with one of them, for the other. Heads default to ``h / 128`` and the vocabulary to
    32000. The count itself is kept as given for the model states.

    Raises:
        ValueError: a count or dimension is not positive, or the embeddings alone exceed the count.
    """
    if num_params <= 0:
        raise ValueError(f"--num_params must be positive, got {num_params}")
    guessed = []
    vocab = vocab_size or VOCAB_SIZE_GUESS
    if vocab_size is None:
        guessed.append("vocab_size")
    if hidden_size is None and num_layers is None:
        num_layers = max(1, round((num_params / (12 * HIDDEN_PER_LAYER_GUESS**2)) ** (1 / 3)))
        guessed.append("num_layers")
    if hidden_size is None:
        # Solve 12*L*h**2 + 2*V*h = P (GPT layers plus untied embedding and head) for h, rounded to 128.
        root = (-2 * vocab + math.sqrt(4 * vocab**2 + 48 * num_layers * num_params)) / (24 * num_layers)
        hidden_size = max(HEAD_DIM_GUESS, round(root / HEAD_DIM_GUESS) * HEAD_DIM_GUESS)
        guessed.append("hidden_size")
    if num_layers is None:
        num_layers = max(1, round((num_params - 2 * vocab * hidden_size) / (12 * hidden_size**2)))
        guessed.append("num_layers")
    if num_attention_heads is None:
        num_attention_heads = max(1, hidden_size // HEAD_DIM_GUESS)
        guessed.append("num_attention_heads")
    dimensions = (("num_layers", num_layers), ("hidden_size", hidden_size), ("num_attention_heads", num_attention_heads))
    for name, value in dimensions:
        if value <= 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    shape = generic_shape(num_layers, hidden_size, num_attention_heads, vocab)
    if shape.non_layer_params >= num_params:
        raise ValueError(
            f"--num_params {num_params} is smaller than the embeddings of a {vocab} x {hidden_size} vocabulary; "
            "pass a smaller --hidden_size/--vocab_size or check the count"
        )
    _check_heads(shape)
    return replace(
        shape,
        declared_num_params=num_params,
        declared_largest_layer_params=largest_layer_params,
        guessed=tuple(guessed),
    )


def _check_heads(shape: ModelShape) -> None:
    if shape.num_attention_heads <= 0 or shape.hidden_size % shape.num_attention_heads:
        raise ValueError(
            f"hidden_size {shape.hidden_size} is not divisible by num_attention_heads {shape.num_attention_heads}; "
            "fix the config or the --num_attention_heads hint"
        )
    if shape.num_attention_heads % shape.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads {shape.num_attention_heads} is not a multiple of the "
            f"{shape.num_key_value_heads} key/value heads; fix the config"
        )


_COUNT_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str | int | float) -> int:
    """Parse a parameter count: ``7e9``, ``7B``, ``2851M``, ``2851598336``, ``1.5G``.

    Raises:
        ValueError: not a number with an optional K/M/B/G/T suffix.
    """
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a parameter count; write e.g. 7e9, 7B, 2851M or 2851598336")
    return int(round(float(match.group(1)) * _COUNT_SUFFIXES[match.group(2).upper()]))


def format_count(count: int) -> str:
    """``2851598336`` -> ``2851.6M``; counts under a million stay exact."""
    if count >= 10**9:
        return f"{count / 1e9:.2f}B"
    if count >= 10**6:
        return f"{count / 1e6:.1f}M"
    return str(count)
