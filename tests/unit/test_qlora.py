"""QLoRA's flags (both PaddleNLP spellings, early errors) and the quantized LoRA layer (forward, gradients, merge)."""

import json

import numpy as np
import paddle
import pytest

from paddle_llm.config.parser import parse_flags
from paddle_llm.config.presets import preset
from paddle_llm.config.validation import check_quantization
from paddle_llm.estimator.command import main as estimate_main
from paddle_llm.estimator.memory import quantized_weight_bytes
from paddle_llm.peft.quantize import QuantSpec, quantize


def finetune_types() -> tuple[type, ...]:
    """finetune_generation.py's argument dataclasses; imported when a test runs (they load PaddleNLP), not at collection."""
    from paddle_llm.config.arguments import FinetuneArguments, FinetuneDataArguments, ModelArguments, PeftArguments

    return ModelArguments, FinetuneDataArguments, PeftArguments, FinetuneArguments


LLAMA = preset("tiny-llama")


@pytest.mark.parametrize("spelling", [
    ["--qlora_weight_blocksize", "128", "--qlora_weight_double_quant", "True", "--qlora_weight_double_quant_block_size", "64"],
    ["--weight_blocksize", "128", "--weight_double_quant", "True", "--weight_double_quant_block_size", "64"],  # PaddleNLP 3.0.0b4
], ids=["llm-flags", "paddlenlp-3.0.0b4"])
def test_both_spellings_of_the_qlora_flags_parse_to_one_spec(spelling):
    parsed = parse_flags(["--output_dir", "o", "--lora", "True", "--weight_quantize_algo", "nf4"] + spelling, finetune_types())
    peft_args = parsed.build(finetune_types())[2]
    assert QuantSpec.from_arguments(peft_args) == QuantSpec("nf4", 128, True, 64)


def test_defaults_are_paddlenlps():
    peft_args = parse_flags(["--output_dir", "o", "--lora", "True", "--weight_quantize_algo", "fp4"], finetune_types()).build(finetune_types())[2]
    assert QuantSpec.from_arguments(peft_args) == QuantSpec("fp4", 64, False, 256)
    assert QuantSpec.from_arguments(parse_flags(["--output_dir", "o"], finetune_types()).build(finetune_types())[2]) is None


@pytest.mark.parametrize("values, message", [
    ({"weight_quantize_algo": "nf4"}, "add --lora True"),
    ({"weight_quantize_algo": "llm.int8", "lora": True}, "must be one of nf4, fp4, weight_only_int8, weight_only_int4"),
    ({"weight_quantize_algo": "nf4", "lora": True, "qlora_weight_blocksize": 48}, "--qlora_weight_blocksize 48 does not divide hidden_size=128"),
    ({"weight_quantize_algo": "nf4", "lora": True, "qlora_weight_blocksize": 3}, "must be an even number"),
    ({"weight_quantize_algo": "weight_only_int8", "lora": True, "qlora_weight_double_quant": True}, "one scale per output channel"),
    ({"qlora_weight_double_quant": True}, "add --weight_quantize_algo nf4"),
    ({"weight_quantize_algo": "nf4", "lora": True, "prefix_tuning": True}, "drop --prefix_tuning"),
    ({"weight_quantize_algo": "nf4", "lora": True, "tensor_parallel_degree": 2}, "use --tensor_parallel_degree 1"),
])
def test_quantization_rules_say_what_to_change(values, message):
    errors = check_quantization(dict({"qlora_weight_blocksize": 64, "qlora_weight_double_quant_block_size": 256}, **values), LLAMA)
    assert any(message in e for e in errors), errors


def test_a_valid_qlora_configuration_passes():
    values = {"weight_quantize_algo": "nf4", "lora": True, "qlora_weight_blocksize": 64, "qlora_weight_double_quant": True,
              "qlora_weight_double_quant_block_size": 256}
    assert check_quantization(values, LLAMA) == [] and check_quantization({}, LLAMA) == []


def lora_layer(bias: bool) -> "LoRALinear":
    from paddlenlp.peft.lora.lora_layers import LoRALinear

    paddle.seed(1)
    layer = LoRALinear(64, 96, r=4, lora_alpha=8, bias_attr=None if bias else False)
    layer.lora_B.set_value(paddle.randn([4, 96]) * 0.1)  # a trained adapter, not the zero init
    if bias:
        layer.bias.set_value(paddle.randn([96]))
    return layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec("nf4"), QuantSpec("fp4", double_quant=True, double_quant_blocksize=32), QuantSpec("weight_only_int4")],
                         ids=lambda s: s.describe())
