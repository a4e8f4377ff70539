"""run_pretrain.py end to end: real Paddle training in fresh processes, on CPU."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from paddle_llm.recipes.pretrain import RECIPE as PRETRAIN_RECIPE
from tests.conftest import ROOT, RUN_PRETRAIN, read_metrics, run_script, subprocess_env, train_losses
from tests.unit.test_parser import seed_pretrain_args


def pretrain_flags(data: str, output_dir: str, model: str = "tiny-llama", **overrides) -> list[str]:
    flags = {
        "model_name_or_path": model,
        "input_dir": data,
        "output_dir": output_dir,
        "device": "cpu",
        "max_steps": 20,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_seq_length": 64,
        "learning_rate": 0.003,
        "warmup_steps": 2,
        "logging_steps": 5,
        "eval_steps": 10,
        "eval_iters": 2,
        "save_steps": 10,
        "report_to": "none",
        "disable_tqdm": 1,
        "seed": 7,
        "do_train": 1,
    }
    flags.update(overrides)
    return [str(token) for name, value in flags.items() for token in (f"--{name}", value)]


@pytest.mark.slow  # four 20-step trainings
@pytest.mark.parametrize("family", ["llama", "chatglm", "chatglm2", "qwen2"])
def test_twenty_steps_per_family_learn_and_write_every_artifact(demo_data, tmp_path, family):
    output = str(tmp_path / family)
    run_script([RUN_PRETRAIN] + pretrain_flags(demo_data, output, model=f"tiny-{family}", do_eval=1, report_to="visualdl"))
    rows = read_metrics(output)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    for row in train_rows:
        assert set(row) == {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second"}
        assert row["grad_norm"] > 0 and row["tokens_per_second"] > 0
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0, train_rows  # it learns, from ~ln(1024)=6.9
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in eval_rows] == [10, 20]
    assert eval_rows[-1]["eval_ppl"] == pytest.approx(math.exp(eval_rows[-1]["eval_loss"]), rel=1e-6)
    with open(os.path.join(output, "train_results.json")) as f:
        assert json.load(f)["train_tokens_per_second"] > 0
    for step in (10, 20):
        assert os.path.isfile(os.path.join(output, f"checkpoint-{step}", "paddle_llm_complete.json"))
    assert os.path.isfile(os.path.join(output, "model_state.pdparams"))
    assert any(name.startswith("vdlrecords") for _, _, files in os.walk(os.path.join(output, "runs")) for name in files)


@pytest.mark.slow  # two 10-step trainings
def test_cpu_fast_paths_off_keeps_paddlenlps_composites_on_the_same_loss_curve(demo_data, tmp_path):
    """``--cpu_fast_paths False`` is the way to rule our CPU implementations out: the run says so, and its losses
    are the default run's (they are numerically equal); ``--num_threads`` is honoured and reported in both."""
    runs = {}
    for switch in ("True", "False"):
        output = str(tmp_path / switch)
        flags = pretrain_flags(demo_data, output, max_steps=10, logging_steps=2, do_eval=0, num_threads=1, cpu_fast_paths=switch)
        runs[switch] = (run_script([RUN_PRETRAIN] + flags).stderr, train_losses(output))
    (on_log, on_losses), (off_log, off_losses) = runs["True"], runs["False"]
    assert "cpu fast paths on" in on_log and "cpu fast paths off" not in on_log
    assert "cpu fast paths off (--cpu_fast_paths False)" in off_log and "cpu fast paths on" not in off_log
    for log in (on_log, off_log):
        assert "cpu runtime: 1 math threads" in log
    assert sorted(off_losses) == sorted(on_losses) == [2, 4, 6, 8, 10]
    assert on_losses[10] < on_losses[2]
    for step, loss in on_losses.items():
        assert off_losses[step] == pytest.approx(loss, rel=1e-4), step


