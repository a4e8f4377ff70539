"""Running the step graph: Paddle Inference or dygraph behind one interface, plus the preallocated KV cache.

``StepDecoder`` is the piece the parity check and the serving engine share. It knows how to build the step inputs for
rows of different lengths (padding, an explicit mask, per-row positions), how to prefill prompts in chunks into cache
slots and run one decoding step over the decoding slots. It does not sample and does not schedule.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
from typing import Protocol, Sequence

import numpy as np
import paddle
from paddle import inference

from paddle_llm.cpu import features as cpu_features
from paddle_llm.cpu import kernels as cpu_kernels
from paddle_llm.inference.manifest import (
    COMPILED_KERNELS,
    PORTABLE_PROGRAM,
    STEP_INTERFACE,
    CacheLayout,
    load_manifest,
    program_needs,
    program_params,
)

logger = logging.getLogger(__name__)


_GARBAGE_COLLECTION_FLAG = "FLAGS_eager_delete_tensor_gb"
_NEVER_COLLECT = -1.0  # Paddle's default, 0, frees each intermediate when it dies


class StepRunner(Protocol):
    """Runs the flat inputs ``[input_ids, position_ids, mask, *past_keys, *past_values]`` and returns
    ``[last_logits, *new_keys, *new_values]`` (the new positions only), as numpy arrays or Paddle tensors."""

    def run(self, inputs: list[paddle.Tensor]) -> list[np.ndarray | paddle.Tensor]: ...


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

    def run(self, inputs: list[paddle.Tensor]) -> list[np.ndarray]:
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
        # The predictor hands back tensors over its own output buffers, which the next run overwrites: numpy() copies
        # them out once (a clone and then numpy() copied twice, ~0.7 ms of a 64-row step).
        return [output.numpy() for output in outputs]


class DygraphStepRunner:
    """The same step as a dygraph Layer (``step_graph.build_step_layer``), for serving a checkpoint without export."""

    def __init__(self, step_layer: paddle.nn.Layer):
        self.step_layer = step_layer
        step_layer.eval()

    def run(self, inputs: list[paddle.Tensor]) -> list[paddle.Tensor]:
        with paddle.no_grad():
            return list(self.step_layer(*inputs[:3], list(inputs[3:])))


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


_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
def anonymous_mapping(size: int) -> mmap.mmap:
    """``size`` bytes of fresh anonymous memory, which the kernel zeroes page by page when first touched.

    Why not ``np.zeros``: once a cache array is freed, glibc raises its mmap threshold to that size, so the next
    cache-sized ``np.zeros`` comes from the heap and is memset whole: 3 ms per 25 MB array, 8 arrays per growth, paid
    even for the slots holding nothing (one request on a 64-slot cache: 21% of its decoding time, issue 25). Here the
    slots holding nothing cost neither time nor memory. Huge pages are asked for where the kernel has them, as numpy
    does for its own large arrays, so a full cache takes few page faults.
    """
    mapping = mmap.mmap(-1, max(size, 1))
    # AttributeError: no such advice on this platform; OSError: a kernel without transparent huge pages.
    with contextlib.suppress(AttributeError, OSError):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


def array_in(mapping: mmap.mmap, shape: Sequence[int], dtype) -> np.ndarray:
    """An array of ``shape`` over the first bytes of ``mapping`` (no copy)."""
    return np.frombuffer(mapping, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


# Inference reads an input's dims, not its strides, so a column-sliced view cannot be passed; capacity itself stays
# within a block or two of the longest row. Each growth copies the whole cache (~25 ms at 64 rows x 96 columns, hidden
# 512), once a block's worth of steps; a masked column costs ~0.12 ms per step at 64 rows: 32 balances the two
# (docs/benchmarks.md, issue 25).
_CAPACITY_BLOCK = 32
# A fresh cache mapping has room for this many times its columns, so the next growths fit in it (``_allocate``);
# the room is address space only until a row is written there.
_MAPPING_HEADROOM = 1.5


class StepDecoder:
    """A preallocated KV cache of ``slots`` rows around a ``StepRunner``: prefill chunks into slots, decode slots.

    The cache is allocated once (one numpy array per layer's key and value, ``layout.shape(slots, capacity)``), and
    the step graph reads it in place: the arrays are handed to Paddle through DLPack, without a copy, and a step
    returns only the new positions' keys and values, which are written into each row's next columns. A row's columns
    ``[0, lengths[slot])`` are its tokens (after a prefix-tuning past, when the model has one); the rest are masked.
    Capacity (columns) is the longest row rounded up to a block (``_CAPACITY_BLOCK``): it grows a block when a row
    needs more and shrinks when the rows in use got a block shorter (``shrink``), so memory and the columns attention
    reads follow the longest row, not the context; the arrays are reallocated then and only then.

    Decoding runs rows ``0 .. count-1``: the caller keeps its decoding rows in the lowest slots (``move`` packs a row
    into a freed slot; one row's copy). The decoder does not sample and does not schedule: ``serving.engine.Engine``
    decides which slot holds which request (and anything else per row, such as an adapter id).
    """

    def __init__(
        self,
        runner: StepRunner,
        layout: CacheLayout,
        dtype: str,
        glm_positions: bool,
        pad_token_id: int = 0,
        prefix_cache: list[paddle.Tensor] | None = None,
        slots: int = 1,
        max_columns: int | None = None,
        adapter_bank=None,
    ):
        """
        Args:
            runner: the step graph or layer.
            layout: cache geometry (from the export manifest or the config).
            dtype: cache dtype (float32 or float16).
            glm_positions: the model takes ChatGLM v1 2-D positions.
            pad_token_id: id written into padded query positions (never attended to).
            prefix_cache: prefix-tuning past for one row (key then value per layer, ``layout`` shape), the first
                columns of every slot.
            slots: rows of the cache (the most requests decoding together).
            max_columns: the most positions a row ever holds (the context); capacity never grows past it.
            adapter_bank: per-row LoRA adapters (``peft.multi_lora.LoRABank``) inside the runner's layer, or None.
                ``prefill`` and ``decode`` take each row's adapter slot (0: none) and select them for that step.

        Raises:
            ValueError: a cache dtype numpy cannot hold.
        """
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"serving keeps its cache in {' or '.join(_NUMPY_DTYPES)}; this model's cache is {dtype}")
        self.runner = runner
        self.layout = layout
        self.dtype = dtype
        self.glm_positions = glm_positions
        self.pad_token_id = pad_token_id
        self.adapter_bank = adapter_bank
        self._prefix = [cache.numpy() for cache in prefix_cache] if prefix_cache is not None else None
        self.prefix_columns = 0 if self._prefix is None else int(self._prefix[0].shape[layout.seq_axis])
        self.max_columns = None if max_columns is None else max_columns + self.prefix_columns
        self._mappings: list[mmap.mmap] = []  # under the cache arrays
        self._spare_mappings: list[mmap.mmap] = []  # under the previous ones: the next reallocation's (_allocate)
        other_axes = [axis for axis in range(len(layout.shape(1, 1))) if axis not in (layout.batch_axis, layout.seq_axis)]
        self._rows_axes = (layout.batch_axis, layout.seq_axis, *other_axes)
        self.resize(slots)

    # ---- storage -------------------------------------------------------------------------------------------------

    def resize(self, slots: int) -> None:
        """Reallocate the cache empty with ``slots`` rows (only between runs: every row's cache is dropped)."""
        self.slots = slots
        self.lengths = np.full(slots, self.prefix_columns, dtype="int64")
        self._use(self._allocate(self._columns_for(self.prefix_columns + 1)))
        for slot in range(slots):
            self.clear(slot)

    @property
    def capacity(self) -> int:
        return int(self._arrays[0].shape[self.layout.seq_axis])

    def _allocate(self, columns: int) -> list[np.ndarray]:
        """Arrays for a cache of ``columns`` columns, in the mappings the cache before the current one used when they
        are large enough, else in fresh ones with room for ``_MAPPING_HEADROOM`` times the columns.

        Why reuse: writing into fresh memory costs a page fault per 4 KiB, and where the kernel gives no huge pages
        (a 2-core EPYC VM: 110 ms per 100 MB, against 10 ms into memory touched before) the faults were 11% of the
        engine's CPU with 32 mixed requests at hidden 512, one growth every ~20 steps. Reallocations alternate
        between two sets of mappings; the rows in use fill each array from its start, so a growth faults in only
        the columns the other set never held. The price: both sets stay resident, at most the two largest caches
        (a reallocation held both while copying anyway); ``shrink`` gives the spare back when no request is left.
        A reused mapping holds stale keys and values past each row's length, which the mask hides, as it hides a
        freed slot's.
        """
        shape = self.layout.shape(self.slots, columns)
        dtype = _NUMPY_DTYPES[self.dtype]
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        mappings = self._spare_mappings
        if not mappings or len(mappings[0]) < size:
            mappings = [anonymous_mapping(int(size * _MAPPING_HEADROOM)) for _ in range(2 * self.layout.num_layers)]
        self._spare_mappings, self._mappings = self._mappings, mappings
        return [array_in(mapping, shape, dtype) for mapping in mappings]

    def _use(self, arrays: list[np.ndarray]) -> None:
        """Make ``arrays`` the cache, with what each decoding step reuses until they change: their ``[slots,
        columns, ...]`` views, the Paddle tensors over the decoding rows (building these per step cost ~0.5 ms,
        5-8% of a one-row step at hidden 512) and the step's input buffers (``_decoding_inputs``)."""
        self._arrays = arrays
        self._rows = [self._rows_view(array) for array in arrays]
        self._decoding_past: tuple[int, list[paddle.Tensor]] = (0, [])
        self._step_inputs: tuple = (0,)

    def _rows_view(self, array: np.ndarray) -> np.ndarray:
        """``array`` as ``[slots, columns, ...]`` (a view, for indexing by slot and column)."""
        return array.transpose(self._rows_axes)  # np.moveaxis's own checks cost ~10 us per array, 8 per step

    def _columns_for(self, columns: int) -> int:
        """``columns`` rounded up to a whole block, within the context."""
        rounded = -(-columns // _CAPACITY_BLOCK) * _CAPACITY_BLOCK
        return rounded if self.max_columns is None else min(rounded, self.max_columns)

    def _ensure_capacity(self, columns: int) -> None:
        if columns <= self.capacity:
            return
        if self.max_columns is not None and columns > self.max_columns:
            raise ValueError(f"a row needs {columns} cache columns; the context holds {self.max_columns}")
        self._reallocate(self._columns_for(columns))

    def _reallocate(self, columns: int) -> None:
        """Move the cache into arrays of ``columns`` columns, copying each row's own columns only: a slot holding
        nothing costs neither the copy nor memory (a page is mapped when first written), so one request on a 64-slot
        cache does not copy 64 rows each time its row grows a block."""
        arrays = self._allocate(columns)
        holding = np.flatnonzero(self.lengths)
        for old_rows, new in zip(self._rows, arrays):
            new_rows = self._rows_view(new)
            for slot in holding:
                end = min(int(self.lengths[slot]), columns)
                new_rows[slot, :end] = old_rows[slot, :end]
        self._use(arrays)

    def shrink(self, slots_in_use: Sequence[int]) -> None:
        """Forget the slots not in ``slots_in_use`` (``clear`` one before reuse) and give back the columns the rows in
        use do not need, keeping a block of room for them to grow.

        Without it, one long request would leave every later step attending over (and the memory holding) its
        length. The block of room keeps a row near a boundary from reallocating every step.
        """
        free = np.ones(self.slots, dtype=bool)
        free[list(slots_in_use)] = False
        self.lengths[free] = 0
        longest = int(self.lengths.max())
        target = self._columns_for(max(longest, self.prefix_columns) + _CAPACITY_BLOCK)
        if target < self.capacity:
            self._reallocate(target)
        if not len(slots_in_use):  # idle: the spare mappings go back to the system
            self._spare_mappings = []

    def clear(self, slot: int) -> None:
        """Empty ``slot`` for a new request (its prefix-tuning past, if any, stays)."""
        self.lengths[slot] = self.prefix_columns
        if self._prefix is not None:
            for rows, prefix in zip(self._rows, self._prefix):
                rows[slot, : self.prefix_columns] = self._rows_view(prefix)[0]

    def move(self, source: int, target: int) -> None:
        """Put ``source``'s row into ``target`` (overwriting it); ``source`` is then free."""
        length = int(self.lengths[source])
        for rows in self._rows:
            rows[target, :length] = rows[source, :length]
        self.lengths[target] = length

    def swap(self, first: int, second: int) -> None:
        for rows in self._rows:
            rows[[first, second]] = rows[[second, first]]
        self.lengths[[first, second]] = self.lengths[[second, first]]

    def row_cache(self, slot: int, start: int, end: int) -> list[np.ndarray]:
        """Copies of ``slot``'s columns ``[start, end)`` of every layer (``[columns, ...]`` each), e.g. to reuse."""
        return [rows[slot, start:end].copy() for rows in self._rows]

    def write_row_cache(self, slot: int, start: int, columns: list[np.ndarray]) -> None:
        """Write ``row_cache`` output into ``slot`` from column ``start``; the row then ends after it."""
        end = start + int(columns[0].shape[0])
        self._ensure_capacity(end)
        for rows, values in zip(self._rows, columns):
            rows[slot, start:end] = values
        self.lengths[slot] = end

    def _past(self, slots: slice | np.ndarray, columns: int | None = None) -> list[paddle.Tensor]:
        """The rows' caches as Paddle tensors, their first ``columns`` columns (None: all): views without a copy for a
        contiguous range of a batch-first cache taken whole, copies otherwise."""
        if isinstance(slots, slice) and self.layout.batch_axis == 0 and columns in (None, self.capacity):
            return [paddle.from_dlpack(array[slots]) for array in self._arrays]
        index = [slice(None)] * len(self._arrays[0].shape)
        index[self.layout.batch_axis] = slots
        index[self.layout.seq_axis] = slice(0, columns)
        return [paddle.from_dlpack(np.ascontiguousarray(array[tuple(index)])) for array in self._arrays]

    def _decoding_rows_past(self, rows: int) -> list[paddle.Tensor]:
        """``_past`` of rows ``0 .. rows-1``; views (a batch-first cache) are kept until the arrays or ``rows``
        change, copies are taken afresh."""
        if self.layout.batch_axis != 0:
            return self._past(slice(0, rows))
        if self._decoding_past[0] != rows:
            self._decoding_past = (rows, self._past(slice(0, rows)))
        return self._decoding_past[1]

    def adapter_key(self, adapter: int) -> tuple[int, int]:
        """What a row's cache columns depend on besides its tokens: its adapter slot and how many times that slot was
        loaded, so a slot reused by another adapter never matches cache computed with the one before."""
        return adapter, 0 if self.adapter_bank is None else self.adapter_bank.loads[adapter]

    # ---- steps ---------------------------------------------------------------------------------------------------

    def _run(self, inputs: list[paddle.Tensor], adapters: Sequence[int] | None):
        """One step on ``inputs`` (token ids, positions, mask, then the past); returns the logits and each layer's new
        keys and values as ``[rows, columns, ...]`` views."""
        if self.adapter_bank is None:
            if adapters is not None and any(adapters):
                raise ValueError("this decoder has no adapter bank; rows cannot pick an adapter")
            logits, *new = self.runner.run(inputs)
        else:
            # The bank's lock is held for the whole step, so a load or unload never writes a slot mid-step.
            with self.adapter_bank.rows_for_step(adapters or [0] * inputs[0].shape[0]):
                logits, *new = self.runner.run(inputs)
        return np.asarray(logits), [self._rows_view(np.asarray(cache)) for cache in new]

    def _decoding_inputs(self, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[paddle.Tensor]]:
        """Token-id, position and mask buffers of a decoding step over ``rows`` rows, and Paddle tensors sharing their
        memory (DLPack), kept until ``rows`` or the cache arrays (so the capacity) change: a step writes into them
        instead of building three tensors (0.15 ms of a 0.6 ms step at the demo's size). The positions returned are
        a ``[rows, 1]`` view into the buffer in the family's input form (ChatGLM's adds block positions, all 0)."""
        if self._step_inputs[0] != rows:
            ids = np.zeros((rows, 1), dtype="int64")
            positions = np.ascontiguousarray(position_input(np.zeros((rows, 1), dtype="int64"), self.glm_positions))
            # The last column is the new token itself, always attended.
            mask = np.ones((rows, 1, 1, self.capacity + 1), dtype=bool)
            self._step_inputs = (rows, ids, positions[:, 0] if self.glm_positions else positions, mask,
                                 [paddle.from_dlpack(array) for array in (ids, positions, mask)])
        return self._step_inputs[1:]

    def prefill(self, slots: Sequence[int], chunks: Sequence[Sequence[int]], adapters: Sequence[int] | None = None) -> np.ndarray:
        """Feed each slot the next tokens of its prompt (``chunks[i]`` continues ``slots[i]`` where it ends);
        rows run together, left-padded to the longest chunk, each with its adapter slot (``adapters[i]``; None: the
        base model for all).

        Returns:
            logits ``[rows, vocab]`` after each chunk's last token.
        """
        slots = np.asarray(slots, dtype="int64")
        rows, longest = len(chunks), max(len(c) for c in chunks)
        self._ensure_capacity(int((self.lengths[slots] + np.array([len(c) for c in chunks])).max()))
        input_ids = np.full((rows, longest), self.pad_token_id, dtype="int64")
        new_valid = np.zeros((rows, longest), dtype=bool)
        positions = np.zeros((rows, longest), dtype="int64")
        for row, chunk in enumerate(chunks):
            input_ids[row, longest - len(chunk):] = chunk
            new_valid[row, longest - len(chunk):] = True
            first = self.lengths[slots[row]] - self.prefix_columns
            positions[row, longest - len(chunk):] = np.arange(first, first + len(chunk))
        # Only the columns some row already holds are attended (at least one, masked, so the past is never empty):
        # a chunk of fresh prompts reads one column instead of every column the longest decoding row made room for.
        columns = max(int(self.lengths[slots].max()), 1)
        past_valid = np.arange(columns)[None, :] < self.lengths[slots][:, None]
        contiguous = rows > 0 and np.array_equal(slots, np.arange(slots[0], slots[0] + rows))
        past = self._past(slice(int(slots[0]), int(slots[0]) + rows) if contiguous else slots, columns)
        inputs = [paddle.to_tensor(input_ids), paddle.to_tensor(position_input(positions, self.glm_positions)),
                  paddle.to_tensor(step_attention_mask(past_valid, new_valid))]
        logits, new = self._run(inputs + past, adapters)
        for row, chunk in enumerate(chunks):
            slot, start = int(slots[row]), int(self.lengths[slots[row]])
            for cache_rows, values in zip(self._rows, new):
                cache_rows[slot, start:start + len(chunk)] = values[row, longest - len(chunk):]
            self.lengths[slot] = start + len(chunk)
        return logits

    def decode(self, last_tokens: Sequence[int], adapters: Sequence[int] | None = None) -> np.ndarray:
        """Feed rows ``0 .. len(last_tokens)-1`` their latest token (each with its adapter slot, as ``prefill``);
        returns next-token logits ``[rows, vocab]``."""
        rows = len(last_tokens)
        lengths = self.lengths[:rows]
        self._ensure_capacity(int(lengths.max()) + 1)
        input_ids, positions, mask, inputs = self._decoding_inputs(rows)
        input_ids[:, 0] = last_tokens
        positions[:, 0] = lengths - self.prefix_columns
        # One query per row sees its valid columns and itself: step_attention_mask's result, without its cost.
        np.less(np.arange(self.capacity)[None, :], lengths[:, None], out=mask[:, 0, 0, : self.capacity])
        logits, new = self._run(inputs + self._decoding_rows_past(rows), adapters)
        every_row = np.arange(rows)
        for cache_rows, values in zip(self._rows, new):
            cache_rows[every_row, lengths] = values[:, 0]
        self.lengths[:rows] += 1
        return logits


def _programs(export_dir: str, manifest) -> list[dict]:
    """The manifest's ``programs``; an export older than that field holds ``model.json`` alone, whose needs are read
    from the program."""
    return manifest.programs or [
        {"file": PORTABLE_PROGRAM, "needs": program_needs(os.path.join(export_dir, PORTABLE_PROGRAM))}
    ]


def _has(need: str, features: cpu_features.CpuFeatures, on_gpu: bool) -> bool:
    # The compiled kernels are CPU code, built on first use on each machine (cpu.kernels), absent without a compiler.
    if need == COMPILED_KERNELS:
        return not on_gpu and cpu_kernels.load() is not None
    return features.has(need)


def runnable_programs(export_dir: str, manifest, features: cpu_features.CpuFeatures,
                      on_gpu: bool = False) -> tuple[list[str], dict[str, list[str]]]:
    """The export's programs this CPU and process can run, best first, and ``{program: what is missing}`` for the
    others (CPU features, or ``COMPILED_KERNELS``)."""
    runnable, lacking = [], {}
    for program in _programs(export_dir, manifest):
        missing = [need for need in program["needs"] if not _has(need, features, on_gpu)]
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
    if manifest.step_interface != STEP_INTERFACE:
        raise ValueError(
            f"{export_dir} was exported by an older paddle_llm (step interface {manifest.step_interface}: its graph "
            f"returns the whole grown cache; serving now needs {STEP_INTERFACE}, the new positions only, to keep a "
            "preallocated cache). Re-export it into a new directory: `paddle-llm export --model_name_or_path "
            f"{manifest.source.get('model_name_or_path') or 'CHECKPOINT'} --output_path DIR`")
    if program is None:
        program = best_program(export_dir, manifest, on_gpu=runner_options.get("use_gpu", False))
    entry = next((p for p in _programs(export_dir, manifest) if p["file"] == program), {"file": program, "needs": []})
    if COMPILED_KERNELS in entry["needs"] and cpu_kernels.load() is None:  # its ops register when the kernels load
        raise ValueError(f"{export_dir}: {program} needs paddle_llm's compiled CPU kernels, unavailable here (the "
                         "warning above says why); serve another of its programs")
    params = program_params(entry)
    try:
        runner = InferenceStepRunner(os.path.join(export_dir, program), os.path.join(export_dir, params), **runner_options)
    except (FileNotFoundError, RuntimeError) as err:
        raise ValueError(f"{_damaged_graph_file(export_dir, program, params, err)}; export it again "
                         f"(`paddle-llm export --model_name_or_path {manifest.source.get('model_name_or_path') or 'CHECKPOINT'} "
                         f"--output_path DIR`) into a new directory") from None
    prefix = None
    if manifest.prefix_cache:
        stored = paddle.load(os.path.join(export_dir, manifest.prefix_cache))  # stacked over layers
        prefix = [*paddle.unbind(stored["key"]), *paddle.unbind(stored["value"])]
    return StepDecoder(runner, layout, manifest.dtype, manifest.glm_positions, manifest.pad_token_id, prefix,
                       max_columns=manifest.max_context_length)


def _damaged_graph_file(export_dir: str, program: str, params: str, err: Exception) -> str:
    """Which of the two graph files Paddle Inference could not load, and how: its C++ error (a JSON parser's or a
    tensor stream's) names neither."""
    program_path, params_path = os.path.join(export_dir, program), os.path.join(export_dir, params)
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


def best_program(export_dir: str, manifest, on_gpu: bool = False) -> str:
    """The best program this CPU (or, ``on_gpu``, GPU 0) can run; a fallback is logged.

    Raises:
        ValueError: none runs here; the message names what each needs and how to re-export.
    """
    features = cpu_features.detect()
    runnable, lacking = runnable_programs(export_dir, manifest, features, on_gpu)
    if not runnable:
        needs = "; ".join(f"{name} needs {', '.join(missing)}" for name, missing in lacking.items())
        raise ValueError(
            f"{export_dir}: no step graph here runs on this CPU ({needs}; this CPU: {features.isa.name}). It was "
            "exported by an older paddle_llm; export it again (`paddle-llm export --model_name_or_path "
            f"{manifest.source.get('model_name_or_path', 'CHECKPOINT')} --output_path DIR`), which also writes "
            "model.json for any x86-64 CPU"
        )
    for name, missing in lacking.items():
        if missing == [COMPILED_KERNELS]:
            logger.warning("%s: serving %s: %s needs paddle_llm's compiled CPU kernels, unavailable here", export_dir,
                           runnable[0], name)
        else:
            logger.warning("%s: serving %s: this CPU (%s) lacks %s, which %s needs", export_dir, runnable[0],
                           features.isa.name, ", ".join(missing), name)
    return runnable[0]