def test_quantized_layer_computes_dequantized_base_plus_adapter_and_trains_only_the_adapter(spec, bias):
    from paddle_llm.peft.qlora import QuantizedLoRALinear

    plain = lora_layer(bias)
    quantized = QuantizedLoRALinear(plain, spec)
    assert sorted(n for n, _ in quantized.named_parameters()) == (["bias"] if bias else []) + ["lora_A", "lora_B"]
    assert quantized.stored_bytes < quantized.float_bytes / 3
    weight = quantized.dequantized_weight("float32")
    assert 0 < float((weight - plain.weight).abs().max()) < 0.1  # quantized, close to the original

    x = paddle.randn([2, 5, 64])
    x.stop_gradient = False
    out = quantized(x)
    expected = x @ weight + (x @ plain.lora_A @ plain.lora_B) * plain.scaling + (plain.bias if bias else 0)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-5)
    upstream = paddle.randn(out.shape)
    (out * upstream).sum().backward()
    # The input gradient runs through the dequantized weight, rebuilt in backward (nothing float was saved).
    full = weight + plain.lora_A @ plain.lora_B * plain.scaling
    np.testing.assert_allclose(x.grad.numpy(), (upstream @ full.T).numpy(), atol=1e-5)
    assert quantized.lora_A.grad is not None and quantized.lora_B.grad is not None
    assert all(b.grad is None for b in quantized.buffers())


def test_back_to_a_float_lora_layer_merges_into_the_dequantized_weight():
    from paddle_llm.peft.qlora import QuantizedLoRALinear

    quantized = QuantizedLoRALinear(lora_layer(bias=False), QuantSpec("nf4"))
    x = paddle.randn([3, 64])
    expected = quantized(x)
    plain = quantized.to_lora_linear()
    np.testing.assert_allclose(plain(x).numpy(), expected.numpy(), atol=1e-5)
    plain.merge()
    np.testing.assert_allclose((x @ plain.weight).numpy(), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("spec", [QuantSpec("nf4"), QuantSpec("fp4", 32), QuantSpec("nf4", double_quant=True, double_quant_blocksize=16),
                                  QuantSpec("nf4", double_quant=True), QuantSpec("weight_only_int8"), QuantSpec("weight_only_int4")],
                         ids=lambda s: s.describe())
def test_the_estimator_counts_the_bytes_the_quantizer_stores(spec):
    stored = quantize(np.ones((128, 96), np.float32), spec)
    assert sum(a.nbytes for a in stored.values()) == quantized_weight_bytes(128, 96, spec.algo, spec.blocksize, spec.double_quant, spec.double_quant_blocksize)


LLAMA_2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False}


def test_qlora_7b_fits_one_24gb_gpu_where_lora_does_not(tmp_path, capsys):
    """The README's example: bf16 O2, flash attention, 2048 tokens, one 24 GB card."""
    with open(tmp_path / "config.json", "w") as f:
        json.dump(dict(LLAMA_2_7B, architectures=["LlamaForCausalLM"]), f)
    common = ["--model_name_or_path", str(tmp_path), "--lora", "--lora_rank", "8", "--bf16", "--fp16_opt_level", "O2",
              "--use_flash_attention", "--max_seq_length", "2048", "--num_gpus", "1", "--gpu_memory_gb", "24", "--json"]
    results = {}
    for name, extra in (("lora", []), ("qlora", ["--weight_quantize_algo", "nf4"])):
        assert estimate_main(common + extra) == 0
        results[name] = json.loads(capsys.readouterr().out)
    lora, qlora = results["lora"], results["qlora"]
    assert lora["fits"] is False and qlora["fits"] is True
    # Only the frozen projections shrink (embeddings and head stay bf16): nf4 + scales is 0.5625 B vs 2 B per weight.
    projections = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    saved = lora["per_device"]["params"] - qlora["per_device"]["params"]
    assert saved == projections * 2 - projections * (0.5 + 4 / 64)
    assert lora["per_device"]["grads"] == qlora["per_device"]["grads"] and lora["per_device"]["optimizer"] == qlora["per_device"]["optimizer"]
    assert estimate_main(common[:2] + ["--weight_quantize_algo", "nf4"]) == 2
    assert "is QLoRA: add --lora" in capsys.readouterr().err
