"""``paddle-llm export`` for every family, LoRA and prefix: the graph decodes like dygraph (parity check), the directory
holds what serving needs, and the check fails when the graph and checkpoint disagree."""

import json
import os
import shutil

import numpy as np
import pytest

from paddle_llm.export.command import main as export_main
from paddle_llm.inference.manifest import load_manifest
from tests.integration.tiny_checkpoint import make_checkpoint, make_lora_adapter, make_prefix_adapter

FAMILIES = {"llama": "tiny-llama", "chatglm": "tiny-chatglm", "chatglm2": "tiny-chatglm2", "qwen2": "tiny-qwen2"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def checkpoints(workdir):
    return {family: make_checkpoint(preset, str(workdir / f"ckpt-{family}")) for family, preset in FAMILIES.items()}


@pytest.fixture(scope="module")
def exports(workdir, checkpoints):
    """Each family exported once through the real CLI entry point (which runs the parity check)."""
    results = {}
    for family, checkpoint in checkpoints.items():
        output = str(workdir / f"export-{family}")
        results[family] = (export_main(["--model_name_or_path", checkpoint, "--output_path", output]), output)
    return results


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_passes_parity_and_writes_serving_files(exports, family):
    exit_code, output = exports[family]
    assert exit_code == 0
    manifest = load_manifest(output)
    assert manifest.parity["passed"] and manifest.parity["max_abs_diff"] <= 1e-4
    assert manifest.parity["prompts"] == 4 and not manifest.parity["mismatches"]
    assert manifest.family == family and manifest.chat_template == family
    for name in ("model.json", "model.pdiparams", "config.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(output, name)), name
    generation = json.load(open(os.path.join(output, "generation_config.json")))
    assert generation["eos_token_id"] in (manifest.eos_token_ids[0], manifest.eos_token_ids)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_and_checkpoint_serve_a_chat_prompt_with_the_same_greedy_tokens(checkpoints, exports, family):
    """Serving, per family: the exported graph under Paddle Inference and the checkpoint under the dygraph engine
    answer a prompt framed by the family's chat template, token for token alike."""
    from paddle_llm.data.sft import prompt_ids_as_trained
    from paddle_llm.serving.model import open_checkpoint, open_export
    from paddle_llm.serving.sampling import SamplingParams

    served = [open_export(exports[family][1], num_threads=1, max_batch_size=2), open_checkpoint(checkpoints[family], max_batch_size=2)]
    try:
        assert [model.family.chat_template.name for model in served] == [family, family]
        prompt = prompt_ids_as_trained(served[0].family, served[0].tokenizer, [{"role": "user", "content": "The quick brown fox"}], templated=True)
        replies = [model.engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0)) for model in served]
        assert replies[0].error is None and len(replies[0].token_ids) == 8
        assert replies[0].token_ids == replies[1].token_ids
    finally:
        for model in served:
            model.engine.shutdown()


def test_check_only_runs_alone(exports):
    _, output = exports["llama"]
    assert export_main(["--check_only", output, "--check_tokens", "4"]) == 0
    assert load_manifest(output).parity["new_tokens"] == 4


def test_check_fails_against_a_different_checkpoint(exports, checkpoints, workdir):
    import paddle

    _, output = exports["llama"]
    altered = str(workdir / "ckpt-llama-altered")
    shutil.copytree(checkpoints["llama"], altered)
    state = paddle.load(os.path.join(altered, "model_state.pdparams"))
    name = next(k for k in state if k.endswith("lm_head.weight"))
    state[name] = state[name] + 0.05 * paddle.randn(state[name].shape)
    paddle.save(state, os.path.join(altered, "model_state.pdparams"))
    assert export_main(["--check_only", output, "--model_name_or_path", altered]) == 1
    assert not load_manifest(output).parity["passed"]
    assert export_main(["--check_only", output, "--model_name_or_path", checkpoints["llama"]]) == 0


@pytest.mark.parametrize("family", ["llama", pytest.param("chatglm2", marks=pytest.mark.slow), "qwen2"])
def test_lora_is_merged_and_matches_unmerged_adapter(checkpoints, exports, workdir, family):
    from paddle_llm.inference.runtime import open_export_decoder

    lora = make_lora_adapter(checkpoints[family], str(workdir / f"lora-{family}"))
    output = str(workdir / f"export-lora-{family}")
    # Parity's reference is PaddleNLP's LoRAModel computing x W + x A B s at run time: merged == unmerged.
    assert export_main(["--model_name_or_path", checkpoints[family], "--lora_path", lora, "--output_path", output]) == 0
    manifest = load_manifest(output)
    assert manifest.parity["passed"] and manifest.source["lora_path"] == os.path.abspath(lora)
    # The adapter really changed the model: the merged graph disagrees with the base export.
    prompt = [[10, 20, 30, 40]]
    merged_logits = open_export_decoder(output).prefill([0], prompt)
    base_logits = open_export_decoder(exports[family][1]).prefill([0], prompt)
    assert np.abs(merged_logits - base_logits).max() > 1e-3


@pytest.mark.parametrize(
    "family", ["llama", pytest.param("chatglm", marks=pytest.mark.slow), pytest.param("chatglm2", marks=pytest.mark.slow), "qwen2"])
