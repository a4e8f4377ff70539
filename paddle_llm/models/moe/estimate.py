"""Mixture-of-experts configs for the estimator: ERNIE 4.5 MoE (``ernie4_5_moe``, ERNIE-4.5-21B-A3B), Qwen3-MoE
(``qwen3_moe``) and Qwen2-MoE (``qwen2_moe``), read with transformers 5.25's field names and defaults.

Every layer has Llama's attention (q/k/v/o, grouped heads, ``head_dim`` from the config); its MLP is either dense
SwiGLU (``intermediate_size``) or a router (``h x experts``) over ``experts`` SwiGLU experts of
``moe_intermediate_size``, plus shared experts that every token runs. Which layers are sparse: ERNIE's
``moe_layer_start_index`` .. ``moe_layer_end_index`` every ``moe_layer_interval``; Qwen's every
``decoder_sparse_step``-th layer not in ``mlp_only_layers``. The parameter count is exact over that mix (ERNIE's
multi-token-prediction layers, ``num_nextn_predict_layers``, are not counted); the per-layer modules describe a sparse
layer, and the activations are Llama's with the MLP as wide as what one token runs (``top_k`` experts plus the
shared ones). Nothing here is measured: none of these models trains here.
"""

from __future__ import annotations

from dataclasses import dataclass

from paddle_llm.models.memory_spec import linear, read_field


@dataclass(frozen=True)
class MoeLayout:
    """The expert layout of one config."""

    experts: int
    active_experts: int  # per token
    expert_width: int  # moe_intermediate_size
    shared_width: int  # the shared experts' MLP width (0: none)
    shared_gate: bool  # Qwen2-MoE's sigmoid gate on the shared expert (an h x 1 linear)
    router_bias: bool  # ERNIE's e_score_correction_bias (one per expert)
    sparse_layers: tuple[int, ...]


def layout(fields: dict) -> MoeLayout:
    """The experts and sparse layers of an ``ernie4_5_moe``, ``qwen3_moe`` or ``qwen2_moe`` config."""
    layers = int(read_field(fields, ("num_hidden_layers",), 28 if fields.get("model_type") == "ernie4_5_moe" else 24))
    if fields.get("model_type") == "ernie4_5_moe":
        expert_width = int(read_field(fields, ("moe_intermediate_size",), 1536))
        end = int(read_field(fields, ("moe_layer_end_index",), -1))
        end = layers - 1 if end == -1 else end
        start, interval = int(read_field(fields, ("moe_layer_start_index",), 1)), int(read_field(fields, ("moe_layer_interval",), 1))
        return MoeLayout(
            experts=int(read_field(fields, ("moe_num_experts", "num_experts"), 64)),
            active_experts=int(read_field(fields, ("moe_k", "num_experts_per_tok"), 6)),
            expert_width=expert_width,
            shared_width=expert_width * int(read_field(fields, ("moe_num_shared_experts",), 2)),
            shared_gate=False,
            router_bias=True,
            sparse_layers=tuple(i for i in range(layers) if (i + 1) % interval == 0 and start <= i <= end),
        )
    qwen2 = fields.get("model_type") == "qwen2_moe"
    step, dense_only = int(read_field(fields, ("decoder_sparse_step",), 1)), set(fields.get("mlp_only_layers") or ())
    return MoeLayout(
        experts=int(read_field(fields, ("num_experts",), 60 if qwen2 else 128)),
        active_experts=int(read_field(fields, ("num_experts_per_tok",), 4 if qwen2 else 8)),
        expert_width=int(read_field(fields, ("moe_intermediate_size",), 1408 if qwen2 else 768)),
        shared_width=int(read_field(fields, ("shared_expert_intermediate_size",), 5632)) if qwen2 else 0,
        shared_gate=qwen2,
        router_bias=False,
        sparse_layers=tuple(i for i in range(layers) if i not in dense_only and step > 0 and (i + 1) % step == 0),
    )


def _swiglu(prefix: str, h: int, width: int, bias: bool) -> tuple:
    return (linear(f"{prefix}.gate_proj", h, width, bias, "column"), linear(f"{prefix}.up_proj", h, width, bias, "column"),
            linear(f"{prefix}.down_proj", width, h, bias, "row"))


