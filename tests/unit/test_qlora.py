"""QLoRA's flags (both PaddleNLP spellings, early errors) and the quantized LoRA layer (forward, gradients, merge)."""

import numpy as np
import paddle
import pytest
from paddlenlp.peft.lora.lora_layers import LoRALinear

from paddle_llm.config.arguments import FinetuneArguments, FinetuneDataArguments, ModelArguments, PeftArguments
from paddle_llm.config.parser import parse_flags
from paddle_llm.config.presets import preset
from paddle_llm.config.validation import check_quantization
from paddle_llm.peft.qlora import QuantizedLoRALinear
from paddle_llm.peft.quantize import QuantSpec

TYPES = (ModelArguments, FinetuneDataArguments, PeftArguments, FinetuneArguments)
LLAMA = preset("tiny-llama")


@pytest.mark.parametrize("spelling", [
    ["--qlora_weight_blocksize", "128", "--qlora_weight_double_quant", "True", "--qlora_weight_double_quant_block_size", "64"],
    ["--weight_blocksize", "128", "--weight_double_quant", "True", "--weight_double_quant_block_size", "64"],  # PaddleNLP 3.0.0b4
], ids=["llm-flags", "paddlenlp-3.0.0b4"])
def test_both_spellings_of_the_qlora_flags_parse_to_one_spec(spelling):
    parsed = parse_flags(["--output_dir", "o", "--lora", "True", "--weight_quantize_algo", "nf4"] + spelling, TYPES)
    peft_args = parsed.build(TYPES)[2]
    assert QuantSpec.from_arguments(peft_args) == QuantSpec("nf4", 128, True, 64)


def test_defaults_are_paddlenlps():
    peft_args = parse_flags(["--output_dir", "o", "--lora", "True", "--weight_quantize_algo", "fp4"], TYPES).build(TYPES)[2]
    assert QuantSpec.from_arguments(peft_args) == QuantSpec("fp4", 64, False, 256)
    assert QuantSpec.from_arguments(parse_flags(["--output_dir", "o"], TYPES).build(TYPES)[2]) is None


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


def lora_layer(bias: bool) -> LoRALinear:
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
    quantized = QuantizedLoRALinear(lora_layer(bias=False), QuantSpec("nf4"))
    x = paddle.randn([3, 64])
    expected = quantized(x)
    plain = quantized.to_lora_linear()
    np.testing.assert_allclose(plain(x).numpy(), expected.numpy(), atol=1e-5)
    plain.merge()
    np.testing.assert_allclose((x @ plain.weight).numpy(), expected.numpy(), atol=1e-5)
