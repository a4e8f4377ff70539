"""PaddleNLP's (Megatron's) mmap indexed-dataset format: ``PREFIX.bin`` holds the token ids, ``PREFIX.idx`` the index.

Layout of ``.idx`` (little endian), identical to ``paddlenlp.data.indexed_dataset.MMapIndexedDataset``::

    b"MMIDIDX\\x00\\x00"  uint64 version=1  uint8 dtype_code
    uint64 num_sequences  uint64 num_doc_idx
    int32 sizes[num_sequences]  int64 byte_pointers[num_sequences]  int64 doc_idx[num_doc_idx]

Each document is one sequence, so ``doc_idx`` is ``0..num_documents``. Files are written under temporary names and
renamed when complete (``.bin`` first, ``.idx`` last), so a crash never leaves a prefix that looks finished.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterable

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# dtype codes shared with PaddleNLP's reader
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16, 9: np.uint32, 10: np.uint64}
CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and page cache), else int32 — PaddleNLP's choice too."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class IndexedDatasetWriter:
    """Stream documents into ``PREFIX.bin`` / ``PREFIX.idx``; call ``commit()`` to publish, ``abort()`` to discard."""

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.sizes: list[int] = []
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self._bin_tmp = f"{prefix}.bin.tmp-{os.getpid()}"
        self._idx_tmp = f"{prefix}.idx.tmp-{os.getpid()}"
        self._bin = open(self._bin_tmp, "wb")

    def add_document(self, token_ids: Iterable[int]) -> None:
        array = np.asarray(token_ids, dtype=self.dtype)
        self._bin.write(array.tobytes(order="C"))
        self.sizes.append(int(array.size))

    def commit(self) -> None:
        self._bin.close()
        sizes = np.asarray(self.sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            pointers[1:] = np.cumsum(sizes[:-1], dtype=np.int64) * self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(self._idx_tmp, self.prefix + ".idx")

    def abort(self) -> None:
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)


@dataclass
class IndexedDataset:
    """A read-only view of one prefix: ``len(ds)`` documents, ``ds[i]`` the i-th document's token ids."""

    prefix: str
    dtype: np.dtype
    sizes: np.ndarray
    pointers: np.ndarray
    doc_idx: np.ndarray
    tokens: np.ndarray  # memory-mapped .bin

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.sizes[i])])

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum())


def read_indexed_dataset(prefix: str) -> IndexedDataset:
    """Open ``PREFIX.idx`` + ``PREFIX.bin`` and check they agree.

    Raises:
        FileNotFoundError: either file is missing (the message names it and how to make it).
        ValueError: the index is not in this format, its size does not match its counts (truncated or corrupt), or
            the .bin is shorter than the index says.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing; make it with `paddle-llm preprocess --output_prefix {prefix}`")
    with open(idx_path, "rb") as f:
        header = f.read(len(MAGIC) + 8 + 1 + 8 + 8)
    if len(header) < len(MAGIC) + 25 or header[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{idx_path}: not an mmap indexed-dataset index (bad magic); was it written with --data_impl mmap?")
    (version,) = struct.unpack_from("<Q", header, len(MAGIC))
    dtype_code, num_sequences, num_doc_idx = struct.unpack_from("<BQQ", header, len(MAGIC) + 8)
    if version != VERSION or dtype_code not in DTYPE_CODES:
        raise ValueError(f"{idx_path}: unsupported index version {version} or dtype code {dtype_code}")
    dtype = np.dtype(DTYPE_CODES[dtype_code])
    offset = len(header)
    # The counts are checked against the file's size before any array is read: a truncated index, or a corrupted
    # count, would otherwise fail inside numpy without naming the file.
    needed = offset + num_sequences * (4 + 8) + num_doc_idx * 8
    if os.path.getsize(idx_path) != needed:
        raise ValueError(
            f"{idx_path}: {os.path.getsize(idx_path)} bytes, but its header describes {num_sequences} documents and "
            f"{num_doc_idx} document indices ({needed} bytes): the index is truncated or corrupt; re-run preprocess"
        )
    index = np.memmap(idx_path, mode="r", dtype=np.uint8)
    sizes = np.frombuffer(index, dtype=np.int32, count=num_sequences, offset=offset)
    pointers = np.frombuffer(index, dtype=np.int64, count=num_sequences, offset=offset + sizes.nbytes)
    doc_idx = np.frombuffer(index, dtype=np.int64, count=num_doc_idx, offset=offset + sizes.nbytes + pointers.nbytes)
    expected_bytes = int(sizes.sum(dtype=np.int64)) * dtype.itemsize
    actual_bytes = os.path.getsize(bin_path)
    if actual_bytes < expected_bytes:
        raise ValueError(f"{bin_path}: {actual_bytes} bytes, but {idx_path} describes {expected_bytes}; re-run preprocess")
    tokens = np.memmap(bin_path, mode="r", dtype=dtype) if actual_bytes else np.zeros(0, dtype=dtype)
    return IndexedDataset(prefix, dtype, sizes, pointers, doc_idx, tokens)
