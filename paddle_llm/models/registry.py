"""The model registry: one ``ModelFamily`` per supported architecture, and the rules for finding a model.

A model is named by ``--model_name_or_path``, which is either a built-in preset (``tiny-llama``...), or a local
directory holding ``config.json`` (and, for ``--continue_training``, weights). Anything else is refused with a
message, because this toolkit never downloads: a hub name would otherwise fail deep inside a download with a
stack trace, or worse, hang on a machine without internet.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import numpy as np

from paddle_llm.config.presets import PRESETS, SHIPPED_TOKENIZER_DIR, preset
from paddle_llm.models.memory_spec import ActivationTable
from paddle_llm.models.step import StepSpec
from paddle_llm.models import hf_checkpoint, hf_tokenizer

WEIGHT_FILES = ("model_state.pdparams", "model.safetensors", "model_state.pdparams.index.json", "model.safetensors.index.json")

def no_extra_inputs(input_ids: np.ndarray) -> dict:
    """A plain causal LM needs nothing but ``input_ids`` (its own causal mask and positions apply)."""
    return {}


@dataclass(frozen=True)
class Deferred:
    """A family's function that lives in a module importing Paddle, named rather than imported.

    The registry is read by commands that must start without loading Paddle (``paddle-llm --help``, ``estimate``,
    ``doctor``; ``tests/unit/test_layers.py`` checks it), so a family's CPU fast paths and export hooks are imported on
    their first call, never when the family is registered.
    """

    module: str
    name: str

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


@dataclass(frozen=True)
class ChatTemplate:
    """How one family lays out a conversation. All fields are format strings or plain data.

    Attributes:
        name: the family name (``llama``, ``chatglm``, ``chatglm2``).
        system_format: how a system message is written (``{content}``).
        system_inside_first_user: Llama-2 folds the system block into the first user turn; ChatGLM puts it first.
        user_format: one user turn up to where the reply starts (``{round}``, ``{system}``, ``{content}``).
        assistant_format: one reply (``{content}``); this whole piece is what fine-tuning trains on.
        round_separator: text between a reply and the next round (not trained on).
        first_round: the number of the first ``[Round N]``.
        append_eos_token: True when the text has no terminator and a trainer must add the EOS token after a reply.
        stop_strings: text that means the model started a new round; a server stops there by default.
        conversation_prefix: text written once, before the first message (Mistral's ``<s>``); Llama-2 writes its
            ``<s>`` in every round's ``user_format`` instead.
    """

    name: str
    system_format: str
    system_inside_first_user: bool
    user_format: str
    assistant_format: str
    round_separator: str
    first_round: int
    append_eos_token: bool
    stop_strings: tuple[str, ...]
    conversation_prefix: str = ""


@dataclass(frozen=True)
class PrefixLayout:
    """What prefix tuning's encoder must produce for one model config (see ``paddle_llm.peft.prefix``).

    Attributes:
        num_attention_heads, num_hidden_layers, hidden_size: the model's.
        multi_query_group_num: key/value heads when fewer than the query heads (grouped or multi-query
            attention), else None.
        postprocess_name: the function in ``paddlenlp.peft.prefix`` that reshapes the prefix into the family's
            past-key-value layout.
    """

    num_attention_heads: int
    num_hidden_layers: int
    hidden_size: int
    multi_query_group_num: int | None
    postprocess_name: str


# The parallel layouts and fusions PaddleNLP builds with its own attention and MLP layers (split or fused projections
# of hidden/heads-wide heads without biases); a family's own layers (``ModelFamily.layer_options``) have none of them.
_UNBUILT_WITH_LAYER_OPTIONS = ("tensor_parallel_degree", "pipeline_parallel_degree", "sep_parallel_degree",
                               "context_parallel_degree", "fuse_attention_qkv", "fuse_attention_ffn", "sequence_parallel")


@dataclass(frozen=True)
class ModelFamily:
    """Everything the toolkit knows about one architecture, as data; each family's package defines one
    (``paddle_llm/models/<family>/__init__.py``) and the rest of the code asks it instead of testing names.

    Attributes:
        name: our family name (``llama``, ``chatglm``, ``chatglm2``).
        model_types: ``model_type`` values in a config.json that belong to this family.
        config_class, model_class, tokenizer_class: PaddleNLP class names in ``paddlenlp.transformers``.
        max_positions_field: the config field bounding the sequence length.
        field_aliases: the config class's ``attribute_map`` (alias -> constructor name). ChatGLM's configs read
            ``num_layers`` but their constructors only take ``num_hidden_layers``, silently building a 28-layer
            model from ``num_layers=2``; every config dict is renamed through this map before use.
        causal_lm_inputs: extra model inputs a plain-text causal-LM batch needs, from ``input_ids`` [batch, seq].
        pipe_model_class: the PaddleNLP pipeline-parallel variant of ``model_class`` (stages of a ``PipelineLayer``),
            built instead when ``pipeline_parallel_degree > 1``; None when PaddleNLP has none for the family.
        tokenizer_model_file: the file ``tokenizer_class`` reads its SentencePiece model from (``paddle-llm
            tokenizer train`` writes one under each family's name), or None for a tokenizer that has none.
        sentencepiece_tokenizer_class: for a family whose own tokenizer is not SentencePiece (``tokenizer_model_file``
            None), the PaddleNLP class that reads a SentencePiece directory in its place: the shipped tokenizer a
            preset uses, or one ``paddle-llm tokenizer train`` wrote. None: such a directory is read with
            ``tokenizer_class``.
        chat_template: the family's built-in conversation format (``paddle_llm.models.chat_template``).
        lora_target_modules: the linear layers LoRA adapts by default: every attention and MLP projection, as
            PaddleNLP's ``llm/utils.get_lora_target_modules`` chooses them.
        prefix_layout: the past-key-value layout prefix tuning must produce, from the model config.
        prefix_needs_cache: the model reads a past (and so a prefix) only with ``use_cache`` on (ChatGLM2).
        glm_context: GLM's bidirectional context with 2-D positions after a ``[gMASK]`` prompt (ChatGLM-6B): an SFT
            sample needs an explicit 4-D mask and positions (``paddle_llm.data.sft``).
        token_mean_loss: the model's own loss averages over ignored positions too, so fine-tuning swaps in a
            token-mean criterion (``trainer.finetune_trainer.TokenMeanCrossEntropy``).
        paddlenlp_module: the module prefix of the family's model class (PaddleNLP's, or ours for a family PaddleNLP
            lacks: ``paddle_llm.models.qwen3.``); a model (or a wrapper such as a LoRA
            model) is recognised by the first sublayer from it.
        cpu_fast_paths: swaps in the CPU implementations of the family's hot composites on one model instance and
            returns what it replaced (``paddle_llm.cpu.fast_paths``); None when the family has none.
        step: how one KV-cache decoding step runs (``paddle_llm.models.step.StepSpec``), for export and serving.
        estimate_shape: the estimator's ``ModelShape`` fields from a config dict (``paddle_llm.models.memory_spec``).
        activations: the tensors the family's forward keeps for backward (``memory_spec.ActivationTable``).
        hf: the family's Hugging Face mapping module (``models/<family>/hf.py``: names, layouts, config.json both
            ways); None when Hugging Face checkpoints of the family are refused.
        hf_refusal: why, when ``hf`` is None.
        classes_module: the module ``config_class``, ``model_class`` and ``pipe_model_class`` are read from:
            PaddleNLP's, or the family's own subclasses where PaddleNLP lacks a layer (``models/llama/modeling.py``).
        layer_options: ``config fields -> ["option value", ...]``, what the config asks of the family's own layers
            that PaddleNLP's parallel layouts do not build (``models/llama/layer_options.py``); empty for none.
        install_rope_scaling: ``(model, config)``: puts a RoPE scaling the config asks for and PaddleNLP's classes do
            not build (YaRN, ``models/llama/rope.py``) into a freshly built model; None when the family reads none.
        estimate_only: for a family ``paddle-llm estimate`` reads but nothing trains (mixture-of-experts configs):
            config fields -> the one line estimate prints and every other command refuses the model with.
        window_field: the config field of a sliding attention window (Mistral's ``sliding_window``; null or absent:
            none). paddle_llm's attention has no window, so a training sequence, or a prompt with its reply, longer
            than it is refused before work starts, rather than attended further back than the model was trained to.
    """

    name: str
    model_types: tuple[str, ...]
    config_class: str
    model_class: str
    tokenizer_class: str
    max_positions_field: str
    field_aliases: dict = field(default_factory=dict)
    causal_lm_inputs: Callable[[np.ndarray], dict] = field(default=no_extra_inputs)
    pipe_model_class: str | None = None
    tokenizer_model_file: str | None = None
    sentencepiece_tokenizer_class: str | None = None
    chat_template: ChatTemplate | None = None
    lora_target_modules: tuple[str, ...] = ()
    prefix_layout: Callable[[object], PrefixLayout] | None = None
    prefix_needs_cache: bool = False
    glm_context: bool = False
    token_mean_loss: bool = False
    paddlenlp_module: str = ""
    cpu_fast_paths: Callable[[object], list[str]] | None = None
    step: StepSpec | None = None
    estimate_shape: Callable[[dict], dict] | None = None
    activations: ActivationTable | None = None
    hf: ModuleType | None = None
    install_rope_scaling: Callable[[object, object], None] | None = None
    window_field: str | None = None
    estimate_only: Callable[[dict], str] | None = None
    hf_refusal: str = "paddle_llm has no Hugging Face mapping for this family"
    classes_module: str = "paddlenlp.transformers"
    layer_options: Callable[[dict], list[str]] = field(default=lambda fields: [])

    def layer_option_errors(self, config_fields, flags) -> list[str]:
        """Why the run's layout (``flags``: degrees and fusions, from the command line or a model config's fields)
        cannot build the family's own layers that this config asks for (``layer_options``)."""
        options = self.layer_options(config_fields)
        # A degree is off at -1, 0, 1 or None; a fusion or sequence_parallel is on when true.
        asked = [name for name in _UNBUILT_WITH_LAYER_OPTIONS if flags.get(name) is True or (flags.get(name) or 0) > 1]
        if not options or not asked:
            return []
        return [f"{', '.join(options)} (config) cannot be combined with {', '.join('--' + n for n in asked)}: "
                f"{self.name}'s layers for them are built for one process without fused projections; run with "
                "degree 1 and no fusion"]

    def canonical_fields(self, config_fields: dict) -> dict:
        """Rename alias keys to the names the config constructor takes (an explicit canonical key wins)."""
        renamed = {name: value for name, value in config_fields.items() if name not in self.field_aliases}
        for alias, canonical in self.field_aliases.items():
            if alias in config_fields:
                renamed.setdefault(canonical, config_fields[alias])
        return renamed

    def classes(self):
        """Import and return ``(config_class, model_class, tokenizer_class)``; the tokenizer is always PaddleNLP's."""
        import paddlenlp.transformers as transformers

        classes = importlib.import_module(self.classes_module)
        return (
            getattr(classes, self.config_class),
            getattr(classes, self.model_class),
            getattr(transformers, self.tokenizer_class),
        )

    def max_context_length(self, config) -> int:
        """The number of positions the model's config covers (its rotary tables or position embeddings), or its
        sliding attention window when that is shorter."""
        positions = int(getattr(config, self.max_positions_field))
        window = self.attention_window(vars(config))
        return min(positions, window) if window else positions

    def attention_window(self, config_fields: dict) -> int | None:
        """The sliding attention window a config sets (``window_field``), or None."""
        window = config_fields.get(self.window_field) if self.window_field else None
        return int(window) if window else None

    def window_errors(self, config_fields: dict, length: int, flag: str) -> list[str]:
        """The refusal of a ``length``-token sequence (set by ``flag``) longer than the model's attention window."""
        window = self.attention_window(config_fields)
        if window and length > window:
            return [f"{flag} {length} is longer than the model's {self.window_field} {window}: paddle_llm's attention "
                    f"has no window, so it would attend further back than the model was trained to; use {flag} "
                    f"{window} or less"]
        return []


