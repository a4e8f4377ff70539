"""``paddle-llm convert-checkpoint``: make a unified checkpoint saved by several ranks loadable on one device.

Why this exists: PaddleNLP's unified checkpoint (``--unified_checkpoint 1``) stores whole, unsplit tensors, so any
layout can resume it, but the ranks that saved it each wrote their own file (``model-00001-of-00002.safetensors``,
``optimizer-00002-of-00002.safetensors``...). A run of two or more processes reads every file; PaddleNLP 3.0.0b4's
single-device loader (``load_single_card_checkpoint`` / ``load_single_card_optimizer``) reads only the first
file of each kind, so a single process resuming a tensor- or sharding-parallel checkpoint would start with half
of its weights and optimizer moments missing. This command merges each kind into one file, which every layout
loads, and copies everything else (trainer state, scheduler, RNG, tokenizer) unchanged; a complete checkpoint's
completion marker is written afresh, recording the merged files' sizes and checksums.

    paddle-llm convert-checkpoint OUTPUT/checkpoint-500 [--output_dir OUTPUT/checkpoint-500-single]

The reverse direction needs no conversion: a checkpoint saved by one process resumes under tensor parallel or
sharding directly (each rank takes its part of the whole tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from safetensors.numpy import load_file, save_file

from paddle_llm.files import OutputPathError, check_output_directory, replace_directory_atomically
from paddle_llm.trainer.checkpoint import COMPLETE_MARKER, is_complete, mark_complete

CONVERT_COMMAND = "convert-checkpoint"  # the marker its output directories carry

# index file -> prefix of its shard files (PaddleNLP's SAFE_*_INDEX_NAME names)
SHARDED_KINDS = {
    "model.safetensors.index.json": "model",
    "optimizer.safetensors.index.json": "optimizer",
    "master_weights.safetensors.index.json": "master_weights",
    "peft_model.safetensors.index.json": "peft_model",
}


class ConversionError(ValueError):
    """The directory is not a unified checkpoint, or its files disagree with their index."""


def shard_files(checkpoint: str) -> dict[str, list[str]]:
    """Index file -> the distinct shard files it lists, for every unified-checkpoint kind present."""
    files = {}
    for index_name in SHARDED_KINDS:
        path = os.path.join(checkpoint, index_name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                files[index_name] = sorted(set(json.load(f)["weight_map"].values()))
    return files


def single_device_resume_problem(checkpoint: str) -> str | None:
    """Why one process cannot resume ``checkpoint`` as it is, with the command that fixes it; None if it can."""
    split = {name: files for name, files in shard_files(checkpoint).items() if len(files) > 1}
    if not split:
        return None
    counts = ", ".join(f"{name.split('.')[0]} in {len(files)} files" for name, files in split.items())
    return (
        f"--resume_from_checkpoint {checkpoint} was saved by several ranks ({counts}); a single process reads only "
        f"the first file of each: run `paddle-llm convert-checkpoint {checkpoint}` and resume from "
        f"{checkpoint.rstrip('/')}-single"
    )


def _merge_kind(source: str, destination: str, index_name: str, prefix: str) -> str:
    """Merge one kind's shard files into ``{prefix}-00001-of-00001.safetensors``; return its name, or None."""
    with open(os.path.join(source, index_name), encoding="utf-8") as f:
        index = json.load(f)
    shard_files = sorted(set(index["weight_map"].values()))
    merged: dict = {}
    for shard in shard_files:
        path = os.path.join(source, shard)
        if not os.path.isfile(path):
            raise ConversionError(f"{index_name} lists {shard}, which is missing from {source}")
        tensors = load_file(path)
        duplicated = set(tensors) & set(merged)
        if duplicated:
            raise ConversionError(f"{shard} repeats tensors already read from another shard: {sorted(duplicated)[:3]}")
        merged.update(tensors)
    missing = set(index["weight_map"]) - set(merged)
    if missing:
        raise ConversionError(f"{index_name} lists tensors no shard holds: {sorted(missing)[:3]}")
    merged_name = f"{prefix}-00001-of-00001.safetensors"
    save_file(merged, os.path.join(destination, merged_name), metadata={"format": "np"})
    index["weight_map"] = {name: merged_name for name in index["weight_map"]}
    with open(os.path.join(destination, index_name), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return merged_name


def merge_unified_checkpoint(source: str, destination: str, overwrite: bool = False) -> list[str]:
    """Write ``source`` (a unified checkpoint) to ``destination`` with one safetensors file per kind.

    Args:
        source: a checkpoint directory saved with ``--unified_checkpoint 1`` by any layout.
        destination: a new directory (written atomically); it must not overlap ``source``, and an existing one is
            replaced only if convert-checkpoint wrote it, or with ``overwrite``.

    Returns:
        The merged files written, e.g. ``["model-00001-of-00001.safetensors", ...]``.

    Raises:
        ConversionError: ``source`` has no unified-checkpoint index, a shard is missing, or shards overlap.
        OutputPathError: ``destination`` overlaps ``source`` or holds files convert-checkpoint did not write.
    """
    check_output_directory("--output_dir", destination, {"CHECKPOINT": source}, CONVERT_COMMAND, overwrite=overwrite)
    kinds = {name: prefix for name, prefix in SHARDED_KINDS.items() if os.path.isfile(os.path.join(source, name))}
    if not kinds:
        raise ConversionError(
            f"{source} has no {' / '.join(SHARDED_KINDS)}: it is not a unified checkpoint (save with --unified_checkpoint 1)"
        )
    merged_away = {name for files in shard_files(source).values() for name in files} | set(kinds)
    written = []

    def write(staging: str) -> None:
        written.extend(_merge_kind(source, staging, index_name, prefix) for index_name, prefix in kinds.items())
        for name in os.listdir(source):
            if name in merged_away or name == COMPLETE_MARKER:
                continue
            path = os.path.join(source, name)
            (shutil.copytree if os.path.isdir(path) else shutil.copy2)(path, os.path.join(staging, name))
        if is_complete(source):
            # The marker records each file's size and checksum, and these files are new: record them afresh.
            with open(os.path.join(source, COMPLETE_MARKER), encoding="utf-8") as f:
                mark_complete(staging, json.load(f)["global_step"])

    replace_directory_atomically(destination, write, CONVERT_COMMAND, prefix=".convert-", overwrite=overwrite,
                                 output_flag="--output_dir")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="paddle-llm convert-checkpoint",
        description="Merge a unified checkpoint saved by several ranks into one file per kind, so one device loads it.",
    )
    parser.add_argument("checkpoint", help="a checkpoint directory saved with --unified_checkpoint 1")
    parser.add_argument("--output_dir", help="where to write the merged checkpoint (default: CHECKPOINT-single); it must "
                        "not hold or sit inside CHECKPOINT, and an existing one is replaced only if convert-checkpoint wrote it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output_dir that convert-checkpoint did not write (everything in it is deleted)")
    args = parser.parse_args(argv)
    destination = args.output_dir or args.checkpoint.rstrip("/") + "-single"
    try:
        written = merge_unified_checkpoint(args.checkpoint, destination, args.overwrite)
    except (ConversionError, OutputPathError, OSError) as err:
        print(f"paddle-llm convert-checkpoint: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {destination}: {', '.join(written)}; resume with --resume_from_checkpoint {destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
