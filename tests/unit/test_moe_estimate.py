"""Mixture-of-experts configs (tests/assets/hf/*-config: config.json only, written by hand with the real models' field names):
``paddle-llm estimate`` counts them from the expert layout and says in one line that training them is not supported
yet; every other command refuses them with that line before anything starts."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from paddle_llm.estimator.command import main as estimate_main
from paddle_llm.models.moe.estimate import active_parameters, shape
from paddle_llm.tools import check
from tests.conftest import ROOT

HF_ASSETS = os.path.join(ROOT, "tests", "assets", "hf")
TINY = ["ernie4_5_moe", "qwen3_moe", "qwen2_moe"]
TORCH5_PYTHON = "/work/torchvenv5/bin/python"
NOT_SUPPORTED = "paddle-llm estimates its memory, but training it is not supported yet"


def config_dir(name: str) -> str:
    return os.path.join(HF_ASSETS, f"{name}-config")


def config(name: str) -> dict:
    with open(os.path.join(config_dir(name), "config.json"), encoding="utf-8") as f:
        return json.load(f)


def test_estimate_reads_ernie_4_5_21b_a3b_and_says_training_is_not_supported(capsys):
    assert estimate_main(["--model_name_or_path", config_dir("ernie-4.5-21b-a3b")]) == 0
    out = capsys.readouterr().out
    # The model's name: 21B parameters, 3B active (64 experts, 6 routed and 2 shared per token, the first layer dense).
    assert ("note: ernie4_5_moe is a mixture of experts (64 experts, 6 per token, shared experts 3072 wide; "
            f"3,352,150,208 of 21,825,437,888 parameters active per token): {NOT_SUPPORTED}") in out
    assert "model:  moe, 21.83B parameters, 28 layers" in out


@pytest.mark.parametrize("script", ["run_pretrain.py", "finetune_generation.py", "run_dpo.py"])
def test_every_training_command_refuses_a_moe_config_with_that_line(script, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "1")
    argv = [script, "--model_name_or_path", config_dir("qwen3_moe"), "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    assert check.main(argv) == check.EXIT_BAD_CONFIG
    err = capsys.readouterr().err
    assert "config.json: qwen3_moe is a mixture of experts (16 experts, 4 per token;" in err and NOT_SUPPORTED in err


def test_export_refuses_a_moe_config_with_that_line(capsys, tmp_path):
    from paddle_llm.export.command import main as export_main

    assert export_main(["--model_name_or_path", config_dir("ernie4_5_moe"), "--output_path", str(tmp_path / "x")]) != 0
    assert NOT_SUPPORTED in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # starts torch in a subprocess
@pytest.mark.skipif(not os.path.isfile(TORCH5_PYTHON), reason=f"needs transformers 5 in {TORCH5_PYTHON} (scripts/make_hf_fixtures.py)")
def test_parameter_counts_equal_transformers5_models_when_its_venv_exists():
    script = (
        "import json, sys, torch; from transformers import AutoConfig, AutoModelForCausalLM\n"
        "out = {}\nfor path in sys.argv[1:]:\n"
        "    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))\n"
        "    out[path] = sum(p.numel() for p in model.parameters())\nprint(json.dumps(out))")
    paths = [config_dir(name) for name in TINY]
    result = subprocess.run([TORCH5_PYTHON, "-c", script, *paths], capture_output=True, text=True, check=True, timeout=300)
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert {name: shape(config(name))["declared_num_params"] for name in TINY} == {name: counts[path] for name, path in zip(TINY, paths)}


def test_active_parameters_leave_out_the_experts_not_picked():
    fields = config("qwen2_moe")  # layers 1 of 3 sparse (decoder_sparse_step 2): 6 experts, 2 picked, 64 x 32 SwiGLU
    assert shape(fields)["declared_num_params"] - active_parameters(fields) == 4 * 3 * 64 * 32
