"""Qwen3 (dense) as Hugging Face writes it (``Qwen3ForCausalLM`` of transformers >= 4.51), and as ``modeling.py``
builds it.

The tensors are Llama's with ``head_dim``-wide heads plus ``self_attn.q_norm`` / ``k_norm`` per layer (vectors, kept as
they are), and the model keeps PaddleNLP's Llama prefix ``llama.``: names and layouts are Llama's mapping
(``llama/hf.py``). Sliding-window attention is refused (every layer here attends over the whole context), and so is
any RoPE scaling but YaRN (Qwen3's long-context setting), which is kept in ``rope_scaling`` and put into the rotary
tables as for Llama (``llama/rope.py``). A config without ``head_dim`` means transformers' default, 128.
"""

from __future__ import annotations

from paddle_llm.models.llama import hf as llama_hf
from paddle_llm.models.qwen2 import hf as qwen2_hf

# transformers' Qwen3Config default, used when config.json has no head_dim.
DEFAULT_HEAD_DIM = 128
# HF config fields that describe the file (or a feature refused below), not the model built here.
_HF_ONLY_FIELDS = ("torch_dtype", "dtype", "transformers_version", "_name_or_path", "rope_scaling", "rope_parameters",
                   "layer_types", "use_sliding_window", "sliding_window", "max_window_layers", "auto_map")
_UNDERSTOOD_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "num_attention_heads", "attention_bias",
                    "attention_dropout", "layer_types", "use_sliding_window", "sliding_window", "max_window_layers")

# Qwen3 shares Qwen2's ChatML (the built-in template as Jinja) and its tokenizer class.
CHAT_TEMPLATE = qwen2_hf.CHAT_TEMPLATE
TRANSFORMERS5_TOKENIZER_CLASS = qwen2_hf.TRANSFORMERS5_TOKENIZER_CLASS

paddle_name = llama_hf.paddle_name
hf_name = llama_hf.hf_name
to_paddle_layout = llama_hf.to_paddle_layout
to_hf_layout = llama_hf.to_hf_layout
tied_aliases = llama_hf.tied_aliases


def config_from_hf(fields: dict, config_path: str) -> dict:
    """``Qwen3Config`` fields (``modeling.py``) from a transformers ``config.json``.

    Raises:
        ValueError: a feature not built here; the message names the field and the file.
    """
    converted = qwen2_hf.qwen_config_from_hf(fields, config_path, "Qwen3ForCausalLM", _HF_ONLY_FIELDS, _UNDERSTOOD_KEYS,
                                             "this Qwen3 checkpoint cannot be built")
    converted.setdefault("head_dim", DEFAULT_HEAD_DIM)
    return converted


def config_to_hf(config) -> dict:
    """A transformers ``config.json`` for a ``Qwen3Config``, in the keys transformers 4.51+ and 5 both read."""
    hf = {key: value for key, value in llama_hf.config_to_hf(config).items() if key not in ("mlp_bias", "pretraining_tp")}
    hf.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=False, sliding_window=None,
              max_window_layers=config.num_hidden_layers)
    return hf
