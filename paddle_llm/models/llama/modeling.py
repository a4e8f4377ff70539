"""PaddleNLP's Llama with the layer options transformers' Llama has and PaddleNLP 3.0.0b4's lacks.

PaddleNLP's ``LlamaAttention`` fixes ``head_dim = hidden_size / num_attention_heads`` and builds q/k/v/o and the MLP
without biases. Checkpoints of 2025-2026 differ: Qwen3 and ERNIE 4.5 decouple ``head_dim`` from the hidden size
(ERNIE 4.5 0.3B: 16 heads of 128 at hidden 1024), and Llama-architecture checkpoints carry ``attention_bias`` (q, k,
v and o) or ``mlp_bias`` (gate, up, down). ``LlamaForCausalLM`` here is PaddleNLP's, with each decoder layer's
attention and MLP rebuilt with those widths and biases when the config asks for them, and nothing changed when it
does not. The sublayer names stay PaddleNLP's (``q_proj`` ... ``down_proj``), so LoRA targets, DPO, export and the
CPU fast paths find them; PaddleNLP's forward reads ``self.head_dim`` everywhere, so it computes the new shapes
unchanged. Only a single process is built: tensor, pipeline and sequence parallel layouts of these options are
refused by ``check`` (``models.llama.layer_option_errors``) before anything starts.

Qwen3 (``models/qwen3``) and ERNIE 4.5 (``models/ernie4_5``) subclass these classes.
"""

from __future__ import annotations

from paddle import nn
from paddlenlp.transformers import llama as paddlenlp_llama
from paddlenlp.transformers.llama import modeling as llama_modeling

from paddle_llm.models.llama import layer_options
from paddle_llm.models.registry import family_of

LlamaConfig = paddlenlp_llama.LlamaConfig


def layer_options_of(config) -> list[str]:
    """What ``config`` asks of the rebuilt layers (its family's ``layer_options``); empty: PaddleNLP's are kept."""
    return family_of({"model_type": config.model_type}).layer_options(vars(config))


def refuse_parallel_layouts(config) -> None:
    """Raise ValueError when ``config`` asks for layer options in a layout these layers are not built for."""
    errors = family_of({"model_type": config.model_type}).layer_option_errors(vars(config), vars(config))
    if errors:
        raise ValueError(errors[0])


class LlamaOptionsAttention(llama_modeling.LlamaAttention):
    """PaddleNLP's attention with ``config.head_dim`` wide heads and, with ``config.attention_bias``, biased
    q/k/v/o projections (as transformers' ``LlamaAttention``)."""

    def __init__(self, config, layerwise_recompute: bool = False, skip_recompute_ops=None):
        super().__init__(config, layerwise_recompute, skip_recompute_ops)
        self.head_dim = layer_options.head_dim(vars(config))
        bias = None if getattr(config, "attention_bias", False) else False  # Paddle's bias_attr: None is a zero-initialised bias
        query_width, key_value_width = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(self.hidden_size, query_width, bias_attr=bias)
        self.k_proj = nn.Linear(self.hidden_size, key_value_width, bias_attr=bias)
        self.v_proj = nn.Linear(self.hidden_size, key_value_width, bias_attr=bias)
        self.o_proj = nn.Linear(query_width, self.hidden_size, bias_attr=bias)
        if config.rope:
            # PaddleNLP's private _init_rope (checked on 3.0.0b4, cpu/ops.py VERIFIED_VERSIONS) builds the rotary
            # table its config asks for (plain, linear, dynamic NTK, llama3) at self.head_dim; called again so the
            # tables are the decoupled head's width. YaRN is put into these tables after the model is built
            # (ModelFamily.install_rope_scaling, llama/rope.py), which reads their width.
            # tests/unit/test_layer_options.py fails if it stops doing so.
            self._init_rope()


class LlamaOptionsMLP(llama_modeling.LlamaMLP):
    """PaddleNLP's SwiGLU MLP with biased gate/up/down projections (``config.mlp_bias``)."""

    def __init__(self, config, skip_recompute_ops=None):
        super().__init__(config, skip_recompute_ops)
        bias = None if getattr(config, "mlp_bias", False) else False
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias_attr=bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias_attr=bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias_attr=bias)


class LlamaForCausalLM(llama_modeling.LlamaForCausalLM):
    """PaddleNLP's ``LlamaForCausalLM``; its attention and MLP layers are rebuilt when the config sets a layer option
    (``layer_options_of``). PaddleNLP initialises the rebuilt layers as its own after this ``__init__`` (its
    ``_post_init`` hook runs ``init_weights`` on every layer not yet initialised)."""

    attention_class = LlamaOptionsAttention
    mlp_class = LlamaOptionsMLP

    def __init__(self, config):
        super().__init__(config)
        if not layer_options_of(config):
            return
        refuse_parallel_layouts(config)
        for layer in self.llama.layers:
            attention = layer.self_attn
            layer.self_attn = self.attention_class(config, attention.layerwise_recompute, attention.skip_recompute_ops)
            layer.mlp = self.mlp_class(config, layer.mlp.skip_recompute_ops)


class LlamaForCausalLMPipe(paddlenlp_llama.LlamaForCausalLMPipe):
    """PaddleNLP's pipeline stages, which build its own layers: a config with layer options is refused, not built
    into a model of other widths (``check`` refuses it before any process starts)."""

    def __init__(self, config):
        refuse_parallel_layouts(config)
        super().__init__(config)
