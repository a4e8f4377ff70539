"""``--lazy``: fine-tuning and preference files read one line at a time when the trainer asks for a row, holding only
where each line is. The rows, their order (same seed) and so every batch are the ones the file read whole gives, and
a bad line is still named by file and line."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from paddle_llm.data.jsonl import DataError, LazyJsonlDataset
from paddle_llm.data.preference import PreferenceCollator, PreferenceLimits, build_preference_split
from paddle_llm.data.sft import Limits, SftCollator, build_split, family_layout
from paddle_llm.models.registry import FAMILIES, load_tokenizer

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "paddle_llm", "assets")
SEED = 7


def first_lines(source: str, count: int, directory) -> str:
    """The first ``count`` lines of a shipped file, copied: enough for several batches, quick to tokenize."""
    path = os.path.join(directory, os.path.basename(source))
    with open(source, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        out.writelines(line for _, line in zip(range(count), f))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("lazy")
    return {
        "preferences": first_lines(os.path.join(ASSETS, "preferences", "train.jsonl"), 24, directory),
        "instructions": first_lines(os.path.join(ASSETS, "instructions", "train.json"), 60, directory),
    }


@pytest.fixture(scope="module")
def llama():
    tokenizer = load_tokenizer("tiny-llama")
    return family_layout(FAMILIES["llama"], tokenizer), tokenizer


def batches(dataset, collator, size: int = 4) -> list[dict]:
    return [collator([dataset[i] for i in range(start, min(start + size, len(dataset)))]) for start in range(0, len(dataset), size)]


def assert_same_batches(actual: list[dict], expected: list[dict]):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_lazy_preference_pairs_give_the_eager_batches_in_the_same_shuffled_order(llama, files):
    layout, tokenizer = llama
    preferences = files["preferences"]
    limits = PreferenceLimits(128, 96)
    eager = build_preference_split(preferences, layout, tokenizer, limits, shuffle_seed=SEED)
    lazy = build_preference_split(preferences, layout, tokenizer, limits, shuffle_seed=SEED, lazy=True)
    assert isinstance(lazy.dataset, LazyJsonlDataset) and all(len(item) == 1 and len(item[0]) == 2 for item in lazy.dataset.items)
    assert len(lazy.dataset) == len(eager.dataset) > 8 and lazy.tokens_per_row == eager.tokens_per_row
    assert lazy.summary().startswith(eager.summary()) and "read lazily" in lazy.summary()
    assert_same_batches(batches(lazy.dataset, PreferenceCollator(layout)), batches(eager.dataset, PreferenceCollator(layout)))
    unshuffled = build_preference_split(preferences, layout, tokenizer, limits, lazy=True)
    assert [item[0][0] for item in unshuffled.dataset.items] != [item[0][0] for item in lazy.dataset.items]  # the seed shuffled


@pytest.mark.parametrize("zero_padding", [False, True])
def test_lazy_fine_tuning_rows_give_the_eager_batches_packed_or_not(llama, files, zero_padding):
    layout, tokenizer = llama
    instructions = files["instructions"]
    limits = Limits(48, 64)
    eager = build_split(instructions, layout, tokenizer, limits, shuffle_seed=SEED, zero_padding=zero_padding)
    lazy = build_split(instructions, layout, tokenizer, limits, shuffle_seed=SEED, zero_padding=zero_padding, lazy=True)
    assert lazy.samples == [] and lazy.sample_count == eager.sample_count and lazy.tokens_per_row == eager.tokens_per_row
    # Read whole, the records stay: generation-based evaluation builds its dev prompts from them.
    assert len(eager.read.records) == eager.read.count > 0 and lazy.read.records == []
    assert lazy.summary().startswith(eager.summary())
    assert_same_batches(batches(lazy.dataset, SftCollator(layout)), batches(eager.dataset, SftCollator(layout)))
    if zero_padding:
        assert max(len(row) for row in lazy.dataset.items) > 1  # packs read several lines


def test_a_bad_line_is_named_by_file_and_line_when_read_first_and_when_read_again(llama, files, tmp_path):
    layout, tokenizer = llama
    preferences = files["preferences"]
    path = str(tmp_path / "train.jsonl")
    shutil.copy(preferences, path)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"prompt": "hi", "chosen": "a"}\n')
    lines = sum(1 for _ in open(path, encoding="utf-8"))
    with pytest.raises(DataError, match=rf"train.jsonl:{lines}: missing field"):
        build_preference_split(path, layout, tokenizer, PreferenceLimits(128, 96), lazy=True)
    # read fine first, then the file changes under the run: the row read later names its line
    shutil.copy(preferences, path)
    split = build_preference_split(path, layout, tokenizer, PreferenceLimits(128, 96), lazy=True)
    [(line_number, offset)] = split.dataset.items[0]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"#")
    with pytest.raises(DataError, match=rf"{path}:{line_number}: not valid JSON"):
        split.dataset[0]


def test_lazy_is_accepted_by_dpo_and_fine_tuning_checks():
    from paddle_llm.config.parser import parse_flags
    from paddle_llm.recipes import dpo, finetune

    dpo_values = parse_flags(["--output_dir", "out", "--lazy", "true"], dpo._dataclass_types()).as_dict()
    assert not any("lazy" in error for error in dpo.check_dpo(dpo_values))
    values = parse_flags(["--output_dir", "out", "--lazy", "true", "--zero_padding", "true"], finetune._dataclass_types()).as_dict()
    assert not any("lazy" in error for error in finetune.check_finetune(values, 1))
    generation = parse_flags(["--output_dir", "out", "--lazy", "true", "--eval_with_do_generation", "true"], finetune._dataclass_types()).as_dict()
    assert any(error.startswith("--lazy keeps no records in memory") for error in finetune.check_finetune(generation, 1))
