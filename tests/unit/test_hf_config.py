"""Reading a Hugging Face config.json in both transformers layouts: 4.x (``rope_theta``, ``rope_scaling``,
``torch_dtype``) and 5.x (``rope_parameters``, ``dtype``). Every RoPE or attention key that is not understood is
refused by name, and the checkpoint's dtype never becomes the model's."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
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
    (llama_hf, LLAMA, {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters of type 'longrope'"),
    (llama_hf, LLAMA, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "long_factor": [1.0]}}, "rope_scaling.long_factor"),
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
     "rope_parameters of type 'linear' (supported: default, yarn)"),
    (qwen2_hf, QWEN2, {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling of type 'dynamic'"),
    (qwen2_hf, QWEN2, {"attention_sink_size": 4}, "attention_sink_size"),
    (qwen2_hf, QWEN2, {"use_sliding_window": True}, "use_sliding_window: true"),
], ids=["longrope", "yarn_extra_key", "llama3_extra_key", "dynamic_original_positions", "partial_rotary", "theta_disagrees", "unknown_rope_key",
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
    with pytest.raises(ValueError, match=r"rope_parameters of type 'linear' \(supported: default, yarn\)"):
        ernie4_5_hf.config_from_hf({**LLAMA, "model_type": "ernie4_5", "rope_parameters": {"rope_type": "linear", "factor": 4.0}},
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


YARN = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 1.0, "attention_factor": 1.2}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_yarn_is_read_from_either_layout_and_written_back_as_it_was(family):
    from paddlenlp.transformers import LlamaConfig, Qwen2Config

    from paddle_llm.models.qwen3 import hf as qwen3_hf
    from paddle_llm.models.qwen3.modeling import Qwen3Config

    module, base, config_class = {"llama": (llama_hf, LLAMA, LlamaConfig), "qwen2": (qwen2_hf, QWEN2, Qwen2Config),
                                  "qwen3": (qwen3_hf, {**QWEN2, "model_type": "qwen3", "head_dim": 32}, Qwen3Config)}[family]
    v4_fields = {**base, "max_position_embeddings": 256, "rope_theta": 1e6, "rope_scaling": YARN}
    v5_fields = {**base, "max_position_embeddings": 256,
                 "rope_parameters": {**YARN, "rope_theta": 1e6, "original_max_position_embeddings": 64}}
    v4, v5 = module.config_from_hf(v4_fields, "v4/config.json"), module.config_from_hf(v5_fields, "v5/config.json")
    assert v4["rope_scaling"] == YARN and v5["rope_scaling"] == {**YARN, "original_max_position_embeddings": 64}
    written = [module.config_to_hf(config_class(**{k: v for k, v in c.items() if k != "architectures"})) for c in (v4, v5)]
    # transformers 4's layout while it computes the same frequencies; a correction range from fewer positions than
    # max_position_embeddings only in 5's, which 4.46's YaRN would ignore.
    assert (written[0]["rope_scaling"], written[0]["rope_theta"]) == (YARN, 1e6) and "rope_parameters" not in written[0]
    assert written[1]["rope_parameters"] == v5_fields["rope_parameters"] and "rope_scaling" not in written[1]


def test_ernie4_5_yarn_is_kept_and_written_back_in_rope_parameters():
    from paddle_llm.models.ernie4_5 import hf as ernie4_5_hf
    from paddle_llm.models.ernie4_5.modeling import Ernie4_5Config

    parameters = {**YARN, "rope_theta": 500000.0, "original_max_position_embeddings": 64}
    fields = ernie4_5_hf.config_from_hf({**LLAMA, "model_type": "ernie4_5", "max_position_embeddings": 256,
                                         "rope_parameters": parameters}, "config.json")
    assert fields["rope_scaling"] == {k: v for k, v in parameters.items() if k != "rope_theta"}
    written = ernie4_5_hf.config_to_hf(Ernie4_5Config(**{k: v for k, v in fields.items() if k != "architectures"}))
    assert written["rope_parameters"] == parameters and written["rope_theta"] == 500000.0


TORCH5_PYTHON = "/work/torchvenv5/bin/python"


@pytest.mark.slow  # starts torch in a subprocess
@pytest.mark.skipif(not os.path.isfile(TORCH5_PYTHON), reason=f"needs transformers 5 in {TORCH5_PYTHON} (scripts/make_hf_fixtures.py)")
def test_yarn_frequencies_equal_transformers5_for_every_option_when_its_venv_exists():
    """truncate, mscale / mscale_all_dim and a factor from the position ratio: the options no fixture holds."""
    from paddle_llm.models.llama.rope import yarn_frequencies

    cases = [{"factor": 4.0}, {"factor": 8.0, "truncate": False, "original_max_position_embeddings": 64},
             {"factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 16.0},
             {"factor": None, "original_max_position_embeddings": 128, "attention_factor": 0.9}]
    script = (
        "import json, sys; from transformers import LlamaConfig; from transformers.modeling_rope_utils import "
        "_compute_yarn_parameters as y\nout = []\nfor case in json.loads(sys.argv[1]):\n"
        "    c = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=512, "
        "rope_parameters={'rope_type': 'yarn', 'rope_theta': 10000.0, 'original_max_position_embeddings': 512, **case})\n"
        "    f, a = y(c)\n    out.append([f.tolist(), a])\nprint(json.dumps(out))")
    result = subprocess.run([TORCH5_PYTHON, "-c", script, json.dumps(cases)], capture_output=True, text=True, check=True, timeout=300)
    for case, (inv_freq, attention_factor) in zip(cases, json.loads(result.stdout.strip().splitlines()[-1])):
        ours, our_factor = yarn_frequencies({"original_max_position_embeddings": 512, **case}, 32, 10000.0, 512)
        np.testing.assert_allclose(ours, inv_freq, rtol=1e-6, err_msg=str(case))
        assert our_factor == pytest.approx(attention_factor, rel=1e-9), case
