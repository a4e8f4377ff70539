"""Llama as Hugging Face writes it (``LlamaForCausalLM`` of transformers), and as PaddleNLP builds it.

Both have the same modules; they differ in three ways:
- the base-model prefix: ``model.`` in transformers, ``llama.`` in PaddleNLP;
- Linear weights: torch stores ``[out, in]``, Paddle ``[in, out]``, so every projection and an untied ``lm_head``
  is transposed;
- the config: transformers names ``rope_scaling`` by ``rope_type`` (or, before 4.43, ``type``), has ``head_dim``,
  ``attention_bias``, ``mlp_bias`` and ``torch_dtype``. PaddleNLP reads ``rope_scaling`` only for ``llama3``, and
  linear scaling from ``rope_scaling_type`` / ``rope_scaling_factor``; YaRN is kept in ``rope_scaling`` and put into
  the rotary tables after the model is built (``rope.py``). transformers 5 writes ``rope_parameters``
  (the theta and the scaling in one dict) and ``dtype``; both layouts are read (``rope_settings``), and a RoPE or
  attention key neither names is refused rather than left to a default.

The checkpoint's dtype is not the model's: weights load in the dtype the run's flags ask for (float32 on CPU), as
PaddleNLP's ``from_pretrained(dtype=...)`` does, so ``dtype`` / ``torch_dtype`` only describe the file.

``head_dim`` other than hidden/heads, ``attention_bias`` and ``mlp_bias`` are built by our subclass of PaddleNLP's
Llama (``modeling.py``) and kept in the config. A config feature neither builds (sliced ``pretraining_tp``
projections, other RoPE scalings) is refused here, because the weights would load into a model that computes
something else.
"""

from __future__ import annotations

from paddle_llm.models.llama import layer_options, rope

HF_PREFIX = "model."
PADDLE_PREFIX = "llama."
# Older checkpoints store each layer's rotary frequencies; both sides compute them from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# HF config fields that describe the file, not the model.
_HF_ONLY_FIELDS = ("torch_dtype", "dtype", "transformers_version", "_name_or_path", "pretraining_tp", "rope_scaling", "rope_parameters", "layer_types", "auto_map")
# Supported HF rope scalings -> PaddleNLP's rope_scaling_type (llama3 is read from rope_scaling itself).
_ROPE_TYPES = {"linear": "linear", "dynamic": "dynamic_ntk"}
# What each RoPE type may carry besides ``rope_type`` / ``type`` (and, in transformers 5's rope_parameters,
# ``rope_theta``); any other key changes the frequencies in a way not built here.
ROPE_TYPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": rope.YARN_KEYS,
}
# Scalings kept whole in the config's rope_scaling: PaddleNLP builds llama3 from it, ``rope.install`` YaRN.
SCALINGS_KEPT_WHOLE = ("llama3", "yarn")
# Config keys about RoPE or attention that a family understands; any other key whose name says it is one of those
# (``ATTENTION_KEY_PARTS``) is refused by name.
ATTENTION_KEY_PARTS = ("rope", "rotary", "attention", "attn", "window", "layer_types")
_UNDERSTOOD_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "num_attention_heads", "attention_bias",
                    "attention_dropout", "layer_types")


# The built-in Llama-2 chat format (models/chat_template.py, "llama") as the Jinja template an exported directory
# carries when its source had none, so transformers and vLLM frame conversations as fine-tuning here did.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% if message['role'] == 'user' %}"
    "{{ '<s>[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' </s>' }}{% endif %}{% endfor %}"
)


def _is_linear(paddle_name: str) -> bool:
    return paddle_name.endswith("_proj.weight") or paddle_name == "lm_head.weight"


def paddle_name(hf_name: str) -> str | None:
    """The PaddleNLP parameter name for a transformers tensor name; None for tensors computed from the config."""
    if hf_name.endswith(IGNORED_SUFFIXES):
        return None
    if hf_name.startswith(HF_PREFIX):
        return PADDLE_PREFIX + hf_name[len(HF_PREFIX):]
    return hf_name


def hf_name(paddle_parameter: str) -> str:
    """The transformers tensor name for a PaddleNLP parameter name."""
    if paddle_parameter.startswith(PADDLE_PREFIX):
        return HF_PREFIX + paddle_parameter[len(PADDLE_PREFIX):]
    return paddle_parameter


def to_paddle_layout(paddle_parameter: str, array, config_fields: dict):
    """Turn a transformers tensor into the layout of the PaddleNLP parameter it loads into (the same for any config)."""
    return array.T if _is_linear(paddle_parameter) else array


def to_hf_layout(paddle_parameter: str, array, config_fields: dict):
    """Turn a PaddleNLP parameter into transformers' layout (the same for any config)."""
    return array.T if _is_linear(paddle_parameter) else array


def tied_aliases(config_fields: dict) -> dict:
    """HF tensors that, with tied embeddings, repeat another tensor (``torch.save`` keeps both names of a shared
    tensor in a .bin): name -> the tensor it must equal."""
    return {"lm_head.weight": "model.embed_tokens.weight"} if config_fields.get("tie_word_embeddings") else {}


