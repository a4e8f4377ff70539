"""The model registry: one ``ModelFamily`` per supported architecture, and the rules for finding a model.

A model is named by ``--model_name_or_path``, which is either a built-in preset (``tiny-llama``...), or a local
directory holding ``config.json`` (and, for ``--continue_training``, weights). Anything else is refused with a
message, because this toolkit never downloads: a hub name would otherwise fail deep inside a download with a
stack trace, or worse, hang on a machine without internet.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import numpy as np

from paddle_llm.config.presets import PRESETS, preset
from paddle_llm.models import hf_checkpoint, hf_tokenizer
from paddle_llm.models.llama import hf as llama_hf

WEIGHT_FILES = ("model_state.pdparams", "model.safetensors", "model_state.pdparams.index.json", "model.safetensors.index.json")


def _no_extra_inputs(input_ids: np.ndarray) -> dict:
    return {}


def _chatglm_v1_inputs(input_ids: np.ndarray) -> dict:
    """ChatGLM-6B (v1) needs an explicit 4-D mask and 2-D rotary positions; it has no defaults for plain text.

    For causal language modelling every token attends to itself and earlier tokens (True = attend), positions
    count 0..s-1 and the "block" positions (used only after a [gMASK] prompt) stay 0.
    """
    batch, seq = input_ids.shape
    causal = np.tril(np.ones((seq, seq), dtype="int64"))
    attention_mask = np.broadcast_to(causal, (batch, 1, seq, seq)).copy()
    positions = np.broadcast_to(np.arange(seq, dtype="int64"), (batch, seq))
    position_ids = np.stack([positions, np.zeros_like(positions)], axis=1)
    return {"attention_mask": attention_mask, "position_ids": position_ids}


@dataclass(frozen=True)
class ModelFamily:
    """Everything the toolkit needs to know about one architecture, as data.

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
        hf: the family's Hugging Face mapping module (``models/<family>/hf.py``: names, layouts, config.json both
            ways); None when Hugging Face checkpoints of the family are refused.
        hf_refusal: why, when ``hf`` is None.
    """

    name: str
    model_types: tuple[str, ...]
    config_class: str
    model_class: str
    tokenizer_class: str
    max_positions_field: str
    field_aliases: dict = field(default_factory=dict)
    causal_lm_inputs: Callable[[np.ndarray], dict] = field(default=_no_extra_inputs)
    pipe_model_class: str | None = None
    hf: ModuleType | None = None
    hf_refusal: str = "paddle_llm has no Hugging Face mapping for this family"

    def canonical_fields(self, config_fields: dict) -> dict:
        """Rename alias keys to the names the config constructor takes (an explicit canonical key wins)."""
        renamed = {name: value for name, value in config_fields.items() if name not in self.field_aliases}
        for alias, canonical in self.field_aliases.items():
            if alias in config_fields:
                renamed.setdefault(canonical, config_fields[alias])
        return renamed

    def classes(self):
        """Import and return ``(config_class, model_class, tokenizer_class)`` from PaddleNLP."""
        import paddlenlp.transformers as transformers

        return (
            getattr(transformers, self.config_class),
            getattr(transformers, self.model_class),
            getattr(transformers, self.tokenizer_class),
        )


# transformers has no ChatGLM class: THUDM's checkpoints run their own modelling code (trust_remote_code), whose
# tensor names and fused layouts are not a transformers contract.
CHATGLM_HF_REFUSAL = (
    "ChatGLM / ChatGLM2 / ChatGLM3 exist in transformers only as remote code (trust_remote_code), so their Hugging "
    "Face checkpoints are not loaded; convert one with PaddleNLP on a machine with the weights "
    "(ChatGLMv2ForCausalLM.from_pretrained(dir, convert_from_torch=True).save_pretrained(new_dir)) and pass new_dir"
)

FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily(
        name="llama",
        model_types=("llama",),
        config_class="LlamaConfig",
        model_class="LlamaForCausalLM",
        tokenizer_class="LlamaTokenizer",
        max_positions_field="max_position_embeddings",
        field_aliases={
            "n_positions": "max_position_embeddings",
            "n_embd": "hidden_size",
            "n_layer": "num_hidden_layers",
            "n_head": "num_attention_heads",
            "n_inner": "intermediate_size",
            "activation_function": "hidden_act",
        },
        pipe_model_class="LlamaForCausalLMPipe",
        hf=llama_hf,
    ),
    "chatglm": ModelFamily(
        name="chatglm",
        model_types=("chatglm",),
        config_class="ChatGLMConfig",
        model_class="ChatGLMForCausalLM",
        tokenizer_class="ChatGLMTokenizer",
        max_positions_field="max_sequence_length",
        field_aliases={"num_layers": "num_hidden_layers"},
        causal_lm_inputs=_chatglm_v1_inputs,
        hf_refusal=CHATGLM_HF_REFUSAL,
    ),
    "chatglm2": ModelFamily(
        name="chatglm2",
        model_types=("chatglm_v2", "chatglm2"),
        config_class="ChatGLMv2Config",
        model_class="ChatGLMv2ForCausalLM",
        tokenizer_class="ChatGLMv2Tokenizer",
        max_positions_field="max_sequence_length",
        field_aliases={"num_layers": "num_hidden_layers", "padded_vocab_size": "vocab_size", "seq_length": "max_sequence_length"},
        pipe_model_class="ChatGLMv2ForCausalLMPipe",
        hf_refusal=CHATGLM_HF_REFUSAL,
    ),
}


def family_of(config_fields: dict) -> ModelFamily:
    """Find the family of a config (a preset dict or a parsed config.json).

    Raises:
        ValueError: the config's ``model_type`` is not one we support.
    """
    model_type = str(config_fields.get("model_type", "")).lower()
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    for architecture in config_fields.get("architectures") or []:
        for family in FAMILIES.values():
            if architecture == family.model_class or architecture.lower().startswith(family.model_types[0]):
                return family
    supported = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"model_type {model_type!r} is not supported; supported model types: {supported}")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a preset (random init) or a local directory (config, maybe weights)."""

    name_or_path: str
    family: ModelFamily
    config_fields: dict
    directory: str | None  # None for presets
    has_weights: bool
    hf_weights: hf_checkpoint.HFWeights | None = None  # set when the directory holds a Hugging Face checkpoint


