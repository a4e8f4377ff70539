"""Mistral through PaddleNLP's ``LlamaForCausalLM``: everything the toolkit knows about it.

Mistral is Llama (RMSNorm, rotary, grouped-query attention, SwiGLU, the same tensor names) with a sliding attention
window. PaddleNLP 3.0.0b4 also has ``MistralForCausalLM``, but it has no pipeline-parallel variant, no prefix
post-processing, and neither our CPU fast paths nor our decoding step know its classes; built on Llama's classes
instead, a Mistral checkpoint trains, takes LoRA/QLoRA/prefix/DPO, exports and serves through the paths Llama has
proved, and this package only maps the config (``hf.py``). The window is not built: a sequence longer than
``sliding_window`` is refused before work starts (``ModelFamily.window_field``); Mistral v0.2 and later set it to
null, and those load without a limit.
"""

from __future__ import annotations

import dataclasses

from paddle_llm.models import llama
from paddle_llm.models.mistral import estimate, hf
from paddle_llm.models.registry import ChatTemplate

# Mistral-Instruct's ``[INST]`` format as its tokenizer_config.json renders it: ``<s>`` once, then
# ``[INST] {user} [/INST]{reply}</s>`` per round (Llama-2 repeats ``<s>`` each round; Mistral does not), a system
# message folded into the first user turn. A directory's own Jinja template, when it has one, is used instead.
CHAT_TEMPLATE = ChatTemplate(
    name="mistral",
    system_format="{content}\n\n",
    system_inside_first_user=True,
    user_format="[INST] {system}{content} [/INST]",
    assistant_format="{content}</s>",
    round_separator="",
    first_round=0,
    append_eos_token=False,
    stop_strings=(),
    conversation_prefix="<s>",
)

# Llama's family in every field but these: the classes, fast paths, decoding step, LoRA targets and prefix layout are
# Llama's because the model is PaddleNLP's Llama.
FAMILY = dataclasses.replace(
    llama.FAMILY,
    name="mistral",
    model_types=("mistral",),
    chat_template=CHAT_TEMPLATE,
    estimate_shape=estimate.shape,
    hf=hf,
    window_field="sliding_window",
)
