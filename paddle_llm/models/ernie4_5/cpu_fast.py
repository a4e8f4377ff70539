"""CPU fast paths of ERNIE 4.5: Llama's (``models/llama/cpu_fast.py``) on ERNIE 4.5's model class (its layers are
Llama's; ``hf.py`` turns its rotary layout into Llama's)."""

from __future__ import annotations

from paddle import nn

from paddle_llm.models.llama.cpu_fast import apply_to_llama_subclass


def apply(model: nn.Layer) -> list[str]:
    """Swap the fast paths into an ERNIE 4.5's layers; returns what was replaced (``ernie4_5.<component> xN``)."""
    from paddlenlp.transformers.llama.modeling import LlamaAttention

    from paddle_llm.models.ernie4_5 import modeling

    # PaddleNLP's attention where the config sets no layer option, our subclass of it where it does: both are Llama's.
    return apply_to_llama_subclass(model, "ernie4_5", LlamaAttention, modeling.Ernie4_5ForCausalLM)
