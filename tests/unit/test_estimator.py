"""Memory estimator: DeepSpeed's numbers, Korthikanti's table, parameter counts, monotonicity, adapters, the CLI."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paddle_llm.config.presets import preset
from paddle_llm.estimator import deepspeed_compat
from paddle_llm.estimator.activations import korthikanti_layer_bytes
from paddle_llm.estimator.command import build_parser, main
from paddle_llm.estimator.flags import setup_from_flags
from paddle_llm.estimator.memory import TrainingSetup, estimate, estimate_training_memory, shape_of
from paddle_llm.estimator.planner import plan_layouts, startup_report
from paddle_llm.estimator.shapes import generic_shape, parse_count, shape_from_config, shape_from_num_params
from paddle_llm.models.registry import FAMILIES

# t5-3b, the model of the seed's DeepSpeed example: DeepSpeed prints int(P/1e6), so "2851M total params, 32M largest
# layer params" are these exact counts (the largest layer is the shared 32128 x 1024 embedding).
T5_3B_PARAMS = 2_851_598_336
T5_3B_LARGEST_LAYER = 32_899_072

LLAMA_2_7B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
}
CHATGLM_6B = {"model_type": "chatglm", "hidden_size": 4096, "inner_hidden_size": 16384, "num_layers": 28,
              "num_attention_heads": 32, "vocab_size": 130528}
CHATGLM2_6B = {"model_type": "chatglm_v2", "hidden_size": 4096, "ffn_hidden_size": 13696, "num_layers": 28,
               "num_attention_heads": 32, "kv_channels": 128, "multi_query_attention": True,
               "multi_query_group_num": 2, "padded_vocab_size": 65024, "add_qkv_bias": True, "seq_length": 32768}
# config.json of Qwen3-0.6B and ERNIE-4.5-0.3B (the fields that size them).
QWEN3_0_6B = {"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
              "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
              "tie_word_embeddings": True}
ERNIE4_5_0_3B = {"model_type": "ernie4_5", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 18,
                 "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 103424,
                 "tie_word_embeddings": True, "use_bias": False}
QWEN2_5_0_5B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}


# --- DeepSpeed compatibility: the seed's numbers, to the printed digit -----------------------------------------


def test_zero2_reproduces_the_seed():
    rows = [row.format() for row in deepspeed_compat.zero2_table(T5_3B_PARAMS, num_gpus_per_node=8, num_nodes=1)]
    assert rows == [
        "  127.48GB |   5.31GB | offload_optimizer=cpu ",
        "  127.48GB |  15.93GB | offload_optimizer=none",
    ]


def test_zero3_reproduces_the_seeds_six_rows():
    rows = deepspeed_compat.zero3_table(T5_3B_PARAMS, T5_3B_LARGEST_LAYER, num_gpus_per_node=8, num_nodes=1)
    printed = [(f"{r.per_cpu_bytes / 2**30:.2f}", f"{r.per_gpu_bytes / 2**30:.2f}", r.options) for r in rows]
    assert printed == [
        ("71.71", "0.12", "offload_param=cpu , offload_optimizer=cpu , zero_init=1"),
        ("127.48", "0.12", "offload_param=cpu , offload_optimizer=cpu , zero_init=0"),
        ("63.74", "0.79", "offload_param=none, offload_optimizer=cpu , zero_init=1"),
        ("127.48", "0.79", "offload_param=none, offload_optimizer=cpu , zero_init=0"),
        ("1.47", "6.10", "offload_param=none, offload_optimizer=none, zero_init=1"),
        ("127.48", "6.10", "offload_param=none, offload_optimizer=none, zero_init=0"),
    ]


def test_model_states_only_cli_prints_deepspeeds_header_and_rows(capsys):
    code = main(["--num_params", str(T5_3B_PARAMS), "--largest_layer_params", str(T5_3B_LARGEST_LAYER),
                 "--num_gpus", "8", "--model_states_only"])
    out = capsys.readouterr().out
    assert code == 0
    assert "HW: Setup with 1 node, 8 GPUs per node." in out
    assert "SW: Model with 2851M total params, 32M largest layer params." in out
    assert "  127.48GB |  15.93GB | offload_optimizer=none" in out
    assert "    1.47GB |   6.10GB | offload_param=none, offload_optimizer=none, zero_init=1" in out


def test_model_states_only_json_and_buffer_factor(capsys):
    main(["--num_params", "1e9", "--largest_layer_params", "1e8", "--num_gpus", "4", "--model_states_only",
          "--zero_stage", "3", "--additional_buffer_factor", "1.0", "--json"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 6 and {r["zero_stage"] for r in rows} == {3}
    no_offload = rows[4]  # offload_param=none, offload_optimizer=none, zero_init=1
    assert no_offload["per_gpu"] == 4 * 10**8 + int(18 * 10**9 / 4)
    assert no_offload["per_cpu"] == 10**8 * 4 * 4


# --- Korthikanti et al. 2022, table 2 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t, sp, recompute, expected",
    [
        (1, False, None, lambda s, b, h, a, t: s * b * h * (34 + 5 * a * s / h)),
        (8, False, None, lambda s, b, h, a, t: s * b * h * (10 + 24 / t + 5 * a * s / (h * t))),
        (8, True, None, lambda s, b, h, a, t: s * b * h / t * (34 + 5 * a * s / h)),
        (8, False, "core_attn", lambda s, b, h, a, t: s * b * h * (10 + 24 / t)),
        (8, True, "core_attn", lambda s, b, h, a, t: s * b * h / t * 34),
        (1, False, "full", lambda s, b, h, a, t: 2 * s * b * h),
    ],
)
def test_generic_table_is_korthikanti_table_2(t, sp, recompute, expected):
    s, b, h, a = 2048, 1, 12288, 96  # GPT-3 175B, the paper's running example
    got = korthikanti_layer_bytes(
        s, b, h, a, tensor_parallel_degree=t, sequence_parallel=sp, recompute_granularity=recompute
    )
    assert got == pytest.approx(expected(s, b, h, a, t), rel=1e-12)


# --- parameter counts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, expected",
    [
        (preset("tiny-llama"), 664_192),  # sum(p.numel()) of PaddleNLP's LlamaForCausalLM
        (LLAMA_2_7B, 6_738_415_616),  # Llama-2-7B
        (CHATGLM_6B, 6_173_286_400),  # ChatGLM-6B
        (CHATGLM2_6B, 6_243_584_000),  # ChatGLM2-6B
        (preset("tiny-qwen2"), 500_864),  # sum(p.numel()) of PaddleNLP's Qwen2ForCausalLM (tied head, q/k/v biases)
        (QWEN2_5_0_5B, 494_032_768),  # Qwen2.5-0.5B
        (preset("tiny-qwen3"), 598_912),  # sum(p.numel()) of our Qwen3ForCausalLM (head_dim 64, q/k head norms)
        (QWEN3_0_6B, 596_049_920),  # Qwen3-0.6B
        (preset("tiny-ernie4_5"), 598_656),  # sum(p.numel()) of our Ernie4_5ForCausalLM
        (ERNIE4_5_0_3B, 360_748_032),  # ERNIE-4.5-0.3B
        (preset("tiny-mistral"), 631_424),  # sum(p.numel()) of the PaddleNLP LlamaForCausalLM it builds
        ({"model_type": "mistral", "sliding_window": 4096}, 7_241_732_096),  # Mistral-7B-v0.1 (MistralConfig's defaults)
    ],
)
def test_parameter_counts_match_the_published_models(fields, expected):
    assert shape_of(fields).num_params == expected


def test_config_aliases_and_paddlenlp_defaults():
    shape = shape_from_config({"num_layers": 3, "padded_vocab_size": 500}, FAMILIES["chatglm2"])
    assert (shape.num_layers, shape.vocab_size, shape.hidden_size, shape.num_key_value_heads) == (3, 500, 4096, 1)


@pytest.mark.parametrize("text, count", [("7e9", 7 * 10**9), ("7B", 7 * 10**9), ("2851M", 2_851_000_000),
                                         ("2851598336", 2_851_598_336), ("1.5G", 1_500_000_000), ("32k", 32_000)])
def test_parse_count(text, count):
    assert parse_count(text) == count


def test_parse_count_rejects_words():
    with pytest.raises(ValueError, match="7e9, 7B"):
        parse_count("seven billion")


def test_guessed_shape_keeps_the_declared_count_and_says_what_it_guessed():
    shape = shape_from_num_params(7 * 10**9)
    assert shape.num_params == 7 * 10**9
    assert set(shape.guessed) == {"vocab_size", "num_layers", "hidden_size", "num_attention_heads"}
    layer = sum(m.params for m in shape.linear_modules) + shape.norm_params_per_layer
    own_count = shape.non_layer_params + shape.num_layers * layer
    assert own_count == pytest.approx(7e9, rel=0.1)


# --- monotonicity ------------------------------------------------------------------------------------------------

shapes = st.builds(
    lambda layers, heads, head_dim, ffn_factor, vocab: generic_shape(layers, heads * head_dim, heads, vocab)
    if ffn_factor == 0
    else shape_from_config(
        {"num_hidden_layers": layers, "hidden_size": heads * head_dim, "num_attention_heads": heads,
         "intermediate_size": heads * head_dim * ffn_factor, "vocab_size": vocab},
        FAMILIES["llama"],
    ),
    layers=st.integers(2, 48),
    heads=st.sampled_from([4, 8, 16, 32]),
    head_dim=st.sampled_from([32, 64, 128]),
    ffn_factor=st.integers(0, 4),
    vocab=st.integers(16, 2400).map(lambda k: 64 * k),  # padded, as real vocabularies are
)
setups = st.builds(
    TrainingSetup,
    method=st.sampled_from(["full", "lora", "prefix"]),
    precision=st.sampled_from(["fp32", "bf16"]),
    amp_level=st.sampled_from(["O1", "O2"]),
    optimizer=st.sampled_from(["adamw", "sgd", "lomo"]),
    use_flash_attention=st.booleans(),
    seq_length=st.integers(16, 8192),
    micro_batch_size=st.integers(1, 16),
    gpus_per_node=st.just(8),
    num_prefix_tokens=st.integers(1, 256),
)


def _total(shape, setup, **changes):
    return estimate(shape, replace(setup, **changes)).per_device.total


@settings(max_examples=60, deadline=None)
@given(shape=shapes, setup=setups, longer=st.integers(1, 4096), larger=st.integers(1, 16))
def test_memory_rises_with_sequence_length_and_batch(shape, setup, longer, larger):
    base = _total(shape, setup)
    assert _total(shape, setup, seq_length=setup.seq_length + longer) > base
    assert _total(shape, setup, micro_batch_size=setup.micro_batch_size + larger) > base


@settings(max_examples=60, deadline=None)
@given(shape=shapes, setup=setups)
def test_memory_falls_with_sharding_stage(shape, setup):
    totals = [_total(shape, setup, sharding_stage=stage) for stage in (0, 1, 2, 3)]
    assert totals == sorted(totals, reverse=True)
    if setup.method == "full" and setup.optimizer == "adamw":
        assert totals[3] < totals[0]


@settings(max_examples=60, deadline=None)
@given(shape=shapes, setup=setups, sequence_parallel=st.booleans())
def test_memory_falls_with_tensor_parallel_degree(shape, setup, sequence_parallel):
    degrees = [t for t in (1, 2, 4, 8) if shape.num_attention_heads % t == 0]
    totals = [
        _total(shape, setup, tensor_parallel_degree=t, sequence_parallel=sequence_parallel and t > 1)
        for t in degrees
    ]
    assert totals == sorted(totals, reverse=True)
    assert totals[-1] < totals[0]


@settings(max_examples=60, deadline=None)
@given(shape=shapes, setup=setups)
def test_memory_falls_with_recompute(shape, setup):
    granularities = ("core_attn", "full_attn", "full")
    no_recompute = estimate(shape, setup).per_device
    with_recompute = [estimate(shape, _recompute(setup, g)).per_device for g in granularities]
    for device in with_recompute:
        assert device.total <= no_recompute.total
    kept = [no_recompute.activations] + [d.activations for d in with_recompute]
    assert kept == sorted(kept, reverse=True)
    assert with_recompute[-1].total < no_recompute.total


def _recompute(setup, granularity):
    return replace(setup, recompute=True, recompute_granularity=granularity)


# --- adapters: only adapter parameters get gradients and optimizer states --------------------------------------


@pytest.mark.parametrize("precision, amp_level, state_bytes", [("fp32", "O1", 8), ("bf16", "O2", 12)])
def test_lora_counts_only_adapter_optimizer_state(precision, amp_level, state_bytes):
    result = estimate_training_memory(LLAMA_2_7B, method="lora", lora_rank=8, precision=precision, amp_level=amp_level)
    adapters = 32 * (4 * 8 * (4096 + 4096) + 3 * 8 * (4096 + 11008))  # q, k, v, o and gate, up, down per layer
    assert result.details.trainable_params == adapters == 19_988_480
    assert result.per_device.optimizer == state_bytes * adapters
    assert result.per_device.grads == 4 * adapters if precision == "fp32" else 2 * adapters
    weight_bytes = 4 if precision == "fp32" else 2
    assert result.per_device.params == weight_bytes * (6_738_415_616 + adapters)


def test_lora_targets_select_modules_by_name_or_regex():
    shape = shape_of(LLAMA_2_7B)
    by_name = shape.lora_targets(("q_proj", "v_proj"))
    by_regex = shape.lora_targets((".*q_proj.*", ".*v_proj.*"))
    assert by_name == by_regex and [m.name for m in by_name] == ["self_attn.q_proj", "self_attn.v_proj"]
    result = estimate_training_memory(LLAMA_2_7B, method="lora", lora_rank=16, lora_target_modules=("q_proj", "v_proj"))
    assert result.details.trainable_params == 32 * 2 * 16 * (4096 + 4096)
    with pytest.raises(ValueError, match="q_proj, k_proj"):
        shape.lora_targets(("query_key_value",))


def test_prefix_counts_only_prefix_optimizer_state():
    result = estimate_training_memory(LLAMA_2_7B, method="prefix", num_prefix_tokens=64)
    prefix = 64 * 32 * 2 * 4096
    assert result.details.trainable_params == prefix
    assert result.per_device.optimizer == 8 * prefix
    assert result.per_device.grads == 4 * prefix


def test_lomo_keeps_one_gradient_and_no_state():
    result = estimate_training_memory(LLAMA_2_7B, optimizer="lomo", precision="bf16", amp_level="O2")
    assert result.per_device.optimizer == 0
    assert result.per_device.grads == 2 * 32000 * 4096  # the embedding is the largest tensor


def test_full_mixed_precision_adamw_is_sixteen_bytes_per_parameter():
    result = estimate_training_memory(LLAMA_2_7B, precision="bf16", amp_level="O2")
    assert result.per_device.model_states == 16 * 6_738_415_616


# --- validation says what to change -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs, message",
    [
        (dict(pipeline_parallel_degree=2, sharding_stage=2, gpus_per_node=4), "use --sharding stage1"),
        (dict(tensor_parallel_degree=3, gpus_per_node=3), "must divide the 32 attention heads"),
        (dict(gpus_per_node=6, tensor_parallel_degree=4), "not divisible"),
        (dict(sharding_stage=1, sharding_offload=True, gpus_per_node=2), "stage2 offload"),
        (dict(method="prefix", pipeline_parallel_degree=2, gpus_per_node=2), "prefix tuning"),
    ],
)
def test_invalid_layouts_name_the_flag_to_change(knobs, message):
    with pytest.raises(ValueError, match=message):
        estimate_training_memory(LLAMA_2_7B, **knobs)


def test_o2_without_16bit_is_refused(capsys):
    assert main(["--model_name_or_path", "tiny-llama", "--fp16_opt_level", "O2"]) == 2
    assert "--fp16_opt_level O2 needs --fp16 or --bf16" in capsys.readouterr().err


# --- CLI -----------------------------------------------------------------------------------------------------------


def test_json_has_the_documented_fields(capsys):
    assert main(["--model_name_or_path", "tiny-llama", "--max_seq_length", "128", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    device = payload["per_device"]
    assert set(device) == {"params", "grads", "optimizer", "activations", "buffers", "total"}
    assert device["total"] == sum(device[k] for k in ("params", "grads", "optimizer", "activations", "buffers"))
    assert isinstance(payload["per_host_cpu"], int) and payload["fits"] is True
    assert device["params"] == 4 * 664_192


def test_text_output_reports_every_kind(capsys):
    main(["--model_name_or_path", "tiny-llama", "--lora", "--bf16", "--fp16_opt_level", "O2"])
    out = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimizer", "activations", "buffers", "total", "per host CPU RAM", "fits"):
        assert word in out


def test_plan_commands_are_pasteable_and_round_trip(capsys, tmp_path):
    config = tmp_path / "llama-2-7b"
    config.mkdir()
    (config / "config.json").write_text(json.dumps(LLAMA_2_7B))
    argv = ["--model_name_or_path", str(config), "--bf16", "--fp16_opt_level", "O2", "--num_gpus", "8",
            "--use_flash_attention", "--plan", "--json"]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["fits"] is False and payload["plans"]
    speeds = [plan["tokens_per_s"] for plan in payload["plans"]]
    assert speeds == sorted(speeds, reverse=True)
    command = shlex.split(payload["plans"][0]["command"])
    assert command[:6] == ["python", "-u", "-m", "paddle.distributed.launch", "--gpus", "0,1,2,3,4,5,6,7"]
    assert command[6] == "run_pretrain.py"
    # The pasted flags, read back by the same parser, describe a layout that fits.
    flags = build_parser().parse_args(command[7:] + ["--num_gpus", "8"])
    result = estimate(shape_of(LLAMA_2_7B), setup_from_flags(vars(flags)))
    assert result.fits is True
    assert result.per_device.total == payload["plans"][0]["per_device_total"]


def test_plan_prefers_no_offload_and_no_recompute_when_memory_allows():
    shape = shape_of(preset("tiny-llama"))
    plans = plan_layouts(shape, TrainingSetup(gpus_per_node=8, seq_length=512), "tiny-llama")
    best = plans[0].setup
    assert not best.sharding_offload and not best.recompute and best.tensor_parallel_degree == 1


def test_plan_keeps_tensor_parallel_inside_a_node():
    plans = plan_layouts(shape_of(LLAMA_2_7B), TrainingSetup(gpus_per_node=4, num_nodes=2, precision="bf16",
                                                             amp_level="O2"), "m")
    assert plans and all(p.setup.tensor_parallel_degree <= 4 for p in plans)
    assert all("--nnodes 2 --master MASTER_IP:PORT" in p.command for p in plans)


def test_plan_says_when_nothing_fits(capsys):
    main(["--num_params", "70B", "--num_gpus", "1", "--gpu_memory_gb", "24", "--plan"])
    assert "no layout fits" in capsys.readouterr().out


def test_unknown_model_is_an_error_not_a_download(capsys):
    assert main(["--model_name_or_path", "meta-llama/Llama-2-7b-hf"]) == 2
    assert "never downloads" in capsys.readouterr().err


def test_startup_report_warns_and_names_the_planners_layout():
    setup = setup_from_flags({"bf16": True, "fp16_opt_level": "O2", "num_gpus": 8, "use_flash_attention": True})
    report = startup_report(shape_of(LLAMA_2_7B), setup, "./llama-2-7b")
    assert "fits: NO" in report
    assert "WARNING: this run will likely run out of memory" in report
    assert "python -u -m paddle.distributed.launch" in report and "--sharding" in report
    fitting = setup_from_flags({"bf16": True, "fp16_opt_level": "O2", "num_gpus": 8, "sharding": "stage2"})
    assert "WARNING" not in startup_report(shape_of(LLAMA_2_7B), fitting, "./llama-2-7b")


# Rank 0's peak under TP2 on 2 CPU processes, 48M Llama, sequence 256 x batch 2 (tests/integration/
# test_estimator_measured.py, Paddle 3.3.1): 629,143,648 bytes without sequence parallel, 611,824,736 with it.
MEASURED_SEQUENCE_PARALLEL_SAVING = 629_143_648 - 611_824_736


def test_sequence_parallel_saving_leaves_the_column_parallel_inputs_whole():
    """Paddle's column-parallel linears each keep a whole-sequence copy of their input (c_identity; the all-gather
    under sequence parallel), so sequence parallel saves ~17 MB here, not the 28 MB of splitting every replicated
    tensor (Megatron's accounting, which the estimator used before)."""
    from paddle_llm.estimator.measure import LLAMA_48M

    def total(sequence_parallel: bool) -> int:
        knobs = {"seq_length": 256, "micro_batch_size": 2, "tensor_parallel_degree": 2, "sequence_parallel": sequence_parallel}
        return estimate_training_memory(LLAMA_48M, device="cpu", gpu_memory_gb=None, gpus_per_node=2, **knobs).per_device.total

    saving = total(False) - total(True)
    assert saving == pytest.approx(MEASURED_SEQUENCE_PARALLEL_SAVING, rel=0.15), saving
