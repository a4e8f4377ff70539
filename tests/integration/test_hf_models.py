"""Hugging Face directories through every command: the fixtures transformers wrote (tests/assets/hf) are trained,
merged, exported and served, answer as transformers does, and are never written to."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import subprocess

import numpy as np
import pytest

from paddle_llm.models import hf_checkpoint
from paddle_llm.models.registry import build_config, build_model, resolve_model
from paddle_llm.peft.lora import load_lora
from tests.conftest import ROOT, run_script
from tests.integration.server_process import ServerProcess

# Every test fine-tunes, exports or serves the Hugging Face fixtures in fresh processes.
pytestmark = pytest.mark.slow

HF_ASSETS = os.path.join(ROOT, "tests", "assets", "hf")
FINETUNE = os.path.join(ROOT, "finetune_generation.py")
RUN_PRETRAIN = os.path.join(ROOT, "run_pretrain.py")
INSTRUCTIONS = os.path.join(ROOT, "paddle_llm", "assets", "instructions")
TORCH_PYTHON = "/work/torchvenv/bin/python"  # the venv scripts/make_hf_fixtures.py names; CI has no torch
TORCH5_PYTHON = "/work/torchvenv5/bin/python"  # its transformers 5 venv
# Config features whose fixtures were added after the first ones: Mistral's sliding window (sequences within it) and
# YaRN in transformers 4's rope_scaling and 5's rope_parameters; YaRN on Qwen3's and ERNIE 4.5's decoupled heads and
# Mistral-Nemo's head_dim (Llama's own attention).
FEATURE_FIXTURES = ["mistral", "llama3-yarn", "qwen2-yarn", "qwen3-yarn", "ernie4_5-yarn", "mistral-headdim"]


def fixture_dir(name: str) -> str:
    return os.path.join(HF_ASSETS, name)


def reference(name: str) -> dict:
    with open(os.path.join(fixture_dir(name), "reference.json"), encoding="utf-8") as f:
        return json.load(f)


def rope_theta_of(config: dict) -> float:
    """The RoPE theta of a transformers config.json, in 4's layout (rope_theta) or 5's (inside rope_parameters)."""
    return (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))


def snapshot(directory: str) -> dict[str, str]:
    """Every file under ``directory`` with its SHA-256: equal snapshots mean byte-for-byte unchanged."""
    digests = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def load(directory: str):
    source = resolve_model(directory)
    model = build_model(source, build_config(source, dtype="float32"), load_weights=True)
    model.eval()
    return model


def logits_of(model, input_ids) -> np.ndarray:
    import paddle

    with paddle.no_grad():
        return model(paddle.to_tensor(input_ids), return_dict=True).logits.numpy()


def hf_tensors(directory: str) -> dict[str, np.ndarray]:
    weights = hf_checkpoint.find_hf_weights(directory)
    return {name: np.array(array) for _, name, array in hf_checkpoint.iter_tensors(weights)}


def finetune_lora(model_dir: str, output_dir: str, *extra: str) -> subprocess.CompletedProcess:
    return run_script([FINETUNE, "--model_name_or_path", model_dir, "--dataset_name_or_path", INSTRUCTIONS,
                       "--output_dir", output_dir, "--do_train", "--lora", "True", "--r", "4", "--max_steps", "3",
                       "--learning_rate", "0.01", "--report_to", "none", "--disable_tqdm", "1", "--device", "cpu",
                       "--src_length", "32", "--tgt_length", "16", *extra])


@pytest.fixture(scope="module", params=["llama2", "llama3", "qwen2"])
def lora_run(request, tmp_path_factory):
    """A LoRA fine-tune (with --merge_weights) of a fixture directory, and the directory's snapshot before it."""
    name = request.param
    before = snapshot(fixture_dir(name))
    output = str(tmp_path_factory.mktemp(f"lora-{name}"))
    finetune_lora(fixture_dir(name), output, "--merge_weights")
    return name, output, before


