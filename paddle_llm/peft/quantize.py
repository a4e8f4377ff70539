"""Weight quantization for QLoRA that runs on any CPU: NF4 / FP4 blockwise, int8 / int4 per channel.

PaddleNLP's QLoRA quantizes through ``paddleslim_ops`` (custom CUDA kernels) and ``paddle.nn.quant.weight_quantize``
needs a GPU architecture, so neither runs here. This module is the same arithmetic in numpy (quantize, once, when the
model is built) and in plain Paddle ops (dequantize, every forward), so it runs wherever Paddle does.

Layout, as bitsandbytes and PaddleNLP's ``quant_blockwise`` use it:

* ``nf4`` / ``fp4``: the Paddle weight ``[in, out]`` is flattened row-major and cut into blocks of ``blocksize``
  values; each block keeps its absmax as a float32 scale and each value the index of the nearest code-book entry of
  ``value / absmax``. Two 4-bit indices share a byte, the even element in the high nibble.
* double quantization (``--qlora_weight_double_quant``): the block scales lose their mean, then are stored as int8,
  absmax-scaled per block of ``double_quant_blocksize`` scales (a linear 8-bit code, not bitsandbytes' dynamic one:
  the saved adapter never holds the quantized base, so only the error bound matters, and that is tested).
* ``weight_only_int8`` / ``weight_only_int4``: symmetric per output channel, ``round(w / (absmax / qmax))`` with
  qmax 127 or 7; int4 values are stored offset by 8, two per byte like the 4-bit codes.

On a GPU the same Paddle ops run. PaddleNLP's ``paddleslim_ops`` kernels are not swapped in: they could only be if
they read and write exactly this layout, which ``test_paddlenlp_blockwise_kernels_agree_with_ours_gpu`` checks on a
machine that has them (none here has).

Only numpy is imported at module level; ``dequantize`` imports Paddle when first called.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

# The NF4 code book of the QLoRA paper (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to [-1, 1].
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
# bitsandbytes' FP4 (e2m1, bias 3) as its dDequantizeFP4Tree decodes it, divided by the format's absmax 12:
# bit 3 is the sign, so codes 8-15 mirror 0-7.
_FP4_POSITIVE = [0.0, 0.005208333333, 0.6666666667, 1.0, 0.3333333333, 0.5, 0.1666666667, 0.25]
FP4_CODE = np.array(_FP4_POSITIVE + [-v for v in _FP4_POSITIVE], dtype=np.float32)
CODE_BOOKS = {"nf4": NF4_CODE, "fp4": FP4_CODE}
# Per-channel integer formats: the largest magnitude each stores.
INT_MAX = {"weight_only_int8": 127, "weight_only_int4": 7}
ALGORITHMS = tuple(CODE_BOOKS) + tuple(INT_MAX)
DOUBLE_QUANT_MAX = 127  # int8 codes of the double-quantized scales
# The model config LoRAModel.save_pretrained writes next to an adapter; PaddleNLP's QLoRA records its quantization there.
ADAPTER_CONFIG = "config.json"


@dataclass(frozen=True)
class QuantSpec:
    """How the frozen base is stored: PaddleNLP's ``QuantizationConfig`` fields, under our names.

    Attributes:
        algo: one of :data:`ALGORITHMS`.
        blocksize: values per absmax block (nf4/fp4).
        double_quant: quantize the block scales too (nf4/fp4).
        double_quant_blocksize: scales per block of the double quantization.
    """

    algo: str
    blocksize: int = 64
    double_quant: bool = False
    double_quant_blocksize: int = 256

    @property
    def blockwise(self) -> bool:
        return self.algo in CODE_BOOKS

    def describe(self) -> str:
        if not self.blockwise:
            return f"{self.algo} (per-channel absmax)"
        double = f", double-quantized scales (block {self.double_quant_blocksize})" if self.double_quant else ""
        return f"{self.algo} (block {self.blocksize}{double})"

    def to_paddlenlp(self) -> dict:
        """The fields of PaddleNLP's ``QuantizationConfig`` (what its QLoRA writes into an adapter's config.json)."""
        return {
            "weight_quantize_algo": self.algo,
            "weight_blocksize": self.blocksize,
            "weight_double_quant": self.double_quant,
            "weight_double_quant_block_size": self.double_quant_blocksize,
        }

    @classmethod
    def from_arguments(cls, peft_args) -> "QuantSpec | None":
        """From the fine-tuning flags (``PeftArguments``); None without ``--weight_quantize_algo``."""
        if not peft_args.weight_quantize_algo:
            return None
        return cls(peft_args.weight_quantize_algo, peft_args.qlora_weight_blocksize,
                   peft_args.qlora_weight_double_quant, peft_args.qlora_weight_double_quant_block_size)

    @classmethod
    def from_paddlenlp(cls, fields: dict) -> "QuantSpec | None":
        """Read PaddleNLP's ``quantization_config`` dict; None when it quantizes nothing."""
        algo = fields.get("weight_quantize_algo")
        if algo is None:
            return None
        return cls(algo, int(fields.get("weight_blocksize", 64)), bool(fields.get("weight_double_quant", False)),
                   int(fields.get("weight_double_quant_block_size", 256)))


