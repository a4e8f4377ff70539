"""The compiled CPU kernels: built once per machine, safe to build from several processes, really called by the
fast paths, correct on the inputs the families do not exercise, and replaced by the pure-Paddle composites when
they cannot be built. Their equality with PaddleNLP per family is in test_cpu_fast.py."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from paddle_llm.cpu import kernels as cpu_kernels
from paddle_llm.models.registry import family_of_model
from paddle_llm.models.registry import build_config, build_model, resolve_model
from tests.conftest import ROOT, run_script, subprocess_env

# What one Llama training step calls; the masked softmax serves instead of the attention kernel without MKL.
LLAMA_STEP_KERNELS = {
    "paddle_llm_rms_norm", "paddle_llm_swiglu", "paddle_llm_rotary", "paddle_llm_attention",
    "paddle_llm_token_cross_entropy",
}
KERNEL_NAMES = LLAMA_STEP_KERNELS | {"paddle_llm_masked_softmax", "paddle_llm_packed_matmul"}


@pytest.fixture(scope="module")
def kernels():
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler here: training uses the pure-Paddle composites (test_cpu_fast.py covers them)")
    module = cpu_kernels.load()
    assert module is not None, f"the kernels did not build: {cpu_kernels.describe()}"
    return module


def test_kernels_compile_and_load_here(kernels):
    assert cpu_kernels.describe() == "compiled CPU kernels"
    assert KERNEL_NAMES <= set(dir(kernels))


class _RecordingKernels:
    def __init__(self, module, hidden: frozenset = frozenset()):
        self.module, self.hidden, self.called = module, hidden, set()

    def __getattr__(self, name):
        if name in self.hidden:  # as in a module built without MKL
            raise AttributeError(name)
        self.called.add(name)
        return getattr(self.module, name)


@pytest.mark.parametrize("hidden, expected", [
    (frozenset(), LLAMA_STEP_KERNELS),
    (frozenset({"paddle_llm_attention"}), LLAMA_STEP_KERNELS - {"paddle_llm_attention"} | {"paddle_llm_masked_softmax"}),
], ids=["with_mkl", "without_mkl"])
def test_a_llama_training_step_runs_every_kernel(kernels, monkeypatch, hidden, expected):
    import paddle
    from paddle_llm.cpu.fast_paths import apply_cpu_fast_paths

    recording = _RecordingKernels(kernels, hidden)
    monkeypatch.setattr(cpu_kernels, "load", lambda: recording)
    source = resolve_model("tiny-llama")
    model = build_model(source, build_config(source, num_hidden_layers=2, vocab_size=1024), load_weights=False)
    apply_cpu_fast_paths(model, family_of_model(model))
    tokens = paddle.to_tensor(np.random.default_rng(0).integers(0, 1024, size=(2, 17)).astype("int64"))
    loss = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:])[0]
    loss.backward()
    assert recording.called == expected
    assert all(parameter.grad is not None for parameter in model.parameters() if not parameter.stop_gradient)


def _leaf(array: np.ndarray) -> paddle.Tensor:
    import paddle

    tensor = paddle.to_tensor(array)
    tensor.stop_gradient = False
    return tensor


def test_rms_norm_kernel_reads_a_strided_view(kernels):
    """A transposed tensor is a view with Paddle's stride kernels on (their default); the kernel must not read it
    as if it were dense."""
    import paddle

    rng = np.random.default_rng(1)
    values = rng.standard_normal([6, 4, 32]).astype("float32")
    weight = rng.standard_normal([6]).astype("float32")
    with paddle.no_grad():
        previous = paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"]
        paddle.set_flags({"FLAGS_use_stride_kernel": True})
        try:
            view = paddle.to_tensor(values).transpose([2, 1, 0])  # [32, 4, 6]
            out = kernels.paddle_llm_rms_norm(view, paddle.to_tensor(weight), 1e-6)[0]
        finally:
            paddle.set_flags({"FLAGS_use_stride_kernel": previous})
    dense = values.transpose([2, 1, 0])
    expected = dense / np.sqrt((dense**2).mean(-1, keepdims=True) + 1e-6) * weight
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_shape", [[1, 1, 5, 7], [3, 1, 5, 7], [3, 2, 5, 7], [1, 2, 5, 7]])
def test_masked_softmax_kernel_reads_each_broadcast_mask_in_place(kernels, mask_shape):
    import paddle
    import paddle.nn.functional as F

    rng = np.random.default_rng(2)
    scores_array = rng.standard_normal([3, 2, 5, 7]).astype("float32")
    mask_array = np.where(rng.random(mask_shape) < 0.3, np.finfo("float32").min, 0.0).astype("float32")
    mask_array[..., 0] = 0.0  # every row keeps one key
    cotangent = paddle.to_tensor(rng.standard_normal([3, 2, 5, 7]).astype("float32"))
    results = []
    for softmax in (lambda s, m: kernels.paddle_llm_masked_softmax(s, m), lambda s, m: F.softmax(s + m, axis=-1)):
        scores = _leaf(scores_array)
        probabilities = softmax(scores, paddle.to_tensor(mask_array))
        (probabilities * cotangent).sum().backward()
        results.append((probabilities.numpy(), scores.grad.numpy()))
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


_ATTENTION_CASES = {
    # batch, queries, query heads, key/value heads, head size, keys, mask shape, sequence_first
    "llama": (2, 16, 4, 4, 8, 16, [2, 1, 16, 16], False),
    "grouped_heads_with_cache": (2, 5, 4, 2, 8, 9, [1, 1, 5, 9], False),
    "per_head_mask": (2, 5, 2, 2, 4, 5, [2, 2, 5, 5], False),
    "chatglm_layout_multi_query": (3, 6, 4, 1, 8, 6, [3, 1, 6, 6], True),
}


def _attention_case(name: str, seed: int = 4):
    batch, queries, heads, kv_heads, head_dim, keys, mask_shape, sequence_first = _ATTENTION_CASES[name]
    rng = np.random.default_rng(seed)

    def layout(count, length):
        return [length, batch, count, head_dim] if sequence_first else [batch, length, count, head_dim]

    arrays = [rng.standard_normal(layout(count, length)).astype("float32")
              for count, length in ((heads, queries), (kv_heads, keys), (kv_heads, keys))]
    mask = np.where(rng.random(mask_shape) < 0.3, np.finfo("float32").min, 0.0).astype("float32")
    mask[..., 0] = 0.0
    cotangent = rng.standard_normal(layout(heads, queries)).astype("float32")
    return arrays, mask, cotangent, sequence_first


def _attention_values_and_grads(attention, arrays, mask, cotangent):
    import paddle

    inputs = [_leaf(array) for array in arrays]
    context, probabilities = attention(*inputs, paddle.to_tensor(mask))
    (context * paddle.to_tensor(cotangent)).sum().backward()
    return [context.numpy(), probabilities.numpy()] + [tensor.grad.numpy() for tensor in inputs]


@pytest.mark.parametrize("case", sorted(_ATTENTION_CASES))
def test_attention_kernel_equals_the_composite_it_replaces(kernels, case, monkeypatch):
    """Forward, probabilities and the three gradients, for grouped heads, a longer cached key sequence, every mask
    broadcast and ChatGLM's sequence-first layout."""
    from paddle_llm.cpu.ops import attention_in_projection_layout

    arrays, mask, cotangent, sequence_first = _attention_case(case)
    got = _attention_values_and_grads(
        lambda *inputs: kernels.paddle_llm_attention(*inputs, 0.3, sequence_first), arrays, mask, cotangent)
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)  # the pure-Paddle composite, transposes and all
    want = _attention_values_and_grads(
        lambda *inputs: attention_in_projection_layout(*inputs, sequence_first=sequence_first, query_scale=0.3),
        arrays, mask, cotangent)
    for name, got_values, want_values in zip(["context", "probabilities", "dq", "dk", "dv"], got, want):
        np.testing.assert_allclose(got_values, want_values, rtol=1e-5, atol=1e-5, err_msg=name)