def test_every_command_reads_an_hf_dir_and_leaves_it_byte_for_byte(lora_run, demo_data, tmp_path):
    name, adapter, before = lora_run
    model_dir = fixture_dir(name)
    merged = os.path.join(adapter, "merged")
    assert os.path.isfile(os.path.join(merged, "config.json"))
    run_script(["-m", "paddle_llm", "merge-lora", "--model_name_or_path", model_dir, "--lora_path", adapter,
                "--output_path", str(tmp_path / "merged")])
    exported = run_script(["-m", "paddle_llm", "export", "--model_name_or_path", model_dir, "--lora_path", adapter,
                           "--output_path", str(tmp_path / "export")])
    assert "parity PASSED" in exported.stdout
    run_script(["-m", "paddle_llm", "export", "--format", "hf", "--model_name_or_path", model_dir,
                "--output_path", str(tmp_path / "hf")])
    estimate = run_script(["-m", "paddle_llm", "estimate", "--model_name_or_path", model_dir])
    assert "fits:" in estimate.stdout
    if name == "llama2":  # the shipped tokenizer's vocabulary: the preprocessed demo corpus fits it
        # At learning rate 0 the saved model is the loaded one: --continue_training really started from the HF weights.
        pretrained = str(tmp_path / "pretrain")
        run_script([RUN_PRETRAIN, "--model_name_or_path", model_dir, "--input_dir", demo_data, "--output_dir", pretrained,
                    "--continue_training", "1", "--max_steps", "2", "--max_seq_length", "32", "--learning_rate", "0", "--min_learning_rate", "0",
                    "--warmup_steps", "0", "--per_device_train_batch_size", "2", "--device", "cpu", "--report_to", "none",
                    "--disable_tqdm", "1", "--do_train", "1", "--save_steps", "2", "--eval_steps", "2", "--eval_iters", "1"])
        probe = reference(name)["logits_input_ids"]
        np.testing.assert_allclose(logits_of(load(pretrained), probe), logits_of(load(model_dir), probe), atol=1e-6)
    assert snapshot(model_dir) == before


@pytest.mark.parametrize("name", ["llama2", "llama3", "llama3-sharded", "llama3-bin", "qwen2"])
def test_export_hf_then_reload_is_bit_identical(name, tmp_path):
    out = str(tmp_path / "hf")
    run_script(["-m", "paddle_llm", "export", "--format", "hf", "--model_name_or_path", fixture_dir(name),
                "--output_path", out, "--max_shard_size", "50KB"])
    assert os.path.isfile(os.path.join(out, hf_checkpoint.SAFETENSORS_INDEX))  # sharded at the tiny threshold
    original, exported = hf_tensors(fixture_dir(name)), hf_tensors(out)
    if resolve_model(fixture_dir(name)).config_fields["tie_word_embeddings"]:
        original.pop("lm_head.weight", None)  # torch.save's second name for the tied embedding (the .bin fixture)
    assert exported.keys() == original.keys()
    for key, array in original.items():
        assert exported[key].dtype == array.dtype and np.array_equal(exported[key], array), key
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(fixture_dir(name), "config.json")) as f:
        source_config = json.load(f)
    for field in ("hidden_size", "num_key_value_heads", "rope_theta", "rope_scaling", "tie_word_embeddings", "vocab_size"):
        assert config[field] == source_config[field], field
    expected = np.load(os.path.join(fixture_dir(name), "reference_logits.npy"))
    np.testing.assert_allclose(logits_of(load(out), reference(name)["logits_input_ids"]), expected, atol=1e-4, rtol=0)


def test_lora_merged_hf_export_equals_base_plus_adapter(lora_run, tmp_path):
    import paddle

    name, adapter, _ = lora_run
    out = str(tmp_path / "hf")
    run_script(["-m", "paddle_llm", "export", "--format", "hf", "--model_name_or_path", fixture_dir(name),
                "--lora_path", adapter, "--output_path", out])
    ids = reference(name)["logits_input_ids"]
    adapted = load_lora(load(fixture_dir(name)), adapter, fixture_dir(name))
    adapted.eval()
    with paddle.no_grad():
        expected = adapted(input_ids=paddle.to_tensor(ids), return_dict=True).logits.numpy()
    np.testing.assert_allclose(logits_of(load(out), ids), expected, atol=1e-5, rtol=0)
    biases = sorted(key for key in hf_tensors(out) if key.endswith(".bias"))
    assert biases == sorted(key for key in hf_tensors(fixture_dir(name)) if key.endswith(".bias"))  # merging adds no biases (Llama has none, Qwen2 q/k/v)


