"""DPO through the real entry points: a PaddleNLP-style args file trains on CPU and the held-out reward accuracy on
the shipped preference task rises from chance to at least 90%; LoRA DPO uses no second model; bad configurations
and data fail before training with what to change."""

from __future__ import annotations

import json
import os

import pytest

from paddle_llm.recipes.dpo import RECIPE as DPO_RECIPE
from tests.conftest import ROOT, read_metrics, run_script

RUN_DPO = os.path.join(ROOT, "run_dpo.py")
PREFERENCES = os.path.join(ROOT, "paddle_llm", "assets", "preferences")


def paddlenlp_args(output_dir: str, **overrides) -> dict:
    """An args file in the shape of PaddleNLP's llm/config/llama/dpo_argument.json, sized for the tiny model."""
    return {
        "model_name_or_path": "tiny-llama",
        "train_dataset_path": os.path.join(PREFERENCES, "train.jsonl"),
        "dev_dataset_path": os.path.join(PREFERENCES, "dev.jsonl"),
        "output_dir": output_dir,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "per_device_eval_batch_size": 16,
        "max_steps": 60,
        "learning_rate": 1e-3,
        "warmup_steps": 5,
        "logging_steps": 10,
        "eval_steps": 30,
        "evaluation_strategy": "steps",
        "save_strategy": "no",
        "max_seq_len": 128,
        "max_prompt_len": 96,
        "beta": 0.1,
        "loss_type": "sigmoid",
        "lora": False,
        "lora_rank": 8,
        "unified_checkpoint": True,
        "do_train": True,
        "do_eval": True,
        "device": "cpu",
        "disable_tqdm": True,
        "report_to": "none",
        "seed": 42,
        **overrides,
    }


def run_dpo(tmp_path, name: str, *flags: str, entry=(RUN_DPO,), check=True, **overrides):
    output_dir = str(tmp_path / name)
    args_file = tmp_path / f"{name}.json"
    args_file.write_text(json.dumps(paddlenlp_args(output_dir, **overrides)))
    return output_dir, run_script([*entry, str(args_file), *flags], check=check)


def last_eval(output_dir: str) -> dict:
    return [row for row in read_metrics(output_dir) if "eval_loss" in row][-1]


@pytest.mark.slow  # two DPO runs
def test_paddlenlp_args_file_trains_and_held_out_reward_accuracy_rises_from_chance_to_90_percent(tmp_path):
    # Before training: how often the starting model already prefers the chosen reply (reference-free rewards are
    # the model's own log-probabilities; with a reference every reward starts at exactly 0, a tie).
    before, _ = run_dpo(tmp_path, "before", "--do_train", "false", "--reference_free", "true")
    chance = last_eval(before)["eval_rewards/accuracies"]
    assert 0.3 <= chance <= 0.7, chance

    after, result = run_dpo(tmp_path, "after")
    assert "reference model: a frozen copy of the starting weights" in result.stderr
    evaluation = last_eval(after)
    assert evaluation["eval_rewards/accuracies"] >= 0.9, evaluation
    assert evaluation["eval_rewards/margins"] > 0 and evaluation["eval_rewards/chosen"] > evaluation["eval_rewards/rejected"]
    assert "eval_ppl" not in evaluation  # a preference loss has no perplexity
    with open(os.path.join(after, "eval_results.json"), encoding="utf-8") as f:
        assert json.load(f)["eval_rewards/accuracies"] == evaluation["eval_rewards/accuracies"]
    training = [row for row in read_metrics(after) if "loss" in row]
    assert [row["step"] for row in training] == [10, 20, 30, 40, 50, 60]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert all(key in row for row in training), key
    assert training[-1]["rewards/accuracies"] > training[0]["rewards/accuracies"]
    report = open(os.path.join(after, "report.html"), encoding="utf-8").read()
    assert 'id="plot-rewards"' in report and 'id="plot-reward_accuracy"' in report
    assert os.path.isfile(os.path.join(after, "run_summary.json"))
    assert any(name.startswith("model") and name.endswith((".safetensors", ".pdparams")) for name in os.listdir(after))


@pytest.mark.slow  # a DPO run
def test_lora_dpo_learns_against_the_base_with_adapters_off(tmp_path, saved_tiny_models):
    output_dir, result = run_dpo(
        tmp_path, "lora", entry=("-m", "paddle_llm", "dpo"), model_name_or_path=saved_tiny_models["llama"], lora=True, learning_rate=3e-3
    )
    assert "reference model: the same weights with the LoRA adapters off" in result.stderr
    assert last_eval(output_dir)["eval_rewards/accuracies"] >= 0.9
    assert os.path.isfile(os.path.join(output_dir, "lora_config.json"))  # only the adapter is saved


