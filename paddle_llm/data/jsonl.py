"""Reading jsonl with errors that name the file, the line and the field."""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

MAX_ERRORS_SHOWN = 5


class DataError(ValueError):
    """Bad input data; the message names the file, line and field so the user can fix it."""


def _decoded(raw: bytes, path: str, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}:{line_number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
            "convert the file to UTF-8, e.g. iconv -f GBK -t UTF-8"
        ) from None


def numbered_lines_at(path: str) -> Iterator[tuple[int, int, str]]:
    """Yield ``(line_number, byte_offset, line)`` for every line of a UTF-8 text file, numbered from 1; ``read_line_at``
    reads a line again from its offset.

    Raises:
        DataError: a line is not UTF-8; the message names the file, line, column and byte.
    """
    with open(path, "rb") as f:  # decoded line by line, so a bad byte is reported with its line number
        offset = 0
        for line_number, raw in enumerate(f, start=1):
            yield line_number, offset, _decoded(raw, path, line_number)
            offset += len(raw)


def numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` for every line of a UTF-8 text file, numbered from 1 (see ``numbered_lines_at``)."""
    for line_number, _, line in numbered_lines_at(path):
        yield line_number, line


def read_line_at(path: str, offset: int, line_number: int) -> str:
    """The line of ``path`` that starts at byte ``offset`` (``numbered_lines_at``'s), decoded."""
    with open(path, "rb") as f:
        f.seek(offset)
        return _decoded(f.readline(), path, line_number)


def iter_jsonl_texts(path: str, json_key: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for every non-blank line of a jsonl file.

    Raises:
        DataError: the file is missing or empty, a line is not JSON, or ``json_key`` is missing or not a string.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    seen_any = False
    for line_number, line in numbered_lines(path):
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


def questionable_records(path: str, wheres: list[str], problem: str, strict: bool) -> str | None:
    """One line about records that read fine but teach nothing, naming the first few as ``file:line``; None when
    there are none.

    Args:
        wheres: the records' ``file:line``.
        problem: what they are, plural (``records with an empty reply``).
        strict: ``--strict_data``: raise instead of returning the line.

    Raises:
        DataError: ``strict`` and there are such records.
    """
    if not wheres:
        return None
    shown = ", ".join(wheres[:MAX_ERRORS_SHOWN]) + (", ..." if len(wheres) > MAX_ERRORS_SHOWN else "")
    text = f"{path}: {len(wheres)} {problem} ({shown})"
    if strict:
        raise DataError(f"{text}; fix or remove them, or drop --strict_data to train with them")
    return f"{text}; pass --strict_data to make this an error"


def decode_json_line(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None


def iter_jsonl_records(path: str, detect: Callable[[object], str | None], parse: Callable[[object, str, str], object], skip_bad_lines: bool,
                       format_hint: str, skipped: list[str], record_format: str | None = None) -> Iterator[tuple[object, str, int, int]]:
    """Stream a jsonl file of training records, each parsed by ``parse(decoded, record_format, "path:line")``, one
    line at a time: yield ``(record, record_format, line_number, byte_offset)``.

    Args:
        detect: the record format of a decoded line, or None; asked of the first record when ``record_format`` is None.
        parse: raises ``DataError`` naming the line and field.
        skip_bad_lines: skip bad lines (their errors are appended to ``skipped``) instead of failing on the first one.
        format_hint: what the formats' fields are, for a first record whose format cannot be told.

    Raises:
        DataError: a missing or empty file, a bad record (without ``skip_bad_lines``), or no good record at all.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    good = 0
    for line_number, offset, line in numbered_lines_at(path):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            decoded = decode_json_line(line, where)
            if record_format is None:
                record_format = detect(decoded)
                if record_format is None:
                    keys = ", ".join(sorted(decoded)) if isinstance(decoded, dict) else type(decoded).__name__
                    raise DataError(f"{where}: cannot tell the record format from fields ({keys}); expected {format_hint}")
            record = parse(decoded, record_format, where)
        except DataError as err:
            if not skip_bad_lines:
                raise
            skipped.append(str(err))
            continue
        good += 1
        yield record, record_format, line_number, offset
    if not good and not skipped:
        raise DataError(f"{path}: the file is empty; nothing to train on")
    if not good:
        shown = "\n  ".join(skipped[:MAX_ERRORS_SHOWN])
        raise DataError(f"{path}: every one of its {len(skipped)} records is bad, e.g.:\n  {shown}")


class LazyJsonlDataset:
    """A map-style dataset read from a jsonl file one line at a time (``--lazy``): it holds the line number and byte
    offset of each item's lines and nothing else; asking for an item reads, decodes and converts its lines again.

    Map-style, not iterable: the trainer's sampler keeps its order, data-parallel ranks take their own rows and a
    resumed run skips exactly the batches it trained on, as with the data read whole.

    Args:
        items: per item, the ``(line_number, byte_offset)`` of its lines (one, or a pack's several), in the order the
            trainer reads them.
        make_item: ``[(decoded JSON, "path:line"), ...] -> item``; the same conversion the first pass made.
    """

    def __init__(self, path: str, items: list[list[tuple[int, int]]], make_item: Callable[[list[tuple[object, str]]], object]):
        self.path = path
        self.items = items
        self.make_item = make_item

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        lines = []
        for line_number, offset in self.items[index]:
            where = f"{self.path}:{line_number}"
            lines.append((decode_json_line(read_line_at(self.path, offset, line_number), where), where))
        return self.make_item(lines)
