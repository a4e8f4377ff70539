"""ChatGLM-6B (v1) through PaddleNLP's ``ChatGLMForCausalLM``: everything the toolkit knows about it.

Config fields, tokenizer, chat template, the plain-text inputs GLM needs and the decoding step's model call here; the
CPU fast paths in ``cpu_fast.py``, the traceable rotary table in ``step.py``, the estimator's shape and activation
table in ``estimate.py``. The first two import Paddle, so the family names them (``Deferred``) instead of importing.
"""

from __future__ import annotations

import numpy as np

from paddle_llm.models.chatglm import estimate
from paddle_llm.models.registry import ChatTemplate, Deferred, ModelFamily, PrefixLayout
from paddle_llm.models.step import StepSpec

# transformers has no ChatGLM class: THUDM's checkpoints run their own modelling code (trust_remote_code), whose
# tensor names and fused layouts are not a transformers contract.
HF_REFUSAL = (
    "ChatGLM / ChatGLM2 / ChatGLM3 exist in transformers only as remote code (trust_remote_code), so their Hugging "
    "Face checkpoints are not loaded; convert one with PaddleNLP on a machine with the weights "
    "(ChatGLMv2ForCausalLM.from_pretrained(dir, convert_from_torch=True).save_pretrained(new_dir)) and pass new_dir"
)


def cache_call(model, input_ids, position_ids, attention_mask, past):
    # ChatGLM v1 returns (logits, (caches,)) and names its cache argument ``cache``.
    logits, rest = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        cache=past,
        use_cache=True,
        return_dict=False,
    )
    return logits, rest[0]


def causal_lm_inputs(input_ids: np.ndarray) -> dict:
    """ChatGLM-6B (v1) needs an explicit 4-D mask and 2-D rotary positions; it has no defaults for plain text.

    For causal language modelling every token attends to itself and earlier tokens (True = attend), positions
    count 0..s-1 and the "block" positions (used only after a [gMASK] prompt) stay 0.
    """
    batch, seq = input_ids.shape
    causal = np.tril(np.ones((seq, seq), dtype="int64"))
    attention_mask = np.broadcast_to(causal, (batch, 1, seq, seq)).copy()
    positions = np.broadcast_to(np.arange(seq, dtype="int64"), (batch, seq))
    position_ids = np.stack([positions, np.zeros_like(positions)], axis=1)
    return {"attention_mask": attention_mask, "position_ids": position_ids}


def prefix_layout(config) -> PrefixLayout:
    """Sequence-first ``[prefix, batch, heads, head_dim]``, a key/value per head."""
    return PrefixLayout(config.num_attention_heads, config.num_hidden_layers, config.hidden_size, None, "chatglm_postprocess_past_key_value")


def kv_geometry(config) -> tuple[int, int]:
    """``(key/value heads, head_dim)`` of the cache: one per attention head."""
    return config.num_attention_heads, config.hidden_size // config.num_attention_heads


# ChatGLM-6B: ``[Round 0]\n问：{user}\n答：{assistant}\n[Round 1]\n问：...`` (rounds count from 0). No system role (a
# system message becomes a leading paragraph) and no textual terminator, so a trainer appends the EOS token.
CHAT_TEMPLATE = ChatTemplate(
    name="chatglm",
    system_format="{content}\n",
    system_inside_first_user=False,
    user_format="[Round {round}]\n问：{content}\n答：",
    assistant_format="{content}",
    round_separator="\n",
    first_round=0,
    append_eos_token=True,
    stop_strings=("[Round ",),
)

FAMILY = ModelFamily(
    name="chatglm",
    model_types=("chatglm",),
    config_class="ChatGLMConfig",
    model_class="ChatGLMForCausalLM",
    tokenizer_class="ChatGLMTokenizer",
    max_positions_field="max_sequence_length",
    field_aliases={"num_layers": "num_hidden_layers"},
    causal_lm_inputs=causal_lm_inputs,
    tokenizer_model_file="ice_text.model",
    chat_template=CHAT_TEMPLATE,
    lora_target_modules=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    prefix_layout=prefix_layout,
    glm_context=True,
    # ChatGLM-6B's head calls F.cross_entropy(..., ignore_index=-100), whose mean in Paddle 3.3 divides by every
    # position, ignored ones included (tests/unit/test_sft_data.py pins this).
    token_mean_loss=True,
    paddlenlp_module="paddlenlp.transformers.chatglm.",
    cpu_fast_paths=Deferred("paddle_llm.models.chatglm.cpu_fast", "apply"),
    # ChatGLM v1 names its cache argument ``cache``, keeps it sequence-first and takes 2-D positions.
    step=StepSpec(
        call=cache_call,
        batch_axis=1,
        seq_axis=0,
        glm_positions=True,
        kv_geometry=kv_geometry,
        prepare_for_tracing=Deferred("paddle_llm.models.chatglm.step", "prepare_for_tracing"),
    ),
    estimate_shape=estimate.shape,
    activations=estimate.ACTIVATIONS,
    hf_refusal=HF_REFUSAL,
)
