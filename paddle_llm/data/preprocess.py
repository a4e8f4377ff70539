"""``paddle-llm preprocess``: tokenize a jsonl corpus into PaddleNLP's mmap ``.bin``/``.idx`` pretraining format.

Same flags as PaddleNLP's ``create_pretraining_data.py``. Tokenization runs in ``--workers`` processes while the
parent reads, checks order and writes, so the output is identical for any worker count. Bad input stops the run
with the file, line and field named, and nothing is left at ``--output_prefix``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm

from paddle_llm.console import configure_output
from paddle_llm.data.indexed import IndexedDatasetWriter, token_dtype
from paddle_llm.data.jsonl import DataError, numbered_lines
from paddle_llm.files import OutputPathError, output_overlap
from paddle_llm.models.registry import load_tokenizer

LINES_PER_TASK = 256
# A task (256 lines) takes well under a second, so a pool that returns nothing for this long has a hung worker, not
# a slow one. The first result also waits for the workers to import Paddle, so it gets longer.
STALL_SECONDS = 60
FIRST_RESULT_SECONDS = 300

_worker_tokenizer = None
_worker_options: dict = {}


def _init_worker(tokenizer_name_or_path: str, json_key: str, append_eos: bool) -> None:
    # Each worker loads its own tokenizer once; tokenizers are not cheap to pickle per task.
    global _worker_tokenizer, _worker_options

    configure_output()  # a spawned worker is a fresh interpreter: the entry point's output policy is not inherited

    _worker_tokenizer = load_tokenizer(tokenizer_name_or_path)
    _worker_options = {"json_key": json_key, "append_eos": append_eos}


def _encode_lines(task: tuple[str, list[tuple[int, str]]]) -> tuple[int, list]:
    """Encode one task's lines.

    Returns:
        ``(bytes_read, [(line_number, token_ids), ...])``; the list ends at the first bad line, whose entry holds
        the error text instead of token ids.
    """
    path, lines = task
    json_key = _worker_options["json_key"]
    bytes_read = sum(len(line.encode("utf-8")) for _, line in lines)
    encoded = []
    for line_number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return bytes_read, encoded + [(line_number, f"{path}:{line_number}: not valid JSON ({err.msg} at column {err.colno})")]
        if not isinstance(record, dict) or json_key not in record:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            return bytes_read, encoded + [(line_number, f"{path}:{line_number}: missing key {json_key!r} (found: {keys}); set --json_key")]
        text = record[json_key]
        if not isinstance(text, str):
            return bytes_read, encoded + [(line_number, f"{path}:{line_number}: field {json_key!r} must be a string, got {type(text).__name__}")]
        ids = _worker_tokenizer(text, add_special_tokens=False)["input_ids"]
        if _worker_options["append_eos"]:
            ids = list(ids) + [_worker_tokenizer.eos_token_id]
        encoded.append((line_number, ids))
    return bytes_read, encoded


def _read_tasks(paths: list[str]):
    """Batches of ``LINES_PER_TASK`` non-blank lines, file after file; a batch never spans two files."""
    for path in paths:
        batch = []
        for line_number, line in numbered_lines(path):
            if line.strip():
                batch.append((line_number, line))
            if len(batch) == LINES_PER_TASK:
                yield path, batch
                batch = []
        if batch:
            yield path, batch


def input_files(input_path: str) -> list[str]:
    """The jsonl files ``--input_path`` names: the file itself, or every ``.jsonl`` file under a directory, walked
    and sorted as PaddleNLP's ``create_pretraining_data.py`` does (it also skips files of other types, saying so).

    Raises:
        DataError: no such file or directory, an empty file, or a directory without a ``.jsonl`` file.
    """
    if os.path.isfile(input_path):
        if os.path.getsize(input_path) == 0:
            raise DataError(f"{input_path}: the file is empty; nothing to preprocess")
        return [input_path]
    if not os.path.isdir(input_path):
        raise DataError(f"{input_path}: no such file or directory")
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(input_path) for name in names)
    skipped = [path for path in found if not path.endswith(".jsonl")]
    for path in skipped:
        print(f"preprocess: skipped {path}: not a .jsonl file", file=sys.stderr)
    paths = [path for path in found if path.endswith(".jsonl")]
    if not paths:
        raise DataError(f"{input_path}: a directory with no .jsonl file in it (or below); nothing to preprocess")
    return paths


def preprocess(
    input_path: str,
    output_prefix: str,
    tokenizer_name_or_path: str,
    json_key: str = "text",
    append_eos: bool = False,
    workers: int = 1,
    show_progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Tokenize ``input_path`` (a jsonl file, or a directory of them) into ``output_prefix.bin/.idx``; existing ones
    are replaced only with ``overwrite``.

    Returns:
        A summary with documents, tokens, seconds, docs/s and tokens/s.

    Raises:
        DataError: missing or empty input, text that is not UTF-8, malformed JSON, a missing or non-string field
            (file and line named).
        OutputPathError: an output file is an input or sits inside the tokenizer directory, or exists already
            without ``overwrite``.
    """
    check_output_prefix(output_prefix, input_path, tokenizer_name_or_path, overwrite)
    paths = input_files(input_path)
    vocab_size = len(load_tokenizer(tokenizer_name_or_path))
    writer = IndexedDatasetWriter(output_prefix, token_dtype(vocab_size))
    start = time.perf_counter()
    initargs = (tokenizer_name_or_path, json_key, append_eos)
    progress = tqdm(total=sum(os.path.getsize(path) for path in paths), unit="B", unit_scale=True, desc="preprocess", disable=not show_progress)
    try:
        done = _encode_in_pool(paths, workers, initargs, writer, progress) if workers > 1 else 0
        if done is not None:  # no pool, or the pool stalled after ``done`` tasks: the rest is encoded here
            _init_worker(*initargs)
            _drain(map(_encode_lines, itertools.islice(_read_tasks(paths), done, None)), writer, progress)
        if not writer.sizes:
            raise DataError(f"{input_path}: no non-blank lines; nothing to preprocess")
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    tokens = sum(writer.sizes)
    return {
        "documents": len(writer.sizes),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "docs_per_second": round(len(writer.sizes) / seconds, 1),
        "tokens_per_second": round(tokens / seconds, 1),
        "output_prefix": output_prefix,
    }


