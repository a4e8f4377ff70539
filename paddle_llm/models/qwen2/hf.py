"""Qwen2 / Qwen2.5 as Hugging Face writes it (``Qwen2ForCausalLM`` of transformers), and as PaddleNLP builds it.

The tensors are Llama's plus a bias on each of q/k/v, so names and layouts are Llama's mapping (``llama/hf.py``) with
PaddleNLP's base-model prefix ``qwen2.`` instead of ``llama.``; biases are vectors and keep their layout. The config
differs in what PaddleNLP's Qwen2 can build: sliding-window attention is refused, because PaddleNLP's CPU attention
has no window and would attend further back than the checkpoint was trained to, and so is any RoPE scaling but YaRN
(``llama/rope.py``).
Both transformers 4's and 5's config layouts are read (``llama_hf.rope_settings``); ``dtype`` / ``torch_dtype``
describe the file only (weights load in the run's dtype).
"""

from __future__ import annotations

from paddle_llm.models.llama import hf as llama_hf

HF_PREFIX = llama_hf.HF_PREFIX
PADDLE_PREFIX = "qwen2."
# HF config fields that describe the file (or a feature refused below), not the model PaddleNLP builds.
_HF_ONLY_FIELDS = ("torch_dtype", "dtype", "transformers_version", "_name_or_path", "rope_scaling", "rope_parameters",
                   "layer_types", "use_sliding_window", "auto_map")
# RoPE and attention keys of transformers' Qwen2Config (4.x and 5.x); the window is refused when switched on.
_UNDERSTOOD_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "num_attention_heads", "attention_dropout",
                    "layer_types", "use_sliding_window", "sliding_window", "max_window_layers")

# ChatML, the built-in template (``qwen2/__init__.py``) as Jinja, for an exported directory whose source had none.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# transformers 5's AutoTokenizer loads model_type qwen2 with this class whatever tokenizer_config.json names, and it
# rebuilds a byte-level BPE from the vocabulary: a SentencePiece tokenizer.json gets other ids there.
TRANSFORMERS5_TOKENIZER_CLASS = "Qwen2Tokenizer"

to_paddle_layout = llama_hf.to_paddle_layout
to_hf_layout = llama_hf.to_hf_layout
tied_aliases = llama_hf.tied_aliases


def paddle_name(hf_name: str) -> str | None:
    """The PaddleNLP parameter name for a transformers tensor name; None for tensors computed from the config."""
    name = llama_hf.paddle_name(hf_name)
    if name is not None and name.startswith(llama_hf.PADDLE_PREFIX):
        return PADDLE_PREFIX + name[len(llama_hf.PADDLE_PREFIX):]
    return name


def hf_name(paddle_parameter: str) -> str:
    """The transformers tensor name for a PaddleNLP parameter name."""
    if paddle_parameter.startswith(PADDLE_PREFIX):
        return HF_PREFIX + paddle_parameter[len(PADDLE_PREFIX):]
    return paddle_parameter


def config_from_hf(fields: dict, config_path: str) -> dict:
    """PaddleNLP ``Qwen2Config`` fields from a transformers ``config.json``.

    Raises:
        ValueError: a feature PaddleNLP's Qwen2 does not build; the message names the field and the file.
    """
    return qwen_config_from_hf(fields, config_path, "Qwen2ForCausalLM", _HF_ONLY_FIELDS, _UNDERSTOOD_KEYS,
                               "this Qwen2 checkpoint cannot be built by PaddleNLP's Qwen2")


def qwen_config_from_hf(fields: dict, config_path: str, architecture: str, hf_only_fields: tuple[str, ...],
                        understood_keys: tuple[str, ...], cannot_build: str) -> dict:
    """Config fields of a Qwen-style checkpoint (Qwen2, Qwen3), whose differences from Llama's are refused alike.

    Sliding-window attention is refused (every layer here attends over the whole context, further back than the
    checkpoint was trained to), and so are any RoPE scaling but YaRN and an MLP other than SwiGLU.

    Raises:
        ValueError: ``{config_path}: {cannot_build}: `` and every refused field.
    """
    refusals = []
    if fields.get("use_sliding_window"):
        refusals.append("use_sliding_window: true (every layer attends over the whole context here)")
    theta, scaling, rope_refusals = llama_hf.rope_settings(fields, understood_keys, rope_types=("default", "yarn"))
    refusals += rope_refusals
    if fields.get("hidden_act", "silu") != "silu":
        refusals.append(f"hidden_act {fields['hidden_act']!r} (the MLP is SwiGLU: 'silu')")
    if refusals:
        raise ValueError(f"{config_path}: {cannot_build}: " + "; ".join(refusals))
    converted = {k: v for k, v in fields.items() if k not in hf_only_fields}
    converted.update(rope_theta=theta, architectures=[architecture])
    if scaling:
        converted["rope_scaling"] = scaling  # YaRN, put into the rotary tables by models/llama/rope.py
    converted.setdefault("tie_word_embeddings", False)
    return converted


def config_to_hf(config) -> dict:
    """A transformers ``config.json`` for a PaddleNLP ``Qwen2Config``, as ``Qwen2Config.save_pretrained`` writes it."""
    hf = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "max_window_layers": config.max_window_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": config.rope_theta,
        "sliding_window": config.sliding_window,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "torch_dtype": config.dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": config.vocab_size,
    }
    scaling = getattr(config, "rope_scaling", None)
    if scaling:
        llama_hf.write_scaling(hf, scaling)
    return hf
