"""Checkpoints with layers PaddleNLP 3.0.0b4 does not build, as transformers 5 wrote them (tests/assets/hf,
scripts/make_hf_fixtures.py, random norms and non-zero biases): a Llama with attention_bias, mlp_bias and head_dim 24
at hidden 64, a Qwen3 (q/k head norms, head_dim 32 at hidden 64) and an ERNIE 4.5 (interleaved RoPE, use_bias).
Their logits and training steps are compared in tests/unit/test_hf_checkpoint.py, their served greedy tokens in
tests/integration/test_hf_dtypes.py; here they go through export and transformers, and LoRA through Qwen3's own
attention layer and ERNIE 4.5's biased projections."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from paddle_llm.models.registry import resolve_model
from tests.conftest import ROOT
from tests.integration.test_hf_models import fixture_dir, hf_tensors, load, logits_of, reference, snapshot

# Every test exports or loads several models; the transformers check runs in its own venv's process.
pytestmark = pytest.mark.slow

FIXTURES = ["llama-bias-headdim", "qwen3", "ernie4_5"]
TORCH5_PYTHON = "/work/torchvenv5/bin/python"  # transformers 5 (has qwen3 and ernie4_5); CI has no torch
# The config fields each fixture's export must carry over unchanged: what makes its layers what they are.
LAYER_FIELDS = {
    "llama-bias-headdim": ("head_dim", "attention_bias", "mlp_bias", "tie_word_embeddings"),
    "qwen3": ("head_dim", "attention_bias", "tie_word_embeddings", "rms_norm_eps"),
    "ernie4_5": ("head_dim", "use_bias", "tie_word_embeddings", "rms_norm_eps"),
}


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module", params=FIXTURES)
def exported(request, tmp_path_factory):
    """``export --format hf`` of a fixture (the command's main, in this process: the other families' tests run it as
    a process), and the fixture's snapshot before it."""
    from paddle_llm.export.command import main as export_main

    name = request.param
    before = snapshot(fixture_dir(name))
    out = str(tmp_path_factory.mktemp(f"hf-{name}") / "hf")
    assert export_main(["--format", "hf", "--model_name_or_path", fixture_dir(name), "--output_path", out]) == 0
    return name, out, before


def test_export_hf_reloads_bit_identical_with_the_layer_options(exported):
    name, out, before = exported
    original, written = hf_tensors(fixture_dir(name)), hf_tensors(out)
    assert written.keys() == original.keys()
    for key, array in original.items():  # ERNIE's q/k rows are reordered on loading and restored here
        assert written[key].dtype == array.dtype and np.array_equal(written[key], array), key
    config, source_config = read_json(os.path.join(out, "config.json")), read_json(os.path.join(fixture_dir(name), "config.json"))
    assert config["model_type"] == source_config["model_type"]
    for field in LAYER_FIELDS[name]:
        assert config[field] == source_config[field], field
    assert config["rope_theta"] == source_config["rope_parameters"]["rope_theta"]
    expected = np.load(os.path.join(fixture_dir(name), "reference_logits.npy"))
    np.testing.assert_allclose(logits_of(load(out), reference(name)["logits_input_ids"]), expected, atol=1e-4, rtol=0)
    assert snapshot(fixture_dir(name)) == before


@pytest.mark.skipif(not os.path.isfile(TORCH5_PYTHON), reason=f"needs transformers 5 in {TORCH5_PYTHON} (see scripts/make_hf_fixtures.py); CI has no torch")
def test_transformers_loads_the_export_with_no_missing_or_unexpected_keys_when_torch_venv_exists(exported):
    name, out, _ = exported
    ids = reference(name)["logits_input_ids"]
    result = subprocess.run([TORCH5_PYTHON, os.path.join(ROOT, "scripts", "check_hf_dir_in_transformers.py"), out, json.dumps(ids)],
                            capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert "not used" not in report["log"] and "newly initialized" not in report["log"], report["log"]
    np.testing.assert_allclose(np.array(report["logits"]), np.load(os.path.join(fixture_dir(name), "reference_logits.npy")),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["qwen3", "ernie4_5"])
def test_lora_adapts_every_projection_and_merges_into_the_hf_export(name, tmp_path):
    """LoRA on Qwen3's own attention layer and ERNIE 4.5's biased projections: every default target is adapted, and
    the merged model written as a Hugging Face directory computes the adapted model (biases kept, none added)."""
    import paddle

    from paddle_llm.models.hf_checkpoint import save_hf_directory
    from paddle_llm.peft.lora import apply_lora, merge_lora

    model = load(fixture_dir(name))
    family = resolve_model(fixture_dir(name)).family
    adapted = apply_lora(model, family, rank=4)
    with paddle.no_grad():  # B starts at zero, which would make the adapter a no-op
        for parameter_name, parameter in adapted.named_parameters():
            if "lora_B" in parameter_name:
                parameter.set_value(paddle.normal(std=0.05, shape=parameter.shape))
    targets = {parameter_name.rsplit(".", 2)[-2] for parameter_name, _ in adapted.named_parameters() if "lora_A" in parameter_name}
    assert targets == set(family.lora_target_modules)
    ids = reference(name)["logits_input_ids"]
    expected = logits_of(adapted, ids)
    assert not np.allclose(expected, np.load(os.path.join(fixture_dir(name), "reference_logits.npy")), atol=1e-3)
    out = str(tmp_path / "hf")
    os.makedirs(out)
    save_hf_directory(merge_lora(adapted), family.hf, None, out, generation={})
    np.testing.assert_allclose(logits_of(load(out), ids), expected, atol=1e-5, rtol=0)
    assert sorted(k for k in hf_tensors(out) if k.endswith(".bias")) == sorted(k for k in hf_tensors(fixture_dir(name)) if k.endswith(".bias"))
