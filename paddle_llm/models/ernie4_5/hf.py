"""ERNIE 4.5 (dense) as Hugging Face writes it (``Ernie4_5ForCausalLM`` of transformers 5), and as ``modeling.py``
builds it.

Tensor names are Llama's (``model.`` <-> ``llama.``, Linear weights transposed). Two differences:
- RoPE: ERNIE 4.5 rotates interleaved pairs of each head, dims ``(2i, 2i+1)`` by the angle of frequency ``i``
  (transformers' ``apply_rotary_pos_emb`` there repeats each cos/sin entry twice and its ``rotate_half`` swaps
  pairs); Llama rotates halves, dims ``(i, i + head_dim/2)``. Reordering each q and k head's output features
  from ``0, 1, 2, 3, ...`` to ``0, 2, 4, ..., 1, 3, 5, ...`` turns one into the other, and q.k is unchanged when q
  and k are reordered alike (v and o are not touched). So the q/k projection rows (and biases) are reordered on
  loading and restored on export: the model is a Llama, and Llama's CPU fast paths and decoding step apply.
- config: ``use_bias`` puts a bias on every projection (``attention_bias`` and ``mlp_bias`` here);
  ``head_dim`` defaults to 128 and ``tie_word_embeddings`` to true, as transformers' Ernie4_5Config.
RoPE scaling: YaRN only (released ERNIE 4.5 dense models use plain RoPE, theta 5e5), put into the rotary tables as for
Llama (``llama/rope.py``): after the reordering the rotation is Llama's, so the same frequencies apply.
"""

from __future__ import annotations

import numpy as np

from paddle_llm.models.llama import hf as llama_hf
from paddle_llm.models.llama import layer_options

# transformers' Ernie4_5Config defaults where config.json may leave a field out.
DEFAULTS = {"head_dim": 128, "tie_word_embeddings": True, "rope_theta": 500000.0}
_HF_ONLY_FIELDS = ("torch_dtype", "dtype", "transformers_version", "_name_or_path", "rope_scaling", "rope_parameters",
                   "use_bias", "auto_map")
_UNDERSTOOD_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "num_attention_heads")
# The rows the rotary reordering applies to: each head's output features of q and k.
_ROTATED = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias")

# ERNIE 4.5's format as Jinja (its tokenizer_config.json's without the tool branches), for an export whose source had none.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

paddle_name = llama_hf.paddle_name
hf_name = llama_hf.hf_name
tied_aliases = llama_hf.tied_aliases


def _reordered(paddle_parameter: str, rows: np.ndarray, config_fields: dict, to_halves: bool) -> np.ndarray:
    """``rows`` ([out] or [out, in], transformers' layout) with each head's features from interleaved pairs to halves
    (``to_halves``) or back."""
    if not paddle_parameter.endswith(_ROTATED):
        return rows
    head_dim = layer_options.head_dim(config_fields)
    grouped = rows.reshape((-1, head_dim // 2, 2) + rows.shape[1:]) if to_halves else rows.reshape((-1, 2, head_dim // 2) + rows.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(rows.shape)


def to_paddle_layout(paddle_parameter: str, array, config_fields: dict):
    """A transformers tensor in the layout of the parameter it loads into: q/k rows to halves, then Llama's."""
    return llama_hf.to_paddle_layout(paddle_parameter, _reordered(paddle_parameter, np.asarray(array), config_fields, True), config_fields)


def to_hf_layout(paddle_parameter: str, array, config_fields: dict):
    """A parameter in transformers' layout: Llama's, then q/k rows back to interleaved pairs."""
    return _reordered(paddle_parameter, llama_hf.to_hf_layout(paddle_parameter, array, config_fields), config_fields, False)


def config_from_hf(fields: dict, config_path: str) -> dict:
    """``Ernie4_5Config`` fields (``modeling.py``) from a transformers ``config.json``.

    Raises:
        ValueError: a feature not built here; the message names the field and the file.
    """
    theta, scaling, refusals = llama_hf.rope_settings({"rope_theta": DEFAULTS["rope_theta"], **fields}, _UNDERSTOOD_KEYS,
                                                      rope_types=("default", "yarn"))
    if fields.get("hidden_act", "silu") != "silu":
        refusals.append(f"hidden_act {fields['hidden_act']!r} (the MLP is SwiGLU: 'silu')")
    if refusals:
        raise ValueError(f"{config_path}: this ERNIE 4.5 checkpoint cannot be built: " + "; ".join(refusals))
    converted = {**DEFAULTS, **{k: v for k, v in fields.items() if k not in _HF_ONLY_FIELDS}}
    bias = bool(fields.get("use_bias", False))
    converted.update(rope_theta=theta, attention_bias=bias, mlp_bias=bias, architectures=["Ernie4_5ForCausalLM"])
    if scaling:
        converted["rope_scaling"] = scaling
    return converted


def config_to_hf(config) -> dict:
    """A transformers ``config.json`` for an ``Ernie4_5Config``, as transformers 5's ``save_pretrained`` writes it but
    with ``rope_theta`` beside ``rope_parameters`` (both read it), a YaRN scaling inside the latter."""
    hf = {key: value for key, value in llama_hf.config_to_hf(config).items()
          if key not in ("attention_bias", "mlp_bias", "pretraining_tp", "rope_scaling", "attention_dropout")}
    scaling = getattr(config, "rope_scaling", None) or {"rope_type": "default"}
    hf.update(architectures=["Ernie4_5ForCausalLM"], model_type="ernie4_5", use_bias=bool(config.attention_bias),
              rope_theta=config.rope_theta, rope_parameters={"rope_theta": config.rope_theta, **scaling})
    return hf
