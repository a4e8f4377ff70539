"""Running the step graph: Paddle Inference or dygraph behind one interface, plus batched KV-cache bookkeeping.

``StepDecoder`` is the piece the parity check and the serving engine share. It knows how to build the step inputs for
rows of different lengths (left padding, an explicit mask, per-row positions), how to prefill new rows, run one
decoding step, and merge or drop rows between steps. It does not sample and does not schedule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import paddle

from paddle_llm.export.manifest import CacheLayout


class StepRunner(Protocol):
    """Runs ``(input_ids, position_ids, mask, past_key, past_value) -> (last_logits, key, value)``."""

    def run(self, inputs: list[paddle.Tensor]) -> list[paddle.Tensor]: ...


class InferenceStepRunner:
    """The exported step graph in a Paddle Inference predictor (CPU, or GPU when asked and available)."""

    def __init__(self, graph_prefix: str, num_threads: int = 1, use_gpu: bool = False, enable_mkldnn: bool = False):
        """
        Args:
            graph_prefix: path without extension of ``model.json`` / ``model.pdiparams``.
            num_threads: CPU math threads of this predictor.
            use_gpu: run on GPU 0 (needs a CUDA build of Paddle).
            enable_mkldnn: use oneDNN kernels on CPU (safe: the past is never empty; measured slower for small models).

        Raises:
            FileNotFoundError: the graph files are missing.
        """
        from paddle import inference

        model_file, params_file = graph_prefix + ".json", graph_prefix + ".pdiparams"
        for path in (model_file, params_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing; run `paddle-llm export` to write the step graph")
        config = inference.Config(model_file, params_file)
        if use_gpu:
            config.enable_use_gpu(256, 0)
        else:
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(num_threads)
            if not enable_mkldnn:
                config.disable_mkldnn()
        config.disable_glog_info()
        self.predictor = inference.create_predictor(config)

    def run(self, inputs: list[paddle.Tensor]) -> list[paddle.Tensor]:
        # The predictor hands back tensors over its own output buffers, which the next run overwrites; the cache
        # outlives the call (and is fed back in), so it must own its memory.
        return [output.clone() for output in self.predictor.run(inputs)]


class DygraphStepRunner:
    """The same step as a dygraph Layer (``step_graph.build_step_layer``), for serving a checkpoint without export."""

    def __init__(self, step_layer: paddle.nn.Layer):
        self.step_layer = step_layer
        step_layer.eval()

    def run(self, inputs: list[paddle.Tensor]) -> list[paddle.Tensor]:
        with paddle.no_grad():
            return list(self.step_layer(*inputs))


@dataclass
class KVBatch:
    """The cache of the rows decoding together, and which of its columns are real tokens.

    Attributes:
        key, value: stacked caches, shape ``layout.shape(rows, columns)``.
        valid: ``[rows, columns]`` bool; False for left padding and the masked dummy column.
        next_position: ``[rows]`` position id of each row's next token (prefix columns take no positions).
    """

    key: paddle.Tensor
    value: paddle.Tensor
    valid: np.ndarray
    next_position: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.valid.shape[0])


def step_attention_mask(past_valid: np.ndarray, new_valid: np.ndarray) -> np.ndarray:
    """Mask ``[b, 1, q, past + q]`` (True = attend): every valid past column, and new tokens causally.

    A padded query row would attend to nothing; it attends to itself instead so softmax never sees an all-masked
    row (its output is thrown away).
    """
    batch, query = new_valid.shape
    causal = np.tril(np.ones((query, query), dtype=bool))
    new_part = causal[None, :, :] & new_valid[:, None, :]
    new_part |= np.eye(query, dtype=bool)[None, :, :] & ~new_valid[:, :, None]
    past_part = np.broadcast_to(past_valid[:, None, :], (batch, query, past_valid.shape[1]))
    return np.concatenate([past_part, new_part], axis=2)[:, None, :, :]


def position_input(positions: np.ndarray, glm_positions: bool) -> np.ndarray:
    """``[b, q]`` positions in the family's input form; ChatGLM v1 adds block positions (0 for plain text)."""
    if glm_positions:
        return np.stack([positions, np.zeros_like(positions)], axis=1)
    return positions