_ATTENTION_WITH_THREADS = """
import sys
from paddle_llm.cpu.threads import configure_cpu_runtime
configure_cpu_runtime(2, device="cpu")
import numpy as np
from paddle_llm.cpu import kernels as cpu_kernels
from paddle_llm.cpu.ops import attention_in_projection_layout
from tests.unit.test_cpu_kernels import _attention_case, _attention_values_and_grads
kernels = cpu_kernels.load()
arrays, mask, cotangent, _ = _attention_case("llama")
runs = [_attention_values_and_grads(lambda *inputs: kernels.paddle_llm_attention(*inputs, 0.3, False),
                                    arrays, mask, cotangent) for _ in range(5)]
cpu_kernels.load = lambda: None
composite = _attention_values_and_grads(lambda *inputs: attention_in_projection_layout(*inputs, query_scale=0.3),
                                        arrays, mask, cotangent)
print("ERROR", max(float(np.abs(a - b).max()) for run in runs for a, b in zip(run, composite)))
"""


def test_attention_kernel_on_two_threads_equals_the_composite_every_time(kernels):
    """The suite runs on one thread, where the kernel's parallel loop never splits. On two, each (batch, head) task
    must still run exactly once: with a dynamic schedule, Paddle's OpenMP ran tasks twice and results varied."""
    (error,) = _lines(run_script(["-c", _ATTENTION_WITH_THREADS], OMP_NUM_THREADS="2").stdout, "ERROR")
    assert float(error) < 1e-5