def family_named(name: str, feature: str = "") -> ModelFamily:
    """The family called ``name``; with ``feature`` (a ``ModelFamily`` field), one that has it set.

    Raises:
        ValueError: no such family, or it lacks ``feature``; the message lists the families that have it.
    """
    having = [f.name for f in FAMILIES.values() if not feature or getattr(f, feature) is not None]
    if name not in having:
        missing = f"no {feature.replace('_', ' ')} for" if feature else "no"
        raise ValueError(f"{missing} model family {name!r}; known families: {', '.join(having)}")
    return FAMILIES[name]


def family_of(config_fields: dict) -> ModelFamily:
    """Find the family of a config (a preset dict or a parsed config.json).

    Raises:
        ValueError: the config's ``model_type`` is not one we support.
    """
    model_type = str(config_fields.get("model_type", "")).lower()
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    # Only a config without model_type is read by its architecture: its class name, else the longest model type it
    # starts with (underscores aside), so Qwen3MoeForCausalLM is the moe family's qwen3_moe, not the dense qwen3.
    for architecture in [] if model_type else config_fields.get("architectures") or []:
        for family in FAMILIES.values():
            if architecture == family.model_class:
                return family
        name = architecture.lower().replace("_", "")
        prefixes = [(len(t), family) for family in FAMILIES.values() for t in family.model_types
                    if name.startswith(t.replace("_", ""))]
        if prefixes:
            return max(prefixes, key=lambda prefix: prefix[0])[1]
    supported = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"model_type {model_type!r} is not supported; supported model types: {supported}")


