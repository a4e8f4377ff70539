"""Reading a Hugging Face config.json in both transformers layouts: 4.x (``rope_theta``, ``rope_scaling``,
``torch_dtype``) and 5.x (``rope_parameters``, ``dtype``). Every RoPE or attention key that is not understood is
refused by name, and the checkpoint's dtype never becomes the model's."""

from __future__ import annotations

import pytest

from paddle_llm.models.hf_checkpoint import default_write_dtype
from paddle_llm.models.llama import hf as llama_hf
from paddle_llm.models.qwen2 import hf as qwen2_hf

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 320}
QWEN2 = {**LLAMA, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28}
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_transformers4_and_5_layouts_give_the_same_llama3_config():
    v4 = llama_hf.config_from_hf({**LLAMA, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                                  "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}}, "v4/config.json")
    v5 = llama_hf.config_from_hf({**LLAMA, "dtype": "bfloat16",
                                  "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}},
                                 "v5/config.json")
    assert v4 == v5
    assert v5["rope_theta"] == 500000.0 and v5["rope_scaling"] == {"rope_type": "llama3", **LLAMA3_SCALING}
    assert "rope_parameters" not in v5


@pytest.mark.parametrize("fields", [
    {"rope_theta": 1e6, "torch_dtype": "bfloat16"},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "dtype": "float16",
     "layer_types": ["full_attention", "full_attention"]},
], ids=["transformers4", "transformers5"])
def test_qwen2_theta_is_read_from_either_layout_and_the_dtype_stays_out_of_the_model(fields):
    converted = qwen2_hf.config_from_hf({**QWEN2, **fields}, "config.json")
    assert converted["rope_theta"] == 1e6
    assert not {"dtype", "torch_dtype", "rope_parameters", "layer_types"} & converted.keys()


def test_linear_scaling_from_rope_parameters_becomes_paddlenlps_fields():
    converted = llama_hf.config_from_hf({**LLAMA, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
                                        "config.json")
    assert (converted["rope_scaling_type"], converted["rope_scaling_factor"], converted["rope_theta"]) == ("linear", 2.0, 1e4)


@pytest.mark.parametrize("module, base, extra, named", [
    (llama_hf, LLAMA, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters of type 'yarn'"),
    (llama_hf, LLAMA, {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, **LLAMA3_SCALING, "beta_fast": 32}},
     "rope_parameters.beta_fast"),
    (llama_hf, LLAMA, {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}},
     "rope_scaling.original_max_position_embeddings"),
    (llama_hf, LLAMA, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor"),
    (llama_hf, LLAMA, {"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
     "rope_parameters.rope_theta 1000000.0 and rope_theta 10000.0 disagree"),
    (llama_hf, LLAMA, {"rope_interleaved": True}, "rope_interleaved"),
    (llama_hf, LLAMA, {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    (llama_hf, LLAMA, {"sliding_window": 4096}, "sliding_window"),
    (llama_hf, LLAMA, {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types ['full_attention', 'sliding_attention']"),
    (llama_hf, LLAMA, {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "rope_parameters.full_attention"),
    (qwen2_hf, QWEN2, {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}},
     "rope_parameters of type 'linear' (supported: default)"),
    (qwen2_hf, QWEN2, {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling of type 'dynamic'"),
    (qwen2_hf, QWEN2, {"attention_sink_size": 4}, "attention_sink_size"),
    (qwen2_hf, QWEN2, {"use_sliding_window": True}, "use_sliding_window: true"),
], ids=["yarn", "llama3_extra_key", "dynamic_original_positions", "partial_rotary", "theta_disagrees", "unknown_rope_key",
        "unknown_attn_key", "llama_window", "sliding_layer_types", "per_layer_type_rope", "qwen2_linear", "qwen2_v4_dynamic",
        "qwen2_unknown_attention_key", "qwen2_window"])
def test_a_rope_or_attention_key_not_understood_is_refused_by_name(module, base, extra, named):
    with pytest.raises(ValueError) as refused:
        module.config_from_hf({**base, **extra}, "/models/x/config.json")
    assert str(refused.value).startswith("/models/x/config.json: ") and named in str(refused.value)


@pytest.mark.parametrize("stored, written", [("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "float32"),
                                             (None, "float32"), ("float64", "float32")])
def test_hf_output_defaults_to_the_stored_dtype(stored, written):
    assert default_write_dtype(stored) == written


def test_qwen3_and_ernie4_5_configs_take_transformers_defaults_and_refuse_what_is_not_built():
    from paddle_llm.models.ernie4_5 import hf as ernie4_5_hf
    from paddle_llm.models.qwen3 import hf as qwen3_hf

    qwen3 = qwen3_hf.config_from_hf({**QWEN2, "model_type": "qwen3", "rope_theta": 1e6}, "config.json")
    assert (qwen3["head_dim"], qwen3["rope_theta"]) == (128, 1e6) and "use_sliding_window" not in qwen3
    with pytest.raises(ValueError, match=r"config\.json: this Qwen3 checkpoint cannot be built: use_sliding_window: true"):
        qwen3_hf.config_from_hf({**QWEN2, "model_type": "qwen3", "use_sliding_window": True}, "config.json")
    ernie = ernie4_5_hf.config_from_hf({**LLAMA, "model_type": "ernie4_5", "use_bias": True}, "config.json")
    assert (ernie["head_dim"], ernie["rope_theta"], ernie["tie_word_embeddings"]) == (128, 500000.0, True)
    assert ernie["attention_bias"] and ernie["mlp_bias"] and "use_bias" not in ernie
    with pytest.raises(ValueError, match=r"rope_parameters of type 'yarn'"):
        ernie4_5_hf.config_from_hf({**LLAMA, "model_type": "ernie4_5", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
                                   "config.json")


def test_ernie4_5_interleaved_rotary_rows_become_halves_and_come_back():
    """Each head's q/k rows (2i, 2i+1) go to (i, i + head_dim/2) on loading, and back on export; other tensors only
    transpose as Llama's."""
    import numpy as np

    from paddle_llm.models.ernie4_5 import hf as ernie4_5_hf

    fields = {"head_dim": 4}
    hf_weight = np.arange(8 * 3).reshape(8, 3)  # two heads of 4 rows, [out, in]
    loaded = ernie4_5_hf.to_paddle_layout("llama.layers.0.self_attn.k_proj.weight", hf_weight, fields)
    assert loaded.T[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]  # rows 0, 2, 1, 3 of each head
    assert np.array_equal(ernie4_5_hf.to_hf_layout("llama.layers.0.self_attn.k_proj.weight", loaded, fields), hf_weight)
    assert np.array_equal(ernie4_5_hf.to_paddle_layout("llama.layers.0.self_attn.v_proj.weight", hf_weight, fields), hf_weight.T)
