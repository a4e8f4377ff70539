"""Qwen2 / Qwen2.5 through PaddleNLP's ``Qwen2ForCausalLM``: everything the toolkit knows about it.

Qwen2 is built like Llama (RMSNorm, rotary, grouped-query attention, SwiGLU; PaddleNLP keeps Llama's sublayer
names and cache layout) with three differences that matter here: q/k/v projections have biases, small sizes tie
the LM head to the embedding, and the tokenizer is byte-level BPE with the ChatML template. So the prefix layout,
the cache geometry, the decoding-step call and the CPU fast paths are Llama's (``cpu_fast.py`` names Qwen2's
classes); Llama's own inference step is not used, since it has no projection biases; ``step.py`` makes PaddleNLP's forward
traceable. The estimator's shape is in ``estimate.py``.
"""

from __future__ import annotations

from paddle_llm.models import llama
from paddle_llm.models.qwen2 import estimate, hf
from paddle_llm.models.registry import ChatTemplate, Deferred, ModelFamily
from paddle_llm.models.step import StepSpec, past_key_values_call

# ChatML, as Qwen2's tokenizer_config.json renders it: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, and
# ``<|im_start|>assistant\n`` to ask for a reply. The reply is trained up to and including ``<|im_end|>``, the
# terminator an instruct model stops on; the newline after it belongs to the next round.
CHAT_TEMPLATE = ChatTemplate(
    name="qwen2",
    system_format="<|im_start|>system\n{content}<|im_end|>\n",
    system_inside_first_user=False,
    user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant_format="{content}<|im_end|>",
    round_separator="\n",
    first_round=0,
    append_eos_token=False,
    stop_strings=("<|im_end|>",),
)

FAMILY = ModelFamily(
    name="qwen2",
    model_types=("qwen2",),
    config_class="Qwen2Config",
    model_class="Qwen2ForCausalLM",
    tokenizer_class="Qwen2Tokenizer",
    max_positions_field="max_position_embeddings",
    field_aliases={"num_classes": "num_labels"},
    pipe_model_class="Qwen2ForCausalLMPipe",
    # Qwen2's own tokenizer is byte-level BPE (vocab.json + merges.txt); the shipped SentencePiece tokenizer a preset
    # uses, or one `paddle-llm tokenizer train` wrote, is read as Llama's.
    sentencepiece_tokenizer_class="LlamaTokenizer",
    chat_template=CHAT_TEMPLATE,
    lora_target_modules=llama.FAMILY.lora_target_modules,
    prefix_layout=llama.prefix_layout,
    paddlenlp_module="paddlenlp.transformers.qwen2.",
    cpu_fast_paths=Deferred("paddle_llm.models.qwen2.cpu_fast", "apply"),
    step=StepSpec(
        call=past_key_values_call,
        batch_axis=0,
        seq_axis=1,
        glm_positions=False,
        kv_geometry=llama.kv_geometry,
        prepare_for_tracing=Deferred("paddle_llm.models.qwen2.step", "prepare_for_tracing"),
    ),
    estimate_shape=estimate.shape,
    activations=estimate.ACTIVATIONS,
    hf=hf,
    install_rope_scaling=llama.FAMILY.install_rope_scaling,
)