def shape(fields: dict) -> dict:
    """The estimator's ``ModelShape`` fields, with the exact parameter count of the dense and sparse layers."""
    ernie = fields.get("model_type") == "ernie4_5_moe"
    moe = layout(fields)
    h = int(read_field(fields, ("hidden_size",), 2560 if ernie else 2048))
    a = int(read_field(fields, ("num_attention_heads",), 20 if ernie else 32))
    kv = int(read_field(fields, ("num_key_value_heads",), 4))
    d = int(read_field(fields, ("head_dim",), h // a))
    dense_width = int(read_field(fields, ("intermediate_size",), 12288 if ernie else 6144))
    vocab = int(read_field(fields, ("vocab_size",), 103424 if ernie else 151936))
    layers = int(read_field(fields, ("num_hidden_layers",), 28 if ernie else 24))
    tied = bool(read_field(fields, ("tie_word_embeddings",), ernie))
    bias = bool(fields.get("use_bias")) if ernie else False
    qkv_bias = bias or bool(read_field(fields, ("qkv_bias", "attention_bias"), fields.get("model_type") == "qwen2_moe"))
    attention = (linear("self_attn.q_proj", h, a * d, qkv_bias, "column"), linear("self_attn.k_proj", h, kv * d, qkv_bias, "column"),
                 linear("self_attn.v_proj", h, kv * d, qkv_bias, "column"), linear("self_attn.o_proj", a * d, h, bias, "row"))
    # All experts of a sparse layer as one module per projection (the width of every expert side by side).
    sparse_mlp = (linear("mlp.gate", h, moe.experts, False, "column"), *_swiglu("mlp.experts", h, moe.experts * moe.expert_width, bias))
    if moe.shared_width:
        sparse_mlp += _swiglu("mlp.shared_experts", h, moe.shared_width, bias)
    if moe.shared_gate:
        sparse_mlp += (linear("mlp.shared_expert_gate", h, 1, False, "column"),)
    q_k_norms = 2 * d if fields.get("model_type") == "qwen3_moe" else 0
    norms = 2 * h + q_k_norms
    attention_params = sum(i * o + (o if b else 0) for _, i, o, b, _ in attention)
    sparse_params = sum(i * o + (o if b else 0) for _, i, o, b, _ in sparse_mlp) + (moe.experts if moe.router_bias else 0)
    dense_params = sum(i * o + (o if b else 0) for _, i, o, b, _ in _swiglu("mlp", h, dense_width, bias))
    sparse_count = len(moe.sparse_layers)
    total = (vocab * h * (1 if tied else 2) + (vocab if bias and not tied else 0) + h
             + layers * (attention_params + norms) + sparse_count * sparse_params + (layers - sparse_count) * dense_params)
    return dict(
        num_layers=layers,
        hidden_size=h,
        num_attention_heads=a,
        num_key_value_heads=kv,
        head_dim=d,
        intermediate_size=moe.active_experts * moe.expert_width + moe.shared_width,  # what one token's MLP runs
        vocab_size=vocab,
        max_position_embeddings=int(read_field(fields, ("max_position_embeddings",), 131072 if ernie else 32768)),
        tie_word_embeddings=tied,
        linear_modules=attention + sparse_mlp,
        norm_params_per_layer=norms,
        final_norm_params=h,
        supports_sequence_parallel=False,
        layer_module_prefix="model.layers.{i}",
        declared_num_params=total,
    )


def active_parameters(fields: dict) -> int:
    """Parameters one token runs through: the model without the experts its router did not pick."""
    moe = layout(fields)
    h = int(read_field(fields, ("hidden_size",), 2560 if fields.get("model_type") == "ernie4_5_moe" else 2048))
    idle = moe.experts - moe.active_experts
    return shape(fields)["declared_num_params"] - len(moe.sparse_layers) * idle * 3 * h * moe.expert_width


def not_trained_line(fields: dict) -> str:
    """What ``estimate`` says of a MoE config, and what every other command refuses it with."""
    moe = layout(fields)
    total = shape(fields)["declared_num_params"]
    return (f"{fields.get('model_type')} is a mixture of experts ({moe.experts} experts, {moe.active_experts} per token"
            f"{f', shared experts {moe.shared_width} wide' if moe.shared_width else ''}; "
            f"{active_parameters(fields):,} of {total:,} parameters active per token): "
            "paddle-llm estimates its memory, but training it is not supported yet")
