"""PaddleNLP's LoRA variants through ``peft.lora.apply_lora``, each against a NumPy reference on the same weights:
rsLoRA's scaling, LoRA+'s learning rate for B, PiSSA's initialisation and its save as an ordinary adapter, and
``--rslora_plus``; then merged (``paddle-llm merge-lora``) and exported for each."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest

RANK, ALPHA = 4, 8
LAYER = "llama.layers.0.self_attn.q_proj"


def tiny_llama():
    import paddle

    from paddle_llm.models.registry import build_config, build_model, resolve_model

    paddle.seed(0)
    source = resolve_model("tiny-llama")
    return build_model(source, build_config(source), load_weights=False), source.family


def lora(**variant):
    from paddle_llm.peft.lora import apply_lora

    model, family = tiny_llama()
    original = model.get_sublayer(LAYER).weight.numpy().astype(np.float64)
    lora_model = apply_lora(model, family, RANK, alpha=variant.pop("alpha", ALPHA), **variant)
    return lora_model, lora_model.model.get_sublayer(LAYER), original


def randomise(parameter, seed: int) -> np.ndarray:
    value = np.random.default_rng(seed).normal(0, 0.1, parameter.shape).astype("float32")
    parameter.set_value(value)
    return value.astype(np.float64)


def forward(layer, x: np.ndarray) -> np.ndarray:
    import paddle

    with paddle.no_grad():
        return layer(paddle.to_tensor(x.astype("float32"))).numpy().astype(np.float64)


X = np.random.default_rng(1).normal(0, 1, (3, 128))


@pytest.mark.parametrize("rslora, scaling", [(False, ALPHA / RANK), (True, ALPHA / math.sqrt(RANK))])
def test_rslora_scales_by_alpha_over_the_square_root_of_the_rank(rslora, scaling):
    _, layer, weight = lora(rslora=rslora)
    a, b = randomise(layer.lora_A, 2), randomise(layer.lora_B, 3)
    np.testing.assert_allclose(forward(layer, X), X @ weight + X @ a @ b * scaling, rtol=1e-4, atol=1e-4)


def test_lora_plus_gives_b_its_scale_times_the_learning_rate_under_adamw():
    import paddle

    scale, lr, beta1, beta2, eps = 4.0, 1e-2, 0.9, 0.999, 1e-8
    _, layer, weight = lora(lora_plus_scale=scale)
    a, b = randomise(layer.lora_A, 2), randomise(layer.lora_B, 3)
    optimizer = paddle.optimizer.AdamW(lr, parameters=[layer.lora_A, layer.lora_B], beta1=beta1, beta2=beta2, epsilon=eps, weight_decay=0.0)
    (layer(paddle.to_tensor(X.astype("float32"))) ** 2).sum().backward()
    gradients = {"A": layer.lora_A.grad.numpy().astype(np.float64), "B": layer.lora_B.grad.numpy().astype(np.float64)}
    optimizer.step()

    def adamw_first_step(value, gradient, rate):  # bias-corrected first step: m̂ = g, v̂ = g²
        return value - rate * gradient / (np.abs(gradient) + eps)

    np.testing.assert_allclose(layer.lora_A.numpy(), adamw_first_step(a, gradients["A"], lr), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(layer.lora_B.numpy(), adamw_first_step(b, gradients["B"], lr * scale), rtol=1e-4, atol=1e-6)


def test_rslora_plus_is_paddlenlps_shorthand():
    from paddle_llm.peft.lora import lora_variant

    flags = SimpleNamespace(lora_alpha=None, rslora=False, lora_plus_scale=1.0, pissa=False, rslora_plus=True)
    assert lora_variant(flags) == {"alpha": 4, "rslora": True, "lora_plus_scale": 4.0, "pissa": False}


def pissa_reference(weight: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """PiSSA (arXiv 2404.02948): A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T, residual W - A B."""
    u, s, vh = np.linalg.svd(weight, full_matrices=False)
    return u[:, :rank] * np.sqrt(s[:rank]), np.sqrt(s[:rank])[:, None] * vh[:rank]


def test_pissa_starts_from_the_top_singular_vectors_and_saves_an_ordinary_adapter_on_the_original_base(tmp_path):
    from paddle_llm.peft.lora import load_lora, pissa_as_plain_lora

    lora_model, layer, weight = lora(pissa=True)
    initial_a, initial_b = pissa_reference(weight, RANK)
    # A B is unique (singular vector signs cancel); the base keeps the residual; the model starts unchanged
    np.testing.assert_allclose(layer.lora_A.numpy() @ layer.lora_B.numpy(), initial_a @ initial_b, atol=1e-4)
    np.testing.assert_allclose(layer.weight.numpy(), weight - initial_a @ initial_b, atol=1e-4)
    np.testing.assert_allclose(forward(layer, X), X @ weight, rtol=1e-4, atol=1e-3)

    residual = layer.weight.numpy().astype(np.float64)
    a, b = randomise(layer.lora_A, 2), randomise(layer.lora_B, 3)  # "trained"
    trained = X @ residual + X @ a @ b  # PiSSA's scaling is 1
    np.testing.assert_allclose(forward(layer, X), trained, rtol=1e-4, atol=1e-3)

    assert pissa_as_plain_lora(lora_model) and not pissa_as_plain_lora(lora_model)
    np.testing.assert_allclose(layer.weight.numpy(), weight, atol=1e-5)  # the original base again
    np.testing.assert_allclose(forward(layer, X), trained, rtol=1e-4, atol=1e-3)
    lora_model.save_pretrained(str(tmp_path))
    with open(tmp_path / "lora_config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"], config["pissa"]) == (2 * RANK, 2 * RANK, False)

    base, _ = tiny_llama()  # the same seed: the user's original base model
    reloaded = load_lora(base, str(tmp_path), "tiny-llama").model.get_sublayer(LAYER)
    np.testing.assert_allclose(forward(reloaded, X), trained, rtol=1e-4, atol=1e-3)


VARIANTS = {
    "rslora": {"rslora": True},
    "lora_plus": {"lora_plus_scale": 4.0},
    "rslora_plus": {"rslora": True, "lora_plus_scale": 4.0, "alpha": 4},
    "pissa": {"pissa": True},
}


# PiSSA's saved adapter is the one that differs from PaddleNLP's; the others (about 5 s each) run in the full tier
@pytest.mark.parametrize("variant", [pytest.param(name, marks=() if name == "pissa" else pytest.mark.slow) for name in VARIANTS])
def test_each_variant_merges_and_exports(variant, tmp_path):
    from paddle_llm.export.command import main as export_main
    from paddle_llm.models.registry import load_tokenizer
    from paddle_llm.peft.lora import pissa_as_plain_lora
    from paddle_llm.peft.merge import merge_lora_checkpoint

    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    lora_model, layer, weight = lora(**VARIANTS[variant])
    base, _ = tiny_llama()
    base.save_pretrained(base_dir)
    load_tokenizer("tiny-llama").save_pretrained(base_dir)
    randomise(layer.lora_A, 2), randomise(layer.lora_B, 3)
    expected = forward(layer, X)
    pissa_as_plain_lora(lora_model)
    lora_model.save_pretrained(adapter_dir)

    difference = merge_lora_checkpoint(base_dir, adapter_dir, str(tmp_path / "merged"))
    assert difference < 1e-4
    from paddle_llm.inference.load import load_model
    from paddle_llm.models.registry import resolve_model

    merged = load_model(resolve_model(str(tmp_path / "merged")))
    np.testing.assert_allclose(forward(merged.get_sublayer(LAYER), X), expected, rtol=1e-4, atol=1e-3)
    assert export_main(["--model_name_or_path", base_dir, "--lora_path", adapter_dir, "--output_path", str(tmp_path / "export"), "--format", "hf"]) == 0
    assert os.listdir(tmp_path / "export")


VARIANT_RULES = {
    "VeRA": ({"vera": True}, "--vera: VeRA is not supported here; use --lora True"),
    "a LoKr companion alone": ({"lokr_dim": 8}, "--lokr_dim: LoKr is not supported here"),
    "LongLoRA": ({"use_shift_sparse_attention": True}, "--use_shift_sparse_attention: LongLoRA (shifted sparse attention) is not supported here"),
    "a variant without LoRA": ({"rslora": True}, "--rslora shape a LoRA adapter: add --lora True"),
    "a variant on a loaded adapter": ({"lora": True, "lora_path": "a", "lora_plus_scale": 4.0}, "--lora_plus_scale shape a new adapter, but --lora_path loads one"),
    "rslora_plus against an explicit alpha": ({"lora": True, "rslora_plus": True, "lora_alpha": 16}, "--rslora_plus sets --rslora True --lora_plus_scale 4 --lora_alpha 4, which --lora_alpha 16 contradicts"),
    "PiSSA with rsLoRA": ({"lora": True, "pissa": True, "rslora": True}, "--pissa and --rslora are exclusive"),
    "PiSSA on a quantized base": ({"lora": True, "pissa": True, "weight_quantize_algo": "nf4"}, "--pissa rewrites the base weights, which --weight_quantize_algo nf4 stores quantized"),
    "PiSSA under tensor parallel": ({"lora": True, "pissa": True, "tensor_parallel_degree": 2}, "--pissa does not run under tensor parallel"),
    "a non-positive LoRA+ scale": ({"lora": True, "lora_plus_scale": 0.0}, "--lora_plus_scale 0.0: must be positive"),
    "LoRA+ under LOMO": ({"lora": True, "lora_plus_scale": 4.0, "optim": "lomo"}, "--lora_plus_scale sets a per-parameter learning rate, which --optim lomo does not read"),
}


@pytest.mark.parametrize("rule", VARIANT_RULES)
def test_each_variant_rule_names_what_to_change(rule):
    from paddle_llm.config.validation import check_peft_variants

    values, message = VARIANT_RULES[rule]
    assert any(error.startswith(message) for error in check_peft_variants(values)), check_peft_variants(values)


@pytest.mark.parametrize("values", [{"lora": True, "rslora_plus": True, "lora_alpha": -1}, {"lora": True, "pissa": True}, {"lora": True, "rslora": True, "lora_plus_scale": 16.0}])
def test_paddlenlps_variant_combinations_pass(values):
    from paddle_llm.config.validation import check_peft_variants

    assert check_peft_variants(values) == []
