"""Preference data: both formats, chat-template framing with the prompt masked, PaddleNLP's truncation rule, and
errors that name the file, line and field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from paddle_llm.data.jsonl import DataError
from paddle_llm.data.preference import (
    PreferenceCollator,
    PreferenceLimits,
    PreferenceTruncation,
    build_preference_split,
    read_preferences,
    tokenize_preference,
)
from paddle_llm.data.sft import IGNORE_INDEX, family_layout
from paddle_llm.models.registry import FAMILIES

PROMPT = "At noon, Kai went to the harbor with a goat. Where did Kai go?"


@pytest.fixture(scope="module")
def llama():
    from paddle_llm.models.registry import load_tokenizer, resolve_model

    source = resolve_model("tiny-llama")
    tokenizer = load_tokenizer("tiny-llama", source.family)
    return tokenizer, family_layout(FAMILIES["llama"], tokenizer)


def write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_paddlenlp_and_pairwise_records_read_as_the_same_preference(tmp_path):
    paddlenlp = write(tmp_path / "a.jsonl", [
        {"src": [PROMPT], "tgt": [], "response": ["a map", "the harbor"], "sort": [0, 1]},  # higher sort is chosen
        {"src": ["Hi", PROMPT], "tgt": ["Hello"], "response": ["the harbor", "a map"], "sort": [3, 1]},
    ])
    pairwise = write(tmp_path / "b.jsonl", [
        {"prompt": PROMPT, "chosen": "the harbor", "rejected": "a map"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": PROMPT}],
         "chosen": [{"role": "assistant", "content": "the harbor"}], "rejected": "a map"},
    ])
    a, b = read_preferences(paddlenlp), read_preferences(pairwise)
    assert (a.record_format, b.record_format) == ("paddlenlp", "pairwise")
    for one, two in zip(a.records, b.records):
        assert (one.prompt, one.chosen, one.rejected) == (two.prompt, two.chosen, two.rejected)
    assert a.records[0].chosen == "the harbor" and a.records[1].prompt[-1] == {"role": "user", "content": PROMPT}


@pytest.mark.parametrize("record,message", [
    ({"src": [PROMPT], "tgt": [], "response": ["a", "b"], "sort": [1, 1]}, "field 'sort': both responses rank 1"),
    ({"src": [PROMPT], "tgt": [], "response": ["a"], "sort": [1, 0]}, "field 'response': must be a list of 2 replies"),
    ({"src": [PROMPT], "tgt": ["x"], "response": ["a", "b"], "sort": [1, 0]}, "field 'src': has 1 prompts for 1 earlier replies"),
    ({"src": [PROMPT], "tgt": [], "response": ["a", " "], "sort": [1, 0]}, "field 'response[1]': must be a non-empty string"),
])
def test_bad_paddlenlp_line_names_file_line_and_field(tmp_path, record, message):
    good = {"src": [PROMPT], "tgt": [], "response": ["a", "b"], "sort": [1, 0]}
    path = write(tmp_path / "train.jsonl", [good, record])
    with pytest.raises(DataError, match=f"^{path}:2: {message}".replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        read_preferences(path)


def test_bad_pairwise_lines_are_named_and_can_be_skipped(tmp_path):
    path = write(tmp_path / "dev.jsonl", [
        {"prompt": PROMPT, "chosen": "the harbor", "rejected": "a map"},
        {"prompt": PROMPT, "chosen": "", "rejected": "a map"},
        "not json",
        {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
    ])
    with pytest.raises(DataError, match=f"^{path}:2: field 'chosen': is empty"):
        read_preferences(path)
    read = read_preferences(path, skip_bad_lines=True)
    assert len(read.records) == 1
    assert [m.split(": ")[0] for m in read.skipped] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert "field 'prompt'" in read.skipped[2]


def test_pairs_share_the_framed_prompt_and_train_only_on_the_replies(llama):
    tokenizer, layout = llama
    record = read_preferences(write_tmp([{"prompt": PROMPT, "chosen": "the harbor", "rejected": "a map"}])).records[0]
    pair = tokenize_preference(record, layout, tokenizer, PreferenceLimits(256, 128), PreferenceTruncation())
    chosen, rejected = pair.chosen, pair.rejected
    text = tokenizer.decode(chosen.input_ids.tolist())
    assert "[INST]" in text and "[/INST]" in text  # the Llama chat template frames it
    trained = [i for i, label in enumerate(chosen.labels) if label != IGNORE_INDEX]
    prompt_length = trained[0]
    assert np.array_equal(chosen.input_ids[:prompt_length + 1], rejected.input_ids[:prompt_length + 1])  # the same prompt
    assert trained == list(range(prompt_length, len(chosen)))  # every reply token, no prompt token
    assert tokenizer.decode([int(t) for t in chosen.labels[trained]]).strip().startswith("the harbor")
    assert chosen.labels[-1] == tokenizer.eos_token_id  # "</s>" of the template: the model learns to stop


def write_tmp(records) -> str:
    import tempfile

    handle = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    handle.write("".join(json.dumps(r) + "\n" for r in records))
    handle.close()
    return handle.name


def test_truncation_keeps_the_prompt_end_then_cuts_replies_in_proportion(llama):
    tokenizer, layout = llama
    long_prompt = " ".join(["The fox went to the river."] * 20) + " Where did it go?"
    record = read_preferences(write_tmp([{"prompt": long_prompt, "chosen": "the river " * 12, "rejected": "a map " * 4}])).records[0]
    full = tokenize_preference(record, layout, tokenizer, PreferenceLimits(4096, 2048), PreferenceTruncation())
    chosen_length = int((full.chosen.labels != IGNORE_INDEX).sum())
    rejected_length = int((full.rejected.labels != IGNORE_INDEX).sum())
    report = PreferenceTruncation()
    cut = tokenize_preference(record, layout, tokenizer, PreferenceLimits(60, 30), report)
    assert report["prompt_truncated"] == 1 and report["replies_truncated"] == 1
    cut_chosen = int((cut.chosen.labels != IGNORE_INDEX).sum())
    cut_rejected = int((cut.rejected.labels != IGNORE_INDEX).sum())
    prompt = len(cut.chosen) + 1 - cut_chosen
    assert prompt - len(layout.prefix_ids) == 30  # the prompt's last 30 tokens, after the BOS
    assert prompt + cut_chosen + cut_rejected == 60  # prompt and both replies fill --max_seq_len
    assert cut_chosen == int(chosen_length / (chosen_length + rejected_length) * (60 - prompt))
    assert np.array_equal(cut.chosen.input_ids[prompt - 30:prompt], full.chosen.input_ids[len(full.chosen) + 1 - chosen_length - 30:len(full.chosen) + 1 - chosen_length])


def test_collator_puts_every_chosen_row_before_every_rejected_row(llama, tmp_path):
    tokenizer, layout = llama
    path = write(tmp_path / "p.jsonl", [{"prompt": f"{PROMPT} {i}", "chosen": "the harbor", "rejected": "a map " * (i + 1)} for i in range(3)])
    split = build_preference_split(path, layout, tokenizer, PreferenceLimits(256, 128))
    pairs = [split.dataset[i] for i in range(3)]
    batch = PreferenceCollator(layout)(pairs)
    assert batch["input_ids"].shape[0] == 6
    for i, pair in enumerate(pairs):
        assert np.array_equal(batch["input_ids"][i, : len(pair.chosen)], pair.chosen.input_ids)
        assert np.array_equal(batch["labels"][3 + i, : len(pair.rejected)], pair.rejected.labels)
