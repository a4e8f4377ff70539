"""Fine-tuning end to end on CPU: the PEFT contract table, packing, LOMO, merging, the seed's commands, errors."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from paddle_llm.recipes.finetune import RECIPE as FINETUNE_RECIPE
from tests.conftest import ROOT, read_metrics, run_script, subprocess_env

FINETUNE = os.path.join(ROOT, "finetune_generation.py")
CONTRACT = os.path.join(ROOT, "tests", "integration", "finetune_contract.py")
ASSETS = os.path.join(ROOT, "tests", "assets")
FAMILIES = ("llama", "chatglm", "chatglm2", "qwen2")
METHODS = ("full", "lora", "prefix", "lomo")
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_records(directory, records_by_file) -> str:
    os.makedirs(directory, exist_ok=True)
    for name, records in records_by_file.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            for record in records:
                f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return str(directory)


@pytest.fixture(scope="session")
def sum_data(tmp_path_factory) -> str:
    """A tiny src/tgt task: "3 plus 4 =" -> "seven"."""
    records = [{"src": f"{a} plus {b} =", "tgt": WORDS[(a + b) % 10]} for a in range(8) for b in range(8)]
    return write_records(tmp_path_factory.mktemp("sum"), {"train.json": records[:56], "dev.json": records[56:]})


def contract_results(family, model_dir, data_dir, output_dir) -> dict:
    result = run_script([CONTRACT, family, model_dir, data_dir, str(output_dir)], timeout=900)
    rows = [json.loads(line[len("CONTRACT ") :]) for line in result.stdout.splitlines() if line.startswith("CONTRACT ")]
    return {row["method"]: row for row in rows}


@pytest.mark.slow  # four methods trained per family
@pytest.mark.parametrize("family", FAMILIES)
def test_contract_table_every_method_learns_trains_only_its_parameters_and_round_trips(saved_tiny_models, sum_data, tmp_path, family):
    results = contract_results(family, saved_tiny_models[family], sum_data, tmp_path)
    assert sorted(results) == sorted(METHODS)
    for method, row in results.items():
        losses = row["losses"]
        assert len(losses) == 10, method
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, (method, losses)  # 10 steps: the loss falls
        changed, trainable, everything = set(row["changed"]), set(row["trainable"]), set(row["all"])
        assert changed == trainable, method  # what trains changes; nothing else does
        if method in ("full", "lomo"):
            assert trainable == everything, method
        elif method == "lora":
            assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
            assert row["merge_diff"] < 1e-5  # merged == base + adapter
        else:
            assert trainable and all(n.startswith("prefix_encoder.") for n in trainable)
        assert row["roundtrip_diff"] < 1e-5, method  # what was saved loads back into the same model
    assert results["lomo"]["grads_left"] == 0  # LOMO freed every gradient inside backward


PACKING_CHECK = r"""
import json, sys
import numpy as np, paddle
from paddle_llm.data.packing import pack_best_fit_decreasing
from paddle_llm.data.sft import Limits, SftCollator, build_split, family_layout
from paddle_llm.models.registry import build_config, build_model, load_tokenizer, resolve_model
from paddle_llm.trainer.finetune_trainer import criterion_for
family, model_dir, data_file = sys.argv[1:4]
source = resolve_model(model_dir)
tokenizer = load_tokenizer(model_dir, source.family)
layout = family_layout(source.family, tokenizer)
model = build_model(source, build_config(source), load_weights=True)
criterion = criterion_for(source.family, 1)
samples = build_split(data_file, layout, tokenizer, Limits(32, 48)).samples[:12]
collate = SftCollator(layout)
def loss_and_grads(rows):
    batch = {k: paddle.to_tensor(v) for k, v in collate(rows).items()}
    model.clear_gradients()
    if criterion is None:
        loss = model(**batch)[0]
    else:
        labels = batch.pop("labels")
        loss = criterion(model(**batch), labels)
    loss.backward()
    return float(loss), {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
packs = pack_best_fit_decreasing([len(s) for s in samples], 48)
padded_loss, padded_grads = loss_and_grads([[s] for s in samples])
packed_loss, packed_grads = loss_and_grads([[samples[i] for i in pack] for pack in packs])
print("PACKING " + json.dumps({
    "rows": [len(samples), len(packs)], "loss": [padded_loss, packed_loss],
    "grad_diff": max(float(np.abs(padded_grads[n] - packed_grads[n]).max()) for n in padded_grads),
    "grad_scale": max(float(np.abs(g).max()) for g in padded_grads.values()),
    "same_params": sorted(padded_grads) == sorted(packed_grads)}))
"""


@pytest.mark.slow  # a model per family in a fresh process
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_batch_equals_padded_batch_loss_and_gradients(saved_tiny_models, sum_data, family):
    result = run_script(["-c", PACKING_CHECK, family, saved_tiny_models[family], os.path.join(sum_data, "train.json")])
    row = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("PACKING "))[len("PACKING ") :])
    padded_rows, packed_rows = row["rows"]
    assert packed_rows < padded_rows  # several samples really share a row
    assert row["loss"][1] == pytest.approx(row["loss"][0], abs=1e-5)
    assert row["same_params"] and row["grad_diff"] < 1e-5 and row["grad_scale"] > 1e-3


LOMO_CHECK = r"""
import json
import numpy as np, paddle
from paddle_llm.models.registry import build_config, build_model, resolve_model
from paddle_llm.peft.lomo import LomoOptimizer
source = resolve_model("tiny-llama")
def fresh():
    paddle.seed(3)
    return build_model(source, build_config(source), load_weights=False)
ids = paddle.to_tensor(np.random.default_rng(0).integers(10, 900, (2, 16)), dtype="int64")
sgd_model, lomo_model = fresh(), fresh()
sgd = paddle.optimizer.SGD(learning_rate=0.1, parameters=sgd_model.parameters(), grad_clip=paddle.nn.ClipGradByGlobalNorm(0.5))
lomo = LomoOptimizer(0.1, lomo_model.parameters(), max_grad_norm=0.5)
for _ in range(3):
    loss = sgd_model(input_ids=ids, labels=ids)[0]
    loss.backward()
    sgd.step()
    sgd.clear_grad()
    lomo.fused_step(lambda: lomo_model(input_ids=ids, labels=ids)[0])
print("LOMO " + json.dumps({
    "param_diff": max(float((a - b).abs().max()) for a, b in zip(sgd_model.parameters(), lomo_model.parameters())),
    "clipped": lomo.last_grad_norm > 0.5,
    "grads_left": sum(1 for p in lomo_model.parameters() if p.grad is not None and p.grad._is_initialized())}))
"""


@pytest.mark.slow  # two models trained side by side
def test_lomo_equals_clipped_sgd_and_keeps_no_gradients():
    result = run_script(["-c", LOMO_CHECK])
    row = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("LOMO "))[len("LOMO ") :])
    assert row["clipped"]  # the two-pass clipping really scaled the step
    assert row["param_diff"] < 1e-6 and row["grads_left"] == 0


def seed_command(name: str) -> list[str]:
    """A seed command's arguments exactly as bash passes them (line continuations joined)."""
    with open(os.path.join(ASSETS, name), encoding="utf-8") as f:
        tokens = shlex.split(f.read().replace("\\\n", ""))
    return tokens[tokens.index("finetune_generation.py") + 1 :]


@pytest.mark.slow  # a fine-tuning run
@pytest.mark.parametrize("script, adapter_file", [("seed_finetune_lora.sh", "lora_config.json"), ("seed_finetune_prefix.sh", "prefix_config.json")])
def test_seed_single_device_commands_run_on_cpu(saved_tiny_models, sum_data, tmp_path, script, adapter_file):
    """The seed's command with only the model, the dataset and the device swapped, plus a step limit; run from a
    scratch directory so its ``--output_dir ./checkpoints/`` lands there."""
    args = [saved_tiny_models["llama"] if token == "facebook/llama-7b" else token for token in seed_command(script)]
    args += ["--dataset_name_or_path", sum_data, "--device", "cpu", "--max_steps", "3"]
    result = subprocess.run([sys.executable, FINETUNE] + args, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("--fp16 is GPU-only") == 1  # fp16 O2 falls back to float32 with one warning
    output = tmp_path / "checkpoints"
    assert (output / adapter_file).is_file()
    with open(output / "train_results.json") as f:
        assert json.load(f)["train_tokens_per_second"] > 0
    assert [r["step"] for r in read_metrics(str(output)) if "eval_loss" in r] == [3]  # --do_eval: one evaluation at the end


@pytest.mark.slow  # fine-tune, merge and compare in three processes
def test_merge_lora_command_writes_a_model_equal_to_base_plus_adapter(saved_tiny_models, sum_data, tmp_path):
    adapter = str(tmp_path / "adapter")
    base = saved_tiny_models["llama"]
    run_script([FINETUNE, "--model_name_or_path", base, "--dataset_name_or_path", sum_data, "--output_dir", adapter,
                "--do_train", "--lora", "True", "--r", "4", "--max_steps", "4", "--learning_rate", "0.01",
                "--report_to", "none", "--disable_tqdm", "1", "--device", "cpu", "--src_length", "16", "--tgt_length", "8"])
    merged = str(tmp_path / "merged")
    result = run_script(["-m", "paddle_llm", "merge-lora", "--model_name_or_path", base, "--lora_path", adapter, "--output_path", merged])
    assert "max |logit difference| against base + adapter" in result.stdout
    compare = (
        "import sys, numpy as np, paddle\n"
        "from paddle_llm.models.registry import build_config, build_model, resolve_model\n"
        "from paddle_llm.peft.lora import load_lora\n"
        "from paddle_llm.peft.merge import probe_logits\n"
        "base, adapter, merged = sys.argv[1:4]\n"
        "def load(path):\n"
        "    source = resolve_model(path)\n"
        "    return source, build_model(source, build_config(source), load_weights=True)\n"
        "source, model = load(base)\n"
        "reference = probe_logits(load_lora(model, adapter, base), source.family, 1024)\n"
        "_, plain = load(merged)\n"
        "print('DIFF', float(np.abs(probe_logits(plain, source.family, 1024) - reference).max()))\n"
    )
    diff = float(next(line for line in run_script(["-c", compare, base, adapter, merged]).stdout.splitlines() if line.startswith("DIFF")).split()[1])
    assert diff < 1e-5
    assert os.path.isfile(os.path.join(merged, "tokenizer_config.json")) and not any(n.startswith(".merge-") for n in os.listdir(tmp_path))


@pytest.mark.slow  # a fine-tuning run
def test_instruction_tuning_end_to_end_chat_data_packed_with_generation_eval_and_merge(saved_tiny_models, tmp_path):
    """Chat and ShareGPT records, multi-turn, packed, LoRA, exact-match evaluation and --merge_weights, in one run."""
    conversations = []
    for a in range(6):
        for b in range(6):
            turns = [{"role": "user", "content": f"{a} plus {b}?"}, {"role": "assistant", "content": WORDS[(a + b) % 10]}]
            conversations.append({"messages": [{"role": "system", "content": "Answer in words."}] + turns + [{"role": "user", "content": "again?"}, {"role": "assistant", "content": WORDS[(a + b) % 10]}]})
    data = write_records(tmp_path / "chat", {"train.json": conversations[:30], "dev.json": conversations[30:]})
    output = str(tmp_path / "out")
    result = run_script([FINETUNE, "--model_name_or_path", saved_tiny_models["llama"], "--dataset_name_or_path", data,
                         "--output_dir", output, "--do_train", "--do_eval", "--instruction_generation", "--zero_padding", "1",
                         "--lora", "True", "--r", "4", "--lora_alpha", "16", "--merge_weights", "--eval_with_do_generation", "1",
                         "--max_length", "128", "--src_length", "96", "--tgt_length", "4", "--max_steps", "6",
                         "--learning_rate", "0.01", "--per_device_train_batch_size", "2", "--report_to", "none",
                         "--disable_tqdm", "1", "--device", "cpu"])
    assert "30 records (chat), 30 samples; nothing truncated; packed into" in result.stderr
    with open(os.path.join(output, "eval_results.json")) as f:
        evaluation = json.load(f)
    assert 0.0 <= evaluation["eval_exact_match"] <= 1.0 and evaluation["eval_loss"] > 0
    with open(os.path.join(output, "eval_generations.jsonl")) as f:
        assert len(f.readlines()) == 6
    with open(os.path.join(output, "lora_config.json")) as f:
        assert json.load(f)["lora_alpha"] == 16
    assert os.path.isfile(os.path.join(output, "merged", "model_state.pdparams"))
    # Every recipe writes the run's report and summary, as pretraining does.
    with open(os.path.join(output, "run_summary.json")) as f:
        assert json.load(f)["flags"]["lora"] is True
    with open(os.path.join(output, "report.html"), encoding="utf-8") as f:
        report = f.read()
    assert "<h2>Curves</h2>" in report and "eval_loss" in report


@pytest.mark.slow  # two fine-tuning runs
def test_lora_run_resumes_from_its_last_checkpoint_on_the_same_loss_curve(saved_tiny_models, sum_data, tmp_path):
    """A crash after checkpoint-3 (simulated by deleting what came later): the same command resumes there and
    replays steps 4-6 exactly, adapter weights and optimizer state restored."""
    output = tmp_path / "run"
    command = [FINETUNE, "--model_name_or_path", saved_tiny_models["llama"], "--dataset_name_or_path", sum_data, "--output_dir", str(output),
               "--do_train", "--lora", "True", "--r", "4", "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1",
               "--learning_rate", "0.01", "--report_to", "none", "--disable_tqdm", "1", "--device", "cpu", "--src_length", "16", "--tgt_length", "8"]
    run_script(command)
    reference = {row["step"]: row["loss"] for row in read_metrics(str(output)) if "loss" in row}
    shutil.rmtree(output / "checkpoint-6")
    result = run_script(command)
    assert f"resuming from {output / 'checkpoint-3'}" in result.stderr
    resumed = {row["step"]: row["loss"] for row in read_metrics(str(output)) if "loss" in row}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


@pytest.mark.slow  # a fine-tuning run
def test_finetune_takes_the_cpu_runtime_switches(saved_tiny_models, sum_data, tmp_path):
    command = [FINETUNE, "--model_name_or_path", saved_tiny_models["llama"], "--dataset_name_or_path", sum_data, "--output_dir", str(tmp_path),
               "--do_train", "--lora", "True", "--r", "4", "--max_steps", "2", "--logging_steps", "1", "--report_to", "none",
               "--disable_tqdm", "1", "--device", "cpu", "--src_length", "16", "--tgt_length", "8",
               "--num_threads", "1", "--cpu_fast_paths", "False"]
    log = run_script(command).stderr
    assert "cpu runtime: 1 math threads" in log
    assert "cpu fast paths off (--cpu_fast_paths False)" in log and "cpu fast paths on" not in log


def finetune_preset(data: str, output: str, *flags: str) -> str:
    """Two LoRA steps on ``tiny-llama``; the log."""
    return run_script([FINETUNE, "--model_name_or_path", "tiny-llama", "--dataset_name_or_path", data, "--output_dir", output, "--do_train",
                       "--lora", "True", "--max_steps", "2", "--report_to", "none", "--disable_tqdm", "1", "--device", "cpu",
                       "--src_length", "16", "--tgt_length", "8", *flags]).stderr


@pytest.mark.slow  # a fine-tuning run
def test_fine_tuning_a_preset_warns_first_that_its_base_is_random(sum_data, tmp_path):
    """Said once, before anything is built, with what to pass instead (merge-lora refuses the base afterwards)."""
    log = finetune_preset(sum_data, str(tmp_path))
    warning = ("warning: tiny-llama is a preset, so this run fine-tunes a randomly initialised llama model (`paddle-llm merge-lora` will refuse "
               "it as a base): to fine-tune a trained model, pass its directory as --model_name_or_path, e.g. the --output_dir of `paddle-llm pretrain`")
    assert log.count(warning) == 1
    assert log.index(warning) < log.index("cpu runtime:")  # at the start, not after the set-up


@pytest.mark.slow  # a fine-tuning run
def test_fine_tuning_a_preset_grows_the_vocabulary_to_its_tokenizer(chinese_data, sum_data, tmp_path):
    """From scratch, fine-tuning follows pretraining's rule (PaddleNLP's run_pretrain.py), through the same builder."""
    log = finetune_preset(sum_data, str(tmp_path), "--tokenizer_name_or_path", chinese_data[0])
    assert log.count("vocab size 1024 -> 3072: preset tiny-llama starts from random weights") == 1


def test_fine_tuning_weights_with_a_larger_tokenizer_is_refused_with_what_to_do(chinese_data, saved_tiny_models, sum_data, tmp_path):
    tokenizer, _ = chinese_data
    model = saved_tiny_models["llama"]
    result = run_script([FINETUNE, "--model_name_or_path", model, "--tokenizer_name_or_path", tokenizer, "--dataset_name_or_path", sum_data,
                         "--output_dir", str(tmp_path), "--do_train", "--device", "cpu"], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: the tokenizer {tokenizer} has 3000 tokens but the weights in {model} have 1024 rows" in result.stderr
    assert "pass the tokenizer the model was trained with as --tokenizer_name_or_path" in result.stderr
    assert "randomly initialised" not in result.stderr


@pytest.mark.parametrize(
    "flags, messages",
    [
        (["--lora", "True", "--prefix_tuning", "True"], ["--lora and --prefix_tuning are exclusive"]),
        (["--prefix_tuning", "True", "--pipeline_parallel_degree", "2", "--eval_with_do_generation", "1"],
         ["--prefix_tuning does not run with --pipeline_parallel_degree 2", "generation-based evaluation"]),
        (["--optim", "lomo", "--gradient_accumulation_steps", "4"], ["--optim lomo updates inside backward"]),
        (["--optim", "adam"], ["--optim 'adam' must be one of"]),
        (["--merge_weights"], ["--merge_weights folds a LoRA adapter"]),
        (["--src_length", "64", "--max_length", "64"], ["leaves no room for a reply"]),
    ],
)
def test_configuration_errors_fail_before_any_model_is_built(refused, sum_data, tmp_path, flags, messages):
    exit_code, stderr = refused(FINETUNE_RECIPE, ["--model_name_or_path", "tiny-llama", "--dataset_name_or_path", sum_data, "--output_dir", tmp_path,
                                                  "--do_train", "--device", "cpu"] + flags)
    assert exit_code == 2, stderr[-2000:]
    for message in messages:
        assert message in stderr, message
    assert "Traceback" not in stderr and "model: llama" not in stderr


def test_bad_record_is_a_one_line_error_naming_file_line_and_field(tmp_path):
    """Through the script itself: finetune_generation.py exits 2 with the one-line message, no traceback."""
    data = write_records(tmp_path / "bad", {"train.json": [{"src": "a", "tgt": "b"}, {"src": "c", "answer": "d"}]})
    result = run_script([FINETUNE, "--model_name_or_path", "tiny-llama", "--dataset_name_or_path", data, "--output_dir", str(tmp_path / "o"),
                         "--do_train", "--device", "cpu"], check=False)
    assert result.returncode == 2
    assert f"{data}/train.json:2: missing field 'tgt' (fields present: answer, src)" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_split_file_names_the_flag_that_needs_it(refused, tmp_path):
    data = write_records(tmp_path / "bad", {"train.json": [{"src": "a", "tgt": "b"}]})
    exit_code, stderr = refused(FINETUNE_RECIPE, ["--model_name_or_path", "tiny-llama", "--dataset_name_or_path", data, "--output_dir", tmp_path / "o",
                                                  "--do_eval", "--device", "cpu"])
    assert exit_code == 2 and f"paddle-llm finetune: error: {data}/dev.json: missing (needed by --do_eval)" in stderr


@pytest.mark.slow
@pytest.mark.timeout(2100)  # the shared demo run (when this test is the first to ask for it), then this stage
def test_demo_fine_tuning_reaches_the_accuracy_target(demo_run, tmp_path):
    """The demo's pretraining (the one ``test_demo`` checks), then its LoRA stage by its own entry point: held-out
    exact match goes from ~0 to >= 90%."""
    demo_output, _ = demo_run
    pretrained = os.path.join(demo_output, "pretrain")
    assert os.path.isfile(os.path.join(pretrained, "config.json")), f"the demo wrote no pretrained model in {pretrained}"
    result = run_script(["-m", "paddle_llm.tools.demo_finetune", "--model_dir", pretrained, "--output_dir", str(tmp_path / "finetune")], timeout=1200)
    assert "fine-tuning demo OK" in result.stdout
