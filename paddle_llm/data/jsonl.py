"""Reading jsonl with errors that name the file, the line and the field."""

from __future__ import annotations

import json
import os
from typing import Iterator


class DataError(ValueError):
    """Bad input data; the message names the file, line and field so the user can fix it."""


def iter_jsonl_texts(path: str, json_key: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for every non-blank line of a jsonl file.

    Raises:
        DataError: the file is missing or empty, a line is not JSON, or ``json_key`` is missing or not a string.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    seen_any = False
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            seen_any = True
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_number}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            if json_key not in record:
                keys = ", ".join(sorted(record)) or "none"
                raise DataError(f"{path}:{line_number}: missing key {json_key!r} (keys present: {keys}); set --json_key")
            text = record[json_key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_number}: field {json_key!r} must be a string, got {type(text).__name__}")
            yield line_number, text
    if not seen_any:
        raise DataError(f"{path}: the file is empty; nothing to read")