def resolve_model(name_or_path: str) -> ModelSource:
    """Resolve ``--model_name_or_path`` without touching the network.

    Raises:
        FileNotFoundError: neither a preset nor a local directory with config.json; the message says what to pass.
        ValueError: the config names an unsupported model type.
    """
    if name_or_path in PRESETS:
        fields = preset(name_or_path)
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
        hf_weights = hf_checkpoint.find_hf_weights(name_or_path)
        if hf_weights is not None:
            if family.hf is None:
                raise ValueError(f"{name_or_path} holds a Hugging Face checkpoint ({', '.join(hf_weights.files)}) of "
                                 f"model_type {fields.get('model_type')!r}: {family.hf_refusal}")
            fields = family.hf.config_from_hf(fields, config_path)
        has_weights = hf_weights is not None or any(os.path.exists(os.path.join(name_or_path, w)) for w in WEIGHT_FILES)
        return ModelSource(name_or_path, family, family.canonical_fields(fields), name_or_path, has_weights, hf_weights)
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
    """Instantiate the causal LM: from the directory's weights if asked, else randomly initialised.

    Raises:
        FileNotFoundError: weights were asked for but the source has none.
    """
    _, model_class, _ = source.family.classes()
    if getattr(config, "pipeline_parallel_degree", 1) > 1:
        if source.family.pipe_model_class is None:
            raise ValueError(f"pipeline parallel is not available for {source.family.name}: use --pipeline_parallel_degree 1")
        import paddlenlp.transformers as transformers

        model_class = getattr(transformers, source.family.pipe_model_class)
    if load_weights:
        if not source.has_weights:
            where = source.directory or f"preset {source.name_or_path!r}"
            raise FileNotFoundError(
                f"--continue_training needs weights, but {where} has none of {', '.join(WEIGHT_FILES)}; "
                "pass a directory saved by a previous run, or drop --continue_training to train from scratch"
            )
        if source.hf_weights is not None:
            return _build_from_hf(source, config, model_class)
        return model_class.from_pretrained(source.directory, config=config)
    return model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)


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
        FileNotFoundError: not a local directory or preset; the message says what to pass.
    """
    import paddlenlp.transformers as transformers

    from paddle_llm.data.tokenizer import MODEL_FILE_BY_CLASS, SHIPPED_TOKENIZER_DIR

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
    if not any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer_config.json", "tokenizer.json", *MODEL_FILE_BY_CLASS.values())):
        raise FileNotFoundError(
            f"{directory} has no tokenizer files (tokenizer_config.json or a SentencePiece model); pass "
            "--tokenizer_name_or_path with a tokenizer directory"
        )
    tokenizer_class = family.tokenizer_class if family else hf_tokenizer.configured_class(directory)
    if hf_tokenizer.needs_loading_here(directory, MODEL_FILE_BY_CLASS.get(tokenizer_class)):
        # A transformers directory: tokenizer.json, Llama's tokenizer.model, or a Jinja chat template to keep.
        sentencepiece_class = tokenizer_class if tokenizer_class in MODEL_FILE_BY_CLASS else "LlamaTokenizer"
        return hf_tokenizer.load_hf_tokenizer(directory, getattr(transformers, sentencepiece_class),
                                              MODEL_FILE_BY_CLASS[sentencepiece_class])
    if family is None:
        return transformers.AutoTokenizer.from_pretrained(directory)
    return getattr(transformers, family.tokenizer_class).from_pretrained(directory)
