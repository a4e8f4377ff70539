"""Llama as Hugging Face writes it (``LlamaForCausalLM`` of transformers), and as PaddleNLP builds it.

Both have the same modules; they differ in three ways:
- the base-model prefix: ``model.`` in transformers, ``llama.`` in PaddleNLP;
- Linear weights: torch stores ``[out, in]``, Paddle ``[in, out]``, so every projection and an untied ``lm_head``
  is transposed;
- the config: transformers names ``rope_scaling`` by ``rope_type`` (or, before 4.43, ``type``), has ``head_dim``,
  ``attention_bias``, ``mlp_bias`` and ``torch_dtype``. PaddleNLP reads ``rope_scaling`` only for ``llama3``, and
  linear scaling from ``rope_scaling_type`` / ``rope_scaling_factor``.

A config feature PaddleNLP's Llama does not build (biases, a ``head_dim`` other than hidden/heads, sliced
``pretraining_tp`` projections, other RoPE scalings) is refused here, because the weights would load into a
model that computes something else.
"""

from __future__ import annotations

HF_PREFIX = "model."
PADDLE_PREFIX = "llama."
# Older checkpoints store each layer's rotary frequencies; both sides compute them from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# HF config fields that describe the file, not the model.
_HF_ONLY_FIELDS = ("torch_dtype", "transformers_version", "_name_or_path", "head_dim", "attention_bias", "mlp_bias",
                   "pretraining_tp", "rope_scaling", "auto_map")
# Supported HF rope scalings -> PaddleNLP's rope_scaling_type (llama3 is read from rope_scaling itself).
_ROPE_TYPES = {"linear": "linear", "dynamic": "dynamic_ntk"}


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


def to_paddle_layout(paddle_parameter: str, array):
    """Turn a transformers tensor into the layout of the PaddleNLP parameter it loads into."""
    return array.T if _is_linear(paddle_parameter) else array


def to_hf_layout(paddle_parameter: str, array):
    """Turn a PaddleNLP parameter into transformers' layout."""
    return array.T if _is_linear(paddle_parameter) else array


def tied_aliases(config_fields: dict) -> dict:
    """HF tensors that, with tied embeddings, repeat another tensor (``torch.save`` keeps both names of a shared
    tensor in a .bin): name -> the tensor it must equal."""
    return {"lm_head.weight": "model.embed_tokens.weight"} if config_fields.get("tie_word_embeddings") else {}


def config_from_hf(fields: dict, config_path: str) -> dict:
    """PaddleNLP ``LlamaConfig`` fields from a transformers ``config.json``.

    Raises:
        ValueError: a feature PaddleNLP's Llama does not build; the message names the field and the file.
    """
    hidden, heads = fields.get("hidden_size"), fields.get("num_attention_heads")
    refusals = []
    for name in ("attention_bias", "mlp_bias"):
        if fields.get(name):
            refusals.append(f"{name}: true (PaddleNLP's Llama has no biases; a Qwen2 checkpoint has model_type qwen2)")
    if fields.get("head_dim") not in (None, hidden // heads if hidden and heads else None):
        refusals.append(f"head_dim {fields['head_dim']} (PaddleNLP's Llama uses hidden_size / num_attention_heads = {hidden // heads})")
    if fields.get("pretraining_tp", 1) != 1:
        refusals.append(f"pretraining_tp {fields['pretraining_tp']} (only 1 is built)")
    if fields.get("hidden_act", "silu") != "silu":
        refusals.append(f"hidden_act {fields['hidden_act']!r} (PaddleNLP's Llama MLP is SwiGLU: 'silu')")
    converted = {k: v for k, v in fields.items() if k not in _HF_ONLY_FIELDS}
    scaling = fields.get("rope_scaling")
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type == "llama3":
            converted["rope_scaling"] = {**scaling, "rope_type": "llama3"}
        elif rope_type in _ROPE_TYPES:
            converted.update(rope_scaling_type=_ROPE_TYPES[rope_type], rope_scaling_factor=scaling["factor"])
        else:
            refusals.append(f"rope_scaling of type {rope_type!r} (supported: llama3, {', '.join(_ROPE_TYPES)})")
    if refusals:
        raise ValueError(f"{config_path}: this Llama checkpoint cannot be built by PaddleNLP's Llama: " + "; ".join(refusals))
    if fields.get("torch_dtype"):
        converted["dtype"] = fields["torch_dtype"]
    converted.setdefault("tie_word_embeddings", False)
    converted["architectures"] = ["LlamaForCausalLM"]
    return converted


def config_to_hf(config) -> dict:
    """A transformers ``config.json`` for a PaddleNLP ``LlamaConfig``, as ``LlamaConfig.save_pretrained`` writes it."""
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "head_dim": config.hidden_size // config.num_attention_heads,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "mlp_bias": False,
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
    if scaling and scaling.get("rope_type") == "llama3":
        hf["rope_scaling"] = dict(scaling)
    elif config.rope_scaling_type:
        types = {paddle: hf_type for hf_type, paddle in _ROPE_TYPES.items()}
        if config.rope_scaling_type not in types:
            raise ValueError(f"rope_scaling_type {config.rope_scaling_type!r} has no transformers equivalent")
        hf["rope_scaling"] = {"rope_type": types[config.rope_scaling_type], "factor": config.rope_scaling_factor}
    return hf
