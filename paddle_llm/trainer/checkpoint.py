"""Crash-safe checkpoints on top of PaddleNLP's ``checkpoint-N`` directories.

PaddleNLP writes a checkpoint's files one by one, so a crash mid-save leaves a directory that looks like a
checkpoint but is not. We write a marker file last (atomically, after every rank finished), and resume only from
marked checkpoints. Unmarked ones are the debris of a crash and are removed before training restarts.
"""

from __future__ import annotations

import json
import os
import re
import shutil

COMPLETE_MARKER = "paddle_llm_complete.json"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(checkpoint_dir: str, step: int) -> None:
    """Publish a finished checkpoint: write the marker under a temporary name, then rename it into place."""
    temporary = os.path.join(checkpoint_dir, f".{COMPLETE_MARKER}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"global_step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(checkpoint_dir, COMPLETE_MARKER))


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


def remove_incomplete_checkpoints(output_dir: str) -> list[str]:
    """Delete checkpoint directories a crash left half-written; return what was removed."""
    removed = []
    for _, path in _checkpoints(output_dir):
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
