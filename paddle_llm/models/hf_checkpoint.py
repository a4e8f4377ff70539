"""Hugging Face checkpoint files, read and written without torch: safetensors (one file or sharded with an index)
and ``pytorch_model*.bin`` (torch's zip pickle).

What a family's tensors mean (names, ``[out, in]`` layout) is not here: that lives in ``models/<family>/hf.py``.
This module only finds the files, yields ``(name, numpy array)`` pairs, and writes them back.

Reading never writes anywhere: PaddleNLP's ``from_pretrained(..., convert_from_torch=True)`` writes a converted
``model_state.pdparams`` next to the user's weights (doubling the disk, failing on a read-only mount), so it is not
used. Tensors are read one at a time and copied into the model's parameters, so loading holds one converted
tensor at a time on top of the parameters.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from paddle_llm.console import warn
from paddle_llm.models import hf_tokenizer


SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# The metadata "format" PaddleNLP writes into its own safetensors; any other value (transformers writes "pt") is
# a Hugging Face checkpoint.
PADDLE_SAFETENSORS_FORMATS = ("np", "pd")
# transformers refuses safetensors whose metadata format is not one of its frameworks'.
HF_SAFETENSORS_METADATA = {"format": "pt"}
_NUMPY_DTYPE = {"paddle.float32": np.float32, "paddle.float16": np.float16, "paddle.float64": np.float64}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"
# The dtypes a Hugging Face directory is written in.
WRITABLE_DTYPES = ("float32", "float16", "bfloat16")

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# torch storage class names in a pickled state dict -> numpy dtype ("BFloat16" is widened to float32 on read).
_TORCH_STORAGES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": "bfloat16", "int64": np.int64,
    "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(text: str) -> int:
    """``5GB`` / ``500MB`` / ``40KB`` / ``1024`` -> bytes (decimal units, as transformers' ``max_shard_size``).

    Raises:
        ValueError: not a number with an optional unit.
    """
    value = str(text).strip().upper()
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            break
    else:
        unit, number = "B", value
    try:
        return int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise ValueError(f"size {text!r} is not a number with an optional unit (KB, MB, GB)") from None


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a Hugging Face checkpoint; the message names the file."""


@dataclass(frozen=True)
class HFWeights:
    """The weight files of a Hugging Face model directory, in shard order."""

    directory: str
    files: tuple[str, ...]
    kind: str  # "safetensors" or "bin"


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32; numpy has no bfloat16, so widen exactly."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _safetensors_header(path: str) -> tuple[dict, int]:
    """The header of a safetensors file and where its data starts, checked against the file's size first: a
    corrupt length would otherwise ask for terabytes, and a truncated file fail in a reshape naming no file.

    Raises:
        CheckpointError: the header or a tensor's data reaches past the end of the file, or the header is not JSON.
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if 8 + length > file_size:
            raise CheckpointError(f"{path}: its header says it is {length} bytes long, but the file has {file_size} "
                                  "bytes: the file is truncated or not safetensors; copy or download it again")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_size = file_size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(offset) for offset in info["data_offsets"])
            count = int(np.prod(info["shape"], dtype=np.int64))
            itemsize = 2 if info["dtype"] == "BF16" else np.dtype(_SAFETENSORS_DTYPES.get(info["dtype"], np.uint8)).itemsize
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: the header entry of tensor {name!r} lacks a dtype, shape or data_offsets") from None
        if info["dtype"] in _SAFETENSORS_DTYPES or info["dtype"] == "BF16":
            if not 0 <= begin <= end or end - begin != count * itemsize:
                raise CheckpointError(f"{path}: tensor {name!r} of shape {info['shape']} ({info['dtype']}) needs "
                                      f"{count * itemsize} bytes, but its data_offsets span {end - begin}: the header is corrupt")
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {8 + length + end}, past the end of the file "
                                  f"({file_size} bytes): the file is truncated; copy or download it again")
    return header, 8 + length


def read_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield the tensors of one safetensors file, each read into its own array when it is reached.

    Not a memory map: the pages of a map count towards the process's resident memory until the whole file is
    released, so a 5 GB shard would add 5 GB to the peak; read one by one, the peak is the model plus one tensor.
    """
    header, start = _safetensors_header(path)
    with open(path, "rb") as f:
        for name, info in sorted(((n, i) for n, i in header.items() if n != "__metadata__"), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if info["dtype"] == "BF16":
                raw = np.fromfile(f, dtype=np.uint16, count=(end - begin) // 2, offset=start + begin - f.tell())
                yield name, _bfloat16_to_float32(raw).reshape(shape)
            elif info["dtype"] in _SAFETENSORS_DTYPES:
                dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
                yield name, np.fromfile(f, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin - f.tell()).reshape(shape)
            else:
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which paddle_llm cannot read")


class _StateDictUnpickler(pickle.Unpickler):
    """Rebuild a torch state dict's tensors as numpy arrays, allowing only the globals a state dict uses.

    Anything else (a pickled function or class from any module) is refused, so reading a ``.bin`` cannot run code.
    """

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _TORCH_STORAGES:
            return _TORCH_STORAGES[name]
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        raise CheckpointError(f"{self._path}: refusing to unpickle {module}.{name}; a state dict holds only tensors")

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, element count)
        _, storage_type, key, _, count = pid
        data = self._archive.read(f"{self._prefix}/data/{key}")
        if storage_type == "bfloat16":
            return _bfloat16_to_float32(np.frombuffer(data, dtype=np.uint16, count=count))
        return np.frombuffer(data, dtype=storage_type, count=count)


def _rebuild_tensor(storage, offset, shape, stride, requires_grad=False, hooks=None, metadata=None):
    if not shape:
        return storage[offset:offset + 1].reshape(())
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(shape),
                                           strides=tuple(s * itemsize for s in stride)).copy()


def read_torch_bin(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield the tensors of a ``pytorch_model.bin`` (torch >= 1.6 zip format) without importing torch."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not torch's zip format (saved by torch < 1.6?); re-save it with a newer torch")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("/data.pkl")]
        with archive.open(pickles[0]) as f:
            state = _StateDictUnpickler(f, archive, prefix, path).load()
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    yield from state.items()


