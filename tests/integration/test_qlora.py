"""QLoRA end to end on CPU: the seed's LoRA command with --weight_quantize_algo nf4 trains, merges, exports and
serves; LoRA on a quantized Llama and ChatGLM2 base learns."""

import json
import os
import subprocess
import sys

import openai
import pytest

from paddle_llm.peft.quantize import QuantSpec, recorded_quantization
from tests.conftest import read_metrics, run_script, subprocess_env
from tests.integration.server_process import ServerProcess
from tests.integration.test_finetune import FINETUNE, seed_command, sum_data  # noqa: F401 (sum_data is a fixture)

# Every test fine-tunes (and the seed command also merges, exports and serves) in fresh processes.
pytestmark = pytest.mark.slow

COMPARE = r"""
import json, sys, numpy as np
from paddle_llm.models.registry import build_config, build_model, resolve_model
from paddle_llm.peft.lora import load_lora
from paddle_llm.peft.merge import probe_logits
from paddle_llm.peft.qlora import dequantize_lora_base
base, adapter, merged = sys.argv[1:4]
def load(path):
    source = resolve_model(path)
    return source, build_model(source, build_config(source), load_weights=True)
source, model = load(base)
quantized = load_lora(model, adapter, base)
reference = probe_logits(quantized, source.family, 1024)
dequantize_lora_base(quantized)  # the same adapter on the float base it was loaded from, minus the quantization
_, float_model = load(base)
import paddlenlp.peft
float_lora = paddlenlp.peft.LoRAModel.from_pretrained(float_model, adapter)
_, plain = load(merged)
print("COMPARE " + json.dumps({
    "merged_vs_quantized": float(np.abs(probe_logits(plain, source.family, 1024) - reference).max()),
    "float_vs_quantized": float(np.abs(probe_logits(float_lora, source.family, 1024) - reference).max()),
}))
"""


def test_seed_lora_command_with_nf4_trains_merges_exports_and_serves(saved_tiny_models, sum_data, tmp_path):  # noqa: F811
    base = saved_tiny_models["llama"]
    args = [base if token == "facebook/llama-7b" else token for token in seed_command("seed_finetune_lora.sh")]
    args += ["--weight_quantize_algo", "nf4", "--dataset_name_or_path", sum_data, "--device", "cpu", "--max_steps", "3",
             "--learning_rate", "1e-2"]
    result = subprocess.run([sys.executable, FINETUNE] + args, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "QLoRA: 14 linear layers stored as nf4 (block 64)" in result.stderr
    adapter = str(tmp_path / "checkpoints")
    assert recorded_quantization(adapter) == QuantSpec("nf4")  # PaddleNLP's quantization_config, in the adapter's config.json
    assert [r["step"] for r in read_metrics(adapter) if "eval_loss" in r] == [3]

    merged = str(tmp_path / "merged")
    merge = run_script(["-m", "paddle_llm", "merge-lora", "--model_name_or_path", base, "--lora_path", adapter, "--output_path", merged])
    assert "merged into the base dequantized from nf4 (block 64)" in merge.stdout
    with open(os.path.join(merged, "config.json")) as f:
        assert (json.load(f).get("quantization_config") or {}).get("weight_quantize_algo") is None  # a plain float model
    line = next(l for l in run_script(["-c", COMPARE, base, adapter, merged]).stdout.splitlines() if l.startswith("COMPARE "))
    compare = json.loads(line[len("COMPARE ") :])
    assert compare["merged_vs_quantized"] < 1e-5  # merged == what training computed (quantized base + adapter)
    assert compare["float_vs_quantized"] > 1e-3  # ... which is not the float base + adapter

    export = str(tmp_path / "export")
    exported = run_script(["-m", "paddle_llm", "export", "--model_name_or_path", merged, "--output_path", export])
    assert "parity PASSED" in exported.stdout + exported.stderr
    server = ServerProcess(["--model", export, "--num_threads", "1"], str(tmp_path / "server.log")).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.completions.create(model=client.models.list().data[0].id, prompt="3 plus 4 =", max_tokens=4, temperature=0)
        assert reply.choices[0].text and reply.usage.completion_tokens > 0
    finally:
        assert server.stop() == 0, server.log_tail()


@pytest.mark.parametrize("family, quantization", [
    ("llama", ["--weight_quantize_algo", "nf4"]),
    ("chatglm2", ["--weight_quantize_algo", "nf4", "--qlora_weight_double_quant", "True", "--qlora_weight_blocksize", "32"]),
    ("llama", ["--weight_quantize_algo", "weight_only_int4"]),
], ids=["llama-nf4", "chatglm2-nf4-double", "llama-int4"])
def test_lora_on_a_quantized_base_learns(saved_tiny_models, sum_data, tmp_path, family, quantization):  # noqa: F811
    output = str(tmp_path / "out")
    result = run_script([FINETUNE, "--model_name_or_path", saved_tiny_models[family], "--dataset_name_or_path", sum_data,
                         "--output_dir", output, "--do_train", "--lora", "True", "--r", "8", "--max_steps", "30",
                         "--learning_rate", "0.01", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "1",
                         "--device", "cpu", "--src_length", "16", "--tgt_length", "8"] + quantization)
    assert "QLoRA:" in result.stderr
    losses = [r["loss"] for r in read_metrics(output) if "loss" in r]
    assert len(losses) == 30
    # On a random tiny base at this rate single steps jump by ~1 nat; the mean of the last five is the signal.
    assert sum(losses[-5:]) / 5 < min(losses[0] - 0.5, sum(losses[:5]) / 5), losses
    assert recorded_quantization(output) == QuantSpec.from_paddlenlp({
        "weight_quantize_algo": quantization[1], "weight_double_quant": "--qlora_weight_double_quant" in quantization,
        "weight_blocksize": 32 if "--qlora_weight_blocksize" in quantization else 64})
