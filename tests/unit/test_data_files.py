"""Tokenizer training, the mmap format (both ways with PaddleNLP), and preprocess's handling of bad input."""

import itertools
import json
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paddle_llm.data.indexed import IndexedDatasetWriter, read_indexed_dataset
from paddle_llm.data.jsonl import DataError
from paddle_llm.data.preprocess import preprocess
from paddle_llm.data.tokenizer import GLM_SYMBOLS, SPECIAL_PIECES, train_tokenizer
from paddle_llm.data.tokenizer import main as tokenizer_main
from tests.conftest import DEMO_CORPUS, write_chinese_corpus


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    output = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    summary = train_tokenizer(DEMO_CORPUS, output, vocab_size=600, family="chatglm2")
    return output, summary


def test_trained_tokenizer_loads_in_every_paddlenlp_class(trained_tokenizer):
    from paddlenlp.transformers import AutoTokenizer, ChatGLMTokenizer, ChatGLMv2Tokenizer, LlamaTokenizer

    directory, summary = trained_tokenizer
    assert summary["vocab_size"] == 600
    text = "Ada found a red kite at the river."
    for tokenizer_class in (LlamaTokenizer, ChatGLMTokenizer, ChatGLMv2Tokenizer):
        tokenizer = tokenizer_class.from_pretrained(directory)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids).strip() == text, tokenizer_class.__name__
    assert type(AutoTokenizer.from_pretrained(directory)).__name__ == "ChatGLMv2Tokenizer"  # --family recorded


def test_special_piece_ids_are_fixed(trained_tokenizer):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=os.path.join(trained_tokenizer[0], "tokenizer.model"))
    assert [processor.id_to_piece(i) for i in range(9)] == list(SPECIAL_PIECES + GLM_SYMBOLS)


def test_unseen_characters_fall_back_to_bytes(trained_tokenizer):
    from paddlenlp.transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(trained_tokenizer[0])
    ids = tokenizer("飞桨 ✓", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids).strip() == "飞桨 ✓"


def test_vocabulary_too_small_for_a_chinese_corpus_names_the_smallest_size_that_works(tmp_path, capsys):
    """SentencePiece needs a piece per covered character; instead of its raw RuntimeError, one line says how many
    characters and the smallest --vocab_size, and that size trains (one less does not)."""
    corpus = write_chinese_corpus(str(tmp_path / "zh.jsonl"))

    def train(vocab_size, *flags):
        code = tokenizer_main(["train", "--input", corpus, "--vocab_size", str(vocab_size), "--output", str(tmp_path / "tok"), *flags])
        return code, capsys.readouterr().err.strip()

    code, error = train(1000)
    assert code == 2 and "\n" not in error and "RuntimeError" not in error, error
    found = re.fullmatch(
        rf"paddle-llm tokenizer: error: --vocab_size 1000 is too small for {re.escape(corpus)}: at --character_coverage 0.9995 it needs "
        r"(\d+) distinct characters, one piece each, plus 265 special and byte pieces: use --vocab_size (\d+) or more, or a lower "
        r"--character_coverage \(down to 0.98\)",
        error,
    )
    assert found, error
    characters, smallest = int(found[1]), int(found[2])
    assert characters + 265 == smallest and 2400 <= characters <= 2430  # the corpus's 2400 ideographs and its template's
    assert not os.path.exists(tmp_path / "tok")
    assert train(smallest - 1)[0] == 2
    assert train(smallest) == (0, "")
    # a lower coverage leaves the rarest characters to byte fallback, so fewer pieces suffice
    code, error = train(1000, "--character_coverage", "0.98")
    assert code == 2 and int(re.search(r"use --vocab_size (\d+)", error)[1]) < smallest
    assert train(smallest, "--character_coverage", "0.5")[1].endswith("--character_coverage 0.5 must be between 0.98 and 1.0 (SentencePiece's range)")


def test_ours_is_read_by_paddlenlp(tmp_path):
    from paddlenlp.data.indexed_dataset import MMapIndexedDataset

    documents = [[5, 6, 7], [1], list(range(100, 140))]
    writer = IndexedDatasetWriter(str(tmp_path / "ours"), np.uint16)
    for doc in documents:
        writer.add_document(doc)
    writer.commit()
    theirs = MMapIndexedDataset(str(tmp_path / "ours"), skip_warmup=True)
    assert len(theirs) == 3
    for i, doc in enumerate(documents):
        assert theirs[i].tolist() == doc
    assert theirs.doc_idx.tolist() == [0, 1, 2, 3]


def test_paddlenlp_output_is_read_by_ours(tmp_path):
    from paddlenlp.data.indexed_dataset import make_builder

    prefix = str(tmp_path / "theirs")
    builder = make_builder(prefix + ".bin", impl="mmap", save_dtype=np.uint16)
    documents = [[9, 8, 7, 6], [3, 2], [1000]]
    for doc in documents:
        builder.add_item(np.asarray(doc, dtype="int64"))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    ours = read_indexed_dataset(prefix)
    assert [ours[i].tolist() for i in range(len(ours))] == documents
    assert ours.doc_idx.tolist() == [0, 1, 2, 3]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 65000), min_size=0, max_size=50), min_size=1, max_size=20))