def check_output_prefix(output_prefix: str, input_path: str, tokenizer_name_or_path: str, overwrite: bool) -> None:
    """Raises: OutputPathError: ``OUTPUT_PREFIX.bin/.idx`` would overwrite an input, or a file we may not replace."""
    inputs = {"--input_path": input_path, "--tokenizer_name_or_path": tokenizer_name_or_path}
    for output in (output_prefix + ".bin", output_prefix + ".idx"):
        refusal = output_overlap("--output_prefix", output, inputs)
        if refusal:
            raise OutputPathError(refusal)
        if os.path.exists(output) and not overwrite:
            raise OutputPathError(f"--output_prefix {output_prefix}: {output} exists already: pick a new "
                                  "--output_prefix, or pass --overwrite to replace it")


def _encode_in_pool(paths: list[str], workers: int, initargs: tuple, writer: IndexedDatasetWriter, progress) -> int | None:
    """Encode with spawned worker processes; returns None when done, or the tasks done before the workers stalled.

    A spawned worker imports Paddle, and rarely (about one run in twenty on the 2-core CI machines) a signal during
    that import lands inside malloc, where Paddle's signal handler deadlocks on the allocator's lock: the worker
    neither dies nor answers, ignores SIGTERM, and holds its task, so the ordered results stop for good. Output is
    deterministic whatever encodes it, so after a stall the workers are killed and the caller finishes the rest.
    ``ProcessPoolExecutor``, unlike ``multiprocessing.Pool``, survives workers killed mid-queue: it marks itself
    broken instead of deadlocking on a queue lock a killed worker held.
    """
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),  # fork would copy Paddle's state
                                   initializer=_init_worker, initargs=initargs)
    done = None
    try:
        done = _drain_until_stall(_OrderedResults(executor, _read_tasks(paths), in_flight=2 * workers), writer, progress)
        if done is not None:
            print(f"preprocess: a tokenizer worker stopped answering; encoding the remaining lines in this process "
                  f"(after {done} tasks of {LINES_PER_TASK} lines)", file=sys.stderr)
        return done
    finally:
        stalled = done is not None
        if stalled:  # there is no public way to stop a worker that ignores SIGTERM
            for process in list(executor._processes.values()):
                process.kill()
        executor.shutdown(wait=not stalled, cancel_futures=True)