@pytest.mark.parametrize(
    "overrides,messages",
    [
        ({"loss_type": "kto_pair"}, ["--loss_type 'kto_pair' must be one of sigmoid, hinge, ipo, simpo, orpo, or"]),
        ({"beta": 0, "greedy_zero_padding": True}, ["--beta 0.0: must be positive", "--greedy_zero_padding is not supported here"]),
        ({"max_seq_len": 64, "max_prompt_len": 64}, ["--max_seq_len 64 leaves no room for two replies after --max_prompt_len 64"]),
        ({"train_dataset_path": "/nonexistent/train.jsonl"}, ["--train_dataset_path /nonexistent/train.jsonl: no such file"]),
    ],
)
def test_configuration_errors_fail_before_any_model_is_built(refused, tmp_path, overrides, messages):
    args_file = tmp_path / "bad.json"
    args_file.write_text(json.dumps(paddlenlp_args(str(tmp_path / "bad"), **overrides)))
    exit_code, stderr = refused(DPO_RECIPE, [args_file])
    assert exit_code == 2, stderr[-2000:]
    for message in messages:
        assert f"paddle-llm dpo: error: {message}" in stderr
    assert "Traceback" not in stderr and "model:" not in stderr


def test_bad_preference_line_is_one_error_naming_file_line_and_field(tmp_path):
    """Through the script itself: run_dpo.py exits 2 with the one-line message, no traceback."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"src": ["q"], "tgt": [], "response": ["a", "b"], "sort": [1, 0]}) + "\n" + json.dumps({"src": ["q"], "tgt": [], "response": ["a", "b"], "sort": [2, 2]}) + "\n")
    _, result = run_dpo(tmp_path, "bad_data", check=False, train_dataset_path=str(data), do_eval=False)
    assert result.returncode == 2
    assert f"paddle-llm dpo: error: {data}:2: field 'sort': both responses rank 2; give the chosen one the higher number" in result.stderr
    assert "Traceback" not in result.stderr


ALL_PAIRS_LOSS = """
import sys, json
import numpy as np, paddle
from paddle_llm.models.registry import resolve_model, build_config, build_model, load_tokenizer
from paddle_llm.data.sft import family_layout
from paddle_llm.data.preference import PreferenceCollator, PreferenceLimits, build_preference_split
model_dir, dev_path, beta = sys.argv[1], sys.argv[2], float(sys.argv[3])
source = resolve_model(model_dir)
model = build_model(source, build_config(source), load_weights=True)
model.eval()
tokenizer = load_tokenizer(model_dir, source.family)
layout = family_layout(source.family, tokenizer)
pairs = build_preference_split(dev_path, layout, tokenizer, PreferenceLimits(128, 96)).dataset
collate = PreferenceCollator(layout)
def log_prob(logits, labels):  # numpy: sum over labelled positions of log softmax at the label
    logits = logits - logits.max(-1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    mask = labels != -100
    picked = np.take_along_axis(log_softmax, np.where(mask, labels, 0)[..., None], -1)[..., 0]
    return (picked * mask).sum(-1)
losses = []
for index in range(len(pairs)):  # one pair at a time: no batching, no truncation
    batch = collate([pairs[index]])
    inputs = {k: paddle.to_tensor(v) for k, v in batch.items() if k != "labels"}
    with paddle.no_grad():
        out = model(**inputs)
    logits = (out[0] if isinstance(out, (tuple, list)) else out.logits).astype("float32").numpy()
    chosen, rejected = log_prob(logits, np.asarray(batch["labels"]))
    losses.append(np.logaddexp(0.0, -beta * (chosen - rejected)))  # -log sigmoid(beta * margin), reference-free
print(json.dumps({"pairs": len(losses), "mean": float(np.mean(losses)), "first_half": float(np.mean(losses[:len(losses) // 2]))}))
"""


@pytest.mark.slow
def test_eval_loss_is_the_mean_over_every_dev_pair(tmp_path, saved_tiny_models):
    # 100 dev pairs in batches of 16: 7 batches, the last one partial; PaddleNLP's loop kept the first 50 losses.
    model = saved_tiny_models["llama"]
    output_dir, _ = run_dpo(tmp_path, "eval_only", model_name_or_path=model, do_train=False, reference_free=True,
                            per_device_eval_batch_size=16)
    with open(os.path.join(output_dir, "eval_results.json")) as f:
        reported = json.load(f)["eval_loss"]
    expected = json.loads(run_script(["-c", ALL_PAIRS_LOSS, model, os.path.join(PREFERENCES, "dev.jsonl"), "0.1"]).stdout.splitlines()[-1])
    assert expected["pairs"] == 100
    assert abs(expected["mean"] - expected["first_half"]) > 1e-4, "the dev set no longer tells all pairs from the first half"
    assert reported == pytest.approx(expected["mean"], abs=1e-5), (reported, expected)