def test_round_trip_property(tmp_path_factory, documents):
    prefix = str(tmp_path_factory.mktemp("rt") / "p")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    for doc in documents:
        writer.add_document(doc)
    writer.commit()
    dataset = read_indexed_dataset(prefix)
    assert [dataset[i].tolist() for i in range(len(dataset))] == documents
    assert dataset.num_tokens == sum(map(len, documents))


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "lines, key, message",
    [
        (['{"text": "ok"}', '{"text": "broken"'], "text", r"bad.jsonl:2: not valid JSON"),
        (['{"text": "ok"}', '{"body": "x"}'], "text", r"bad.jsonl:2: missing key 'text' \(found: body\); set --json_key"),
        (['{"text": 3}'], "text", r"bad.jsonl:1: field 'text' must be a string, got int"),
        ([], "text", r"bad.jsonl: the file is empty"),
        (["", "  "], "text", r"bad.jsonl: no non-blank lines"),
    ],
)
def test_bad_input_names_file_line_and_field_and_leaves_nothing(tmp_path, lines, key, message):
    source = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message):
        preprocess(source, str(tmp_path / "out" / "corpus"), "tiny-llama", json_key=key, show_progress=False)
    leftovers = os.listdir(tmp_path / "out") if os.path.isdir(tmp_path / "out") else []
    assert leftovers == []


def test_missing_input_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        preprocess(str(tmp_path / "none.jsonl"), str(tmp_path / "x"), "tiny-llama", show_progress=False)


def test_workers_give_identical_output_and_eos_is_appended(tmp_path):
    lines = [json.dumps({"text": f"Ada counted {i} birds at the river."}) for i in range(600)]
    source = _write(tmp_path / "c.jsonl", lines)
    one = preprocess(source, str(tmp_path / "one"), "tiny-llama", append_eos=True, workers=1, show_progress=False)
    two = preprocess(source, str(tmp_path / "two"), "tiny-llama", append_eos=True, workers=2, show_progress=False)
    assert one["documents"] == two["documents"] == 600
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()
    dataset = read_indexed_dataset(str(tmp_path / "one"))
    assert all(dataset[i][-1] == 2 for i in range(len(dataset)))  # </s>


def test_preprocess_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    from paddle_llm.data.preprocess import main

    source = _write(tmp_path / "bad.jsonl", ['{"txt": "x"}'])
    code = main(["--input_path", source, "--output_prefix", str(tmp_path / "o"), "--tokenizer_name_or_path", "tiny-llama", "--disable_tqdm"])
    assert code == 1
    assert "bad.jsonl:1: missing key 'text'" in capsys.readouterr().err


def test_a_stalled_pool_is_finished_in_process_with_identical_output(tmp_path):
    """A pool whose results stop after two tasks (a hung worker): the rest is encoded here, bytes unchanged."""
    from paddle_llm.data import preprocess as preprocess_module
    from paddle_llm.data.indexed import IndexedDatasetWriter, token_dtype

    lines = [json.dumps({"text": f"Ada counted {i} birds at the river."}) for i in range(3 * 256 + 10)]
    source = _write(tmp_path / "c.jsonl", lines)
    preprocess(source, str(tmp_path / "expected"), "tiny-llama", workers=1, show_progress=False)

    preprocess_module._init_worker("tiny-llama", "text", False)
    encoded = map(preprocess_module._encode_lines, preprocess_module._read_tasks([source]))

    class StallingPoolResults:
        delivered = 0

        def next(self, timeout=None):
            if self.delivered == 2:
                raise TimeoutError
            self.delivered += 1
            return next(encoded)

    class NoProgress:
        def update(self, _):
            pass

    writer = IndexedDatasetWriter(str(tmp_path / "recovered"), token_dtype(1000))
    done = preprocess_module._drain_until_stall(StallingPoolResults(), writer, NoProgress())
    assert done == 2
    preprocess_module._drain(map(preprocess_module._encode_lines, itertools.islice(
        preprocess_module._read_tasks([source]), done, None)), writer, NoProgress())
    writer.commit()
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"recovered{suffix}").read_bytes() == (tmp_path / f"expected{suffix}").read_bytes()


def _spawned_workers() -> list[int]:
    """Pids of this process's multiprocessing spawn children (not its resource tracker)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except OSError:
            continue
        if parent == os.getpid() and b"spawn_main" in command:
            pids.append(int(entry))
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker processes through /proc")
def test_really_hung_workers_are_killed_and_the_output_is_unchanged(tmp_path, monkeypatch, capsys):
    """Workers frozen with SIGSTOP (they neither die nor answer, like the deadlocked import) do not hang the run."""
    import signal
    import threading
    import time

    from paddle_llm.data import preprocess as preprocess_module

    lines = [json.dumps({"text": f"Ada counted {i} birds at the river."}) for i in range(600)]
    source = _write(tmp_path / "c.jsonl", lines)
    preprocess(source, str(tmp_path / "expected"), "tiny-llama", workers=1, show_progress=False)
    monkeypatch.setattr(preprocess_module, "FIRST_RESULT_SECONDS", 5)

    frozen = []

    def freeze_workers():
        deadline = time.monotonic() + 30
        while len(frozen) < 2 and time.monotonic() < deadline:
            for pid in _spawned_workers():
                if pid not in frozen:
                    os.kill(pid, signal.SIGSTOP)
                    frozen.append(pid)
            time.sleep(0.005)

    freezer = threading.Thread(target=freeze_workers)
    freezer.start()
    summary = preprocess(source, str(tmp_path / "recovered"), "tiny-llama", workers=2, show_progress=False)
    freezer.join()
    assert frozen, "no worker process was seen"
    assert summary["documents"] == 600
    assert "a tokenizer worker stopped answering" in capsys.readouterr().err
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"recovered{suffix}").read_bytes() == (tmp_path / f"expected{suffix}").read_bytes()
    time.sleep(0.5)
    assert not [pid for pid in frozen if pid in _spawned_workers()], "a frozen worker was left running"
