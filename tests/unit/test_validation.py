"""Early configuration checks: one row per rule, each error saying what to change."""

import pytest

from paddle_llm.config.presets import preset
from paddle_llm.config.validation import (
    apply_cpu_fallbacks,
    check_device,
    check_parallel,
    check_precision,
    check_split,
    sharding_stages,
)

LLAMA = preset("tiny-llama")  # 4 heads, 4 KV heads, 2 layers, vocab 1024
CHATGLM2 = preset("tiny-chatglm2")  # 4 heads, 2 KV groups


@pytest.mark.parametrize(
    "values, model, world_size, message",
    [
        ({"pipeline_parallel_degree": 2, "sharding": "stage2", "gradient_accumulation_steps": 2}, LLAMA, 2, "cannot be combined with --sharding stage2"),
        ({"pipeline_parallel_degree": 2, "sharding": "stage3 offload", "gradient_accumulation_steps": 2}, LLAMA, 2, "cannot be combined"),
        ({"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2, "gradient_accumulation_steps": 2}, LLAMA, 6, "world size 6 is not divisible by tensor_parallel_degree × pipeline_parallel_degree = 4"),
        ({"tensor_parallel_degree": 3}, LLAMA, 3, "tensor_parallel_degree=3 does not divide num_attention_heads=4: use 1, 2, 4"),
        ({"tensor_parallel_degree": 4}, CHATGLM2, 4, "tensor_parallel_degree=4 does not divide num_key_value_heads=2: use 1, 2"),
        ({"tensor_parallel_degree": 3}, dict(LLAMA, num_attention_heads=3, num_key_value_heads=3, vocab_size=1000), 3, "does not divide vocab_size=1000"),
        ({"pipeline_parallel_degree": 4, "gradient_accumulation_steps": 4}, LLAMA, 4, "num_layers=2 is not divisible by pipeline_parallel_degree × virtual_pp_degree = 4"),
        ({"pipeline_parallel_degree": 2, "virtual_pp_degree": 2, "gradient_accumulation_steps": 2}, LLAMA, 2, "virtual_pp_degree = 4"),
        ({"pipeline_parallel_degree": 2, "gradient_accumulation_steps": 1}, LLAMA, 2, "gradient_accumulation_steps=1 < pipeline_parallel_degree=2"),
        ({"sharding": "stage4"}, LLAMA, 2, "unknown word 'stage4'"),
        ({"sharding_parallel_degree": 4, "sharding": "stage1"}, LLAMA, 2, "sharding_parallel_degree=4 does not divide the 2"),
    ],
)
def test_parallel_rules(values, model, world_size, message):
    errors = check_parallel(values, model, world_size)
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize(
    "values",
    [
        {"tensor_parallel_degree": 2},
        {"pipeline_parallel_degree": 2, "gradient_accumulation_steps": 4, "sharding": "stage1"},
        {"tensor_parallel_degree": -1, "pipeline_parallel_degree": -1, "sharding": "stage2"},
    ],
)
def test_valid_layouts_pass(values):
    assert check_parallel(values, LLAMA, 4) == []


def test_fp16_o2_without_half_precision_is_an_error():
    assert check_precision({"fp16_opt_level": "O2"}, {"fp16_opt_level"}) == [
        "--fp16_opt_level O2 needs --fp16 or --bf16 (O2 is pure half precision); add one, or drop --fp16_opt_level"
    ]
    # the seed's pipeline command says "--fp16 0 --fp16_opt_level O2": fp16 deliberately off, O2 moot
    assert check_precision({"fp16_opt_level": "O2", "fp16": False}, {"fp16_opt_level", "fp16"}) == []
    assert check_precision({"fp16_opt_level": "O2", "bf16": True}, {"fp16_opt_level", "bf16"}) == []
    assert "exclusive" in check_precision({"fp16": True, "bf16": True}, {"fp16", "bf16"})[0]


def test_gpu_device_without_cuda_says_what_to_do():
    (error,) = check_device({"device": "gpu"}, cuda_available=False)
    assert "pass --device cpu" in error
    assert check_device({"device": "cpu"}, cuda_available=False) == []


@pytest.mark.parametrize("split, ok", [("949,50,1", True), ("1,0,0", True), ("98,2", True), ("a,b", False), ("-1,2,3", False), ("0,0,0", False)])
def test_split(split, ok):
    assert (check_split(split) == []) is ok


def test_cpu_fallbacks_warn_once_per_gpu_only_flag():
    values = {"device": "cpu", "use_flash_attention": True, "use_fused_rms_norm": False, "fp16": True, "fp16_opt_level": "O2"}
    warnings = apply_cpu_fallbacks(values)
    assert [w.split(" ")[0] for w in warnings] == ["--use_flash_attention", "--fp16"]
    assert values["use_flash_attention"] is False and values["fp16"] is False and values["fp16_opt_level"] == "O1"
    gpu_values = {"device": "gpu", "use_flash_attention": True}
    assert apply_cpu_fallbacks(gpu_values) == [] and gpu_values["use_flash_attention"] is True


def test_sharding_forms():
    assert sharding_stages(True) == ["stage1"]
    assert sharding_stages("stage2 offload") == ["stage2", "offload"]
    assert sharding_stages("") == [] and sharding_stages(None) == []
