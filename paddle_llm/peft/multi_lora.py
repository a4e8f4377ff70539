"""Many LoRA adapters on one base model at once, each batch row with its own (``paddle-llm serve --lora_modules``).

Merging (``W + A B * scaling``) gives one model per adapter. Here the base weights stay as they are and every linear
layer adds ``x A[slot] B[slot]`` for each row's adapter slot, batched: one gather of the slot's A and B per row and
two batched matrix products. The slots are preallocated (``LoRABank``): slot 0 (``NO_ADAPTER``) is all zeros and
means the base model, slots 1..max_loras hold the loaded adapters, each padded with zeros to ``max_rank`` (zero
columns of A and rows of B add nothing, so any rank up to it computes exactly its own delta). The scaling is folded
into B when an adapter is written.

Only the layers' Python forward is wrapped, so this runs in dygraph; an exported static graph has no adapter inputs.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import paddle
from paddle import nn

from paddle_llm.config.parser import ArgumentError
from paddle_llm.peft.adapter_match import require_matching, tensor_shapes
from paddle_llm.peft.lora import read_lora_tensors
from paddle_llm.peft.quantize import recorded_quantization

NO_ADAPTER = 0
FLOAT32_BYTES = 4
# lora_config.json switches for PaddleNLP LoRA variants whose forward is not x A B * scaling; merge them instead.
_OTHER_FORWARDS = ("use_mora", "lora_use_mixer", "pissa")


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter read from disk, checked against the base: ``layer name -> (A [in, r], B * scaling [r, out])``."""

    rank: int
    deltas: dict[str, tuple[np.ndarray, np.ndarray]]


def read_adapter(lora_path: str, linear_shapes: dict[str, tuple[int, int]], flag: str, base_path: str,
                 max_rank: int) -> AdapterWeights:
    """Read a LoRA adapter directory (either format ``finetune --lora`` saves) for a ``LoRABank``.

    Args:
        linear_shapes: the base's linear layers, ``name -> (in, out)`` (``LoRABank.linear_shapes``).
        flag: how the adapter was named (``--lora_modules NAME``), for messages.
        base_path: the base model's directory, for messages.

    Raises:
        FileNotFoundError: not an adapter directory.
        ArgumentError: rank over ``max_rank``, a variant this forward does not compute, or an adapter saved for
            another base (``AdapterMismatchError`` naming the first tensor that does not fit).
    """
    config_path = os.path.join(lora_path, "lora_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{flag}: {lora_path!r} has no lora_config.json; pass the directory a LoRA run saved")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    tensors = read_lora_tensors(lora_path)
    if tensors is None:
        raise FileNotFoundError(f"{flag}: {lora_path!r} holds no adapter weights; pass the directory a LoRA run saved")
    variants = [name for name in _OTHER_FORWARDS if config.get(name)]
    if recorded_quantization(lora_path) is not None:
        variants.append("a quantized (QLoRA) base")
    if variants:
        raise ArgumentError(f"{flag}: {lora_path} was trained with {', '.join(variants)}, which per-request adapters "
                            "do not compute; merge it (`paddle-llm merge-lora`) and serve the merged model")
    rank = int(config["r"])
    if rank > max_rank:
        raise ArgumentError(f"{flag}: {lora_path} has rank {rank}, over --max_lora_rank {max_rank}; raise "
                            "--max_lora_rank (each slot's memory grows with it)")
    patterns = config.get("target_modules") or []
    targets = [name for name in linear_shapes if any(re.fullmatch(p, name) for p in patterns)]
    expected = {}
    for name in targets:
        fan_in, fan_out = linear_shapes[name]
        expected.update({f"{name}.lora_A": (fan_in, rank), f"{name}.lora_B": (rank, fan_out)})
    require_matching(flag, lora_path, base_path, tensor_shapes(tensors), expected, base_flag="--model")
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / (math.sqrt(rank) if config.get("rslora") else rank)
    deltas = {name: (np.asarray(tensors[f"{name}.lora_A"], dtype="float32"),
                     np.asarray(tensors[f"{name}.lora_B"], dtype="float32") * scaling) for name in targets}
    return AdapterWeights(rank, deltas)


