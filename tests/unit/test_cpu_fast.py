"""CPU fast paths: every replaced composite equals PaddleNLP's, per family, in values and gradients (within 1e-5).

Component tests call a layer's PaddleNLP class ``forward`` and the fast ``forward`` bound on the same instance, so
both see the same weights. Whole-model tests train a PaddleNLP model and a copy with the fast paths side by side.
Both run twice: on the compiled kernels (``cpu/kernels.cc``) and on the pure-Paddle composites they fall back to.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import numpy as np
import pytest

from paddle_llm.cpu.threads import OPENMP_BLOCKTIME_MS
from paddle_llm.cpu import kernels as cpu_kernels
from paddle_llm.models.registry import family_of_model
from paddle_llm.models.registry import build_config, build_model, resolve_model
from tests.conftest import ROOT, run_script, subprocess_env

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
BATCH, SEQ = 2, 16
PRESET_OF_FAMILY = {"llama": "tiny-llama", "chatglm": "tiny-chatglm", "chatglm2": "tiny-chatglm2", "qwen2": "tiny-qwen2",
                    "qwen3": "tiny-qwen3", "ernie4_5": "tiny-ernie4_5"}


# Passed under the config classes' own names: ChatGLM's and ChatGLM2's config __init__ defaults (28 layers, 65024
# embedding rows) win over the presets' aliased ``num_layers`` / ``padded_vocab_size`` in PaddleNLP 3.0.0b4.
TINY_SIZES = {"num_hidden_layers": 2, "vocab_size": 1024}


@pytest.fixture(params=["compiled_kernels", "pure_paddle"])
def composites(request, monkeypatch):
    """Run the test on the compiled kernels, then again with them unavailable (the fallback every user without a
    compiler gets). The fast forwards look the kernels up on every call, so patching ``load`` switches them."""
    if request.param == "pure_paddle":
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    elif cpu_kernels.load() is None:
        pytest.skip("compiled kernels unavailable here; test_kernels_compile_and_load_here says why")
    return request.param


def _tiny_model(family: str, seed: int = 0):
    """The family's preset model at 2 layers and 1024 embedding rows."""
    import paddle

    source = resolve_model(PRESET_OF_FAMILY[family])
    paddle.seed(seed)
    return source, build_model(source, build_config(source, **TINY_SIZES), load_weights=False)


@pytest.fixture(scope="module")
def fast_models():
    """One tiny model per family with the fast paths applied (component tests compare per layer instance)."""
    from paddle_llm.cpu.fast_paths import apply_cpu_fast_paths

    models = {}
    for family in PRESET_OF_FAMILY:
        _, model = _tiny_model(family)
        assert apply_cpu_fast_paths(model, family_of_model(model))
        models[family] = model
    return models


