"""ERNIE 4.5 (dense: 0.3B and the like) through our subclass of PaddleNLP's Llama (``modeling.py``): everything the
toolkit knows about it.

ERNIE 4.5 dense is Llama at its core: RMSNorm, grouped-query attention with ``head_dim`` apart from hidden/heads (128
at hidden 1024), SwiGLU, tied embeddings, RoPE theta 5e5, and ``use_bias`` for every projection. Its interleaved RoPE
becomes Llama's by reordering the q/k weights (``hf.py``), so the layers, the CPU fast paths, the cache geometry and
Llama's own decoding step are Llama's. The estimator's shape is in ``estimate.py``. The MoE models (ERNIE-4.5-21B-A3B) are other model_types, not read here.
"""

from __future__ import annotations

from paddle_llm.models import llama
from dataclasses import replace

from paddle_llm.models.ernie4_5 import estimate, hf
from paddle_llm.models.registry import ChatTemplate, Deferred

# ERNIE 4.5's format (its tokenizer_config.json): ``User: {content}\n`` per user turn, ``Assistant: {reply}`` ended by
# the EOS token, a system message first on its own line. The EOS is a token, not text: the trainer appends it.
CHAT_TEMPLATE = ChatTemplate(
    name="ernie4_5",
    system_format="{content}\n",
    system_inside_first_user=False,
    user_format="User: {content}\nAssistant: ",
    assistant_format="{content}",
    round_separator="",
    first_round=0,
    append_eos_token=True,
    stop_strings=("\nUser:",),
)


# Llama's family (its layers, tokenizer class, cache and decoding step), except for what ERNIE 4.5 changes.
FAMILY = replace(
    llama.FAMILY,
    name="ernie4_5",
    model_types=("ernie4_5",),
    config_class="Ernie4_5Config",
    model_class="Ernie4_5ForCausalLM",
    classes_module="paddle_llm.models.ernie4_5.modeling",
    pipe_model_class=None,
    chat_template=CHAT_TEMPLATE,
    paddlenlp_module="paddle_llm.models.ernie4_5.",
    cpu_fast_paths=Deferred("paddle_llm.models.ernie4_5.cpu_fast", "apply"),
    estimate_shape=estimate.shape,
    hf=hf,
)