@pytest.mark.slow  # a training run
def test_seed_pretrain_command_runs_unchanged_on_cpu(demo_data, saved_tiny_models, tmp_path):
    """The seed's 8-GPU command with only model, tokenizer, data and device swapped (plus a short run)."""
    swaps = {"facebook/llama-7b": saved_tiny_models["llama"], "./data": demo_data, "gpu": "cpu", "output/$task_name": str(tmp_path / "seed")}
    args = [swaps.get(token, token) for token in seed_pretrain_args()]
    shorten = ["--max_steps", "3", "--save_steps", "3", "--eval_steps", "3", "--eval_iters", "1"]
    result = run_script([RUN_PRETRAIN] + args + shorten)
    # each GPU-only flag falls back with exactly one warning
    for flag in ("--use_flash_attention is GPU-only", "--fp16 is GPU-only"):
        assert result.stderr.count(flag) == 1, flag
    assert "--use_fused_rms_norm is GPU-only" not in result.stderr  # it was 0 in the seed
    assert "split '20--dataloader_num_workers'" in result.stderr
    rows = read_metrics(str(tmp_path / "seed"))
    assert any("eval_loss" in r for r in rows)
    # --continue_training 1 really started from the saved weights: the first loss is that model's loss
    assert math.isfinite(rows[-1]["eval_loss"])


def seed_args_with(**values) -> list[str]:
    """The seed's flags with the named flags' values replaced (its model and tokenizer share one value)."""
    args = seed_pretrain_args()
    for flag, value in values.items():
        args[args.index(f"--{flag}") + 1] = str(value)
    return args


@pytest.mark.slow  # a training run
def test_seed_pretrain_command_from_scratch_grows_the_vocabulary_to_a_chinese_tokenizer(chinese_data, tmp_path):
    """The seed's command on a preset with a 3,000-piece tokenizer of a Chinese corpus: as PaddleNLP's run_pretrain.py
    does when not continuing, the model grows to hold it (rounded up to 3072) and the log says so once. Swapped:
    model, tokenizer, data, device; a preset has no weights to continue, so --continue_training 0."""
    tokenizer, data = chinese_data
    output = str(tmp_path / "seed")
    args = seed_args_with(model_name_or_path="tiny-llama", tokenizer_name_or_path=tokenizer, input_dir=data, output_dir=output, device="cpu")
    shorten = ["--max_steps", "3", "--save_steps", "3", "--eval_steps", "3", "--eval_iters", "1", "--continue_training", "0"]
    result = run_script([RUN_PRETRAIN] + args + shorten)
    assert result.stderr.count("vocab size 1024 -> 3072: preset tiny-llama starts from random weights and the tokenizer") == 1
    assert f"the tokenizer {tokenizer} has 3000 tokens" in result.stderr
    with open(os.path.join(output, "config.json")) as f:
        assert json.load(f)["vocab_size"] == 3072
    assert any("eval_loss" in r for r in read_metrics(output))


def test_continuing_with_a_larger_tokenizer_is_refused_with_what_to_do(chinese_data, saved_tiny_models, tmp_path):
    tokenizer, data = chinese_data
    model = saved_tiny_models["llama"]
    args = pretrain_flags(data, str(tmp_path), model=model, tokenizer_name_or_path=tokenizer, continue_training=1)
    result = run_script([RUN_PRETRAIN] + args, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        f"error: the tokenizer {tokenizer} has 3000 tokens but the weights in {model} have 1024 rows (vocab_size in "
        f"{model}/config.json): pass the tokenizer the model was trained with as --tokenizer_name_or_path, or train a "
        "new model from scratch (run_pretrain.py without --continue_training)"
    ) in result.stderr


def test_hub_name_is_a_clear_error_not_a_download(refused, tmp_path):
    exit_code, stderr = refused(PRETRAIN_RECIPE, ["--model_name_or_path", "facebook/llama-7b", "--output_dir", tmp_path, "--device", "cpu"])
    assert exit_code == 2
    assert "never downloads" in stderr and "Traceback" not in stderr