def _random(shape, seed, scale=1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype("float32")


def _values_and_grads(function, inputs: list[np.ndarray], parameters) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run ``function`` on fresh leaf tensors, backpropagate a fixed random cotangent, return output and grads."""
    import paddle

    leaves = []
    for array in inputs:
        leaf = paddle.to_tensor(array)
        leaf.stop_gradient = False
        leaves.append(leaf)
    output = function(*leaves)
    output = output[0] if isinstance(output, (tuple, list)) else output
    cotangent = paddle.to_tensor(_random(output.shape, seed=99))
    (output * cotangent).sum().backward()
    grads = [leaf.grad.numpy() for leaf in leaves] + [p.grad.numpy() for p in parameters]
    for parameter in parameters:
        parameter.clear_gradient()
    return output.numpy(), grads


def assert_same_values_and_grads(reference, fast, inputs: list[np.ndarray], parameters=()) -> None:
    parameters = [p for p in parameters if not p.stop_gradient]
    expected, expected_grads = _values_and_grads(reference, inputs, parameters)
    actual, actual_grads = _values_and_grads(fast, inputs, parameters)
    np.testing.assert_allclose(actual, expected, **TOLERANCE)
    assert len(actual_grads) == len(expected_grads)
    for got, want in zip(actual_grads, expected_grads):
        np.testing.assert_allclose(got, want, **TOLERANCE)


def _original_forward(layer):
    """PaddleNLP's forward for this layer, ignoring the fast forward bound on the instance."""
    return partial(type(layer).forward, layer)


# ----- norms and activations -----


@pytest.mark.parametrize(
    "family, find_norm",
    [
        ("llama", lambda model: model.llama.layers[0].input_layernorm),
        ("llama", lambda model: model.llama.norm),
        ("chatglm", lambda model: model.chatglm.transformer.layers[0].input_layernorm),
        ("chatglm", lambda model: model.chatglm.transformer.final_layernorm),
        ("chatglm2", lambda model: model.chatglm_v2.encoder.layers[0].post_attention_layernorm),
        ("qwen2", lambda model: model.qwen2.layers[0].input_layernorm),
    ],
    ids=["llama-rms_norm", "llama-final_rms_norm", "chatglm-layer_norm", "chatglm-final_layer_norm", "chatglm2-rms_norm", "qwen2-rms_norm"],
)
def test_norm_matches_paddlenlp(composites, fast_models, family, find_norm):
    import paddle

    norm = find_norm(fast_models[family])
    with paddle.no_grad():  # non-trivial weights and biases, so their gradients are tested too
        for parameter in norm.parameters():
            parameter.set_value(paddle.to_tensor(_random(parameter.shape, seed=3, scale=0.5)) + 1.0)
    hidden = norm.weight.shape[0]
    assert_same_values_and_grads(_original_forward(norm), norm.forward, [_random([BATCH, SEQ, hidden], 1, 2.0)], norm.parameters())


@pytest.mark.parametrize("family, find_mlp", [
    ("llama", lambda model: model.llama.layers[1].mlp),
    ("chatglm2", lambda model: model.chatglm_v2.encoder.layers[1].mlp),
    ("qwen2", lambda model: model.qwen2.layers[1].mlp),
], ids=["llama-swiglu_mlp", "chatglm2-swiglu_mlp", "qwen2-swiglu_mlp"])
def test_swiglu_mlp_matches_paddlenlp(composites, fast_models, family, find_mlp):
    mlp = find_mlp(fast_models[family])
    hidden = fast_models[family].config.hidden_size
    assert_same_values_and_grads(_original_forward(mlp), mlp.forward, [_random([BATCH, SEQ, hidden], 2)], mlp.parameters())


def test_chatglm_gelu_mlp_matches_paddlenlp(fast_models):
    import paddle.nn.functional as F
    from paddle_llm.cpu.ops import tanh_gelu

    mlp = fast_models["chatglm"].chatglm.transformer.layers[1].mlp
    assert mlp.activation is tanh_gelu

    def paddlenlp_mlp(x):
        return mlp.dense_4h_to_h(F.gelu(mlp.dense_h_to_4h(x), approximate=True))

    hidden = fast_models["chatglm"].config.hidden_size
    assert_same_values_and_grads(paddlenlp_mlp, mlp.forward, [_random([SEQ, BATCH, hidden], 4, 2.0)], mlp.parameters())


# ----- attention: rotary embedding and causal mask -----


# Qwen2 is built like Llama (its base model is ``model.qwen2``) and takes Llama's fast attention; so do Qwen3 (with
# its q/k head norms and head_dim 64 at hidden 128) and ERNIE 4.5 (head_dim 64).
LLAMA_SHAPED = ["llama", "qwen2", "qwen3", "ernie4_5"]


@pytest.mark.parametrize("family", LLAMA_SHAPED)
def test_llama_attention_matches_paddlenlp(composites, fast_models, family):
    import paddle

    model = fast_models[family]
    base = model.base_model
    attention = base.layers[1].self_attn
    padding = np.ones([BATCH, SEQ], dtype=bool)
    padding[1, :3] = False  # left padding in the second row: the causal mask and the padding mask both apply
    mask = base._prepare_decoder_attention_mask(paddle.to_tensor(padding), (BATCH, SEQ), 0, paddle.float32)
    position_ids = paddle.arange(SEQ, dtype="int64").expand([BATCH, SEQ]) + paddle.to_tensor([[0], [5]])

    def run(forward, hidden_states):
        return forward(hidden_states, position_ids=position_ids, attention_mask=mask)

    inputs = [_random([BATCH, SEQ, model.config.hidden_size], 5)]
    assert_same_values_and_grads(partial(run, _original_forward(attention)), partial(run, attention.forward), inputs, attention.parameters())


@pytest.mark.parametrize("family", LLAMA_SHAPED)
def test_llama_attention_without_mask_or_positions_matches_paddlenlp(composites, fast_models, family):
    """PaddleNLP's pipeline path: no position ids, no mask (its upper-triangle default)."""
    model = fast_models[family]
    attention = model.base_model.layers[0].self_attn
    inputs = [_random([BATCH, SEQ, model.config.hidden_size], 6)]
    assert_same_values_and_grads(_original_forward(attention), attention.forward, inputs, attention.parameters())


def _chatglm_additive_mask(seq: int) -> paddle.Tensor:
    """The mask ChatGLM's stack hands its layers: 0 where attending, the dtype's minimum elsewhere."""
    import paddle

    causal = paddle.tril(paddle.ones([BATCH, 1, seq, seq], dtype="bool"))
    return paddle.where(causal, paddle.zeros([1]), paddle.full([1], paddle.finfo(paddle.float32).min))


def test_chatglm_attention_with_2d_rotary_matches_paddlenlp(composites, fast_models):
    import paddle
    from paddlenlp.transformers.chatglm import modeling as chatglm_modeling

    model = fast_models["chatglm"]
    config = model.config
    attention = model.chatglm.transformer.layers[1].attention
    # GLM's layout after a [gMASK] prompt: positions stop at the prompt end, block positions count from there.
    positions = np.minimum(np.arange(SEQ), 9)
    blocks = np.maximum(np.arange(SEQ) - 9, 0)
    position_ids = paddle.to_tensor(np.broadcast_to(np.stack([positions, blocks]), (BATCH, 2, SEQ)).copy())
    reference_rotary = chatglm_modeling.RotaryEmbeddings(config.hidden_size // (config.num_attention_heads * 2), base=10000.0)
    reference_embeds = reference_rotary(position_ids)
    fast_embeds = model.chatglm.transformer.rotary_embeddings(position_ids)
    mask = _chatglm_additive_mask(SEQ)

    def reference(hidden_states):
        return _original_forward(attention)(hidden_states, mask, position_ids, layer_id=1, rotary_embeds=reference_embeds)

    def fast(hidden_states):
        return attention.forward(hidden_states, mask, position_ids, layer_id=1, rotary_embeds=fast_embeds)

    assert_same_values_and_grads(reference, fast, [_random([SEQ, BATCH, config.hidden_size], 7)], attention.parameters())


def test_chatglm2_attention_with_pair_rotary_and_multi_query_matches_paddlenlp(composites, fast_models):
    import paddle
    from paddlenlp.transformers.chatglm_v2 import modeling as chatglm2_modeling

    model = fast_models["chatglm2"]
    config = model.config
    attention = model.chatglm_v2.encoder.layers[1].self_attention  # layer 2: query-key layer scaling coefficient 2
    assert config.multi_query_group_num < config.num_attention_heads
    position_ids = paddle.arange(SEQ, dtype="int64").expand([BATCH, SEQ]) + paddle.to_tensor([[0], [3]])
    head_dim = attention.hidden_size_per_attention_head
    reference_table = chatglm2_modeling.RotaryEmbedding(head_dim // 2)(config.max_sequence_length)
    reference_rotary = reference_table[position_ids].transpose([1, 0, 2, 3])
    fast_rotary = model.chatglm_v2.rotary_pos_emb(config.max_sequence_length)[position_ids].transpose([1, 0, 2, 3])
    mask = _chatglm_additive_mask(SEQ)

    def reference(hidden_states):
        return _original_forward(attention)(hidden_states, mask, reference_rotary, use_cache=False)

    def fast(hidden_states):
        return attention.forward(hidden_states, mask, fast_rotary, use_cache=False)

    assert_same_values_and_grads(reference, fast, [_random([SEQ, BATCH, config.hidden_size], 8)], attention.parameters())


# ----- loss -----


# No ("chatglm2", "all"): PaddleNLP's ChatGLM2 loss is 0/0 = NaN there, and ours keeps that rule.
@pytest.mark.parametrize("family, ignored", [("llama", "some"), ("llama", "all"), ("chatglm2", "some"), ("qwen2", "some"), ("qwen2", "all")])
def test_loss_matches_paddlenlp(composites, fast_models, family, ignored):
    import paddle
    from paddlenlp.transformers.chatglm_v2 import modeling as chatglm2_modeling
    from paddlenlp.transformers.qwen2 import modeling as qwen2_modeling
    from paddlenlp.transformers.llama import modeling as llama_modeling
    from paddle_llm.cpu.ops import CausalLMLoss

    model = fast_models[family]
    criteria = {"llama": llama_modeling.LlamaPretrainingCriterion, "chatglm2": chatglm2_modeling.ChatGLMv2PretrainingCriterion,
                "qwen2": qwen2_modeling.Qwen2PretrainingCriterion}
    reference = criteria[family](model.config)
    assert isinstance(model.criterion, CausalLMLoss)
    vocab = model.config.vocab_size
    labels = np.random.default_rng(9).integers(0, vocab, size=(BATCH, SEQ)).astype("int64")
    labels[:, :4] = -100
    if ignored == "all":
        labels[:] = -100
    labels = paddle.to_tensor(labels)
    assert_same_values_and_grads(
        lambda logits: reference(logits, labels), lambda logits: model.criterion(logits, labels), [_random([BATCH, SEQ, vocab], 10, 3.0)]
    )


# ----- whole models -----


def _train_losses(model, source, steps: int, compile_step: bool = False) -> list[float]:
    import paddle
    from paddle_llm.cpu.fast_paths import to_static_for_cpu_training

    optimizer = paddle.optimizer.AdamW(learning_rate=1e-3, parameters=model.parameters())
    forward = to_static_for_cpu_training(model) if compile_step else model
    rng = np.random.default_rng(11)
    losses = []
    for _ in range(steps):
        tokens = rng.integers(9, 1000, size=(BATCH, SEQ + 1)).astype("int64")
        extra = {name: paddle.to_tensor(value) for name, value in source.family.causal_lm_inputs(tokens[:, :-1]).items()}
        loss = forward(input_ids=paddle.to_tensor(tokens[:, :-1]), labels=paddle.to_tensor(tokens[:, 1:]), **extra)[0]
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    return losses


def _reference_and_fast_copy(family: str):
    source, reference = _tiny_model(family, seed=0)
    _, fast = _tiny_model(family, seed=1)
    fast.set_state_dict(reference.state_dict())
    return source, reference, fast


# ERNIE 4.5's layers are Llama's classes at other widths: its per-layer rows here and its fixture's 3 AdamW steps
# against transformers (test_hf_checkpoint.py) cover it, so the quick tier skips a second 10-step run of them.
@pytest.mark.parametrize("family", [family for family in PRESET_OF_FAMILY if family != "ernie4_5"])
def test_ten_adamw_steps_give_paddlenlp_losses(composites, family):
    from paddle_llm.cpu.fast_paths import apply_cpu_fast_paths

    source, reference, fast = _reference_and_fast_copy(family)
    replacements = apply_cpu_fast_paths(fast, family_of_model(fast))
    assert {entry.split(" ")[0] for entry in replacements} >= {f"{family}.attention_rotary_mask"}
    expected = _train_losses(reference, source, steps=10)
    actual = _train_losses(fast, source, steps=10)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


def test_to_static_training_step_gives_dygraph_losses():
    from paddle_llm.cpu.fast_paths import apply_cpu_fast_paths

    source, reference, fast = _reference_and_fast_copy("llama")
    apply_cpu_fast_paths(fast, family_of_model(fast))
    expected = _train_losses(reference, source, steps=3)
    actual = _train_losses(fast, source, steps=3, compile_step=True)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(PRESET_OF_FAMILY))
def test_state_dict_is_unchanged_and_applying_twice_changes_nothing(family):
    from paddle_llm.cpu.fast_paths import apply_cpu_fast_paths

    _, model = _tiny_model(family)
    before = {name: value.numpy().copy() for name, value in model.state_dict().items()}
    assert apply_cpu_fast_paths(model, family_of_model(model))
    assert apply_cpu_fast_paths(model, family_of_model(model)) == []
    after = model.state_dict()
    assert list(after) == list(before)
    for name, value in after.items():
        np.testing.assert_array_equal(value.numpy(), before[name])


def test_replacements_are_named_per_family_component():
    from paddle_llm.cpu.fast_paths import apply_cpu_fast_paths

    _, model = _tiny_model("llama")
    assert sorted(apply_cpu_fast_paths(model, family_of_model(model))) == [
        "llama.attention_rotary_mask x2",
        "llama.loss x1",
        "llama.mlp_swiglu x2",
        "llama.rms_norm x5",
    ]


def test_fast_paths_were_verified_against_the_installed_paddle_and_paddlenlp():
    """The fast forwards restate PaddleNLP 3.0.0b4's; after an upgrade, re-check them (these tests) and then bump
    ``VERIFIED_VERSIONS``."""
    import paddle
    from paddle_llm.cpu import ops as cpu_ops
    import paddlenlp

    installed = {"paddlepaddle": paddle.__version__, "paddlenlp": paddlenlp.__version__}
    assert installed == cpu_ops.VERIFIED_VERSIONS


def test_apply_is_a_noop_when_the_model_is_not_on_cpu(monkeypatch):
    from paddlenlp.transformers.llama import modeling as llama_modeling
    from paddle_llm.cpu import fast_paths as cpu_fast
    from paddle_llm.cpu.fast_paths import apply_cpu_fast_paths

    monkeypatch.setattr(cpu_fast, "model_is_on_cpu", lambda model: False)
    _, model = _tiny_model("llama")
    assert apply_cpu_fast_paths(model, family_of_model(model)) == []
    assert not any("forward" in vars(layer) for layer in model.sublayers(include_self=True))
    assert type(model.criterion) is llama_modeling.LlamaPretrainingCriterion


def test_configure_cpu_runtime_sets_threads_and_cpu_settings_in_a_fresh_process():
    """In a subprocess: the settings are process-wide and must not leak into the other tests."""
    code = """
import ctypes, json, os
import paddle
from paddle_llm.cpu.threads import available_cores, configure_cpu_runtime, configure_threads
runtime = configure_cpu_runtime(requested_threads=2, device="cpu")
libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
openmp = ctypes.CDLL(os.path.join(libs, "libiomp5.so"), mode=os.RTLD_NOLOAD)
mkl = ctypes.CDLL(os.path.join(libs, "libmklml_intel.so"), mode=os.RTLD_NOLOAD)
blas_threads, vml_threads, dynamic = mkl.MKL_Domain_Get_Max_Threads(1), mkl.MKL_Domain_Get_Max_Threads(3), mkl.MKL_Get_Dynamic()
try:
    configure_threads(0)
    refused = False
except ValueError:
    refused = True
print(json.dumps({
    "threads": runtime.threads, "summary": runtime.summary(), "omp": os.environ["OMP_NUM_THREADS"],
    "mkl_env": os.environ["MKL_NUM_THREADS"], "stride": paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"],
    "blocktime": openmp.kmp_get_blocktime(), "mkl": [blas_threads, vml_threads, dynamic],
    "default": configure_threads(), "cores": available_cores(), "refused": refused,
    "gpu": configure_cpu_runtime(device="gpu:0").summary(),
}))
"""
    report = json.loads(run_script(["-c", code], OMP_NUM_THREADS=1).stdout.strip().splitlines()[-1])
    assert report["threads"] == 2 and report["omp"] == report["mkl_env"] == "2"
    assert report["summary"].startswith("cpu runtime: 2 math threads of")
    assert report["mkl"] == [2, 1, 0]  # matmuls on 2 threads, vector maths on 1, no dynamic shrinking
    assert report["stride"] is False and report["blocktime"] == OPENMP_BLOCKTIME_MS
    assert report["default"] == 1 and report["refused"]  # the OMP_NUM_THREADS=1 run_script gives it is honoured
    assert "CPU-only settings not applied" in report["gpu"]


def test_default_threads_use_every_core_when_the_user_set_none():
    code = "from paddle_llm.cpu.threads import available_cores, configure_threads; print(configure_threads() == available_cores())"
    env = {k: v for k, v in subprocess_env().items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.stdout.strip().splitlines()[-1] == "True", result.stderr[-2000:]
