"""Mistral as Hugging Face writes it (``MistralForCausalLM`` of transformers), built as PaddleNLP's Llama.

The tensors are Llama's under the same names and layouts, so names, layouts and tied copies are Llama's mapping
(``llama/hf.py``). The config adds ``sliding_window``, which is kept (``ModelFamily.window_field`` refuses longer
sequences) and written back; a decoupled ``head_dim`` (Mistral-Nemo: 128 at hidden 5120 / 32 heads) is built by
Llama's own attention (``llama/modeling.py``), as for Llama.
"""

from __future__ import annotations

from paddle_llm.models.llama import hf as llama_hf

HF_PREFIX = llama_hf.HF_PREFIX
PADDLE_PREFIX = llama_hf.PADDLE_PREFIX
paddle_name = llama_hf.paddle_name
hf_name = llama_hf.hf_name
to_paddle_layout = llama_hf.to_paddle_layout
to_hf_layout = llama_hf.to_hf_layout
tied_aliases = llama_hf.tied_aliases

# Mistral-Instruct's template (the built-in ``[INST]`` format of ``mistral/__init__.py``) as Jinja, for an exported
# directory whose source had none.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ '<s>' }}{% for message in turns %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + '</s>' }}{% endif %}{% endfor %}"
)


def config_from_hf(fields: dict, config_path: str) -> dict:
    """PaddleNLP ``LlamaConfig`` fields from a transformers Mistral ``config.json``, ``sliding_window`` kept.

    Raises:
        ValueError: a feature PaddleNLP's Llama does not build; the message names the field and the file.
    """
    window = fields.get("sliding_window")
    as_llama = {name: value for name, value in fields.items() if name != "sliding_window"}
    try:
        converted = llama_hf.config_from_hf(as_llama, config_path)
    except ValueError as err:
        raise ValueError(str(err).replace("this Llama checkpoint", "this Mistral checkpoint")) from None
    converted["sliding_window"] = window
    return converted


def config_to_hf(config) -> dict:
    """A transformers ``config.json`` for a Mistral built as PaddleNLP's Llama, as ``MistralConfig`` writes it (also
    with ``sliding_window`` null, Mistral v0.2 and later)."""
    return llama_hf.as_mistral(llama_hf.config_to_hf(config), getattr(config, "sliding_window", None))
