"""QLoRA: LoRA adapters on a frozen base stored quantized (``--weight_quantize_algo nf4|fp4|weight_only_int8|int4``).

PaddleNLP's ``LoRAModel`` wraps the model as for LoRA; then every ``LoRALinear`` it made is swapped for a
:class:`QuantizedLoRALinear` that keeps the same ``lora_A`` / ``lora_B`` parameters (same names, so the adapter is
saved and loaded exactly as a LoRA adapter) and, instead of the float weight, the codes and scales of
``paddle_llm.peft.quantize``. The float weight is rebuilt inside each forward and again inside backward
(:class:`_QuantizedMatmul`), so autograd never keeps a dequantized copy per layer: that is where the memory goes.

The quantization is recorded the way PaddleNLP's QLoRA records it, as ``quantization_config`` in the model config
that ``LoRAModel.save_pretrained`` writes next to the adapter (``config.json``). ``load_lora`` reads it back, so
``merge-lora`` and ``export --lora_path`` see the base the adapter was trained on; merging folds the adapter into the
*dequantized* base (what training saw), not into the original float weights.
"""

from __future__ import annotations

import numpy as np
import paddle
from paddle.autograd import PyLayer
from paddlenlp.peft.lora.lora_layers import LoRALinear
from paddlenlp.quantization.quantization_config import QuantizationConfig

from paddle_llm.peft.quantize import QuantSpec, dequantize, quantize

class _QuantizedMatmul(PyLayer):
    """``x @ dequantize(codes)`` whose backward dequantizes again instead of saving the float weight."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return paddle.matmul(x, layer.dequantized_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        # The base is frozen: only the input needs a gradient.
        return paddle.matmul(grad, ctx.layer.dequantized_weight(grad.dtype), transpose_y=True)


class QuantizedLoRALinear(paddle.nn.Layer):
    """A ``LoRALinear`` whose frozen weight is stored quantized; ``x W_q + x A B * scaling`` (+ bias)."""

    def __init__(self, lora_layer: LoRALinear, spec: QuantSpec):
        super().__init__()
        if lora_layer.use_mora or lora_layer.lora_use_mixer or lora_layer.pissa:
            raise ValueError("QLoRA here quantizes plain LoRA layers; MoRA, the LoRA mixer and PiSSA are not supported with --weight_quantize_algo")
        weight = lora_layer.weight
        self.in_features, self.out_features = (int(n) for n in weight.shape)
        self.spec = spec
        for name, array in quantize(weight.astype("float32").numpy(), spec).items():
            # Not persistable: the base is re-quantized from the base checkpoint, the adapter saves only A and B.
            self.register_buffer(name, paddle.to_tensor(array, place=weight.place), persistable=False)
        self.stored_bytes = sum(int(np.prod(b.shape)) * b.element_size() for b in self.buffers())
        self.float_bytes = int(np.prod(weight.shape)) * weight.element_size()
        self.bias = lora_layer.bias
        self.lora_A, self.lora_B = lora_layer.lora_A, lora_layer.lora_B
        self.lora_dropout = lora_layer.lora_dropout
        self.r, self.lora_alpha, self.scaling = lora_layer.r, lora_layer.lora_alpha, lora_layer.scaling
        self.disable_lora = False

    def dequantized_weight(self, dtype) -> paddle.Tensor:
        tensors = {name: buffer for name, buffer in self.named_buffers(include_sublayers=False)}
        return dequantize(tensors, self.spec, [self.in_features, self.out_features], dtype)

    def forward(self, x):
        out = _QuantizedMatmul.apply(x, self)
        if self.bias is not None:
            out = out + self.bias
        if not self.disable_lora:
            out = out + (self.lora_dropout(x) @ self.lora_A @ self.lora_B) * self.scaling
        return out

    def to_lora_linear(self) -> LoRALinear:
        """A float ``LoRALinear`` holding the dequantized weight and these same adapter parameters."""
        dtype = self.lora_A.dtype
        plain = LoRALinear(self.in_features, self.out_features, r=self.r, lora_alpha=self.lora_alpha,
                           bias_attr=False if self.bias is None else None)
        plain.weight.set_value(self.dequantized_weight(dtype))
        plain.weight.stop_gradient = True
        plain.lora_A, plain.lora_B, plain.lora_dropout = self.lora_A, self.lora_B, self.lora_dropout
        plain.scaling = self.scaling
        if self.bias is not None:
            plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, {self.spec.describe()}"


def _replace(root, path: str, layer) -> None:
    *parents, name = path.split(".")
    parent = root
    for part in parents:
        parent = getattr(parent, part)
    setattr(parent, name, layer)


def _quantized_layers(model) -> list[tuple[str, QuantizedLoRALinear]]:
    return [(name, layer) for name, layer in model.named_sublayers() if isinstance(layer, QuantizedLoRALinear)]


def quantize_lora_base(lora_model, spec: QuantSpec) -> str:
    """Store the frozen weight of every LoRA layer of ``lora_model`` quantized, and record ``spec`` in its config.

    A model already quantized with ``spec`` is left as it is (an adapter loaded with ``load_lora`` carries its own).

    Returns:
        One line saying what was quantized and the bytes it saves.

    Raises:
        ValueError: the model is already quantized differently (the adapter was trained on another base).
    """
    done = _quantized_layers(lora_model.model)
    if done:
        if done[0][1].spec != spec:
            raise ValueError(f"this adapter was trained on a {done[0][1].spec.describe()} base; pass the same --weight_quantize_algo and block sizes (asked: {spec.describe()})")
        return f"QLoRA: base already stored as {spec.describe()}"
    targets = [(name, layer) for name, layer in lora_model.model.named_sublayers() if isinstance(layer, LoRALinear)]
    for name, layer in targets:
        _replace(lora_model.model, name, QuantizedLoRALinear(layer, spec))
    lora_model.model.config.quantization_config = QuantizationConfig(**spec.to_paddlenlp())
    stored, full = quantized_bytes(lora_model.model)
    return (f"QLoRA: {len(targets)} linear layers stored as {spec.describe()}: {stored / 2**20:.2f} MiB instead of "
            f"{full / 2**20:.2f} MiB ({stored / max(1, full):.2f}x)")


def dequantize_lora_base(lora_model) -> QuantSpec | None:
    """Swap every quantized layer back for a float ``LoRALinear`` holding the dequantized weight (before a merge).

    Returns:
        The spec the base had, or None when it was not quantized.
    """
    layers = _quantized_layers(lora_model.model)
    for name, layer in layers:
        _replace(lora_model.model, name, layer.to_lora_linear())
    # The merged model is plain float: its config must not tell PaddleNLP's loader to quantize it again.
    lora_model.model.config.quantization_config = QuantizationConfig()
    return layers[0][1].spec if layers else None


def quantized_bytes(model) -> tuple[int, int]:
    """(bytes stored, bytes the same weights take in float) over the quantized layers of ``model``."""
    layers = [layer for _, layer in _quantized_layers(model)]
    return sum(l.stored_bytes for l in layers), sum(l.float_bytes for l in layers)