class MultiLoRALinear(nn.Layer):
    """A base ``nn.Linear`` plus, for each batch row, the delta of the adapter in that row's slot."""

    def __init__(self, base: nn.Linear, bank: "LoRABank", slots: int, max_rank: int):
        super().__init__()
        self.base = base
        self.bank = bank
        fan_in, fan_out = base.weight.shape
        self.register_buffer("lora_A", paddle.zeros([slots, fan_in, max_rank], dtype=base.weight.dtype))
        self.register_buffer("lora_B", paddle.zeros([slots, max_rank, fan_out], dtype=base.weight.dtype))
        self.adapted_slots: set[int] = set()  # slots whose adapter targets this layer

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        output = self.base(x)
        rows = self.bank.step_rows
        if rows is None or not (self.adapted_slots & self.bank.step_slots):
            return output
        # x [b, q, in] (batch first; LoRABank refuses other layouts) @ A[slot] [b, in, r] @ B[slot] [b, r, out]
        low_rank = paddle.bmm(x, paddle.index_select(self.lora_A, rows))
        return output + paddle.bmm(low_rank, paddle.index_select(self.lora_B, rows))


class LoRABank:
    """Every linear layer of a model wrapped in ``MultiLoRALinear``, with ``max_loras`` adapter slots preallocated.

    Thread safety: ``write``/``clear`` (a server's request threads) and ``rows_for_step`` (the engine thread) take
    one lock, so an adapter is never half-written while a step reads the bank.
    """

    def __init__(self, model: nn.Layer, max_loras: int, max_rank: int):
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.step_rows: paddle.Tensor | None = None  # the running step's slot per row; None: no row has an adapter
        self.step_slots: set[int] = set()
        self.loads = [0] * (max_loras + 1)  # writes per slot: tells one adapter in a slot from the next
        self._lock = threading.Lock()
        self.layers: dict[str, MultiLoRALinear] = {}
        linear = [(name, layer) for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)]
        for name, layer in linear:
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_sublayer(parent_name) if parent_name else model
            wrapped = MultiLoRALinear(layer, self, max_loras + 1, max_rank)
            setattr(parent, attribute, wrapped)
            self.layers[name] = wrapped

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: tuple(int(n) for n in layer.weight.shape) for name, layer in self.layers.items()}

    def bytes_per_adapter(self) -> int:
        """Memory one slot holds: ``max_rank * (in + out)`` float32 values per linear layer."""
        return FLOAT32_BYTES * self.max_rank * sum(fan_in + fan_out for fan_in, fan_out in self.linear_shapes().values())

    def write(self, slot: int, adapter: AdapterWeights) -> None:
        """Put ``adapter`` in ``slot`` (1..max_loras), replacing what was there."""
        if not 1 <= slot <= self.max_loras:
            raise ValueError(f"slot {slot} is outside 1..{self.max_loras}")
        with self._lock, paddle.no_grad():
            self.loads[slot] += 1
            for name, layer in self.layers.items():
                layer.lora_A[slot] = paddle.zeros(layer.lora_A.shape[1:], dtype=layer.lora_A.dtype)
                layer.lora_B[slot] = paddle.zeros(layer.lora_B.shape[1:], dtype=layer.lora_B.dtype)
                layer.adapted_slots.discard(slot)
                if name in adapter.deltas:
                    a, b = adapter.deltas[name]
                    layer.lora_A[slot, :, : adapter.rank] = paddle.to_tensor(a)
                    layer.lora_B[slot, : adapter.rank, :] = paddle.to_tensor(b)
                    layer.adapted_slots.add(slot)

    @contextmanager
    def rows_for_step(self, adapters: Sequence[int]):
        """Select each row's slot for the step run inside this context (``adapters[row]``, NO_ADAPTER for the base)."""
        with self._lock:
            slots = set(int(a) for a in adapters) - {NO_ADAPTER}
            if slots:
                self.step_rows = paddle.to_tensor(np.asarray(adapters, dtype="int64"))
                self.step_slots = slots
            try:
                yield
            finally:
                self.step_rows, self.step_slots = None, set()