def _metadata_format(path: str) -> str | None:
    header, _ = _safetensors_header(path)
    return (header.get("__metadata__") or {}).get("format")


def _index_files(directory: str, index_name: str) -> tuple[str, ...]:
    path = os.path.join(directory, index_name)
    with open(path, encoding="utf-8") as f:
        try:
            weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{path}: not a checkpoint index (needs a 'weight_map'): {err}") from None
    files = tuple(dict.fromkeys(weight_map.values()))
    missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise CheckpointError(f"{path}: names shard files that are not in {directory}: {', '.join(missing)}")
    return files


def find_hf_weights(directory: str) -> HFWeights | None:
    """The Hugging Face weight files of a model directory, or None when it holds PaddleNLP's layout (or none).

    A directory with ``pytorch_model*.bin`` is Hugging Face's. safetensors are Hugging Face's unless their
    metadata format is PaddleNLP's (``np``/``pd``), so a directory our own runs saved keeps loading through PaddleNLP.
    """
    for index_name, single, kind in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "safetensors"), (BIN_INDEX, BIN_SINGLE, "bin")):
        if os.path.isfile(os.path.join(directory, index_name)):
            files = _index_files(directory, index_name)
        elif os.path.isfile(os.path.join(directory, single)):
            files = (single,)
        else:
            continue
        if kind == "safetensors" and _metadata_format(os.path.join(directory, files[0])) in PADDLE_SAFETENSORS_FORMATS:
            return None
        return HFWeights(directory, files, kind)
    return None


def iter_tensors(weights: HFWeights) -> Iterator[tuple[str, str, np.ndarray]]:
    """Yield ``(file path, tensor name, array)`` for every tensor of every shard, one shard open at a time."""
    reader = read_safetensors if weights.kind == "safetensors" else read_torch_bin
    for name in weights.files:
        path = os.path.join(weights.directory, name)
        for tensor_name, array in reader(path):
            yield path, tensor_name, array


@dataclass(frozen=True)
class LazyTensor:
    """A tensor whose shape and dtype are known now and whose values are made by ``load()`` when it is written, so
    writing a model holds one converted tensor at a time, not a second copy of the whole model."""

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]


def _values(tensor) -> np.ndarray:
    return tensor.load() if isinstance(tensor, LazyTensor) else tensor


def _stored(tensor, dtype: str | None) -> tuple[str, int]:
    """The safetensors dtype code and byte size ``tensor`` is written with (cast to ``dtype`` when given)."""
    count = int(np.prod(tensor.shape, dtype=np.int64))
    if dtype == "bfloat16":
        return "BF16", 2 * count
    stored = np.dtype(dtype or tensor.dtype)
    return {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}[stored], stored.itemsize * count