# Config fields that size the model (counts and widths, under any family's spelling, Hugging Face's included): each
# must be a positive integer. Checked before Paddle sees them, which otherwise fails deep inside a layer's
# constructor (a negative width) or builds a model of the wrong shape (a string it multiplies).
SIZE_FIELDS = (
    "vocab_size", "padded_vocab_size", "hidden_size", "intermediate_size", "inner_hidden_size", "ffn_hidden_size",
    "num_hidden_layers", "num_layers", "num_attention_heads", "num_key_value_heads", "multi_query_group_num",
    "kv_channels", "head_dim", "max_position_embeddings", "max_sequence_length", "seq_length",
)


def config_errors(fields: dict, where: str) -> list[str]:
    """What is wrong with a config's sizes, each naming ``where`` (the config.json or the preset) and the field."""
    errors = []
    for name in SIZE_FIELDS:
        value = fields.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            errors.append(f"{where}: {name} is {json.dumps(value)}; it must be a positive integer")
    if errors:
        return errors
    heads, kv_heads, hidden = fields.get("num_attention_heads"), fields.get("num_key_value_heads"), fields.get("hidden_size")
    # Without an explicit head width (kv_channels, head_dim) a head is hidden_size / num_attention_heads wide.
    if heads and hidden and not (fields.get("kv_channels") or fields.get("head_dim")) and hidden % heads:
        errors.append(f"{where}: num_attention_heads {heads} does not divide hidden_size {hidden}; each head is "
                      "hidden_size / num_attention_heads wide: pick a divisor")
    if heads and kv_heads and heads % kv_heads:
        errors.append(f"{where}: num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}; "
                      "query heads share key/value heads in equal groups: pick a divisor")
    return errors


