"""``LlamaInferenceStep`` computes what PaddleNLP's Llama computes (through ``KVCacheStep``), for the configurations it
accepts, and ``build_step_layer`` keeps PaddleNLP's forward for the ones it does not."""

import shutil

import numpy as np
import pytest

from paddle_llm.cpu import features as cpu_features
from paddle_llm.cpu.features import fused_rms_norm_allowed
from paddle_llm.inference.manifest import STEP_LLAMA_INFERENCE, STEP_PADDLENLP
from paddle_llm.models.registry import FAMILIES, build_config, build_model, resolve_model

TOLERANCE = 1e-5


def tiny_llama(**overrides):
    import paddle

    paddle.seed(0)
    source = resolve_model("tiny-llama")
    config = build_config(source)
    for name, value in overrides.items():  # set directly: build_config keeps only the fields training flags set
        setattr(config, name, value)
    model = build_model(source, config, load_weights=False)
    model.eval()
    with paddle.no_grad():  # PaddleNLP initialises biases to zero, which would hide a bias left out
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.set_value(paddle.normal(std=0.1, shape=parameter.shape))
    return model


def step_inputs(config, batch: int, query: int, past: int, seed: int = 0):
    """Random ids, per-row positions, a causal mask with left padding in row 1, and a random past per layer in
    PaddleNLP's ``[b, past, kv_heads, dim]`` layout."""
    import paddle

    rng = np.random.default_rng(seed)
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ids = rng.integers(4, config.vocab_size, (batch, query))
    positions = np.tile(np.arange(past, past + query), (batch, 1))
    mask = np.ones((batch, 1, query, past + query), dtype=bool)
    mask[:, :, :, past:] = np.tril(np.ones((query, query), dtype=bool))
    if batch > 1:
        mask[1, :, :, : min(3, past)] = False  # row 1's first columns are left padding
    caches = [paddle.to_tensor(rng.standard_normal([batch, past, kv_heads, head_dim]).astype("float32"))
              for _ in range(2 * config.num_hidden_layers)]
    return [paddle.to_tensor(ids, dtype="int64"), paddle.to_tensor(positions, dtype="int64"), paddle.to_tensor(mask),
            *caches]


def head_major(cache):
    """PaddleNLP's ``[b, positions, heads, dim]`` as the inference step's ``[b, heads, positions, dim]``."""
    return cache.transpose([0, 2, 1, 3])


@pytest.mark.parametrize("overrides", [
    {},
    {"num_key_value_heads": 2},  # grouped-query attention
    {"num_key_value_heads": 1},  # multi-query attention
    {"tie_word_embeddings": True},
    {"rope_theta": 500000.0},
    {"num_key_value_heads": 2, "head_dim": 48, "attention_bias": True, "mlp_bias": True},  # ERNIE 4.5's layer options
], ids=["mha", "gqa", "mqa", "tied", "rope_theta", "head_dim_and_biases"])
@pytest.mark.parametrize("batch, query, past", [(2, 5, 7), (3, 1, 11)], ids=["prefill", "decode"])
@pytest.mark.parametrize("variant", [
    "composed_rms_norm",
    pytest.param("fused_rms_norm", marks=pytest.mark.skipif(not fused_rms_norm_allowed(cpu_features.detect()),
                                                            reason="Paddle's fused RMSNorm has only an AVX-512 CPU kernel")),
    pytest.param("packed_matmul", marks=pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                                           reason="no C++ compiler for the packed matmul kernel")),
])
def test_inference_step_equals_paddlenlp(overrides, batch, query, past, variant):
    import paddle
    from paddle_llm.cpu import kernels as cpu_kernels
    from paddle_llm.models.llama.inference_step import LlamaInferenceStep
    from paddle_llm.inference.step_graph import KVCacheStep

    model = tiny_llama(**overrides)
    reference = KVCacheStep(model, FAMILIES["llama"], model.config.num_hidden_layers)
    ours = LlamaInferenceStep(model, variant == "fused_rms_norm",
                              cpu_kernels.load() if variant == "packed_matmul" else None)
    inputs = step_inputs(model.config, batch, query, past)
    with paddle.no_grad():
        expected = reference(*inputs[:3], inputs[3:])
        actual = ours(*inputs[:3], [head_major(cache) for cache in inputs[3:]])
    assert len(actual) == len(expected) == 1 + 2 * model.config.num_hidden_layers
    np.testing.assert_allclose(actual[0].numpy(), expected[0].numpy(), atol=TOLERANCE, rtol=0, err_msg="logits")
    for index, (want, got) in enumerate(zip(expected[1:], actual[1:])):
        np.testing.assert_allclose(got.numpy(), head_major(want).numpy(), atol=TOLERANCE, rtol=0, err_msg=f"cache {index}")


def test_build_step_layer_picks_the_inference_step_for_plain_llama():
    from paddle_llm.models.llama.inference_step import LlamaInferenceStep
    from paddle_llm.inference.step_graph import build_step_layer

    step = build_step_layer(tiny_llama(), FAMILIES["llama"], "float32")
    assert isinstance(step.layer, LlamaInferenceStep) and step.implementation == STEP_LLAMA_INFERENCE
    assert step.kept_because == "" and (step.layout.head_axis, step.layout.seq_axis) == (1, 2)


@pytest.mark.parametrize("overrides, dtype, expected_reason", [
    ({"fuse_attention_qkv": True}, "float32", "fuse_attention_qkv"),
    ({"fuse_attention_ffn": True}, "float32", "fuse_attention_ffn"),
    ({"rope_scaling_type": "dynamic_ntk", "rope_scaling_factor": 2.0}, "float32", "recomputes its tables"),
    ({}, "float16", "float16"),
])
def test_build_step_layer_keeps_paddlenlp_where_the_step_differs(overrides, dtype, expected_reason):
    from paddle_llm.inference.step_graph import KVCacheStep, build_step_layer

    step = build_step_layer(tiny_llama(**overrides), FAMILIES["llama"], dtype)
    assert isinstance(step.layer, KVCacheStep) and step.implementation == STEP_PADDLENLP
    assert expected_reason in step.kept_because


def test_the_default_step_graph_has_no_kernel_a_cpu_may_lack(tmp_path):
    from paddle_llm.inference.step_graph import build_step_layer
    from paddle_llm.inference.manifest import program_needs, program_op_types
    from paddle_llm.inference.step_graph import save_step_graph

    model = tiny_llama()
    step = build_step_layer(model, FAMILIES["llama"], "float32")
    save_step_graph(step.layer, FAMILIES["llama"], "float32", model.config.num_hidden_layers, str(tmp_path / "portable"))
    assert program_needs(str(tmp_path / "portable.json")) == []
    step.layer.fused_rms_norm = True
    save_step_graph(step.layer, FAMILIES["llama"], "float32", model.config.num_hidden_layers, str(tmp_path / "fused"))
    assert "fused_rms_norm_quant" in program_op_types(str(tmp_path / "fused.json"))
    assert program_needs(str(tmp_path / "fused.json")) == ["avx512f"]