def _shards(tensors: dict, max_shard_bytes: int, dtype: str | None) -> list[list[str]]:
    """Group tensor names into shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = _stored(tensor, dtype)[1]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _float32_to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), as torch's ``.to(torch.bfloat16)`` does."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def _encode(array: np.ndarray, dtype: str | None) -> bytes:
    if dtype == "bfloat16":
        return _float32_to_bfloat16_bits(array).tobytes()
    return np.ascontiguousarray(array, dtype=dtype or array.dtype).tobytes()


def _write_one_safetensors(path: str, tensors: dict, dtype: str | None) -> int:
    """The safetensors format: an 8-byte header length, a JSON header padded to 8 bytes, then the raw data.

    The header comes from shapes alone, so each tensor is converted only when its bytes are written.

    Returns:
        The bytes of tensor data written.
    """
    header: dict = {"__metadata__": HF_SAFETENSORS_METADATA}
    offset = 0
    for name, tensor in tensors.items():
        code, nbytes = _stored(tensor, dtype)
        header[name] = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, tensor in tensors.items():
            data = _encode(_values(tensor), dtype)
            assert len(data) == header[name]["data_offsets"][1] - header[name]["data_offsets"][0], name
            f.write(data)
    return offset


def write_safetensors(tensors: dict, directory: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      dtype: str | None = None) -> list[str]:
    """Write tensors as Hugging Face safetensors into an existing directory: one ``model.safetensors``, or
    ``model-0000N-of-0000M.safetensors`` shards plus ``model.safetensors.index.json`` when over ``max_shard_bytes``.

    Args:
        tensors: name -> numpy array or ``LazyTensor``.
        dtype: cast the tensors to this (``float16``, ``bfloat16``...); None keeps each one's dtype.

    Returns:
        The file names written.
    """
    shards = _shards(tensors, max_shard_bytes, dtype)
    if len(shards) == 1:
        _write_one_safetensors(os.path.join(directory, SAFETENSORS_SINGLE), tensors, dtype)
        return [SAFETENSORS_SINGLE]
    names, weight_map, total = [], {}, 0
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total += _write_one_safetensors(os.path.join(directory, file_name), {n: tensors[n] for n in shard}, dtype)
        weight_map.update({n: file_name for n in shard})
        names.append(file_name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(directory, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return [*names, SAFETENSORS_INDEX]


def default_write_dtype(stored_dtype: str | None) -> str:
    """The dtype a Hugging Face directory is written in when the command names none: the source checkpoint's (a
    bf16 checkpoint exports as bf16), or float32 when it names none this writes."""
    return stored_dtype if stored_dtype in WRITABLE_DTYPES else "float32"


def _assign(parameter, array: np.ndarray) -> None:
    """Copy ``array`` into ``parameter``'s existing storage, through at most one extra copy (the contiguous cast),
    so the peak stays the model plus about two of its largest tensor."""
    import paddle

    if parameter.dtype == paddle.bfloat16:  # numpy has no bfloat16: cast on the Paddle side
        parameter.set_value(paddle.to_tensor(np.ascontiguousarray(array, dtype=np.float32)).astype(parameter.dtype))
    else:
        parameter.set_value(np.ascontiguousarray(array, dtype=_NUMPY_DTYPE[str(parameter.dtype)]))


def load_hf_weights(model, weights: HFWeights, mapping, config_fields: dict) -> None:
    """Load a Hugging Face checkpoint into a built PaddleNLP model, tensor by tensor, checking every name and shape.

    Args:
        model: the PaddleNLP model, built from the converted config (its random initial values are all replaced).
        weights: the checkpoint's files (``find_hf_weights``).
        mapping: the family's ``hf`` module (``paddle_name``, ``to_paddle_layout``, ``tied_aliases``; a layout may
            depend on the config, as ERNIE 4.5's rotary pairs on ``head_dim``).
        config_fields: the converted config, for ``tied_aliases``.

    Raises:
        CheckpointError: a tensor the model does not have, one of the wrong shape, a tied copy that differs, or a
            parameter the checkpoint lacks; each named, so nothing is silently left randomly initialised.
    """
    # named_parameters lists a shared (tied) parameter once, under its first name.
    parameters = dict(model.named_parameters())
    aliases = mapping.tied_aliases(config_fields)
    loaded: dict[str, str] = {}
    alias_copies: dict[str, tuple[str, np.ndarray]] = {}
    for path, name, array in iter_tensors(weights):
        if name in aliases:
            alias_copies[name] = (path, np.array(array))
            continue
        target = mapping.paddle_name(name)
        if target is None:
            continue
        if target not in parameters:
            raise CheckpointError(f"{path}: tensor {name!r} (as {target!r}) is not a parameter of this "
                                  f"{type(model).__name__}; is config.json for these weights?")
        if target in loaded:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice (also in {loaded[target]})")
        array = mapping.to_paddle_layout(target, array, config_fields)
        parameter = parameters[target]
        if list(array.shape) != list(parameter.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(array.shape)}, but config.json makes "
                                  f"{target!r} {list(parameter.shape)} (in Paddle's [in, out] layout)")
        _assign(parameter, array)
        loaded[target] = path
    missing = [name for name in parameters if name not in loaded]
    if missing:
        raise CheckpointError(f"{weights.directory}: the checkpoint has no tensor for {', '.join(missing)}; "
                              "refusing to leave them randomly initialised")
    for name, (path, array) in alias_copies.items():
        original = mapping.paddle_name(aliases[name])
        if not np.array_equal(array, parameters[original].numpy()):
            raise CheckpointError(f"{path}: tie_word_embeddings is true but {name!r} differs from {aliases[name]!r}; "
                                  "set tie_word_embeddings to false in config.json")


def hf_state_dict(model, mapping) -> dict[str, LazyTensor]:
    """A PaddleNLP model's parameters under transformers' names and layout (a tied lm_head once, as HF saves it),
    each converted only when read."""
    state = {}
    fields = vars(model.config)
    for name, parameter in model.named_parameters():
        # The layout change applied to a zero-strided view gives the shape without touching the values.
        dtype = _NUMPY_DTYPE[str(parameter.dtype)]
        shape = mapping.to_hf_layout(name, np.broadcast_to(np.zeros((), dtype), tuple(parameter.shape)), fields).shape
        load = (lambda n, p: lambda: mapping.to_hf_layout(n, p.numpy(), fields))(name, parameter)
        state[mapping.hf_name(name)] = LazyTensor(tuple(shape), np.dtype(dtype), load)
    return state


def save_hf_directory(model, mapping, tokenizer, directory: str, generation: dict,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: str = "float32") -> None:
    """Write a model as a Hugging Face directory into ``directory`` (an empty staging directory).

    Files: safetensors weights under transformers' names and ``[out, in]`` layout (sharded with an index over
    ``max_shard_bytes``), transformers' ``config.json``, ``generation_config.json`` (the special ids), and the
    tokenizer with ``tokenizer_config.json`` naming transformers' class and holding the chat template (the source
    directory's, else the family's built-in format as Jinja: ``mapping.CHAT_TEMPLATE``), a ``tokenizer.json`` giving
    our ids to transformers' fast tokenizer and the pad token of ``config.json``'s ``pad_token_id``
    (``hf_tokenizer.write_fast_tokenizer_files``).

    Args:
        model: a plain PaddleNLP causal LM in float32 (LoRA already merged).
        mapping: the family's ``hf`` module.
        tokenizer: the model's tokenizer, or None to write none.
        generation: the generation settings; its ``bos/eos/pad_token_id`` go to ``generation_config.json``.
        dtype: the weights' dtype on disk (``float32``, ``float16``, ``bfloat16``).
    """
    write_safetensors(hf_state_dict(model, mapping), directory, max_shard_bytes, dtype)
    config = mapping.config_to_hf(model.config)
    config["torch_dtype"] = dtype
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    ids = {name: generation[name] for name in ("bos_token_id", "eos_token_id", "pad_token_id") if generation.get(name) is not None}
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(ids, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        template = getattr(tokenizer, "jinja_chat_template", None) or mapping.CHAT_TEMPLATE
        hf_tokenizer.write_hf_tokenizer_files(directory, template)
        pad_id = config.get("pad_token_id")
        pad_token = None if pad_id is None else tokenizer.convert_ids_to_tokens(int(pad_id))
        forced_class = getattr(mapping, "TRANSFORMERS5_TOKENIZER_CLASS", None)
        if hf_tokenizer.write_fast_tokenizer_files(directory, pad_token) and forced_class:
            warn(f"the tokenizer is SentencePiece, and transformers 5's AutoTokenizer loads model_type "
                 f"{config.get('model_type')!r} with {forced_class} whatever tokenizer_config.json says, which gives "
                 "other ids: there, load the exported directory with PreTrainedTokenizerFast.from_pretrained (transformers "
                 "4's AutoTokenizer, and the tokenizers library on its tokenizer.json, give the training ids)")
