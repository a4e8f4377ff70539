"""ChatGLM2-6B (and ChatGLM3-6B's architecture) through PaddleNLP's ``ChatGLMv2ForCausalLM``: everything the toolkit
knows about it.

Config fields, tokenizer and chat template here; the CPU fast paths in ``cpu_fast.py``, the estimator's shape and
activation table in ``estimate.py``.
"""

from __future__ import annotations

from paddle_llm.models.chatglm import HF_REFUSAL
from paddle_llm.models.chatglm2 import estimate
from paddle_llm.models.registry import ChatTemplate, Deferred, ModelFamily, PrefixLayout
from paddle_llm.models.step import StepSpec, past_key_values_call


def key_value_groups(config) -> int:
    """Key/value heads: one per query group under multi-query attention, else one per head."""
    return config.multi_query_group_num if config.multi_query_attention else config.num_attention_heads


def prefix_layout(config) -> PrefixLayout:
    """Sequence-first ``[prefix, batch, heads, head_dim]``, one key/value per query group."""
    groups = key_value_groups(config) if getattr(config, "multi_query_attention", False) else None
    return PrefixLayout(config.num_attention_heads, config.num_hidden_layers, config.hidden_size, groups, "chatglm_postprocess_past_key_value")


def kv_geometry(config) -> tuple[int, int]:
    """``(key/value heads, head_dim)`` of the cache; ChatGLM2 sets its head width (``kv_channels``) on its own."""
    return key_value_groups(config), config.kv_channels


# ChatGLM2-6B: ``[Round 1]\n\n问：{user}\n\n答：{assistant}\n\n[Round 2]\n\n问：...`` (rounds count from 1). No system
# role (a system message becomes a leading paragraph) and no textual terminator, so a trainer appends the EOS token.
CHAT_TEMPLATE = ChatTemplate(
    name="chatglm2",
    system_format="{content}\n\n",
    system_inside_first_user=False,
    user_format="[Round {round}]\n\n问：{content}\n\n答：",
    assistant_format="{content}",
    round_separator="\n\n",
    first_round=1,
    append_eos_token=True,
    stop_strings=("[Round ",),
)

FAMILY = ModelFamily(
    name="chatglm2",
    model_types=("chatglm_v2", "chatglm2"),
    config_class="ChatGLMv2Config",
    model_class="ChatGLMv2ForCausalLM",
    tokenizer_class="ChatGLMv2Tokenizer",
    max_positions_field="max_sequence_length",
    field_aliases={"num_layers": "num_hidden_layers", "padded_vocab_size": "vocab_size", "seq_length": "max_sequence_length"},
    pipe_model_class="ChatGLMv2ForCausalLMPipe",
    tokenizer_model_file="tokenizer.model",
    chat_template=CHAT_TEMPLATE,
    lora_target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    prefix_layout=prefix_layout,
    # ChatGLM2's attention prepends a past to its keys only when use_cache is on; off, a prefix would be ignored.
    prefix_needs_cache=True,
    paddlenlp_module="paddlenlp.transformers.chatglm_v2.",
    cpu_fast_paths=Deferred("paddle_llm.models.chatglm2.cpu_fast", "apply"),
    # ChatGLM2's forward has Llama's signature, but keeps a sequence-first cache.
    step=StepSpec(call=past_key_values_call, batch_axis=1, seq_axis=0, glm_positions=False, kv_geometry=kv_geometry),
    estimate_shape=estimate.shape,
    activations=estimate.ACTIVATIONS,
    hf_refusal=HF_REFUSAL,
)
