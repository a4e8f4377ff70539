"""Crash-safe checkpoints that verify themselves, on top of PaddleNLP's ``checkpoint-N`` directories.

PaddleNLP writes a checkpoint's files one by one, so a crash mid-save leaves a directory that looks like a
checkpoint but is not. We write a marker file last (atomically, after every rank finished), and resume only from
marked checkpoints. Unmarked ones are the debris of a crash and are removed before training restarts.

The marker lists every file of the checkpoint with its size and CRC-32, so a checkpoint damaged after its save
(a truncated copy, a disk error, an edited ``trainer_state.json``) is recognised on resume: it is moved aside to
``damaged-checkpoint-N`` (kept for the user, out of reach of resume and of ``--save_total_limit`` rotation) and the
previous checkpoint that verifies is used. CRC-32 (zlib) because it detects truncation and corruption, which is
all this guards against, at memory speed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib

EXIT_CHECKPOINT_NOT_SAVED = 4  # a disk filled during a save
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped on a signal after a checkpoint; the same command continues
COMPLETE_MARKER = "paddle_llm_complete.json"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
DAMAGED_PREFIX = "damaged-"
_CHUNK = 4 << 20


class CheckpointNotSaved(Exception):
    """A save failed for want of disk space; the message says what was saved, what was not and what is needed."""


def disk_full_message(checkpoint_dir: str, step: int, parameter_bytes: int) -> str:
    """What a save that ran out of space at ``checkpoint_dir`` leaves, and how much space the next try needs:
    the size of the previous complete checkpoint, else weights plus Adam's two moments (3x the parameters)."""
    output_dir = os.path.dirname(checkpoint_dir)
    written = checkpoint_files(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    previous = latest_complete_checkpoint(output_dir)
    if previous:
        needed, basis = checkpoint_size(previous), f"the size of {previous}"
        kept = f"the last complete checkpoint {previous} is intact and a rerun resumes from it"
    else:
        needed, basis = 3 * parameter_bytes, "weights and the optimizer's two moments"
        kept = "there is no earlier complete checkpoint"
    free = shutil.disk_usage(output_dir).free
    return (
        f"disk full while saving {checkpoint_dir} (step {step}): on disk {', '.join(written) or 'nothing'} "
        f"({sum(os.path.getsize(os.path.join(checkpoint_dir, name)) for name in written) / 2**20:.1f} MiB, one of them "
        "cut short); not saved: whatever did not fit and the completion marker, so this checkpoint is never "
        f"resumed (the next run removes it); {kept}. {free / 2**20:.1f} MiB free on {output_dir}, a checkpoint needs "
        f"about {needed / 2**20:.1f} MiB ({basis}): free that much (or pass another --output_dir) and rerun the same command"
    )


def file_crc32(path: str) -> int:
    """The CRC-32 of a file, read in 4 MiB chunks (constant memory for any size)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def checkpoint_files(checkpoint_dir: str) -> list[str]:
    """The files of a checkpoint, relative to it, sorted; the marker and its temporary are not part of it."""
    found = []
    for root, _, names in os.walk(checkpoint_dir):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), checkpoint_dir)
            if name not in (COMPLETE_MARKER, f".{COMPLETE_MARKER}.tmp"):
                found.append(relative)
    return sorted(found)


def mark_complete(checkpoint_dir: str, step: int) -> None:
    """Publish a finished checkpoint: record each file's size and CRC-32 in the marker, written under a temporary
    name and then renamed into place."""
    files = {}
    for relative in checkpoint_files(checkpoint_dir):
        path = os.path.join(checkpoint_dir, relative)
        files[relative] = {"size": os.path.getsize(path), "crc32": file_crc32(path)}
    temporary = os.path.join(checkpoint_dir, f".{COMPLETE_MARKER}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"global_step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(checkpoint_dir, COMPLETE_MARKER))


def checkpoint_problems(checkpoint_dir: str) -> list[str]:
    """What is wrong with a marked checkpoint (empty when every file has its recorded size and checksum).

    A marker written before checksums were recorded (no ``files``) is trusted as it is.
    """
    try:
        with open(os.path.join(checkpoint_dir, COMPLETE_MARKER), encoding="utf-8") as f:
            recorded = json.load(f).get("files")
    except (OSError, ValueError, AttributeError) as err:
        return [f"{COMPLETE_MARKER} unreadable ({err})"]
    if recorded is None:
        return []
    problems = []
    for relative, expected in sorted(recorded.items()):
        path = os.path.join(checkpoint_dir, relative)
        if not os.path.isfile(path):
            problems.append(f"{relative} is missing")
        elif os.path.getsize(path) != expected["size"]:
            problems.append(f"{relative} has {os.path.getsize(path)} bytes, {expected['size']} were saved")
        elif file_crc32(path) != expected["crc32"]:
            problems.append(f"{relative} has the saved size but different contents (checksum mismatch)")
    return problems


def checkpoint_size(checkpoint_dir: str) -> int:
    """Bytes the checkpoint's files take."""
    return sum(os.path.getsize(os.path.join(checkpoint_dir, relative)) for relative in checkpoint_files(checkpoint_dir))


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_DIR.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def is_complete(checkpoint_dir: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint_dir, COMPLETE_MARKER))


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step checkpoint whose save finished, or None."""
    complete = [path for _, path in _checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def set_aside_damaged_checkpoints(output_dir: str) -> list[tuple[str, str, list[str]]]:
    """Check the marked checkpoints from the newest down until one verifies; move each damaged one above it to
    ``damaged-checkpoint-N`` (never deleted: the user decides). Return (checkpoint, new path, problems) for each."""
    set_aside = []
    for _, path in reversed(_checkpoints(output_dir)):
        if not is_complete(path):
            continue
        problems = checkpoint_problems(path)
        if not problems:
            break
        destination = os.path.join(output_dir, DAMAGED_PREFIX + os.path.basename(path))
        suffix = 1
        while os.path.exists(destination):  # an earlier run set one aside already: keep both
            destination = os.path.join(output_dir, f"{DAMAGED_PREFIX}{os.path.basename(path)}.{suffix}")
            suffix += 1
        os.rename(path, destination)
        set_aside.append((path, destination, problems))
    return set_aside


def remove_incomplete_checkpoints(output_dir: str) -> list[str]:
    """Delete checkpoint directories a crash left half-written; return what was removed."""
    removed = []
    for _, path in _checkpoints(output_dir):
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