def test_pack_panels_puts_each_16_columns_in_one_contiguous_panel():
    weight = np.arange(3 * 20, dtype="float32").reshape(3, 20)
    panels = cpu_kernels.pack_panels(weight)
    assert panels.shape == (2, 3, 16) and panels.flags["C_CONTIGUOUS"]
    assert np.array_equal(panels[0], weight[:, :16])
    assert np.array_equal(panels[1, :, :4], weight[:, 16:]) and not panels[1, :, 4:].any()


# Rows below, at and past the register block (3, 6 or 12 rows per ISA), columns inside one panel and across a
# padded last one, a 3-D input: what the decoding step and a prefill chunk pass.
_PACKED_SHAPES = [(1, 5, 3), (7, 33, 17), (13, 64, 48), (25, 17, 16), (12, 16, 32), (2, 3, 40, 100), (300, 100, 1000)]


@pytest.mark.parametrize("shape", _PACKED_SHAPES, ids=str)
def test_packed_matmul_equals_the_matmul_of_the_unpacked_weight(kernels, shape):
    import paddle

    *leading, k, n = shape
    rng = np.random.default_rng(len(shape) + k + n)
    x = rng.standard_normal((*leading, k)).astype("float32")
    weight = rng.standard_normal((k, n)).astype("float32")
    out = kernels.paddle_llm_packed_matmul(paddle.to_tensor(x), paddle.to_tensor(cpu_kernels.pack_panels(weight)), n)
    expected = x.astype("float64") @ weight.astype("float64")
    assert out.shape == [*leading, n]
    assert np.abs(out.numpy() - expected).max() <= 1e-5 * np.abs(expected).max()


def test_packed_matmul_refuses_a_weight_packed_for_other_columns(kernels):
    import paddle

    packed = paddle.to_tensor(cpu_kernels.pack_panels(np.ones((4, 20), "float32")))
    with pytest.raises(Exception, match=r"\[ceil\(columns / 16\), k, 16\]"):
        kernels.paddle_llm_packed_matmul(paddle.ones([2, 4]), packed, 40)


_PACKED_WITH_THREADS = """
import numpy as np, paddle
from paddle_llm.cpu import kernels as cpu_kernels
module = cpu_kernels.load()
rng = np.random.default_rng(0)
x, weight = rng.standard_normal((70, 300)).astype("float32"), rng.standard_normal((300, 1000)).astype("float32")
expected = x.astype("float64") @ weight.astype("float64")
packed = paddle.to_tensor(cpu_kernels.pack_panels(weight))
print("ERROR", max(float(np.abs(module.paddle_llm_packed_matmul(paddle.to_tensor(x), packed, 1000).numpy() - expected).max())
                   for _ in range(5)) / float(np.abs(expected).max()))
"""


def test_packed_matmul_on_two_threads_computes_every_panel_once(kernels):
    """The suite runs on one thread; a prefill-sized product splits its panels over two."""
    (error,) = _lines(run_script(["-c", _PACKED_WITH_THREADS], OMP_NUM_THREADS="2").stdout, "ERROR")
    assert float(error) < 1e-5


_PACKED_ON_BASELINE_X86_64 = """
from paddle_llm.cpu import features
baseline = features.CpuFeatures(frozenset(), "a CPU with no vector extension beyond x86-64's SSE2")
features.detect = lambda: baseline
import numpy as np, paddle
from paddle_llm.cpu import kernels as cpu_kernels
module = cpu_kernels.load()
rng = np.random.default_rng(0)
x, weight = rng.standard_normal((13, 70)).astype("float32"), rng.standard_normal((70, 40)).astype("float32")
expected = x.astype("float64") @ weight.astype("float64")
out = module.paddle_llm_packed_matmul(paddle.to_tensor(x), paddle.to_tensor(cpu_kernels.pack_panels(weight)), 40)
print("FLAGS", " ".join(cpu_kernels.compile_flags()))
print("ERROR", float(np.abs(out.numpy() - expected).max() / np.abs(expected).max()))
"""


