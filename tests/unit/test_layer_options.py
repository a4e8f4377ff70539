"""The layer options PaddleNLP's Llama lacks (head_dim apart from hidden/heads, attention_bias, mlp_bias, Qwen3's
head norms) are built for one process: a parallel layout or fused projections with them is refused by name before
anything starts, and nothing is refused without them."""

from __future__ import annotations

import numpy as np

from paddle_llm.models.registry import resolve_model
from paddle_llm.recipes.spine import check_model_and_runtime


def test_parallel_layouts_with_layer_options_are_refused_by_name():
    qwen3 = resolve_model("tiny-qwen3")
    errors = qwen3.family.layer_option_errors(qwen3.config_fields, {"tensor_parallel_degree": 2, "pipeline_parallel_degree": -1})
    assert len(errors) == 1 and "q/k head norms (qwen3), head_dim 64" in errors[0] and "--tensor_parallel_degree" in errors[0]
    assert "--pipeline_parallel_degree" not in errors[0]  # -1 is off
    llama = resolve_model("tiny-llama")
    fields = dict(llama.config_fields, head_dim=48, attention_bias=True)
    [fused] = llama.family.layer_option_errors(fields, {"fuse_attention_qkv": True})
    assert "head_dim 48, attention_bias true" in fused and "--fuse_attention_qkv" in fused


def test_nothing_is_refused_without_layer_options_or_without_a_parallel_layout():
    llama = resolve_model("tiny-llama")
    assert llama.family.layer_option_errors(llama.config_fields, {"tensor_parallel_degree": 2, "fuse_attention_qkv": True}) == []
    ernie = resolve_model("tiny-ernie4_5")  # head_dim 32 at hidden 128 with 4 heads is hidden/heads: no option
    assert ernie.family.layer_option_errors(dict(ernie.config_fields, head_dim=32), {"tensor_parallel_degree": 2}) == []
    qwen3 = resolve_model("tiny-qwen3")
    assert qwen3.family.layer_option_errors(qwen3.config_fields, {"tensor_parallel_degree": 1, "sequence_parallel": False}) == []


def test_check_refuses_tensor_parallel_qwen3_before_any_process_starts():
    source = resolve_model("tiny-qwen3")
    values = {"tensor_parallel_degree": 2, "device": "cpu", "output_dir": "unused"}
    assert any("q/k head norms (qwen3)" in error and "--tensor_parallel_degree" in error
               for error in check_model_and_runtime(values, set(values), source))


def test_prefix_tuning_makes_a_past_of_the_decoupled_head_width():
    """PaddleNLP's prefix encoder sizes heads as hidden/heads; given heads * head_dim, Qwen3's past is head_dim wide
    (64 at hidden 128 with 4 heads: a past of hidden/heads = 32 fails to concatenate with the keys)."""
    import paddle

    from paddle_llm.models.registry import build_config, build_model
    from paddle_llm.peft.prefix import apply_prefix

    source = resolve_model("tiny-qwen3")
    model = build_model(source, build_config(source), load_weights=False)
    prefixed = apply_prefix(model, source.family, num_prefix_tokens=3)
    loss = prefixed(input_ids=paddle.to_tensor([[5, 6, 7, 8]]), labels=paddle.to_tensor([[6, 7, 8, 9]]), return_dict=True).loss
    loss.backward()
    assert np.isfinite(float(loss))


def test_moe_configs_are_not_taken_for_their_dense_family():
    """By model_type or, without one, by architecture: the estimate-only moe family, never qwen3 or ernie4_5."""
    from paddle_llm.models.registry import family_of

    for model_type, architecture in (("qwen3_moe", "Qwen3MoeForCausalLM"), ("ernie4_5_moe", "Ernie4_5_MoeForCausalLM"),
                                     ("qwen2_moe", "Qwen2MoeForCausalLM")):
        assert family_of({"model_type": model_type, "architectures": [architecture]}).name == "moe"
        assert family_of({"architectures": [architecture]}).name == "moe"
    assert family_of({"architectures": ["Qwen3ForCausalLM"]}).name == "qwen3"


def test_rebuilt_attention_has_rotary_tables_of_the_head_width():
    """``LlamaOptionsAttention`` calls PaddleNLP's private ``_init_rope`` again after setting ``head_dim``; a PaddleNLP
    whose method stops building the table from ``self.head_dim`` fails here."""
    from paddle_llm.models.registry import build_config, build_model

    source = resolve_model("tiny-llama")
    model = build_model(source, build_config(source, head_dim=48, rope_scaling_type="linear", rope_scaling_factor=2.0),
                        load_weights=False)
    rotary = model.llama.layers[0].self_attn.rotary_emb
    assert type(rotary).__name__ == "LlamaLinearScalingRotaryEmbedding" and rotary.cos_cached.shape[-1] == 48


def test_chat_templates_of_the_transformers5_fixtures_frame_conversations_as_transformers():
    """Qwen3's ChatML and ERNIE 4.5's ``User: ... Assistant: ...`` from the directories' chat_template.jinja give the
    ids of transformers' ``apply_chat_template`` (the fixture's reference)."""
    import json
    import os

    from paddle_llm.data.sft import prompt_ids_as_trained
    from paddle_llm.models.registry import load_tokenizer
    from tests.conftest import ROOT

    for name in ("qwen3", "ernie4_5"):
        directory = os.path.join(ROOT, "tests", "assets", "hf", name)
        with open(os.path.join(directory, "reference.json"), encoding="utf-8") as f:
            chat = json.load(f)["chat"]
        source = resolve_model(directory)
        tokenizer = load_tokenizer(directory, source.family)
        assert prompt_ids_as_trained(source.family, tokenizer, chat["messages"][:-1], True) == chat["prompt_ids"], name
