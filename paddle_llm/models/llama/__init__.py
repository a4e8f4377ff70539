"""Llama (Llama-2 MHA, Llama-3 GQA) through PaddleNLP's ``LlamaForCausalLM``: everything the toolkit knows about it.

Config fields, tokenizer and chat template here; PaddleNLP's classes with the layer options it lacks (``head_dim``,
``attention_bias``, ``mlp_bias``) in ``modeling.py``, read from a config in ``layer_options.py``; the CPU fast paths in ``cpu_fast.py``, the decoding step of our own
in ``inference_step.py``, the estimator's shape and activation table in ``estimate.py``, the Hugging Face checkpoint
mapping in ``hf.py``.
"""

from __future__ import annotations

from paddle_llm.models.llama import estimate, hf, layer_options
from paddle_llm.models.registry import ChatTemplate, Deferred, ModelFamily, PrefixLayout
from paddle_llm.models.step import StepSpec, past_key_values_call


def prefix_layout(config) -> PrefixLayout:
    """Batch-first ``[batch, prefix, heads, head_dim]``; grouped-query attention gives the prefix fewer heads.

    PaddleNLP's prefix encoder makes heads of ``hidden_size / num_attention_heads``, so it is given ``heads *
    head_dim``: the hidden size, or wider or narrower where ``head_dim`` is decoupled (Qwen3, ERNIE 4.5)."""
    kv_heads = getattr(config, "num_key_value_heads", None)
    groups = kv_heads if kv_heads and kv_heads != config.num_attention_heads else None
    width = config.num_attention_heads * layer_options.head_dim(vars(config))
    return PrefixLayout(config.num_attention_heads, config.num_hidden_layers, width, groups, "llama_postprocess_past_key_value")


def kv_geometry(config) -> tuple[int, int]:
    """``(key/value heads, head_dim)`` of the cache."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads, layer_options.head_dim(vars(config))


# Llama-2 chat: ``<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] ...``. ``<s>`` and
# ``</s>`` are written as text; Llama tokenizers map them to the BOS/EOS ids, so the reply segment carries the EOS
# the model must learn to emit.
CHAT_TEMPLATE = ChatTemplate(
    name="llama",
    system_format="<<SYS>>\n{content}\n<</SYS>>\n\n",
    system_inside_first_user=True,
    user_format="<s>[INST] {system}{content} [/INST]",
    assistant_format=" {content} </s>",
    round_separator="",
    first_round=0,
    append_eos_token=False,
    stop_strings=(),
)

FAMILY = ModelFamily(
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
    tokenizer_model_file="sentencepiece.bpe.model",
    chat_template=CHAT_TEMPLATE,
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    prefix_layout=prefix_layout,
    paddlenlp_module="paddlenlp.transformers.llama.",
    cpu_fast_paths=Deferred("paddle_llm.models.llama.cpu_fast", "apply"),
    step=StepSpec(
        call=past_key_values_call,
        batch_axis=0,
        seq_axis=1,
        glm_positions=False,
        kv_geometry=kv_geometry,
        inference_step=Deferred("paddle_llm.models.llama.inference_step", "build"),
    ),
    estimate_shape=estimate.shape,
    activations=estimate.ACTIVATIONS,
    hf=hf,
    classes_module="paddle_llm.models.llama.modeling",
    layer_options=layer_options.requested,
    install_rope_scaling=Deferred("paddle_llm.models.llama.rope", "install"),
    # A Mistral that our runs saved reads back as Llama (PaddleNLP writes model_type llama) with its window kept.
    window_field="sliding_window",
)
