"""What ``paddle-llm selftest`` takes from the planned run's flags: the family, layout, precision and tiny shape."""

from __future__ import annotations

import json

import pytest

from paddle_llm.config.parser import ArgumentError


def test_layout_precision_and_kernel_flags_are_kept_and_the_rest_is_the_selftests(tmp_path):
    from paddle_llm.tools.selftest import TOLERANCE, make_plan

    plan = make_plan([
        "--model_name_or_path", "tiny-qwen2", "--output_dir", "out/real", "--max_steps", "100000",
        "--tensor_parallel_degree", "2", "--sharding", "stage2", "--bf16", "1", "--fp16_opt_level", "O2",
        "--use_flash_attention", "1", "--learning_rate", "1e-4", "--device", "gpu", "--selftest_dir", str(tmp_path),
    ])
    assert plan.family == "qwen2"
    assert plan.layout == {"device": "gpu", "tensor_parallel_degree": 2, "sharding": "stage2", "bf16": True, "fp16_opt_level": "O2", "use_flash_attention": True}
    assert (plan.dtype, plan.tolerance) == ("bfloat16", TOLERANCE[("gpu", "bfloat16")])
    assert plan.directory == str(tmp_path)


def test_cpu_runs_compare_in_float32_and_an_args_file_comes_first(tmp_path):
    from paddle_llm.tools.selftest import make_plan

    args = tmp_path / "args.json"
    args.write_text(json.dumps({"model_name_or_path": "tiny-chatglm2", "output_dir": "out", "fp16": True, "device": "cpu"}))
    plan = make_plan([str(args), "--sharding", "stage2"])
    assert (plan.family, plan.device, plan.dtype, plan.tolerance) == ("chatglm2", "cpu", "float32", 1e-5)
    assert plan.layout["sharding"] == "stage2" and plan.layout["fp16"] is True  # the CPU fallback warns in the run


def test_a_hub_name_is_refused_with_what_to_pass():
    from paddle_llm.tools.selftest import make_plan

    with pytest.raises(ArgumentError, match="--model_name_or_path: .*local directory"):
        make_plan(["--model_name_or_path", "meta-llama/Llama-2-7b"])


def test_the_tiny_shape_keeps_the_head_ratio_and_fits_the_tensor_parallel_degree():
    # Llama-2-70B-like: 64 query heads share 8 key/value heads; TP8 needs 8 heads, each its own KV head
    from paddle_llm.tools.selftest import tiny_shape

    assert tiny_shape("llama", {"num_attention_heads": 64, "num_key_value_heads": 8}, 8) == {
        "num_attention_heads": 8, "hidden_size": 256, "intermediate_size": 704, "num_key_value_heads": 8,
    }
    # grouped 4:1 on one device: the tiny model's 4 heads share one key/value head
    assert tiny_shape("llama", {"num_attention_heads": 32, "num_key_value_heads": 8}, 1) == {"num_key_value_heads": 1}
    assert tiny_shape("chatglm", {"num_attention_heads": 32}, 8) == {"num_attention_heads": 8, "hidden_size": 256, "inner_hidden_size": 1024}


# layout -> (the planned run's flags, what the plan keeps of them, the tiny model's layers when deepened)
LAYOUT_PLANS = {
    "tensor parallel 2 + sequence parallel": (
        ["--tensor_parallel_degree", "2", "--sequence_parallel", "1"], {"tensor_parallel_degree": 2, "sequence_parallel": True}, None,
    ),
    "sharding stage 1 x tensor parallel 2": (["--tensor_parallel_degree", "2", "--sharding", "stage1"], {"tensor_parallel_degree": 2, "sharding": "stage1"}, None),
    "sharding stage 2 x tensor parallel 2": (["--tensor_parallel_degree", "2", "--sharding", "stage2"], {"tensor_parallel_degree": 2, "sharding": "stage2"}, None),
    # 4 stages x 2 virtual stages: 8 layers, one per chunk
    "pipeline 4 x virtual 2": (
        ["--pipeline_parallel_degree", "4", "--virtual_pp_degree", "2", "--gradient_accumulation_steps", "4"],
        {"pipeline_parallel_degree": 4, "virtual_pp_degree": 2, "gradient_accumulation_steps": 4}, 8,
    ),
    # GPU-only (flash attention); kept, so the run under test is the planned one
    "context parallel 2 (GPU)": (
        ["--context_parallel_degree", "2", "--use_flash_attention", "1"], {"context_parallel_degree": 2, "use_flash_attention": True}, None,
    ),
    # kept, so the selftest's run refuses it with check's reason instead of silently testing another layout
    "sep parallel 2 (refused)": (["--sep_parallel_degree", "2"], {"sep_parallel_degree": 2}, None),
}


@pytest.mark.parametrize("layout", LAYOUT_PLANS)
def test_each_parallel_layout_flag_reaches_the_plan(tmp_path, layout):
    from paddle_llm.tools.selftest import DEEP_LEARNING_RATE, LEARNING_RATE, make_plan

    flags, kept, layers = LAYOUT_PLANS[layout]
    plan = make_plan(["--model_name_or_path", "tiny-llama", "--device", "gpu", *flags, "--selftest_dir", str(tmp_path)])
    assert {name: plan.layout[name] for name in kept} == kept
    assert plan.overrides.get("num_hidden_layers") == layers
    assert plan.learning_rate == (DEEP_LEARNING_RATE if layers else LEARNING_RATE)