def test_prefix_becomes_part_of_the_past(checkpoints, workdir, family):
    prefix = make_prefix_adapter(checkpoints[family], str(workdir / f"prefix-{family}"))
    output = str(workdir / f"export-prefix-{family}")
    assert export_main(["--model_name_or_path", checkpoints[family], "--prefix_path", prefix, "--output_path", output]) == 0
    manifest = load_manifest(output)
    assert manifest.parity["passed"] and manifest.prefix_cache and os.path.isfile(os.path.join(output, manifest.prefix_cache))


def test_fastdeploy_format_writes_safetensors_checkpoint(checkpoints, workdir):
    from safetensors.numpy import load_file

    output = str(workdir / "fastdeploy-llama")
    assert export_main(["--model_name_or_path", checkpoints["llama"], "--output_path", output,
                        "--format", "fastdeploy", "--dtype", "bfloat16"]) == 0
    manifest = load_manifest(output)
    assert manifest.format == "fastdeploy" and manifest.cache is None
    tensors = load_file(os.path.join(output, "model.safetensors"))
    assert any(name.endswith("embed_tokens.weight") for name in tensors)
    assert json.load(open(os.path.join(output, "config.json")))["dtype"] == "bfloat16"
    assert os.path.isfile(os.path.join(output, "tokenizer_config.json"))


@pytest.mark.parametrize("family", ["llama", "chatglm2", "qwen2"])
def test_a_checkpoint_trained_with_gpu_kernel_switches_exports_on_cpu(checkpoints, workdir, family):
    """A GPU run saves --use_fused_rms_norm, --use_flash_attention and --use_fused_rope into config.json; the CPU has
    none of those kernels, so export (and its parity reference) must run without them. The input stays untouched."""
    checkpoint = str(workdir / f"gpu-trained-{family}")
    shutil.copytree(checkpoints[family], checkpoint)
    config_path = os.path.join(checkpoint, "config.json")
    config = json.load(open(config_path))
    config.update(use_fused_rms_norm=True, use_flash_attention=True, use_fused_rope=True)
    with open(config_path, "w") as f:
        json.dump(config, f)
    before = open(config_path).read()
    output = str(workdir / f"export-gpu-trained-{family}")
    assert export_main(["--model_name_or_path", checkpoint, "--output_path", output]) == 0
    assert load_manifest(output).parity["passed"]
    assert open(config_path).read() == before


def test_exported_programs_record_what_they_need_and_model_json_runs_anywhere(exports):
    from paddle_llm.cpu import features as cpu_features
    from paddle_llm.cpu import kernels as cpu_kernels
    from paddle_llm.inference.manifest import program_needs

    for family, (_, output) in exports.items():
        programs = load_manifest(output).programs
        assert programs[-1] == {"file": "model.json", "needs": []}, family
        assert program_needs(os.path.join(output, "model.json")) == [], family
        for program in programs:
            assert program["needs"] == program_needs(os.path.join(output, program["file"]))
    llama_programs = load_manifest(exports["llama"][1]).programs
    with_avx512 = cpu_features.fused_rms_norm_allowed(cpu_features.detect())
    with_kernels = cpu_kernels.load() is not None
    assert [program["file"] for program in llama_programs] == (
        ["model.kernels.json"] * with_kernels + ["model.avx512f.json"] * with_avx512 + ["model.json"])
    if with_kernels:  # the packed weights are its own file; every other program shares model.pdiparams
        assert llama_programs[0] == {"file": "model.kernels.json", "params": "model.kernels.pdiparams",
                                     "needs": ["paddle_llm_cpu_kernels"]}
    assert load_manifest(exports["llama"][1]).parity["programs"] == [program["file"] for program in llama_programs]


def test_llama_step_program_reads_where_the_past_ends_once_per_step(exports):
    """A small model's decoding step costs Paddle Inference's per-op time: where the probabilities stop covering the
    cache is one shape read per step, handed to every layer as a slice bound (no per-layer shape, slice and stack)."""
    from collections import Counter

    with open(os.path.join(exports["llama"][1], "model.json"), encoding="utf-8") as f:
        ops = Counter(op["#"] for op in json.load(f)["program"]["regions"][0]["blocks"][0]["ops"])
    assert ops["1.shape64"] == 1 and ops["1.stack"] == 0, ops


def test_half_precision_graph_on_cpu_build_is_refused_clearly(checkpoints, workdir, capsys):
    import paddle

    if paddle.device.is_compiled_with_cuda():
        pytest.skip("a CUDA build can trace half-precision graphs")
    code = export_main(["--model_name_or_path", checkpoints["llama"], "--output_path", str(workdir / "fp16"),
                        "--dtype", "float16"])
    assert code == 2
    assert "need a CUDA build" in capsys.readouterr().err
    assert not os.path.exists(workdir / "fp16")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output_path", "x"], "missing --model_name_or_path"),
        (["--model_name_or_path", "/no/such/dir", "--output_path", "x"], "neither a local directory nor a built-in preset"),
        (["--model_name_or_path", "tiny-llama", "--output_path", "x"], "has no weights to export"),
        (["--check_only", "/no/such/export"], "not an export directory"),
    ],
)
def test_bad_inputs_exit_2_with_a_message(argv, message, capsys, tmp_path):
    argv = [str(tmp_path / a) if a == "x" else a for a in argv]
    assert export_main(argv) == 2
    assert message in capsys.readouterr().err
