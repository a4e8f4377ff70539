"""Running the step graph: Paddle Inference or dygraph behind one interface, plus batched KV-cache bookkeeping.

``StepDecoder`` is the piece the parity check and the serving engine share. It knows how to build the step inputs for
rows of different lengths (left padding, an explicit mask, per-row positions), how to prefill new rows, run one
decoding step, and merge or drop rows between steps. It does not sample and does not schedule.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import paddle
from paddle import inference

from paddle_llm.cpu import features as cpu_features
from paddle_llm.inference.manifest import PARAMS_FILE, PORTABLE_PROGRAM, CacheLayout, load_manifest, program_needs

logger = logging.getLogger(__name__)


_GARBAGE_COLLECTION_FLAG = "FLAGS_eager_delete_tensor_gb"
_NEVER_COLLECT = -1.0  # Paddle's default, 0, frees each intermediate when it dies


class StepRunner(Protocol):
    """Runs the flat inputs ``[input_ids, position_ids, mask, *past_keys, *past_values]`` and returns
    ``[last_logits, *keys, *values]``."""

    def run(self, inputs: list[paddle.Tensor]) -> list[paddle.Tensor]: ...


class InferenceStepRunner:
    """The exported step graph in a Paddle Inference predictor (CPU, or GPU when asked and available)."""

    def __init__(self, model_file: str, params_file: str, num_threads: int = 1, use_gpu: bool = False,
                 enable_mkldnn: bool = False):
        """
        Args:
            model_file, params_file: the program (``model.json`` or a variant) and ``model.pdiparams``.
            num_threads: CPU math threads of this predictor.
            use_gpu: run on GPU 0 (needs a CUDA build of Paddle).
            enable_mkldnn: use oneDNN kernels on CPU (safe: the past is never empty; measured slower for small models).
                Its fusion passes that produce a kernel this CPU cannot run are left out.

        Raises:
            FileNotFoundError: the graph files are missing.
        """
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
            for name in cpu_features.inference_passes_to_delete(cpu_features.detect()):
                config.delete_pass(name)
        config.disable_glog_info()
        self.predictor = inference.create_predictor(config)
        self._decode_predictor = self.predictor.clone()
        self._decoder_built = False

    def run(self, inputs: list[paddle.Tensor]) -> list[paddle.Tensor]:
        one_token_step = inputs[0].shape[1] == 1
        predictor = self._decode_predictor if one_token_step else self.predictor
        # Paddle's executor hands each dead intermediate to a garbage-collector thread. For a one-token step (a few
        # hundred tiny tensors) that thread burns a third of a core and slows the step by ~20% on 2 cores (measured
        # at hidden 256); keeping them until the next run costs one step's activations. A prefill's activations grow
        # with the prompt, so it keeps the collector. An executor reads the flag once, when its first run builds it:
        # hence one predictor (sharing the weights) per kind of step, and the flag set only for that first run.
        if one_token_step and not self._decoder_built:
            previous = paddle.get_flags(_GARBAGE_COLLECTION_FLAG)[_GARBAGE_COLLECTION_FLAG]
            paddle.set_flags({_GARBAGE_COLLECTION_FLAG: _NEVER_COLLECT})
            try:
                outputs = predictor.run(inputs)
            finally:
                paddle.set_flags({_GARBAGE_COLLECTION_FLAG: previous})
            self._decoder_built = True
        else:
            outputs = predictor.run(inputs)
        # The predictor hands back tensors over its own output buffers, which the next run overwrites; the cache
        # outlives the call (and is fed back in), so it must own its memory.
        return [output.clone() for output in outputs]


class DygraphStepRunner:
    """The same step as a dygraph Layer (``step_graph.build_step_layer``), for serving a checkpoint without export."""

    def __init__(self, step_layer: paddle.nn.Layer):
        self.step_layer = step_layer
        step_layer.eval()

    def run(self, inputs: list[paddle.Tensor]) -> list[paddle.Tensor]:
        with paddle.no_grad():
            return list(self.step_layer(*inputs[:3], list(inputs[3:])))


@dataclass
class KVBatch:
    """The cache of the rows decoding together, and which of its columns are real tokens.

    Attributes:
        caches: every layer's key, then every layer's value (the step graph's order), each ``layout.shape(rows,
            columns)``.
        valid: ``[rows, columns]`` bool; False for left padding and the masked dummy column.
        next_position: ``[rows]`` position id of each row's next token (prefix columns take no positions).
    """

    caches: list[paddle.Tensor]
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
        prefix_cache: list[paddle.Tensor] | None = None,
        adapter_bank=None,
    ):
        """
        Args:
            runner: the step graph or layer.
            layout: cache geometry (from the export manifest or the config).
            dtype: cache dtype.
            glm_positions: the model takes ChatGLM v1 2-D positions.
            pad_token_id: id written into padded slots (never attended to).
            prefix_cache: prefix-tuning past for one row (``KVBatch.caches`` order), prepended to every new row.
            adapter_bank: per-row LoRA adapters (``peft.multi_lora.LoRABank``) inside the runner's layer, or None.
                ``prefill`` and ``decode`` take each row's adapter slot (0: none) and select them for that step.
        """
        self.runner = runner
        self.layout = layout
        self.dtype = dtype
        self.glm_positions = glm_positions
        self.pad_token_id = pad_token_id
        self.prefix_cache = prefix_cache
        self.adapter_bank = adapter_bank

    def _initial_past(self, rows: int) -> tuple[list[paddle.Tensor], np.ndarray]:
        if self.prefix_cache is not None:
            tiles = [1] * 4
            tiles[self.layout.batch_axis] = rows
            caches = [paddle.tile(cache, tiles) for cache in self.prefix_cache]
            return caches, np.ones((rows, self.prefix_cache[0].shape[self.layout.seq_axis]), dtype=bool)
        # One masked-out column instead of an empty past (see step_graph's docstring).
        zeros = paddle.zeros(self.layout.shape(rows, 1), dtype=self.dtype)
        return [zeros] * (2 * self.layout.num_layers), np.zeros((rows, 1), dtype=bool)

    def _run(self, input_ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, caches: list[paddle.Tensor],
             adapters: Sequence[int] | None):
        if self.adapter_bank is None:
            if adapters is not None and any(adapters):
                raise ValueError("this decoder has no adapter bank; rows cannot pick an adapter")
            return self._run_rows(input_ids, positions, mask, caches)
        with self.adapter_bank.rows_for_step(adapters or [0] * len(input_ids)):
            return self._run_rows(input_ids, positions, mask, caches)

    def _run_rows(self, input_ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, caches: list[paddle.Tensor]):
        inputs = [
            paddle.to_tensor(input_ids.astype("int64")),
            paddle.to_tensor(position_input(positions.astype("int64"), self.glm_positions)),
            paddle.to_tensor(mask),
            *caches,
        ]
        logits, *new_caches = self.runner.run(inputs)
        return logits.numpy(), new_caches

    def prefill(self, prompts: Sequence[Sequence[int]], adapters: Sequence[int] | None = None) -> tuple[np.ndarray, KVBatch]:
        """Run new rows' prompts together (left-padded to the longest), each row with its adapter slot (``adapters``,
        None: the base model for all).

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
        caches, past_valid = self._initial_past(rows)
        mask = step_attention_mask(past_valid, new_valid)
        logits, caches = self._run(input_ids, positions, mask, caches, adapters)
        valid = np.concatenate([past_valid, new_valid], axis=1)
        lengths = np.array([len(p) for p in prompts], dtype="int64")
        return logits, self.trim(KVBatch(caches, valid, lengths))

    def decode(self, batch: KVBatch, last_tokens: Sequence[int], adapters: Sequence[int] | None = None) -> tuple[np.ndarray, KVBatch]:
        """Feed each row's latest token (with its adapter slot, as ``prefill``); returns next-token logits and the
        grown batch."""
        valid = np.concatenate([batch.valid, np.ones((batch.rows, 1), dtype=bool)], axis=1)
        # One query per row sees every valid column including its own: step_attention_mask's result, without its
        # cost (this runs once per generated token).
        mask = valid[:, None, None, :]
        input_ids = np.asarray(last_tokens, dtype="int64").reshape(batch.rows, 1)
        logits, caches = self._run(input_ids, batch.next_position.reshape(-1, 1), mask, batch.caches, adapters)
        return logits, KVBatch(caches, valid, batch.next_position + 1)

    def _pad_columns(self, batch: KVBatch, columns: int) -> KVBatch:
        missing = columns - batch.valid.shape[1]
        if missing == 0:
            return batch
        zeros = paddle.zeros(self.layout.shape(batch.rows, missing), dtype=batch.caches[0].dtype)
        caches = [paddle.concat([zeros, cache], axis=self.layout.seq_axis) for cache in batch.caches]
        valid = np.concatenate([np.zeros((batch.rows, missing), dtype=bool), batch.valid], axis=1)
        return KVBatch(caches, valid, batch.next_position)

    def merge(self, first: KVBatch | None, second: KVBatch) -> KVBatch:
        """Stack two batches' rows (``first`` then ``second``), left-padding the shorter one."""
        if first is None or first.rows == 0:
            return second
        columns = max(first.valid.shape[1], second.valid.shape[1])
        first, second = self._pad_columns(first, columns), self._pad_columns(second, columns)
        axis = self.layout.batch_axis
        return KVBatch(
            [paddle.concat([a, b], axis=axis) for a, b in zip(first.caches, second.caches)],
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
            [paddle.index_select(cache, index, axis=axis) for cache in batch.caches],
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
        caches = [paddle.slice(cache, axes=[seq_axis], starts=[first], ends=[end]).contiguous() for cache in batch.caches]
        return KVBatch(caches, batch.valid[:, first:], batch.next_position)


def runnable_programs(export_dir: str, manifest, features: cpu_features.CpuFeatures) -> tuple[list[str], dict[str, list[str]]]:
    """The export's programs this CPU can run, best first, and ``{program: missing features}`` for the others.

    An export older than the manifest's ``programs`` holds ``model.json`` alone; its needs are read from the program.
    """
    programs = manifest.programs or [
        {"file": PORTABLE_PROGRAM, "needs": program_needs(os.path.join(export_dir, PORTABLE_PROGRAM))}
    ]
    runnable, lacking = [], {}
    for program in programs:
        missing = [feature for feature in program["needs"] if not features.has(feature)]
        if missing:
            lacking[program["file"]] = missing
        else:
            runnable.append(program["file"])
    return runnable, lacking


def open_export_decoder(export_dir: str, manifest=None, program: str | None = None, **runner_options) -> StepDecoder:
    """A ``StepDecoder`` over an export directory's graph in Paddle Inference (and its prefix past, if any).

    Args:
        export_dir: written by ``paddle-llm export --format paddle``.
        manifest: the directory's ``ExportManifest`` if already read.
        program: which of its programs to run; by default the best this CPU can execute.
        runner_options: ``InferenceStepRunner`` options (``num_threads``, ``use_gpu``, ``enable_mkldnn``).

    Raises:
        FileNotFoundError, ValueError: not a step-graph export, none of its programs runs on this CPU, or a graph
            file is missing, truncated or damaged (the message names the file and says what to run).
    """
    manifest = manifest or load_manifest(export_dir)
    layout = manifest.cache_layout()
    if program is None:
        program = best_program(export_dir, manifest)
    try:
        runner = InferenceStepRunner(os.path.join(export_dir, program), os.path.join(export_dir, PARAMS_FILE), **runner_options)
    except (FileNotFoundError, RuntimeError) as err:
        raise ValueError(f"{_damaged_graph_file(export_dir, program, err)}; export it again "
                         f"(`paddle-llm export --model_name_or_path {manifest.source.get('model_name_or_path') or 'CHECKPOINT'} "
                         f"--output_path DIR`) into a new directory") from None
    prefix = None
    if manifest.prefix_cache:
        stored = paddle.load(os.path.join(export_dir, manifest.prefix_cache))  # stacked over layers
        prefix = [*paddle.unbind(stored["key"]), *paddle.unbind(stored["value"])]
    return StepDecoder(runner, layout, manifest.dtype, manifest.glm_positions, manifest.pad_token_id, prefix)


def _damaged_graph_file(export_dir: str, program: str, err: Exception) -> str:
    """Which of the two graph files Paddle Inference could not load, and how: its C++ error (a JSON parser's or a
    tensor stream's) names neither."""
    program_path, params_path = os.path.join(export_dir, program), os.path.join(export_dir, PARAMS_FILE)
    for path in (program_path, params_path):
        if not os.path.isfile(path):
            return f"{path} is missing"
    try:
        with open(program_path, encoding="utf-8") as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError) as bad:
        return f"{program_path} is truncated or damaged (not valid JSON: {bad})"
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{params_path} is truncated or damaged (Paddle Inference: {first_line})"


def best_program(export_dir: str, manifest) -> str:
    """The best program this CPU can run; a fallback is logged.

    Raises:
        ValueError: none runs here; the message names what each needs and how to re-export.
    """
    features = cpu_features.detect()
    runnable, lacking = runnable_programs(export_dir, manifest, features)
    if not runnable:
        needs = "; ".join(f"{name} needs {', '.join(missing)}" for name, missing in lacking.items())
        raise ValueError(
            f"{export_dir}: no step graph here runs on this CPU ({needs}; this CPU: {features.isa.name}). It was "
            "exported by an older paddle_llm; export it again (`paddle-llm export --model_name_or_path "
            f"{manifest.source.get('model_name_or_path', 'CHECKPOINT')} --output_path DIR`), which also writes "
            "model.json for any x86-64 CPU"
        )
    for name, missing in lacking.items():
        logger.warning("%s: serving %s: this CPU (%s) lacks %s, which %s needs", export_dir, runnable[0],
                       features.isa.name, ", ".join(missing), name)
    return runnable[0]