@pytest.mark.slow  # compiles the kernels once more, for the baseline instruction set: ~20 s
def test_packed_matmul_built_for_baseline_x86_64_is_right(kernels, tmp_path):
    """The suite's CPU runs the AVX-512 or AVX2 register blocks; a CPU without AVX2 gets the SSE one."""
    output = run_script(["-c", _PACKED_ON_BASELINE_X86_64], PADDLE_LLM_KERNEL_CACHE=str(tmp_path)).stdout
    (flags,), (error,) = _lines(output, "FLAGS"), _lines(output, "ERROR")
    assert "-mavx" not in flags
    assert float(error) < 1e-5


def test_cross_entropy_kernel_names_a_label_outside_the_vocabulary(kernels):
    import paddle

    logits = paddle.zeros([2, 3, 10])
    labels = paddle.to_tensor([[1, 2, 3], [4, 12, -100]], dtype="int64")
    with pytest.raises(Exception, match="label 12 is outside the vocabulary"):
        kernels.paddle_llm_token_cross_entropy(logits, labels, -100)


def test_cross_entropy_kernel_gives_ignored_labels_no_loss_and_no_gradient(kernels):
    import paddle
    import paddle.nn.functional as F

    rng = np.random.default_rng(3)
    logits = _leaf(rng.standard_normal([2, 3, 10]).astype("float32"))
    labels = paddle.to_tensor([[1, -100, 3], [-100, 9, 0]], dtype="int64")
    loss = kernels.paddle_llm_token_cross_entropy(logits, labels, -100)[0]
    expected = F.cross_entropy(logits, labels.unsqueeze(-1), reduction="none", ignore_index=-100)
    np.testing.assert_allclose(loss.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    assert not logits.grad.numpy()[0, 1].any() and not logits.grad.numpy()[1, 0].any()
    np.testing.assert_allclose(logits.grad.numpy().sum(-1), 0.0, atol=1e-6)  # softmax minus one-hot sums to 0


_DESCRIBE_AND_TRAIN = """
import logging, math, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
import numpy as np, paddle
from paddle_llm.cpu import kernels as cpu_kernels
from paddle_llm.cpu.fast_paths import apply_cpu_fast_paths
from paddle_llm.models.registry import family_of_model
from paddle_llm.models.registry import build_config, build_model, resolve_model
source = resolve_model("tiny-llama")
paddle.seed(0)
model = build_model(source, build_config(source, num_hidden_layers=2, vocab_size=1024), load_weights=False)
apply_cpu_fast_paths(model, family_of_model(model))
tokens = paddle.to_tensor(np.random.default_rng(0).integers(0, 1024, size=(2, 17)).astype("int64"))
loss = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:])[0]
loss.backward()
print("DESCRIBE", cpu_kernels.describe())
print("LOSS", float(loss))
"""


def _lines(output: str, prefix: str) -> list[str]:
    return [line[len(prefix):].strip() for line in output.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("environment, reason", [
    ({"PADDLE_LLM_KERNEL_CACHE": "/dev/null/kernels"}, "NotADirectoryError"),
    ({"PADDLE_LLM_CPU_KERNELS": "0"}, "PADDLE_LLM_CPU_KERNELS=0"),
], ids=["unwritable_cache", "switched_off"])
def test_training_falls_back_to_the_pure_paddle_composites_with_the_reason(environment, reason):
    output = run_script(["-c", _DESCRIBE_AND_TRAIN], **environment).stdout
    (description,) = _lines(output, "DESCRIBE")
    assert description.startswith("pure-Paddle composites (") and reason in description
    (loss,) = _lines(output, "LOSS")
    assert np.isfinite(float(loss)) and float(loss) > 0


@pytest.mark.slow  # two processes on a fresh kernel cache, one compiling: ~20 s
def test_processes_starting_together_compile_once_and_share_the_library(tmp_path):
    """A fresh cache and two processes at once (a 2-process launch on a new machine): one compiles, one waits."""
    environment = subprocess_env(PADDLE_LLM_KERNEL_CACHE=str(tmp_path))
    processes = [
        subprocess.Popen([sys.executable, "-c", _DESCRIBE_AND_TRAIN], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=environment, cwd=ROOT)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert [_lines(output, "DESCRIBE") for output in outputs] == [["compiled CPU kernels"]] * 2
    compiles = sum(len(_lines(output, "paddle_llm.cpu.kernels compiling")) for output in outputs)
    assert compiles == 1
    assert _lines(outputs[0], "LOSS") == _lines(outputs[1], "LOSS")
    assert len(list(tmp_path.glob("*/paddle_llm_cpu_kernels/paddle_llm_cpu_kernels.so"))) == 1
