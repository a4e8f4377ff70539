"""ERNIE 4.5 (dense) in Paddle: PaddleNLP's Llama with the layer options of ``models/llama/modeling.py`` (``head_dim``
apart from hidden/heads; ``use_bias`` read as ``attention_bias`` and ``mlp_bias``). Its interleaved rotary layout
is a fixed reordering of each q and k head, done on the weights by ``hf.py``, so the layers are Llama's.
PaddleNLP 3.0.0b4 has no ERNIE 4.5.
"""

from __future__ import annotations

from paddlenlp.transformers.llama import modeling as llama_modeling

from paddle_llm.models.llama.modeling import LlamaForCausalLM


class Ernie4_5Config(llama_modeling.LlamaConfig):
    """``LlamaConfig`` under ERNIE 4.5's model_type."""

    model_type = "ernie4_5"


class Ernie4_5ForCausalLM(LlamaForCausalLM):
    """ERNIE 4.5's causal LM: Llama's with its layer options (parameters keep PaddleNLP's ``llama.`` prefix)."""

    config_class = Ernie4_5Config
