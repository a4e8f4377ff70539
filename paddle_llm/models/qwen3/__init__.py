"""Qwen3 (dense) through our subclass of PaddleNLP's Llama (``modeling.py``): everything the toolkit knows about it.

Qwen3 is Llama with heads of their own width (``head_dim`` 128 at any hidden size), an RMSNorm over each query and
key head before the rotary embedding, optional q/k/v/o biases, and tied embeddings at small sizes; its tokenizer is
Qwen2's byte-level BPE with the ChatML template. So the cache geometry, the decoding-step call, the LoRA targets and
the CPU fast paths are Llama's (``cpu_fast.py`` names Qwen3's classes); Llama's own inference step has no head norms,
so export traces this model's forward. The estimator's shape is in ``estimate.py``, the Hugging Face mapping in ``hf.py``.
"""

from __future__ import annotations

from dataclasses import replace

from paddle_llm.models import llama, qwen2
from paddle_llm.models.llama import layer_options
from paddle_llm.models.qwen3 import estimate, hf
from paddle_llm.models.registry import Deferred, ModelFamily
from paddle_llm.models.step import StepSpec, past_key_values_call


def qwen3_layer_options(fields: dict) -> list[str]:
    """Every Qwen3 layer is our own (the q/k head norms), whatever else the config asks."""
    return ["q/k head norms (qwen3)", *layer_options.requested(fields)]


FAMILY = ModelFamily(
    name="qwen3",
    model_types=("qwen3",),
    config_class="Qwen3Config",
    model_class="Qwen3ForCausalLM",
    tokenizer_class="Qwen2Tokenizer",
    max_positions_field="max_position_embeddings",
    field_aliases=llama.FAMILY.field_aliases,  # the config class is LlamaConfig's subclass
    sentencepiece_tokenizer_class="LlamaTokenizer",
    chat_template=replace(qwen2.CHAT_TEMPLATE, name="qwen3"),
    lora_target_modules=llama.FAMILY.lora_target_modules,
    prefix_layout=llama.prefix_layout,
    paddlenlp_module="paddle_llm.models.qwen3.",
    cpu_fast_paths=Deferred("paddle_llm.models.qwen3.cpu_fast", "apply"),
    step=StepSpec(
        call=past_key_values_call,
        batch_axis=0,
        seq_axis=1,
        glm_positions=False,
        kv_geometry=llama.kv_geometry,
    ),
    estimate_shape=estimate.shape,
    activations=estimate.ACTIVATIONS,
    hf=hf,
    classes_module="paddle_llm.models.qwen3.modeling",
    layer_options=qwen3_layer_options,
)