def rope_settings(fields: dict, understood: tuple[str, ...], rope_types: tuple[str, ...]) -> tuple[float, dict | None, list[str]]:
    """RoPE theta and scaling from transformers 4's ``rope_theta`` / ``rope_scaling`` or transformers 5's
    ``rope_parameters``, and the refusals: a RoPE type not in ``rope_types``, a key a type does not take, a
    ``rope_parameters`` that disagrees with ``rope_theta``, a layer type other than full attention, and any key
    named like RoPE or attention (``ATTENTION_KEY_PARTS``) outside ``understood``.

    Returns:
        ``(theta, scaling without rope_theta or None for plain RoPE, refusals)``.
    """
    refusals = [f"{key} (a RoPE or attention setting paddle_llm does not read; remove it only if it is the default)"
                for key in fields if any(part in key for part in ATTENTION_KEY_PARTS) and key not in understood]
    parameters = fields.get("rope_parameters")
    if parameters is not None and not isinstance(parameters, dict):
        return 10000.0, None, refusals + [f"rope_parameters {parameters!r} (expected one dict of RoPE settings)"]
    scaling = dict(parameters or fields.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None)
    if theta is not None and fields.get("rope_theta") not in (None, theta):
        refusals.append(f"rope_parameters.rope_theta {theta} and rope_theta {fields['rope_theta']} disagree")
    theta = float(theta if theta is not None else fields.get("rope_theta", 10000.0))
    where = "rope_parameters" if parameters is not None else "rope_scaling"
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type not in rope_types:
        refusals.append(f"{where} of type {rope_type!r} (supported: {', '.join(rope_types)})")
        return theta, None, refusals
    if scaling.get("partial_rotary_factor", 1.0) == 1.0:
        scaling.pop("partial_rotary_factor", None)
    refusals += [f"{where}.{key} (not a setting of RoPE type {rope_type!r} that paddle_llm builds)"
                 for key in scaling if key not in ROPE_TYPE_KEYS[rope_type]]
    kinds = set(fields.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        refusals.append(f"layer_types {sorted(kinds)} (only full attention is built)")
    return theta, (None if rope_type == "default" else {"rope_type": rope_type, **scaling}), refusals


def config_from_hf(fields: dict, config_path: str) -> dict:
    """PaddleNLP ``LlamaConfig`` fields from a transformers ``config.json``.

    Raises:
        ValueError: a feature PaddleNLP's Llama does not build; the message names the field and the file.
    """
    refusals = []
    if fields.get("pretraining_tp", 1) != 1:
        refusals.append(f"pretraining_tp {fields['pretraining_tp']} (only 1 is built)")
    if fields.get("hidden_act", "silu") != "silu":
        refusals.append(f"hidden_act {fields['hidden_act']!r} (PaddleNLP's Llama MLP is SwiGLU: 'silu')")
    converted = {k: v for k, v in fields.items() if k not in _HF_ONLY_FIELDS}
    theta, scaling, rope_refusals = rope_settings(fields, _UNDERSTOOD_KEYS, tuple(ROPE_TYPE_KEYS))
    refusals += rope_refusals
    converted["rope_theta"] = theta
    if scaling and scaling["rope_type"] in SCALINGS_KEPT_WHOLE:
        converted["rope_scaling"] = scaling
    elif scaling:
        converted.update(rope_scaling_type=_ROPE_TYPES[scaling["rope_type"]], rope_scaling_factor=scaling["factor"])
    if refusals:
        raise ValueError(f"{config_path}: this Llama checkpoint cannot be built by PaddleNLP's Llama: " + "; ".join(refusals))
    converted.setdefault("tie_word_embeddings", False)
    converted["architectures"] = ["LlamaForCausalLM"]
    return converted


def config_to_hf(config) -> dict:
    """A transformers ``config.json`` for a PaddleNLP ``LlamaConfig``, as ``LlamaConfig.save_pretrained`` writes it."""
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": bool(getattr(config, "attention_bias", False)),
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "head_dim": layer_options.head_dim(vars(config)),
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "mlp_bias": bool(getattr(config, "mlp_bias", False)),
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "torch_dtype": config.dtype,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type") in SCALINGS_KEPT_WHOLE:
        write_scaling(hf, scaling)
    elif config.rope_scaling_type:
        types = {paddle: hf_type for hf_type, paddle in _ROPE_TYPES.items()}
        if config.rope_scaling_type not in types:
            raise ValueError(f"rope_scaling_type {config.rope_scaling_type!r} has no transformers equivalent")
        hf["rope_scaling"] = {"rope_type": types[config.rope_scaling_type], "factor": config.rope_scaling_factor}
    if getattr(config, "sliding_window", None):
        # A Mistral that our runs saved: PaddleNLP's LlamaConfig writes model_type llama with the window kept.
        return as_mistral(hf, config.sliding_window)
    return hf


def write_scaling(hf: dict, scaling: dict) -> None:
    """Put a RoPE scaling into a transformers config.json as the source had it: ``rope_scaling`` (transformers 4's
    layout, which 5 also reads), or ``rope_parameters`` with the theta inside when it holds an
    ``original_max_position_embeddings`` other than ``max_position_embeddings``, which transformers 4's YaRN ignores."""
    original = scaling.get("original_max_position_embeddings")
    if scaling.get("rope_type") == "yarn" and original not in (None, hf["max_position_embeddings"]):
        hf.pop("rope_scaling", None)
        hf["rope_parameters"] = {"rope_theta": hf.pop("rope_theta"), **scaling}
    else:
        hf["rope_scaling"] = dict(scaling)


def as_mistral(hf: dict, sliding_window: int | None) -> dict:
    """A Llama ``config.json`` (``config_to_hf``) as transformers' ``MistralConfig`` writes it: Mistral is Llama with
    ``sliding_window`` and without the bias and ``pretraining_tp`` keys."""
    written = {name: value for name, value in hf.items() if name not in ("attention_bias", "mlp_bias", "pretraining_tp")}
    return dict(written, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=sliding_window)
