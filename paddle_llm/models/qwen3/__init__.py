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
from paddle_llm.models.registry import Deferred


def qwen3_layer_options(fields: dict) -> list[str]:
    """Every Qwen3 layer is our own (the q/k head norms), whatever else the config asks."""
    return ["q/k head norms (qwen3)", *layer_options.requested(fields)]


# Llama's family, except for what Qwen3 changes: its classes, tokenizer, template, head norms and Hugging Face mapping.
FAMILY = replace(
    llama.FAMILY,
    name="qwen3",
    model_types=("qwen3",),
    config_class="Qwen3Config",
    model_class="Qwen3ForCausalLM",
    classes_module="paddle_llm.models.qwen3.modeling",
    pipe_model_class=None,
    tokenizer_class="Qwen2Tokenizer",
    tokenizer_model_file=None,
    sentencepiece_tokenizer_class="LlamaTokenizer",
    chat_template=replace(qwen2.CHAT_TEMPLATE, name="qwen3"),
    paddlenlp_module="paddle_llm.models.qwen3.",
    cpu_fast_paths=Deferred("paddle_llm.models.qwen3.cpu_fast", "apply"),
    step=replace(llama.FAMILY.step, inference_step=None),  # Llama's own step has no head norms
    estimate_shape=estimate.shape,
    hf=hf,
    layer_options=qwen3_layer_options,
)
