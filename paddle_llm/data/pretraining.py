"""Pretraining datasets: resolve ``--input_dir``, check the files, and build train/valid/test splits.

Splitting, blending and the cached, deterministic sample index are PaddleNLP's ``causal_dataset`` (it does them
well and its cache files are what users already have). What we add is checking the inputs first, so a wrong path
or a tokenizer/model vocabulary mismatch is a one-line error instead of a crash deep inside a worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from paddle_llm.console import captured_output
from paddle_llm.data.indexed import read_indexed_dataset
from paddle_llm.data.jsonl import DataError

MAX_TOKENS_CHECKED = 16 * 1024 * 1024  # the vocabulary check reads at most this many tokens per prefix


def resolve_data_prefixes(input_dir: str) -> list:
    """Turn ``--input_dir`` into PaddleNLP's ``data_prefix`` list.

    ``"0.7 a 0.3 b"`` -> ``["0.7", "a", "0.3", "b"]``; a single prefix -> ``[prefix]``; a directory -> every
    ``*.idx`` prefix in it, weighted equally (sorted, so the blend does not depend on directory order).

    Raises:
        DataError: nothing usable at that path, or a malformed blend.
    """
    words = input_dir.split()
    if len(words) > 1:
        if len(words) % 2:
            raise DataError(f"--input_dir {input_dir!r}: a blend is 'weight prefix weight prefix ...' (even count)")
        for weight in words[0::2]:
            try:
                if float(weight) < 0:
                    raise ValueError
            except ValueError:
                raise DataError(f"--input_dir {input_dir!r}: blend weight {weight!r} is not a non-negative number") from None
        return words
    if os.path.isdir(input_dir):
        prefixes = sorted(os.path.join(input_dir, f[: -len(".idx")]) for f in os.listdir(input_dir) if f.endswith(".idx"))
        if not prefixes:
            raise DataError(f"--input_dir {input_dir}: no .idx/.bin files in this directory; run `paddle-llm preprocess` first")
        if len(prefixes) == 1:
            return prefixes
        return [item for prefix in prefixes for item in ("1.0", prefix)]
    for suffix in (".idx", ".bin"):
        if input_dir.endswith(suffix):
            input_dir = input_dir[: -len(suffix)]
    return [input_dir]


def check_data_prefixes(data_prefix: list, vocab_size: int) -> dict:
    """Open every prefix, and check its token ids fit the model's embedding.

    Returns:
        ``{prefix: (documents, tokens)}``.

    Raises:
        DataError: a missing or corrupt file, or a token id >= ``vocab_size``.
    """
    prefixes = data_prefix[1::2] if len(data_prefix) > 1 else data_prefix
    summary = {}
    for prefix in prefixes:
        try:
            dataset = read_indexed_dataset(prefix)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(str(err)) from None
        if len(dataset) == 0:
            raise DataError(f"{prefix}.idx: holds no documents")
        head = dataset.tokens[: min(len(dataset.tokens), MAX_TOKENS_CHECKED)]
        largest = int(np.max(head)) if len(head) else 0
        if largest >= vocab_size:
            raise DataError(
                f"{prefix}.bin: token id {largest} does not fit the model's vocabulary of {vocab_size}: the data was "
                "tokenized with a different tokenizer; re-run preprocess with the model's tokenizer"
            )
        summary[prefix] = (len(dataset), dataset.num_tokens)
    return summary


@dataclass
class PretrainingData:
    train: object
    valid: object
    test: object


def build_pretraining_datasets(
    data_prefix: list,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    data_cache: str | None,
    skip_warmup: bool = True,
    share_folder: bool = False,
) -> PretrainingData:
    """Build the three splits with PaddleNLP's causal dataset (each item: ``{"text": int64[seq_length + 1]}``)."""
    from paddlenlp.data.causal_dataset import build_train_valid_test_datasets

    if data_cache:
        os.makedirs(data_cache, exist_ok=True)
    with captured_output():  # ~50 lines of index-building progress per run; shown if the build fails
        train, valid, test = build_train_valid_test_datasets(
            data_prefix=data_prefix,
            data_impl="mmap",
            splits_string=split,
            train_val_test_num_samples=list(num_samples),
            seq_length=seq_length,
            seed=seed,
            skip_warmup=skip_warmup,
            share_folder=share_folder,
            data_cache_path=data_cache,
            need_data=True,
        )
    return PretrainingData(train, valid, test)


class CausalLMCollator:
    """Stack samples of ``seq_length + 1`` tokens into shifted ``input_ids`` / ``labels``, plus family inputs."""

    def __init__(self, extra_inputs):
        self.extra_inputs = extra_inputs

    def __call__(self, samples: list[dict]) -> dict:
        tokens = np.stack([np.asarray(sample["text"], dtype="int64") for sample in samples])
        batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
        batch.update(self.extra_inputs(batch["input_ids"]))
        return batch