def test_merge_lora_writes_the_hf_format(lora_run, tmp_path):
    name, adapter, _ = lora_run
    out = str(tmp_path / "merged-hf")
    run_script(["-m", "paddle_llm", "merge-lora", "--model_name_or_path", fixture_dir(name), "--lora_path", adapter,
                "--output_path", out, "--format", "hf"])
    exported = str(tmp_path / "export-hf")
    run_script(["-m", "paddle_llm", "export", "--format", "hf", "--model_name_or_path", fixture_dir(name),
                "--lora_path", adapter, "--output_path", exported])
    for file_name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # the ids export gives
        assert filecmp.cmp(os.path.join(out, file_name), os.path.join(exported, file_name), shallow=False), file_name
    merged, reference_tensors = hf_tensors(out), hf_tensors(exported)
    assert merged.keys() == reference_tensors.keys()
    assert all(np.array_equal(merged[k], reference_tensors[k]) for k in merged)


@pytest.mark.skipif(not os.path.isfile(TORCH_PYTHON), reason=f"needs transformers in {TORCH_PYTHON} (see scripts/make_hf_fixtures.py); CI has no torch")
def test_exported_hf_dir_loads_in_transformers_without_weight_warnings_when_torch_venv_exists(lora_run, tmp_path):
    name, adapter, _ = lora_run
    out = str(tmp_path / "hf")
    run_script(["-m", "paddle_llm", "export", "--format", "hf", "--model_name_or_path", fixture_dir(name),
                "--lora_path", adapter, "--output_path", out, "--max_shard_size", "100KB"])
    ids = reference(name)["logits_input_ids"]
    result = subprocess.run([TORCH_PYTHON, os.path.join(ROOT, "scripts", "check_hf_dir_in_transformers.py"), out, json.dumps(ids)],
                            capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert "not used" not in report["log"] and "newly initialized" not in report["log"], report["log"]
    np.testing.assert_allclose(np.array(report["logits"]), logits_of(load(out), ids), atol=1e-4, rtol=0)
    # The source's template, or (llama2 has none) the built-in Llama-2 format written as Jinja.
    expected_chat = {
        "llama2": "<s>[INST] Hi [/INST]",
        "llama3": "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "qwen2": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    }
    assert report["chat"].endswith(expected_chat[name])


@pytest.mark.parametrize("name", ["llama2", "llama3", "qwen2"])
def test_served_greedy_tokens_equal_transformers_generate(name, tmp_path):
    """``serve --engine dygraph`` on the fixture directory itself: each completion's prompt is encoded to
    transformers' ids and the 8 greedy tokens are transformers' ``generate`` tokens (the engine, in process, gives
    the ids; the HTTP server, on the directory ``export --format hf`` writes, the same text and token counts)."""
    from paddle_llm.data.sft import prompt_ids_as_trained
    from paddle_llm.serving.model import open_checkpoint
    from paddle_llm.serving.sampling import SamplingParams

    before = snapshot(fixture_dir(name))
    expected = reference(name)["generate"]["prompts"]
    served = open_checkpoint(fixture_dir(name), max_batch_size=4)
    try:
        # How the server encodes a completion prompt (EndpointProtocol.encode).
        prompts = [prompt_ids_as_trained(served.family, served.tokenizer, [{"role": "user", "content": case["prompt"]}], False)
                   for case in expected]
        assert prompts == [case["prompt_ids"] for case in expected]
        handles = [served.engine.submit(ids, SamplingParams(max_tokens=8, temperature=0)) for ids in prompts]
        completions = [handle.result() for handle in handles]
    finally:
        served.engine.shutdown()
    assert [list(c.token_ids) for c in completions] == [case["new_ids"] for case in expected]

    import openai

    # The HTTP server runs on what `export --format hf` wrote from the fixture: what leaves paddle_llm answers the same.
    exported = str(tmp_path / "hf")
    run_script(["-m", "paddle_llm", "export", "--format", "hf", "--model_name_or_path", fixture_dir(name), "--output_path", exported])
    process = ServerProcess(["--model", exported, "--engine", "dygraph"], str(tmp_path / "serve.log")).start()
    try:
        client = openai.OpenAI(base_url=process.url + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        for case, completion in zip(expected, completions):
            reply = client.completions.create(model=model, prompt=case["prompt"], max_tokens=8, temperature=0)
            assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(case["prompt_ids"]), len(case["new_ids"]))
            assert reply.choices[0].text == completion.text
    finally:
        assert process.stop() == 0
    assert snapshot(fixture_dir(name)) == before


def served_greedy_tokens(directory: str, cases: list[dict], exported: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """Each reference prompt as the server encodes a completion, and the engine's 8 greedy tokens for it, from a
    checkpoint in dygraph or, ``exported``, from the step graph through Paddle Inference."""
    from paddle_llm.data.sft import prompt_ids_as_trained
    from paddle_llm.serving.model import open_checkpoint, open_export
    from paddle_llm.serving.sampling import SamplingParams

    served = open_export(directory, num_threads=1, max_batch_size=4) if exported else open_checkpoint(directory, max_batch_size=4)
    try:
        prompts = [prompt_ids_as_trained(served.family, served.tokenizer, [{"role": "user", "content": case["prompt"]}], False)
                   for case in cases]
        handles = [served.engine.submit(ids, SamplingParams(max_tokens=8, temperature=0)) for ids in prompts]
        return prompts, [list(handle.result().token_ids) for handle in handles]
    finally:
        served.engine.shutdown()


@pytest.mark.parametrize("name", FEATURE_FIXTURES)
def test_feature_fixture_exports_bit_exact_and_serves_transformers_greedy_tokens(name, tmp_path):
    """In one process, to keep the suite's time: the dygraph engine on the fixture and on the step graph ``export``
    traced (parity checked) give transformers' ``generate`` tokens; ``export --format hf`` writes the fixture's tensors
    bit for bit and its RoPE and window settings as the source had them; transformers (the version that wrote the
    fixture) loads that export with no missing or unexpected keys and computes our logits."""
    from paddle_llm.export.command import main as export_main

    before = snapshot(fixture_dir(name))
    cases = reference(name)["generate"]["prompts"]
    expected = ([case["prompt_ids"] for case in cases], [case["new_ids"] for case in cases])
    assert served_greedy_tokens(fixture_dir(name), cases) == expected
    graph, hf = str(tmp_path / "graph"), str(tmp_path / "hf")
    assert export_main(["--model_name_or_path", fixture_dir(name), "--output_path", graph]) == 0
    assert served_greedy_tokens(graph, cases, exported=True) == expected

    assert export_main(["--format", "hf", "--model_name_or_path", fixture_dir(name), "--output_path", hf]) == 0
    original, exported = hf_tensors(fixture_dir(name)), hf_tensors(hf)
    if resolve_model(fixture_dir(name)).config_fields["tie_word_embeddings"]:
        original.pop("lm_head.weight", None)
    assert exported.keys() == original.keys()
    assert all(exported[key].dtype == array.dtype and np.array_equal(exported[key], array) for key, array in original.items())
    with open(os.path.join(hf, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(fixture_dir(name), "config.json")) as f:
        source_config = json.load(f)
    for field in ("model_type", "rope_scaling", "rope_parameters", "sliding_window", "head_dim", "max_position_embeddings"):
        assert config.get(field) == source_config.get(field), field
    # ERNIE 4.5's export also writes rope_theta beside rope_parameters (ernie4_5/hf.py); every theta is the source's.
    assert {config.get("rope_theta"), (config.get("rope_parameters") or {}).get("rope_theta")} - {None} == {rope_theta_of(source_config)}
    assert snapshot(fixture_dir(name)) == before

    python = TORCH5_PYTHON if reference(name)["versions"]["transformers"].startswith("5") else TORCH_PYTHON
    if not os.path.isfile(python):
        pytest.skip(f"needs transformers in {python} (see scripts/make_hf_fixtures.py) for the loading check")
    ids = reference(name)["logits_input_ids"]
    result = subprocess.run([python, os.path.join(ROOT, "scripts", "check_hf_dir_in_transformers.py"), hf, json.dumps(ids)],
                            capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    np.testing.assert_allclose(np.array(report["logits"]), np.load(os.path.join(fixture_dir(name), "reference_logits.npy")),
                               atol=1e-4, rtol=0)
