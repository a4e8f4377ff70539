"""The QLoRA quantizer: error bounds per block against the code book's spacing, the stored layout, and the
Paddle dequantization (what every forward runs) against the numpy reference."""

import numpy as np
import paddle
import pytest

from paddle_llm.config.validation import BLOCKWISE_ALGOS, WEIGHT_QUANTIZE_ALGOS
from paddle_llm.peft.quantize import (
    CODE_BOOKS,
    DOUBLE_QUANT_MAX,
    FP4_CODE,
    INT_MAX,
    NF4_CODE,
    QuantSpec,
    block_scales_numpy,
    dequantize,
    dequantize_numpy,
    quantize,
    unpack_nibbles,
)

# The QLoRA paper's NF4 values, as the issue quotes them.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def weights(shape=(128, 96), seed=0, outliers=True) -> np.ndarray:
    """Normal weights (what NF4 is built for) with a few large outliers, as real checkpoints have."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, size=shape).astype(np.float32)
    if outliers:
        w.reshape(-1)[rng.choice(w.size, 20, replace=False)] *= 40
    return w


def half_gap_bound(normalized: np.ndarray, code: np.ndarray) -> np.ndarray:
    """For each value in [-1, 1]: half the width of the code-book interval it falls in (the nearest-rounding bound)."""
    ordered = np.sort(code)
    upper = np.clip(np.searchsorted(ordered, normalized), 1, len(ordered) - 1)
    return (ordered[upper] - ordered[upper - 1]) / 2


def test_code_books_are_the_papers_and_bitsandbytes():
    assert NF4_CODE.tolist() == pytest.approx(PAPER_NF4, abs=0)
    # bitsandbytes' FP4: e2m1 magnitudes {0, 0.0625, 2, 3, 4, 6, 8, 12} / 12 in its code order, sign in bit 3.
    assert FP4_CODE[:8] * 12 == pytest.approx([0, 0.0625, 8, 12, 4, 6, 2, 3])
    assert FP4_CODE[8:] == pytest.approx(-FP4_CODE[:8])
    assert set(CODE_BOOKS) == set(BLOCKWISE_ALGOS) and set(CODE_BOOKS) | set(INT_MAX) == set(WEIGHT_QUANTIZE_ALGOS)


@pytest.mark.parametrize("algo", BLOCKWISE_ALGOS)
@pytest.mark.parametrize("blocksize", [64, 32, 128])
def test_blockwise_error_is_within_half_the_code_spacing_of_each_block(algo, blocksize):
    w = weights()
    spec = QuantSpec(algo, blocksize)
    stored = quantize(w, spec)
    error = np.abs(dequantize_numpy(stored, spec, w.shape) - w).reshape(-1, blocksize)
    blocks = w.reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    assert np.array_equal(stored["quant_scale"], absmax[:, 0])  # one float32 absmax per block
    bound = absmax * half_gap_bound(blocks / absmax, CODE_BOOKS[algo])
    assert np.all(error <= bound * (1 + 1e-6) + 1e-9)
    # The largest value of each block is exact (the code book holds +-1).
    assert np.all(np.take_along_axis(error, np.abs(blocks).argmax(axis=1)[:, None], axis=1) < 1e-9)


def test_an_outlier_costs_only_its_own_block():
    w = weights(outliers=False)
    spiked = w.copy()
    spiked[0, 0] = 5.0  # in the first block of 64
    spec = QuantSpec("nf4")
    before = np.abs(dequantize_numpy(quantize(w, spec), spec, w.shape) - w).reshape(-1, 64)
    after = np.abs(dequantize_numpy(quantize(spiked, spec), spec, w.shape) - spiked).reshape(-1, 64)
    assert after[0].mean() > 10 * before[0].mean()
    assert np.array_equal(after[1:], before[1:])


def test_two_codes_per_byte_even_element_in_the_high_nibble():
    spec = QuantSpec("nf4", blocksize=4)
    w = np.array([[1.0, -1.0, 0.0, 0.55]], dtype=np.float32)  # codes 15, 0, 7, and 0.55 -> 0.5626 (13)
    stored = quantize(w, spec)
    assert stored["quant_weight"].tolist() == [(15 << 4) | 0, (7 << 4) | 13]
    assert unpack_nibbles(stored["quant_weight"]).tolist() == [15, 0, 7, 13]
    assert quantize(weights(), QuantSpec("nf4"))["quant_weight"].nbytes == weights().size // 2


def test_double_quantized_scales_are_int8_blockwise_around_their_mean_and_bounded():
    w = weights(shape=(256, 96))
    plain_spec, double_spec = QuantSpec("nf4"), QuantSpec("nf4", double_quant=True, double_quant_blocksize=256)
    plain, double = quantize(w, plain_spec), quantize(w, double_spec)
    scales = plain["quant_scale"]
    assert double["qquant_scale"].dtype == np.int8 and double["double_quant_scale"].size == -(-scales.size // 256)
    assert double["quant_scale_offset"][0] == pytest.approx(scales.mean())
    recovered = block_scales_numpy(double, double_spec)
    per_scale = np.repeat(double["double_quant_scale"], 256)[: scales.size]
    assert np.all(np.abs(recovered - scales) <= per_scale / (2 * DOUBLE_QUANT_MAX) * (1 + 1e-5) + 1e-9)
    # The weight error grows by at most the scale error (every code is within [-1, 1]).
    base_error = np.abs(dequantize_numpy(plain, plain_spec, w.shape) - w).reshape(-1, 64).max(axis=1)
    double_error = np.abs(dequantize_numpy(double, double_spec, w.shape) - w).reshape(-1, 64).max(axis=1)
    assert np.all(double_error <= base_error + np.abs(recovered - scales) * (1 + 1e-5) + 1e-7)
    nbytes = lambda stored: sum(a.nbytes for a in stored.values())
    assert nbytes(double) < nbytes(plain)


@pytest.mark.parametrize("algo", list(INT_MAX))
def test_per_channel_integers_are_within_half_a_step(algo):
    w = weights()
    spec = QuantSpec(algo)
    stored = quantize(w, spec)
    step = np.abs(w).max(axis=0) / INT_MAX[algo]
    assert stored["quant_scale"] == pytest.approx(step)
    error = np.abs(dequantize_numpy(stored, spec, w.shape) - w)
    assert np.all(error <= step / 2 * (1 + 1e-5) + 1e-9)
    assert stored["quant_weight"].nbytes == (w.size if algo == "weight_only_int8" else w.size // 2)


def test_a_blocksize_that_does_not_divide_the_weight_is_refused():
    with pytest.raises(ValueError, match="blocksize 48 does not divide"):
        quantize(np.zeros((10, 10), np.float32), QuantSpec("nf4", blocksize=48))


@pytest.mark.parametrize("spec", [QuantSpec("nf4"), QuantSpec("fp4", 32), QuantSpec("nf4", double_quant=True, double_quant_blocksize=16),
                                  QuantSpec("weight_only_int8"), QuantSpec("weight_only_int4")], ids=lambda s: s.describe())
def test_paddle_dequantization_equals_the_numpy_reference(spec):
    w = weights()
    stored = quantize(w, spec)
    tensors = {name: paddle.to_tensor(array) for name, array in stored.items()}
    rebuilt = dequantize(tensors, spec, list(w.shape), "float32")
    assert rebuilt.shape == list(w.shape) and rebuilt.dtype == paddle.float32
    np.testing.assert_allclose(rebuilt.numpy(), dequantize_numpy(stored, spec, w.shape), rtol=1e-6, atol=1e-8)


def test_spec_round_trips_through_paddlenlp_quantization_config():
    from paddlenlp.quantization.quantization_config import QuantizationConfig

    spec = QuantSpec("fp4", 128, True, 64)
    config = QuantizationConfig(**spec.to_paddlenlp())
    assert QuantSpec.from_paddlenlp(config.to_dict()) == spec
    assert QuantSpec.from_paddlenlp(QuantizationConfig().to_dict()) is None
    assert QuantSpec.from_paddlenlp({"weight_quantize_algo": "nf4"}) == QuantSpec("nf4", 64, False, 256)  # to_diff_dict


@pytest.mark.gpu
@pytest.mark.skipif(not paddle.device.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0, reason="needs a CUDA device")
@pytest.mark.parametrize("algo", BLOCKWISE_ALGOS)
def test_paddlenlp_blockwise_kernels_agree_with_ours_gpu(algo):
    """The gate for swapping in PaddleNLP's paddleslim_ops kernels on a GPU: they must read and write the layout
    this module stores (same codes, same nibble order, same scales), so the saved format stays one."""
    qlora = pytest.importorskip("paddlenlp.quantization.qlora", reason="paddleslim_ops (PaddleNLP's CUDA kernels) not installed")
    w = weights(shape=(256, 128))
    spec = QuantSpec(algo)
    theirs = qlora.qlora_weight_quantize(paddle.to_tensor(w, place=paddle.CUDAPlace(0)), quant_algo=algo, block_size=64)
    ours = quantize(w, spec)
    np.testing.assert_array_equal(theirs["quant_weight"].numpy().reshape(-1), ours["quant_weight"])
    np.testing.assert_allclose(theirs["quant_scale"].numpy().reshape(-1), ours["quant_scale"], rtol=1e-6)
    rebuilt = qlora.qlora_weight_dequantize(paddle.to_tensor(ours["quant_weight"]).cuda(), algo, paddle.to_tensor(ours["quant_scale"]).cuda(), block_size=64)
    np.testing.assert_allclose(rebuilt.numpy().reshape(w.shape), dequantize_numpy(ours, spec, w.shape), rtol=1e-6)