def test_config_errors_are_all_reported_before_training(refused, demo_data, tmp_path):
    args = pretrain_flags(demo_data, str(tmp_path), tensor_parallel_degree=3, fp16_opt_level="O2", split="a,b") + ["--device", "gpu"]
    exit_code, stderr = refused(PRETRAIN_RECIPE, args)
    assert exit_code == 2
    for message in ("does not divide num_attention_heads=4", "--fp16_opt_level O2 needs --fp16 or --bf16", "--split 'a,b'", "--device gpu but this Paddle build has no CUDA"):
        assert message in stderr, message
    assert "Traceback" not in stderr


def test_continue_training_beyond_trained_positions_is_refused(refused, demo_data, saved_tiny_models, tmp_path):
    args = pretrain_flags(demo_data, str(tmp_path), model=saved_tiny_models["llama"], continue_training=1, max_seq_length=4096)
    exit_code, stderr = refused(PRETRAIN_RECIPE, args)
    assert exit_code == 2 and "exceeds the model's max_position_embeddings=2048" in stderr


def test_wrong_data_path_names_the_file(tmp_path):
    """Through the script itself: run_pretrain.py exits 2 with the one-line message."""
    result = run_script([RUN_PRETRAIN] + pretrain_flags(str(tmp_path / "nope"), str(tmp_path / "o")), check=False)
    assert result.returncode == 2 and f"{tmp_path / 'nope'}.idx: missing" in result.stderr


@pytest.mark.slow  # three training runs
def test_kill_and_resume_gives_the_uninterrupted_loss_curve(demo_data, tmp_path):
    common = dict(max_steps=16, save_steps=4, logging_steps=1, eval_steps=100)
    reference = str(tmp_path / "reference")
    run_script([RUN_PRETRAIN] + pretrain_flags(demo_data, reference, **common))

    crashed = str(tmp_path / "crashed")
    command = [sys.executable, RUN_PRETRAIN] + pretrain_flags(demo_data, crashed, **common)
    process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(crashed, "checkpoint-8", "paddle_llm_complete.json")
    deadline = time.time() + 300
    while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.path.exists(marker), "the run ended before its second checkpoint"
    # a save the crash interrupted: files present, completion marker absent
    half_written = os.path.join(crashed, "checkpoint-12")
    os.makedirs(half_written, exist_ok=True)
    with open(os.path.join(half_written, "model_state.pdparams"), "wb") as f:
        f.write(b"truncated")

    result = run_script(command[1:])  # the very same command line
    assert "resuming from" in result.stderr
    reference_losses, resumed_losses = train_losses(reference), train_losses(crashed)
    assert sorted(resumed_losses) == list(range(1, 17))  # no step missing, none twice
    for step, loss in reference_losses.items():
        assert resumed_losses[step] == pytest.approx(loss, abs=1e-6), step


@pytest.mark.slow  # a two-process launch
def test_data_parallel_two_processes_match_one_process(demo_data, tmp_path):
    single = str(tmp_path / "single")
    run_script([RUN_PRETRAIN] + pretrain_flags(demo_data, single, max_steps=5, logging_steps=1, per_device_train_batch_size=4))
    double = str(tmp_path / "dp2")
    launch = ["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "log"), RUN_PRETRAIN]
    run_script(launch + pretrain_flags(demo_data, double, max_steps=5, logging_steps=1, per_device_train_batch_size=2))
    single_losses, double_losses = train_losses(single), train_losses(double)
    rank_0_log = (tmp_path / "log" / "workerlog.0").read_text()
    assert "all 2 ranks finished; exiting without native teardown" in rank_0_log
    if shutil.which("g++") or shutil.which("c++"):
        assert "cpu fast paths on compiled CPU kernels" in rank_0_log
    assert sorted(double_losses) == [1, 2, 3, 4, 5]
    for step, loss in single_losses.items():
        assert double_losses[step] == pytest.approx(loss, rel=1e-5), step