class _OrderedResults:
    """The results of ``_encode_lines`` over ``tasks``, in task order, with at most ``in_flight`` submitted ahead."""

    def __init__(self, executor, tasks, in_flight: int):
        self.executor, self.tasks = executor, tasks
        self.pending = collections.deque(executor.submit(_encode_lines, task) for task in itertools.islice(tasks, in_flight))

    def next(self, timeout: float):
        """Raises: StopIteration when every task's result was returned; TimeoutError."""
        if not self.pending:
            raise StopIteration
        result = self.pending[0].result(timeout=timeout)
        self.pending.popleft()
        for task in itertools.islice(self.tasks, 1):
            self.pending.append(self.executor.submit(_encode_lines, task))
        return result


def _drain_until_stall(results, writer: IndexedDatasetWriter, progress) -> int | None:
    """Write a pool's ordered results; None when all arrived, else how many did before one stopped coming."""
    done = 0
    while True:
        try:
            result = results.next(timeout=FIRST_RESULT_SECONDS if done == 0 else STALL_SECONDS)
        except StopIteration:
            return None
        except TimeoutError:  # concurrent.futures.TimeoutError is this builtin since Python 3.11
            return done
        _drain([result], writer, progress)
        done += 1


def _drain(results, writer: IndexedDatasetWriter, progress) -> None:
    for bytes_read, batch in results:
        for line_number, ids_or_error in batch:
            if isinstance(ids_or_error, str):
                raise DataError(ids_or_error)
            writer.add_document(ids_or_error)
        progress.update(bytes_read)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paddle-llm preprocess",
        description="Tokenize a jsonl corpus (one document per line) into PaddleNLP's mmap .bin/.idx format, "
        "readable by run_pretrain.py --input_dir and by PaddleNLP itself.",
        epilog="example: paddle-llm preprocess --input_path corpus.jsonl --output_prefix data/corpus "
        "--tokenizer_name_or_path tiny-llama --append_eos --workers 2",
    )
    parser.add_argument("--input_path", required=True, help="jsonl file, one JSON object per line; or a directory: every .jsonl file in it and below, in sorted order (as PaddleNLP's create_pretraining_data.py)")
    parser.add_argument("--output_prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    parser.add_argument("--tokenizer_name_or_path", "--tokenizer_name", required=True, help="tokenizer directory or model preset")
    parser.add_argument("--json_key", default="text", help="the field holding each document's text (default: text)")
    parser.add_argument("--append_eos", action="store_true", help="end every document with the EOS token")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    parser.add_argument("--model_name", help="accepted for PaddleNLP compatibility; the tokenizer decides")
    parser.add_argument("--data_format", default="JSON", choices=["JSON"], help="only JSON lines are supported")
    parser.add_argument("--data_impl", default="mmap", choices=["mmap"], help="only the mmap format is written")
    parser.add_argument("--disable_tqdm", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT_PREFIX.bin/.idx "
                        "(never an input: those are refused anyway)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(
            args.input_path,
            args.output_prefix,
            args.tokenizer_name_or_path,
            json_key=args.json_key,
            append_eos=args.append_eos,
            workers=max(1, args.workers),
            show_progress=not args.disable_tqdm,
            overwrite=args.overwrite,
        )
    except (DataError, OutputPathError, FileNotFoundError, RuntimeError) as err:
        print(f"paddle-llm preprocess: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