def recorded_quantization(lora_path: str) -> QuantSpec | None:
    """The quantization an adapter directory records (its ``config.json``'s ``quantization_config``), or None."""
    path = os.path.join(lora_path, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return QuantSpec.from_paddlenlp(json.load(f).get("quantization_config") or {})


def nearest_code(normalized: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index (into ``code``) of the entry nearest to each value, by binary search over the sorted midpoints."""
    order = np.argsort(code, kind="stable")
    ordered = code[order]
    midpoints = (ordered[1:] + ordered[:-1]) / 2
    return order[np.searchsorted(midpoints, normalized)].astype(np.uint8)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte, the even element in the high nibble (bitsandbytes' order)."""
    flat = values.reshape(-1).astype(np.uint8)
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(-1)


def _double_quantize(scales: np.ndarray, blocksize: int) -> dict[str, np.ndarray]:
    offset = np.float32(scales.mean())
    centred = scales - offset
    padded = np.zeros(-(-centred.size // blocksize) * blocksize, dtype=np.float32)
    padded[: centred.size] = centred
    blocks = padded.reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    divisor = np.where(absmax > 0, absmax, 1.0)[:, None]
    codes = np.clip(np.rint(blocks / divisor * DOUBLE_QUANT_MAX), -DOUBLE_QUANT_MAX, DOUBLE_QUANT_MAX)
    return {
        "qquant_scale": codes.astype(np.int8).reshape(-1)[: centred.size],
        "double_quant_scale": absmax.astype(np.float32),
        "quant_scale_offset": np.array([offset], dtype=np.float32),
    }


def quantize(weight: np.ndarray, spec: QuantSpec) -> dict[str, np.ndarray]:
    """Quantize a ``[in, out]`` float weight.

    Returns:
        The stored arrays, by PaddleNLP's attribute names: ``quant_weight`` (uint8, or int8 for int8) and either
        ``quant_scale`` (float32) or, double-quantized, ``qquant_scale`` / ``double_quant_scale`` /
        ``quant_scale_offset``.

    Raises:
        ValueError: the block size does not divide the weight (validation rejects this earlier for a model).
    """
    weight = np.asarray(weight, dtype=np.float32)
    if not spec.blockwise:
        qmax = INT_MAX[spec.algo]
        scale = np.abs(weight).max(axis=0) / qmax
        ints = np.clip(np.rint(weight / np.where(scale > 0, scale, 1.0)), -qmax, qmax).astype(np.int8)
        stored = ints if spec.algo == "weight_only_int8" else pack_nibbles(ints.astype(np.int16) + 8)
        return {"quant_weight": stored, "quant_scale": scale.astype(np.float32)}
    if weight.size % spec.blocksize:
        raise ValueError(f"blocksize {spec.blocksize} does not divide a weight of {weight.size} values {list(weight.shape)}")
    blocks = weight.reshape(-1, spec.blocksize)
    absmax = np.abs(blocks).max(axis=1)
    codes = nearest_code(blocks / np.where(absmax > 0, absmax, 1.0)[:, None], CODE_BOOKS[spec.algo])
    stored = {"quant_weight": pack_nibbles(codes)}
    if spec.double_quant:
        stored.update(_double_quantize(absmax.astype(np.float32), spec.double_quant_blocksize))
    else:
        stored["quant_scale"] = absmax.astype(np.float32)
    return stored


def block_scales_numpy(stored: dict[str, np.ndarray], spec: QuantSpec) -> np.ndarray:
    """The per-block absmax scales as dequantization sees them (after undoing double quantization)."""
    if not spec.double_quant:
        return stored["quant_scale"]
    count = stored["qquant_scale"].size
    per_scale = np.repeat(stored["double_quant_scale"], spec.double_quant_blocksize)[:count]
    return stored["qquant_scale"].astype(np.float32) / DOUBLE_QUANT_MAX * per_scale + stored["quant_scale_offset"][0]


def dequantize_numpy(stored: dict[str, np.ndarray], spec: QuantSpec, shape) -> np.ndarray:
    """The numpy reference of :func:`dequantize` (tests compare the two)."""
    if not spec.blockwise:
        ints = stored["quant_weight"].astype(np.float32)
        if spec.algo == "weight_only_int4":
            ints = unpack_nibbles(stored["quant_weight"]).astype(np.float32).reshape(shape) - 8
        return ints.reshape(shape) * stored["quant_scale"]
    values = CODE_BOOKS[spec.algo][unpack_nibbles(stored["quant_weight"])].reshape(-1, spec.blocksize)
    return (values * block_scales_numpy(stored, spec)[:, None]).reshape(shape)


def dequantize(tensors: dict, spec: QuantSpec, shape: list[int], dtype: str):
    """Rebuild the float weight from the stored Paddle tensors (the names :func:`quantize` returns) in ``dtype``.

    Plain Paddle ops only (shift, mask, gather, multiply), so it runs on CPU and GPU alike; called inside the
    quantized linear layer's forward and backward, so the float weight lives only while one layer computes.
    """
    import paddle

    codes = tensors["quant_weight"]
    if not spec.blockwise:
        ints = codes.astype("float32")
        if spec.algo == "weight_only_int4":
            ints = _unpack(codes).astype("float32") - 8
        return (ints.reshape(shape) * tensors["quant_scale"]).astype(dtype)
    table = paddle.to_tensor(CODE_BOOKS[spec.algo], place=codes.place)
    values = paddle.gather(table, _unpack(codes).astype("int32")).reshape([-1, spec.blocksize])
    if spec.double_quant:
        per_scale = paddle.repeat_interleave(tensors["double_quant_scale"], spec.double_quant_blocksize)
        count = tensors["qquant_scale"].shape[0]
        scales = tensors["qquant_scale"].astype("float32") / DOUBLE_QUANT_MAX * per_scale[:count] + tensors["quant_scale_offset"]
    else:
        scales = tensors["quant_scale"]
    return (values * scales.unsqueeze(-1)).reshape(shape).astype(dtype)


def _unpack(packed):
    import paddle

    four = paddle.full([], 4, dtype="uint8")
    mask = paddle.full([], 0x0F, dtype="uint8")
    return paddle.stack([paddle.bitwise_right_shift(packed, four), paddle.bitwise_and(packed, mask)], axis=-1).reshape([-1])
