"""Half-precision Hugging Face checkpoints and transformers 5 configs through every command on CPU.

The fixtures (tests/assets/hf, scripts/make_hf_fixtures.py) store their weights in bfloat16 or float16, as real
Llama-3 and Qwen2 checkpoints do, and ``qwen2-tf5`` was written by transformers 5 (``rope_parameters`` with theta
1e6, ``dtype``). Weights load in float32, the dtype the CPU flags ask for, whatever the file stores: before, the
checkpoint's ``torch_dtype`` became the model's and LoRA crashed on "matmul ... bfloat16 not registered", and
``rope_parameters`` was ignored (theta 10000: wrong tokens).
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import paddle
import pytest

from paddle_llm.models import hf_checkpoint
from paddle_llm.models.registry import build_config, build_model, load_tokenizer, resolve_model
from tests.conftest import ROOT, run_script

HF_ASSETS = os.path.join(ROOT, "tests", "assets", "hf")
FINETUNE = os.path.join(ROOT, "finetune_generation.py")
RUN_PRETRAIN = os.path.join(ROOT, "run_pretrain.py")
RUN_DPO = os.path.join(ROOT, "run_dpo.py")
INSTRUCTIONS = os.path.join(ROOT, "paddle_llm", "assets", "instructions")
PREFERENCES = os.path.join(ROOT, "paddle_llm", "assets", "preferences")
DEMO_CORPUS = os.path.join(ROOT, "paddle_llm", "assets", "demo_corpus.jsonl")
# transformers 4.46.3 and 5.x venvs (scripts/make_hf_fixtures.py); CI has no torch, so those checks run where they exist.
TORCH4_PYTHON, TORCH5_PYTHON = "/work/torchvenv/bin/python", "/work/torchvenv5/bin/python"
HALF_FIXTURES = ["llama3-bf16", "llama3-fp16", "qwen2-bf16", "qwen2-fp16", "qwen2-tf5"]
# One bfloat16 and one float16 fixture, one of each family, through every training and serving command.
COMMAND_FIXTURES = ["llama3-bf16", "qwen2-fp16"]
SAFETENSORS_CODE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def fixture_dir(name: str) -> str:
    return os.path.join(HF_ASSETS, name)


def reference(name: str) -> dict:
    with open(os.path.join(fixture_dir(name), "reference.json"), encoding="utf-8") as f:
        return json.load(f)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def logits_of(directory: str, input_ids) -> np.ndarray:
    """Logits of a directory loaded as a training run builds it: the config as read, no dtype override."""
    source = resolve_model(directory)
    model = build_model(source, build_config(source), load_weights=True)
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(input_ids), return_dict=True).logits.numpy()


def stored_dtypes(directory: str) -> set[str]:
    weights = hf_checkpoint.find_hf_weights(directory)
    codes = set()
    for name in weights.files:
        header, _ = hf_checkpoint._safetensors_header(os.path.join(directory, name))
        codes |= {info["dtype"] for key, info in header.items() if key != "__metadata__"}
    return codes


def train_flags(output: str) -> list[str]:
    return ["--output_dir", output, "--max_steps", "2", "--learning_rate", "0.01", "--report_to", "none",
            "--disable_tqdm", "1", "--device", "cpu"]


def finetune(name: str, output: str, *extra: str) -> subprocess.CompletedProcess:
    return run_script([FINETUNE, "--model_name_or_path", fixture_dir(name), "--dataset_name_or_path", INSTRUCTIONS,
                       "--do_train", "--src_length", "32", "--tgt_length", "16", *train_flags(output), *extra])


@pytest.mark.parametrize("name", HALF_FIXTURES)
def test_half_precision_and_transformers5_fixtures_load_in_float32_to_transformers_logits(name):
    source = resolve_model(fixture_dir(name))
    assert build_config(source).dtype == "float32"
    config = read_json(os.path.join(fixture_dir(name), "config.json"))
    assert source.stored_dtype == (config.get("dtype") or config["torch_dtype"]) != "float32"
    expected = np.load(os.path.join(fixture_dir(name), "reference_logits.npy"))
    np.testing.assert_allclose(logits_of(fixture_dir(name), reference(name)["logits_input_ids"]), expected, atol=1e-4, rtol=0)


def test_transformers5_fixture_keeps_its_theta_and_chat_template():
    """The theta in rope_parameters reaches the model, and the chat template transformers 5 writes to
    chat_template.jinja frames conversations as transformers does."""
    from paddle_llm.data.sft import prompt_ids_as_trained

    source = resolve_model(fixture_dir("qwen2-tf5"))
    assert build_config(source).rope_theta == 1e6
    chat = reference("qwen2-tf5")["chat"]
    tokenizer = load_tokenizer(fixture_dir("qwen2-tf5"), source.family)
    assert prompt_ids_as_trained(source.family, tokenizer, chat["messages"][:-1], True) == chat["prompt_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMAND_FIXTURES)
def test_check_accepts_what_runs_from_half_precision_checkpoints(name):
    result = run_script(["-m", "paddle_llm", "check", "finetune_generation.py", "--model_name_or_path", fixture_dir(name),
                         "--dataset_name_or_path", INSTRUCTIONS, "--lora", "True", "--output_dir", "unused", "--device", "cpu"])
    assert result.stdout.startswith("OK (finetune)"), result.stdout


@pytest.mark.slow
def test_check_and_export_refuse_an_unknown_rope_key_by_name(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    for file in os.listdir(fixture_dir("qwen2-tf5")):
        os.symlink(os.path.join(fixture_dir("qwen2-tf5"), file), directory / file)
    config = read_json(os.path.join(fixture_dir("qwen2-tf5"), "config.json"))
    config["rope_parameters"]["mrope_section"] = [16, 24, 24]
    os.remove(directory / "config.json")
    (directory / "config.json").write_text(json.dumps(config))
    checked = run_script(["-m", "paddle_llm", "check", "finetune_generation.py", "--model_name_or_path", str(directory),
                          "--dataset_name_or_path", INSTRUCTIONS, "--lora", "True", "--output_dir", "unused", "--device", "cpu"],
                         check=False)
    assert checked.returncode == 2 and "rope_parameters.mrope_section" in checked.stderr and "Traceback" not in checked.stderr
    exported = run_script(["-m", "paddle_llm", "export", "--format", "hf", "--model_name_or_path", str(directory),
                           "--output_path", str(tmp_path / "out")], check=False)
    assert exported.returncode == 2 and "rope_parameters.mrope_section" in exported.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3-bf16", "qwen2-fp16", "qwen2-tf5"])
def test_export_hf_writes_the_source_dtype_by_default_and_dtype_when_asked(name, tmp_path):
    stored = resolve_model(fixture_dir(name)).stored_dtype
    default, asked = str(tmp_path / "default"), str(tmp_path / "float32")
    run_script(["-m", "paddle_llm", "export", "--format", "hf", "--model_name_or_path", fixture_dir(name), "--output_path", default])
    run_script(["-m", "paddle_llm", "export", "--format", "hf", "--model_name_or_path", fixture_dir(name), "--output_path", asked,
                "--dtype", "float32"])
    assert stored_dtypes(default) == {SAFETENSORS_CODE[stored]} and stored_dtypes(asked) == {"F32"}
    source_tensors = {n: a for _, n, a in hf_checkpoint.iter_tensors(hf_checkpoint.find_hf_weights(fixture_dir(name)))}
    for directory in (default, asked):
        exported = {n: a for _, n, a in hf_checkpoint.iter_tensors(hf_checkpoint.find_hf_weights(directory))}
        assert exported.keys() == source_tensors.keys()
        assert all(np.array_equal(exported[k].astype(np.float32), source_tensors[k].astype(np.float32)) for k in exported)
    config = read_json(os.path.join(default, "config.json"))
    # transformers 4's keys, which transformers 5 reads too.
    assert (config["torch_dtype"], config["rope_theta"]) == (stored, reference_theta(name)) and "rope_parameters" not in config
    assert read_json(os.path.join(asked, "config.json"))["torch_dtype"] == "float32"
    ids = reference(name)["logits_input_ids"]
    np.testing.assert_allclose(logits_of(default, ids), np.load(os.path.join(fixture_dir(name), "reference_logits.npy")),
                               atol=1e-4, rtol=0)
    # Both transformers versions read what export wrote (in the source's half precision) as paddle_llm does.
    for python in (TORCH4_PYTHON, TORCH5_PYTHON):
        if os.path.isfile(python):
            result = subprocess.run([python, os.path.join(ROOT, "scripts", "check_hf_dir_in_transformers.py"), default,
                                     json.dumps(ids)], capture_output=True, text=True, timeout=600, check=True)
            report = json.loads(result.stdout.strip().splitlines()[-1])
            assert not any(report["loading_info"].values()), (python, report["loading_info"])
            np.testing.assert_allclose(np.array(report["logits"]), logits_of(default, ids), atol=1e-4, rtol=0)


def reference_theta(name: str) -> float:
    return 500000.0 if name.startswith("llama3") else 1e6


@pytest.fixture(scope="module", params=COMMAND_FIXTURES)
def lora_adapter(request, tmp_path_factory):
    output = str(tmp_path_factory.mktemp(f"lora-{request.param}"))
    finetune(request.param, output, "--lora", "True", "--r", "4")
    return request.param, output


@pytest.mark.slow
def test_lora_from_half_precision_then_merge_export_and_serve(lora_adapter, tmp_path):
    name, adapter = lora_adapter
    merged = str(tmp_path / "merged")
    merge = run_script(["-m", "paddle_llm", "merge-lora", "--model_name_or_path", fixture_dir(name), "--lora_path", adapter,
                        "--output_path", merged, "--format", "hf"])
    assert "max |logit difference|" in merge.stdout
    stored = resolve_model(fixture_dir(name)).stored_dtype
    assert stored_dtypes(merged) == {SAFETENSORS_CODE[stored]}
    exported = run_script(["-m", "paddle_llm", "export", "--model_name_or_path", fixture_dir(name), "--lora_path", adapter,
                           "--output_path", str(tmp_path / "export")])
    assert "parity PASSED" in exported.stdout
    refused = run_script(["-m", "paddle_llm", "merge-lora", "--model_name_or_path", fixture_dir(name), "--lora_path", adapter,
                          "--output_path", str(tmp_path / "refused"), "--dtype", "bfloat16"], check=False)
    assert refused.returncode == 2 and "--dtype bfloat16 applies to --format hf only" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMAND_FIXTURES)
@pytest.mark.parametrize("method", [[], ["--prefix_tuning", "True", "--num_prefix_tokens", "4"],
                                    ["--lora", "True", "--weight_quantize_algo", "nf4"]], ids=["full", "prefix", "qlora"])
def test_finetune_from_half_precision(name, method, tmp_path):
    result = finetune(name, str(tmp_path / "out"), *method)
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMAND_FIXTURES)
def test_dpo_from_half_precision(name, tmp_path):
    args = {"model_name_or_path": fixture_dir(name), "train_dataset_path": os.path.join(PREFERENCES, "train.jsonl"),
            "output_dir": str(tmp_path / "dpo"), "per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
            "max_seq_len": 64, "max_prompt_len": 32, "save_strategy": "no", "do_train": True, "device": "cpu",
            "disable_tqdm": True, "report_to": "none", "lora": True, "lora_rank": 4}
    (tmp_path / "dpo.json").write_text(json.dumps(args))
    run_script([RUN_DPO, str(tmp_path / "dpo.json")])


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMAND_FIXTURES)
def test_continue_pretraining_from_half_precision_starts_from_its_weights(name, tmp_path):
    from paddle_llm.data.preprocess import preprocess

    data = str(tmp_path / "data" / "corpus")
    os.makedirs(os.path.dirname(data))
    preprocess(DEMO_CORPUS, data, fixture_dir(name), append_eos=True, show_progress=False)
    output = str(tmp_path / "pretrain")
    run_script([RUN_PRETRAIN, "--model_name_or_path", fixture_dir(name), "--input_dir", data, "--continue_training", "1",
                "--max_seq_length", "32", "--min_learning_rate", "0", "--warmup_steps", "0", "--per_device_train_batch_size", "2",
                "--do_train", "1", "--save_steps", "2", "--eval_steps", "2", "--eval_iters", "1", *train_flags(output),
                "--learning_rate", "0"])
    ids = reference(name)["logits_input_ids"]
    np.testing.assert_allclose(logits_of(output, ids), logits_of(fixture_dir(name), ids), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMAND_FIXTURES + ["qwen2-tf5", "llama-bias-headdim", "qwen3", "ernie4_5"])
def test_served_greedy_tokens_from_half_precision_equal_transformers(name):
    """``serve --engine dygraph`` on the directory itself gives transformers' greedy tokens (computed in float32
    from the stored weights); also for the float32 transformers 5 fixtures of layers PaddleNLP lacks
    (tests/integration/test_hf_layer_options.py)."""
    from paddle_llm.data.sft import prompt_ids_as_trained
    from paddle_llm.serving.model import open_checkpoint
    from paddle_llm.serving.sampling import SamplingParams

    expected = reference(name)["generate"]["prompts"]
    served = open_checkpoint(fixture_dir(name), max_batch_size=4)
    try:
        prompts = [prompt_ids_as_trained(served.family, served.tokenizer, [{"role": "user", "content": case["prompt"]}], False)
                   for case in expected]
        handles = [served.engine.submit(ids, SamplingParams(max_tokens=8, temperature=0)) for ids in prompts]
        completions = [handle.result() for handle in handles]
    finally:
        served.engine.shutdown()
    assert prompts == [case["prompt_ids"] for case in expected]
    assert [list(c.token_ids) for c in completions] == [case["new_ids"] for case in expected]