def _checked(fields: dict, where: str) -> dict:
    errors = config_errors(fields, where)
    if errors:
        raise ValueError("\n".join(errors))
    return fields


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a preset (random init) or a local directory (config, maybe weights)."""

    name_or_path: str
    family: ModelFamily
    config_fields: dict
    directory: str | None  # None for presets
    has_weights: bool
    hf_weights: hf_checkpoint.HFWeights | None = None  # set when the directory holds a Hugging Face checkpoint
    # The dtype config.json says the weights are stored in (transformers 4's torch_dtype, 5's and Paddle's dtype):
    # what `export --format hf` writes by default. The model itself loads in the dtype the command asks for.
    stored_dtype: str | None = None


def resolve_model(name_or_path: str, estimating: bool = False) -> ModelSource:
    """Resolve ``--model_name_or_path`` without touching the network; a family that is only estimated
    (``ModelFamily.estimate_only``) resolves only when ``estimating``.

    Raises:
        FileNotFoundError: neither a preset nor a local directory with config.json; the message says what to pass.
        ValueError: the config names an unsupported model type, or a size that is not a positive integer or that
            does not divide another (``config_errors``; every problem, one per line), or a family that is only
            estimated outside ``estimating`` (its one line).
    """
    if name_or_path in PRESETS:
        fields = _checked(preset(name_or_path), f"preset {name_or_path}")
        family = family_of(fields)
        return ModelSource(name_or_path, family, family.canonical_fields(fields), None, False)
    config_path = os.path.join(name_or_path, "config.json")
    if os.path.isdir(name_or_path) and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            try:
                fields = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{config_path}: line {err.lineno}: not valid JSON ({err.msg})") from None
        family = family_of(fields)
        _checked(fields, config_path)
        if family.estimate_only is not None and not estimating:
            raise ValueError(f"{config_path}: {family.estimate_only(fields)}")
        stored_dtype = fields.get("dtype") or fields.get("torch_dtype")
        hf_weights = hf_checkpoint.find_hf_weights(name_or_path)
        if hf_weights is not None and family.estimate_only is None:
            if family.hf is None:
                raise ValueError(f"{name_or_path} holds a Hugging Face checkpoint ({', '.join(hf_weights.files)}) of "
                                 f"model_type {fields.get('model_type')!r}: {family.hf_refusal}")
            fields = family.hf.config_from_hf(fields, config_path)
        has_weights = hf_weights is not None or any(os.path.exists(os.path.join(name_or_path, w)) for w in WEIGHT_FILES)
        return ModelSource(name_or_path, family, family.canonical_fields(fields), name_or_path, has_weights, hf_weights,
                           stored_dtype)
    presets = ", ".join(PRESETS)
    if os.path.isdir(name_or_path):
        raise FileNotFoundError(f"{name_or_path} is a directory but has no config.json; a model directory needs one")
    raise FileNotFoundError(
        f"model {name_or_path!r} is neither a local directory nor a built-in preset. paddle_llm never downloads "
        f"weights: download the model yourself (e.g. with PaddleNLP on a machine with internet), then pass its "
        f"local directory, or use a preset: {presets}"
    )


def build_config(source: ModelSource, **overrides):
    """Build the PaddleNLP config object for a source, with field overrides (e.g. from training flags)."""
    config_class, _, _ = source.family.classes()
    fields = {k: v for k, v in source.config_fields.items() if k not in ("architectures",)}
    fields.update(source.family.canonical_fields(overrides))
    return config_class(**fields)


def build_model(source: ModelSource, config, load_weights: bool):
    """Instantiate the causal LM: from the directory's weights if asked, else randomly initialised, with the RoPE
    scaling its config asks for (``ModelFamily.install_rope_scaling``).

    Raises:
        FileNotFoundError: weights were asked for but the source has none.
        hf_checkpoint.CheckpointError: a weight file that is truncated, not a checkpoint, or does not fit the config.
    """
    _, model_class, _ = source.family.classes()
    if getattr(config, "pipeline_parallel_degree", 1) > 1:
        if source.family.pipe_model_class is None:
            raise ValueError(f"pipeline parallel is not available for {source.family.name}: use --pipeline_parallel_degree 1")
        model_class = getattr(importlib.import_module(source.family.classes_module), source.family.pipe_model_class)
    model = _instantiate(source, config, model_class, load_weights)
    if source.family.install_rope_scaling is not None:
        source.family.install_rope_scaling(model, config)
    return model


def _instantiate(source: ModelSource, config, model_class, load_weights: bool):
    if load_weights:
        if not source.has_weights:
            where = source.directory or f"preset {source.name_or_path!r}"
            raise FileNotFoundError(
                f"--continue_training needs weights, but {where} has none of {', '.join(WEIGHT_FILES)}; "
                "pass a directory saved by a previous run, or drop --continue_training to train from scratch"
            )
        if source.hf_weights is not None:
            return _build_from_hf(source, config, model_class)
        return _from_pretrained(model_class, source.directory, config)
    return model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)


def _from_pretrained(model_class, directory: str, config):
    """PaddleNLP's ``from_pretrained``, with a damaged ``model_state.pdparams`` named instead of failing in unpickling
    or a reshape. Paddle writes it as one pickle (protocol 2 to 4: a PROTO opcode first, STOP last), so a file cut
    short or of random bytes is refused before it is read."""
    path = os.path.join(directory, "model_state.pdparams")
    damaged = f"{path}: not a readable Paddle state dict, it is truncated or not a checkpoint; save it again (save_pretrained)"
    if os.path.isfile(path):
        with open(path, "rb") as f:
            first = f.read(1)
            f.seek(max(0, os.path.getsize(path) - 1))
            last = f.read(1)
        if (first, last) != (b"\x80", b"."):
            raise hf_checkpoint.CheckpointError(damaged)
    try:
        return model_class.from_pretrained(directory, config=config)
    except (pickle.UnpicklingError, EOFError, MemoryError) as err:
        raise hf_checkpoint.CheckpointError(f"{damaged} ({type(err).__name__}: {err})") from None


def hf_split_errors(source: ModelSource, degrees) -> list[str]:
    """Why a Hugging Face checkpoint cannot load into a split model (tensor or pipeline parallel), if it is one.

    Args:
        degrees: the run's flags (a dict), or a model config (attributes), holding the parallel degrees.
    """
    read = degrees.get if isinstance(degrees, dict) else lambda name, default: getattr(degrees, name, default)
    split = {name: read(name, 1) or 1 for name in ("tensor_parallel_degree", "pipeline_parallel_degree")}
    flags = " ".join(f"--{name} {degree}" for name, degree in split.items() if degree > 1)
    if source.hf_weights is None or not flags:
        return []
    return [f"{source.directory} is a Hugging Face checkpoint, which loads unsplit only, so {flags} cannot start from "
            "it; train once with degree 1 (its output directory is in PaddleNLP's layout, which loads split) and "
            "continue from that"]


def _build_from_hf(source: ModelSource, config, model_class):
    """Build the model and load a Hugging Face checkpoint into it in memory; nothing is written anywhere."""
    errors = hf_split_errors(source, config)
    if errors:
        raise ValueError(errors[0])
    from paddlenlp.transformers.model_utils import no_init_weights

    # PaddleNLP's own switch for loading (as its from_pretrained uses it): its normal re-initialisation of every
    # weight took 22 of 36 s building a 1.1B model on 2 cores, for values about to be overwritten. Safe because
    # load_hf_weights refuses a checkpoint that leaves any parameter unset.
    with no_init_weights():
        model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    hf_checkpoint.load_hf_weights(model, source.hf_weights, source.family.hf, source.config_fields)
    return model


def load_tokenizer(name_or_path: str, family: ModelFamily | None = None):
    """Load a tokenizer from a local directory, or the shipped one for a preset.

    Args:
        name_or_path: a tokenizer directory, a model directory that holds one, or a preset name.
        family: use this family's tokenizer class; None lets ``tokenizer_config.json`` (or the preset) decide.

    Raises:
        FileNotFoundError: not a local directory or preset, or a file the tokenizer class reads is missing; the
            message says what to pass.
    """
    import paddlenlp.transformers as transformers

    if name_or_path in PRESETS:
        directory = SHIPPED_TOKENIZER_DIR
        family = family or family_of(PRESETS[name_or_path])
    else:
        directory = name_or_path
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"tokenizer {name_or_path!r} is not a local directory or preset. paddle_llm never downloads: pass a "
            "directory written by `paddle-llm tokenizer train` or saved with a model"
        )
    if not any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer_config.json", "tokenizer.json", *tokenizer_model_files())):
        raise FileNotFoundError(
            f"{directory} has no tokenizer files (tokenizer_config.json or a SentencePiece model); pass "
            "--tokenizer_name_or_path with a tokenizer directory"
        )
    model_file_by_class = {f.tokenizer_class: f.tokenizer_model_file for f in FAMILIES.values() if f.tokenizer_model_file}
    tokenizer_class = family.tokenizer_class if family else hf_tokenizer.configured_class(directory)
    if hf_tokenizer.needs_loading_here(directory, model_file_by_class.get(tokenizer_class)):
        # A transformers directory: tokenizer.json, Llama's tokenizer.model, or a Jinja chat template to keep.
        sentencepiece_class = tokenizer_class if tokenizer_class in model_file_by_class else "LlamaTokenizer"
        return hf_tokenizer.load_hf_tokenizer(directory, getattr(transformers, sentencepiece_class), model_file_by_class[sentencepiece_class])
    if family is None:
        _require_tokenizer_files(directory, getattr(transformers, tokenizer_class or "", None))
        return transformers.AutoTokenizer.from_pretrained(directory)
    class_name = family.tokenizer_class
    if family.sentencepiece_tokenizer_class and any(os.path.exists(os.path.join(directory, f)) for f in tokenizer_model_files()):
        class_name = family.sentencepiece_tokenizer_class
    _require_tokenizer_files(directory, getattr(transformers, class_name))
    return getattr(transformers, class_name).from_pretrained(directory)


def _require_tokenizer_files(directory: str, tokenizer_class) -> None:
    """PaddleNLP's tokenizer classes list the files they read in ``resource_files_names``; without one, the class's
    constructor fails with a TypeError (a missing ``vocab_file`` argument) that names no file.

    Raises:
        FileNotFoundError: a file the class reads is not in ``directory``; the message names it.
    """
    needed = getattr(tokenizer_class, "resource_files_names", None) or {}
    missing = [name for name in needed.values() if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise FileNotFoundError(
            f"{directory}: the tokenizer is incomplete: missing {', '.join(missing)}, which {tokenizer_class.__name__} "
            "reads; copy the tokenizer's files from where it came from, or pass --tokenizer_name_or_path with a complete "
            "tokenizer directory"
        )


def tokenizer_model_files() -> tuple[str, ...]:
    """Every SentencePiece file name a family's tokenizer reads, each once."""
    return tuple(dict.fromkeys(f.tokenizer_model_file for f in FAMILIES.values() if f.tokenizer_model_file))


# The families, one line each: the package under paddle_llm/models/ whose ``FAMILY`` describes it. They are imported
# here, after everything above, because each package builds its ``FAMILY`` from the classes above; and as names, so
# that adding a family is one line. ``paddle_llm.models`` imports this module first, so whichever module a program
# imports first, a family package finds this one's classes defined.
FAMILY_PACKAGES = (
    "llama",
    "chatglm",
    "chatglm2",
    "qwen2",
    "qwen3",
    "ernie4_5",
    "mistral",
    "moe",
)
FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (importlib.import_module(f"paddle_llm.models.{package}").FAMILY for package in FAMILY_PACKAGES)
}


def family_of_model(model) -> ModelFamily | None:
    """The family of the first layer that comes from a family's PaddleNLP module, so wrappers such as a LoRA model
    are recognised through the model they wrap; None for a model of no known family."""
    for layer in model.sublayers(include_self=True):
        module = type(layer).__module__ + "."
        for family in FAMILIES.values():
            if family.paddlenlp_module and module.startswith(family.paddlenlp_module):
                return family
    return None
