"""``paddle-llm doctor``: the checks fed faked environment facts (GPUs, versions and CPUs this machine does not have),
the fact readers on sample inputs, and one real run on this machine."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from paddle_llm import cli
from paddle_llm.tools import doctor
from paddle_llm.estimator.flags import estimate_for_flags
from paddle_llm.tools.doctor import (
    EnvironmentFacts,
    GpuFacts,
    PaddleFacts,
    Status,
    TrainingPlan,
    blocks_training,
    build_parser,
    find_constraints_file,
    format_table,
    format_version_code,
    parse_constraints,
    plan_from_args,
    cpu_model_name,
    run_checks,
    version_satisfies,
)

GIB = 2**30
PINS = parse_constraints(find_constraints_file().read_text(encoding="utf-8"))  # the repo's own pins, not a copy
PADDLE_PIN = PINS["paddlepaddle"].lstrip("=")
PADDLENLP_PIN = PINS["paddlenlp"].lstrip("=")
T4 = GpuFacts("Tesla T4", (7, 5), 15 * GIB)
A100 = GpuFacts("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GIB)
# A Llama-7B config.json, as PaddleNLP's facebook/llama-7b ships it.
LLAMA_7B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
    "num_hidden_layers": 32, "vocab_size": 32000, "max_position_embeddings": 2048,
}


def healthy_cpu_facts(**changes) -> EnvironmentFacts:
    """A CPU-only machine where every version matches the pins."""
    installed = {name: spec.lstrip("=<>~!") for name, spec in PINS.items()}
    facts = EnvironmentFacts(
        python_version="3.11.7",
        python_requirement=">=3.10",
        pins=PINS,
        pins_source="constraints.txt",
        installed=installed,
        paddle_distribution="paddlepaddle",
        paddlenlp_import_error=None,
        machine="x86_64",
        cpu_model="Intel(R) Xeon(R) Platinum 8369B",
        cpu_flags=frozenset({"sse42", "avx", "avx2", "fma3", "f16c"}),
        driver_gpus=(),
        paddle=PaddleFacts(version=PADDLE_PIN, commit="7688495538"),
        output_dir="/data/out",
        free_disk_bytes=500 * GIB,
        total_ram_bytes=64 * GIB,
        available_ram_bytes=60 * GIB,
    )
    return replace(facts, **changes)


def gpu_facts(*gpus: GpuFacts, nccl: str | None = "2.16.2", **changes) -> EnvironmentFacts:
    """A GPU machine with paddlepaddle-gpu at the pinned version."""
    paddle = PaddleFacts(
        version=PADDLE_PIN, compiled_with_cuda=True, compiled_with_nccl=nccl is not None, cuda_version="11.8",
        cudnn_version="8.9.6", nccl_version=nccl, gpus=gpus, has_flash_attention=True, has_fused_ops=True,
    )
    return healthy_cpu_facts(paddle=paddle, paddle_distribution="paddlepaddle-gpu", driver_gpus=tuple(g.name for g in gpus), **changes)


def row(facts: EnvironmentFacts, name: str, plan: TrainingPlan | None = None):
    results = run_checks(facts, plan or TrainingPlan())
    return next(result for result in results if result.name == name)


# -- versions ------------------------------------------------------------------------------------------------------


def test_healthy_cpu_machine_with_faked_environment_is_ready():
    results = run_checks(healthy_cpu_facts(), TrainingPlan(device="cpu"))
    assert not blocks_training(results)
    assert {r.name: r.status for r in results if r.status is not Status.SKIP} == {
        "python": Status.OK, "paddle": Status.OK, "paddlenlp": Status.OK, "other pins": Status.OK,
        "cpu instructions": Status.OK, "cpu kernel paths": Status.OK, "device": Status.OK, "output dir": Status.OK, "disk": Status.OK,
    }


def test_mismatched_paddle_with_faked_environment_fails_with_the_install_command():
    facts = healthy_cpu_facts(paddle=PaddleFacts(version="2.6.1"))
    result = row(facts, "paddle")
    assert result.status is Status.FAIL and "2.6.1" in result.found
    assert result.fix == f"pip install paddlepaddle=={PADDLE_PIN}"
    assert blocks_training(run_checks(facts, TrainingPlan()))


def test_mismatched_paddle_gpu_with_faked_environment_points_at_paddles_own_index():
    facts = gpu_facts(A100)
    facts = replace(facts, paddle=replace(facts.paddle, version="3.0.0"))
    fix = row(facts, "paddle").fix
    assert fix.startswith(f"pip install paddlepaddle-gpu=={PADDLE_PIN} -i https://www.paddlepaddle.org.cn/")


def test_paddle_develop_build_with_faked_environment_fails():
    # PaddleNLP's old llama notes said "needs a paddle develop build"; those report 0.0.0.
    result = row(healthy_cpu_facts(paddle=PaddleFacts(version="0.0.0", commit="abcdef0123456789")), "paddle")
    assert result.status is Status.FAIL and "develop build, commit abcdef0123" in result.found


def test_paddle_that_does_not_import_with_faked_environment_fails_with_the_error():
    facts = healthy_cpu_facts(paddle=PaddleFacts(import_error="OSError: libcudart.so.11.0: cannot open shared object file"))
    result = row(facts, "paddle")
    assert result.status is Status.FAIL and "libcudart" in result.found


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"installed": {**healthy_cpu_facts().installed, "paddlenlp": "2.6.1"}}, "2.6.1 (tested: =="),
        ({"installed": {**healthy_cpu_facts().installed, "paddlenlp": None}}, "not installed"),
        ({"paddlenlp_import_error": "ModuleNotFoundError: No module named 'aistudio_sdk.hub'"}, "aistudio_sdk"),
    ],
)
def test_paddlenlp_problems_with_faked_environment_fail(change, expected):
    result = row(healthy_cpu_facts(**change), "paddlenlp")
    assert result.status is Status.FAIL and expected in result.found
    assert f"paddlenlp=={PADDLENLP_PIN}" in result.fix


def test_other_pins_mismatch_with_faked_environment_warns():
    installed = {**healthy_cpu_facts().installed, "datasets": "3.0.0", "protobuf": "5.28.0"}
    result = row(healthy_cpu_facts(installed=installed), "other pins")
    assert result.status is Status.WARN and "datasets 3.0.0" in result.found and "protobuf 5.28.0" in result.found
    assert result.fix == "pip install -c constraints.txt -r requirements.txt"


def test_python_outside_the_requirement_with_faked_environment_fails():
    assert row(healthy_cpu_facts(python_version="3.8.18"), "python").status is Status.FAIL


def test_the_pins_come_from_the_repos_constraints_file():
    assert find_constraints_file().name == "constraints.txt"
    assert PINS["paddlepaddle"].startswith("==") and PINS["paddlenlp"].startswith("==")
    with pytest.raises(ValueError, match="line 2"):
        parse_constraints("# comment\nnot a requirement ==\n")


@pytest.mark.parametrize(
    "installed, specifier, expected",
    [
        ("3.3.1", "==3.3.1", True),
        ("3.3.1.post118", "==3.3.1", True),  # Paddle's GPU index tags the CUDA version this way
        ("3.3.1+cu118", "==3.3.1", True),
        ("3.0.0b4", "==3.0.0b4", True),
        ("3.0.0", "==3.0.0b4", False),
        ("2024.2.0", "<=2024.3.1", True),
        ("not a version", "==1", False),
    ],
)
def test_version_satisfies(installed, specifier, expected):
    assert version_satisfies(installed, specifier) is expected


# -- CPU -----------------------------------------------------------------------------------------------------------


def test_cpu_without_avx_with_faked_environment_fails():
    result = row(healthy_cpu_facts(cpu_flags=frozenset({"sse4_2"})), "cpu instructions")
    assert result.status is Status.FAIL and "no AVX" in result.found and "AVX" in result.fix


def test_cpu_with_avx_but_not_avx2_with_faked_environment_warns():
    assert row(healthy_cpu_facts(cpu_flags=frozenset({"avx"})), "cpu instructions").status is Status.WARN


def test_arm_cpu_with_faked_environment_skips_the_avx_check():
    assert row(healthy_cpu_facts(machine="aarch64", cpu_flags=frozenset({"neon"})), "cpu instructions").status is Status.SKIP


def test_cpu_model_name_from_cpuinfo():
    text = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2\n\nprocessor\t: 1\n"
    assert cpu_model_name(text) == "AMD EPYC 7B13"


def test_cpu_kernel_paths_row_follows_the_cpu_features():
    avx2 = row(healthy_cpu_facts(cpu_flags=frozenset({"avx", "avx2", "fma3", "f16c"})), "cpu kernel paths").found
    assert avx2.startswith("avx2:") and "-mavx2 -mfma -mf16c" in avx2 and "-mavx512f" not in avx2
    assert "fused RMSNorm no (needs avx512f" in avx2 and "without self_attention_fuse_pass" in avx2
    avx512 = frozenset({"avx", "avx2", "fma3", "f16c", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
    found = row(healthy_cpu_facts(cpu_flags=avx512), "cpu kernel paths").found
    assert found.startswith("avx512:") and "-mavx512f" in found and "fused RMSNorm yes" in found


# -- GPU -----------------------------------------------------------------------------------------------------------


def test_gpu_with_capability_7_5_with_faked_environment_warns_about_flash_attention():
    facts = gpu_facts(T4)
    result = row(facts, "flash attention")
    assert result.status is Status.WARN and "7.5 < 8.0" in result.found
    assert "--use_flash_attention 0" in result.fix and "0.00x" in result.fix
    assert row(facts, "gpu").found.startswith("1 x Tesla T4 (compute capability 7.5, 15.00 GiB); CUDA 11.8, cuDNN 8.9.6")
    assert not blocks_training(run_checks(facts, TrainingPlan()))


def test_flash_attention_requested_on_capability_7_5_with_faked_environment_fails():
    result = row(gpu_facts(T4), "flash attention", TrainingPlan(use_flash_attention=True))
    assert result.status is Status.FAIL and result.fix.startswith("pass --use_flash_attention 0")


def test_a100_with_faked_environment_can_use_flash_attention_and_fused_ops():
    facts = gpu_facts(A100, A100)
    plan = TrainingPlan(use_flash_attention=True, use_fused_ops=True, processes=2)
    assert row(facts, "flash attention", plan).status is Status.OK
    assert row(facts, "fused ops", plan).status is Status.OK
    assert row(facts, "nccl", plan).status is Status.OK
    assert row(facts, "gpu", plan).found.startswith("2 x NVIDIA A100")


def test_several_gpus_without_nccl_with_faked_environment_fails():
    assert row(gpu_facts(A100, A100, nccl=None), "nccl").status is Status.FAIL


def test_gpus_behind_a_cpu_paddle_with_faked_environment_fails_when_training_on_gpu():
    facts = healthy_cpu_facts(driver_gpus=("Tesla V100-SXM2-32GB",))
    assert row(facts, "gpu", TrainingPlan(device="gpu")).status is Status.FAIL
    assert row(facts, "gpu", TrainingPlan(device="cpu")).status is Status.WARN
    assert row(facts, "device", TrainingPlan(device="gpu")).status is Status.FAIL


def test_no_device_flag_on_a_cpu_machine_with_faked_environment_warns_that_scripts_default_to_gpu():
    result = row(healthy_cpu_facts(), "device", TrainingPlan())
    assert result.status is Status.WARN and "--device cpu" in result.fix


@pytest.mark.parametrize("code, text", [(8906, "8.9.6"), (90100, "9.1.0"), ("21602", "2.16.2"), ("2804", "2.8.4"), ("0", None), ("False", None)])
def test_format_version_code(code, text):
    assert format_version_code(code) == text


# -- disk and memory -----------------------------------------------------------------------------------------------


def seven_b_plan(**flags) -> TrainingPlan:
    estimate = estimate_for_flags(LLAMA_7B, {"max_seq_length": 2048, "per_device_train_batch_size": 1, **flags})
    return TrainingPlan(device=flags.get("device", "gpu"), estimate=estimate)


def test_disk_without_room_for_the_checkpoints_with_faked_environment_fails():
    plan = seven_b_plan(device="cpu")
    result = row(healthy_cpu_facts(free_disk_bytes=50 * GIB), "disk", plan)
    assert result.status is Status.FAIL and "2 checkpoints + final model" in result.found  # 7B x 16 bytes x 2 > 50 GiB
    assert row(healthy_cpu_facts(free_disk_bytes=500 * GIB), "disk", plan).status is Status.OK


def test_ram_below_the_estimate_with_faked_environment_fails_and_names_the_knobs():
    result = row(healthy_cpu_facts(), "ram", seven_b_plan(device="cpu"))  # 7B full fine-tune on 64 GiB
    assert result.status is Status.FAIL and "--recompute 1" in result.fix and "--lora 1" in result.fix


def test_ram_within_total_but_above_available_with_faked_environment_warns():
    from paddle_llm.config.presets import preset

    plan = TrainingPlan(device="cpu", estimate=estimate_for_flags(preset("tiny-llama"), {"max_seq_length": 64, "device": "cpu"}))
    facts = healthy_cpu_facts(available_ram_bytes=plan.estimate.per_host_cpu // 2)
    assert row(facts, "ram", plan).status is Status.WARN
    assert row(healthy_cpu_facts(), "ram", plan).status is Status.OK


def test_gpu_memory_below_the_estimate_with_faked_environment_fails():
    plan = seven_b_plan()  # fp32 AdamW: 16 bytes per parameter alone is > 100 GiB
    assert row(gpu_facts(T4), "gpu memory", plan).status is Status.FAIL
    assert row(gpu_facts(A100), "gpu memory", seven_b_plan(lora=True, bf16=True, fp16_opt_level="O2")).status is Status.OK


def test_no_model_means_no_ram_check_with_a_hint():
    result = row(healthy_cpu_facts(), "ram")
    assert result.status is Status.SKIP and "--model_name_or_path" in result.fix


# -- flags ---------------------------------------------------------------------------------------------------------


def test_a_pasted_seed_command_line_is_understood_and_the_rest_ignored():
    argv = (
        "--gpus 0,1,2,3,4,5,6,7 --model_type llama --model_name_or_path tiny-llama --input_dir ./data "
        "--output_dir output/llama --split 949,50,1 --max_seq_length 2048 --per_device_train_batch_size 1 "
        "--use_flash_attention 1 --use_fused_rms_norm 0 --fp16 --fp16_opt_level O2 --scale_loss 1024 "
        "--sharding stage2 --recompute 1 --do_train --device gpu"
    ).split()
    args, ignored = build_parser().parse_known_args(argv)
    assert "--split" in ignored and "--scale_loss" in ignored
    plan = plan_from_args(args, gpu_facts(A100))
    assert plan.processes == 8 and plan.device == "gpu" and plan.use_flash_attention and not plan.use_fused_ops
    setup = plan.estimate.setup
    assert (setup.seq_length, setup.precision, setup.amp_level, setup.sharding_stage, setup.gpus_per_node) == (2048, "fp16", "O2", 2, 8)


def test_an_unknown_model_becomes_a_skipped_ram_row_with_the_reason():
    args, _ = build_parser().parse_known_args(["--model_name_or_path", "facebook/llama-7b"])
    plan = plan_from_args(args, healthy_cpu_facts())
    assert plan.estimate is None and "never downloads" in plan.estimate_error


# -- the command -------------------------------------------------------------------------------------------------------


def test_doctor_exits_non_zero_and_prints_the_fix_with_faked_environment(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "gather_facts", lambda output_dir: healthy_cpu_facts(cpu_flags=frozenset({"sse4_2"})))
    assert cli.main(["doctor", "--device", "cpu", "--some_training_flag", "3"]) == doctor.EXIT_BLOCKED
    out = capsys.readouterr().out
    assert "(not needed for these checks: --some_training_flag)" in out
    assert "cpu instructions  FAIL" in out and "fix: Paddle's PyPI wheels need AVX" in out
    assert "1 check(s) FAILED" in out


def test_format_table_puts_each_fix_under_its_row():
    text = format_table(run_checks(healthy_cpu_facts(paddle=PaddleFacts(version="2.6.1")), TrainingPlan(device="cpu")))
    lines = text.splitlines()
    paddle_line = next(i for i, line in enumerate(lines) if line.startswith("paddle "))
    assert "FAIL" in lines[paddle_line] and lines[paddle_line + 1].strip().startswith("fix: pip install paddlepaddle==")


def test_doctor_on_this_machine(tmp_path, capsys):
    # The real facts: this CPU machine runs the pinned stack (make install), so nothing may fail.
    argv = ["--json", "--output_dir", str(tmp_path / "out"), "--model_name_or_path", "tiny-llama", "--device", "cpu", "--max_seq_length", "64"]
    exit_code = doctor.main(argv)
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert exit_code == doctor.EXIT_OK, rows
    for name in ("python", "paddle", "paddlenlp", "disk", "ram"):
        assert rows[name]["status"] == "ok", rows[name]
    assert rows["paddle"]["found"].startswith(f"paddlepaddle {PADDLE_PIN}")
    assert rows["ram"]["found"].startswith("estimate ")


def test_finetune_max_length_sizes_the_estimate_and_defaults_fill_the_rest():
    args, _ = build_parser().parse_known_args(["--model_name_or_path", "tiny-llama", "--max_length", "512", "--device", "cpu"])
    setup = plan_from_args(args, healthy_cpu_facts()).estimate.setup
    assert (setup.seq_length, setup.micro_batch_size) == (512, doctor.TRAINING_DEFAULTS["per_device_train_batch_size"])
