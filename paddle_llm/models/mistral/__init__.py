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

from paddle_llm.models import llama
from paddle_llm.models.mistral import estimate, hf
from paddle_llm.models.registry import ChatTemplate, ModelFamily

# Mistral-Instruct's ``[INST]`` format as its tokenizer_config.json renders it: ``<s>[INST] {user} [/INST]{reply}</s>``,
# a system message folded into the first user turn. A directory's own Jinja template, when it has one, is used instead.
CHAT_TEMPLATE = ChatTemplate(
    name="mistral",
    system_format="{content}\n\n",
    system_inside_first_user=True,
    user_format="<s>[INST] {system}{content} [/INST]",
    assistant_format="{content}</s>",
    round_separator="",
    first_round=0,
    append_eos_token=False,
    stop_strings=(),
)

FAMILY = ModelFamily(
    name="mistral",
    model_types=("mistral",),
    config_class=llama.FAMILY.config_class,
    model_class=llama.FAMILY.model_class,
    tokenizer_class=llama.FAMILY.tokenizer_class,
    max_positions_field="max_position_embeddings",
    field_aliases=llama.FAMILY.field_aliases,
    pipe_model_class=llama.FAMILY.pipe_model_class,
    tokenizer_model_file=llama.FAMILY.tokenizer_model_file,
    chat_template=CHAT_TEMPLATE,
    lora_target_modules=llama.FAMILY.lora_target_modules,
    prefix_layout=llama.prefix_layout,
    paddlenlp_module=llama.FAMILY.paddlenlp_module,
    cpu_fast_paths=llama.FAMILY.cpu_fast_paths,
    step=llama.FAMILY.step,
    estimate_shape=estimate.shape,
    activations=llama.FAMILY.activations,
    hf=hf,
    install_rope_scaling=llama.FAMILY.install_rope_scaling,
    window_field="sliding_window",
)