class StepDecoder:
    """Prefill, decode, merge and drop rows around a ``StepRunner``."""

    def __init__(
        self,
        runner: StepRunner,
        layout: CacheLayout,
        dtype: str,
        glm_positions: bool,
        pad_token_id: int = 0,
        prefix_cache: tuple[paddle.Tensor, paddle.Tensor] | None = None,
    ):
        """
        Args:
            runner: the step graph or layer.
            layout: cache geometry (from the export manifest or the config).
            dtype: cache dtype.
            glm_positions: the model takes ChatGLM v1 2-D positions.
            pad_token_id: id written into padded slots (never attended to).
            prefix_cache: prefix-tuning past ``(key, value)`` for one row, prepended to every new row.
        """
        self.runner = runner
        self.layout = layout
        self.dtype = dtype
        self.glm_positions = glm_positions
        self.pad_token_id = pad_token_id
        self.prefix_cache = prefix_cache

    def _initial_past(self, rows: int) -> tuple[paddle.Tensor, paddle.Tensor, np.ndarray]:
        if self.prefix_cache is not None:
            tiles = [1] * 5
            tiles[self.layout.batch_axis] = rows
            key = paddle.tile(self.prefix_cache[0], tiles)
            value = paddle.tile(self.prefix_cache[1], tiles)
            valid = np.ones((rows, self.prefix_cache[0].shape[self.layout.seq_axis]), dtype=bool)
            return key, value, valid
        # One masked-out column instead of an empty past (see step_graph's docstring).
        zeros = paddle.zeros(self.layout.shape(rows, 1), dtype=self.dtype)
        return zeros, zeros, np.zeros((rows, 1), dtype=bool)

    def _run(self, input_ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, key, value):
        inputs = [
            paddle.to_tensor(input_ids.astype("int64")),
            paddle.to_tensor(position_input(positions.astype("int64"), self.glm_positions)),
            paddle.to_tensor(mask),
            key,
            value,
        ]
        logits, new_key, new_value = self.runner.run(inputs)
        return logits.numpy(), new_key, new_value

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, KVBatch]:
        """Run new rows' prompts together (left-padded to the longest).

        Returns:
            ``(logits [rows, vocab] of each prompt's last token, the rows' KVBatch)``.
        """
        rows, longest = len(prompts), max(len(p) for p in prompts)
        input_ids = np.full((rows, longest), self.pad_token_id, dtype="int64")
        new_valid = np.zeros((rows, longest), dtype=bool)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt):] = prompt
            new_valid[row, longest - len(prompt):] = True
        positions = np.maximum(np.cumsum(new_valid, axis=1) - 1, 0)
        key, value, past_valid = self._initial_past(rows)
        mask = step_attention_mask(past_valid, new_valid)
        logits, key, value = self._run(input_ids, positions, mask, key, value)
        valid = np.concatenate([past_valid, new_valid], axis=1)
        lengths = np.array([len(p) for p in prompts], dtype="int64")
        return logits, self.trim(KVBatch(key, value, valid, lengths))

    def decode(self, batch: KVBatch, last_tokens: Sequence[int]) -> tuple[np.ndarray, KVBatch]:
        """Feed each row's latest token; returns next-token logits and the grown batch."""
        new_valid = np.ones((batch.rows, 1), dtype=bool)
        mask = step_attention_mask(batch.valid, new_valid)
        input_ids = np.asarray(last_tokens, dtype="int64").reshape(batch.rows, 1)
        logits, key, value = self._run(input_ids, batch.next_position.reshape(-1, 1), mask, batch.key, batch.value)
        valid = np.concatenate([batch.valid, new_valid], axis=1)
        return logits, KVBatch(key, value, valid, batch.next_position + 1)

    def _pad_columns(self, batch: KVBatch, columns: int) -> KVBatch:
        missing = columns - batch.valid.shape[1]
        if missing == 0:
            return batch
        zeros = paddle.zeros(self.layout.shape(batch.rows, missing), dtype=batch.key.dtype)
        key = paddle.concat([zeros, batch.key], axis=self.layout.seq_axis)
        value = paddle.concat([zeros, batch.value], axis=self.layout.seq_axis)
        valid = np.concatenate([np.zeros((batch.rows, missing), dtype=bool), batch.valid], axis=1)
        return KVBatch(key, value, valid, batch.next_position)

    def merge(self, first: KVBatch | None, second: KVBatch) -> KVBatch:
        """Stack two batches' rows (``first`` then ``second``), left-padding the shorter one."""
        if first is None or first.rows == 0:
            return second
        columns = max(first.valid.shape[1], second.valid.shape[1])
        first, second = self._pad_columns(first, columns), self._pad_columns(second, columns)
        axis = self.layout.batch_axis
        return KVBatch(
            paddle.concat([first.key, second.key], axis=axis),
            paddle.concat([first.value, second.value], axis=axis),
            np.concatenate([first.valid, second.valid], axis=0),
            np.concatenate([first.next_position, second.next_position]),
        )

    def select(self, batch: KVBatch, rows: Sequence[int]) -> KVBatch | None:
        """Keep only ``rows`` (in that order); None when no row is left."""
        if len(rows) == 0:
            return None
        if list(rows) == list(range(batch.rows)):
            return batch
        index = paddle.to_tensor(np.asarray(rows, dtype="int64"))
        axis = self.layout.batch_axis
        selected = KVBatch(
            paddle.index_select(batch.key, index, axis=axis),
            paddle.index_select(batch.value, index, axis=axis),
            batch.valid[list(rows)],
            batch.next_position[list(rows)],
        )
        return self.trim(selected)

    def trim(self, batch: KVBatch) -> KVBatch:
        """Drop leading columns that no row attends to (padding left behind by longer rows that finished)."""
        used = np.flatnonzero(batch.valid.any(axis=0))
        first = int(used[0]) if used.size else batch.valid.shape[1] - 1
        if first == 0:
            return batch
        seq_axis, end = self.layout.seq_axis, batch.valid.shape[1]
        # slice returns a strided view; Paddle Inference reads input memory as dense, so materialise it.
        key = paddle.slice(batch.key, axes=[seq_axis], starts=[first], ends=[end]).contiguous()
        value = paddle.slice(batch.value, axes=[seq_axis], starts=[first], ends=[end]).contiguous()
        return KVBatch(key, value, batch.valid[:, first:], batch.next_position)


def open_export_decoder(export_dir: str, manifest=None, **runner_options) -> StepDecoder:
    """A ``StepDecoder`` over an export directory's graph in Paddle Inference (and its prefix past, if any).

    Args:
        export_dir: written by ``paddle-llm export --format paddle``.
        manifest: the directory's ``ExportManifest`` if already read.
        runner_options: ``InferenceStepRunner`` options (``num_threads``, ``use_gpu``, ``enable_mkldnn``).

    Raises:
        FileNotFoundError, ValueError: not a step-graph export (the message says what to run).
    """
    from paddle_llm.export.manifest import GRAPH_PREFIX, load_manifest

    manifest = manifest or load_manifest(export_dir)
    layout = manifest.cache_layout()
    runner = InferenceStepRunner(os.path.join(export_dir, GRAPH_PREFIX), **runner_options)
    prefix = None
    if manifest.prefix_cache:
        stored = paddle.load(os.path.join(export_dir, manifest.prefix_cache))
        prefix = (stored["key"], stored["value"])
    return StepDecoder(runner, layout, manifest.dtype, manifest.glm_positions, manifest.pad_token_id, prefix)
