"""``--greedy_zero_padding`` packs exactly as PaddleNLP 3.0.0b4's own ``generate_greedy_packs`` does, buffer by
buffer, and a fine-tuning split packs with it when asked."""

from __future__ import annotations

import numpy as np
import pytest

from paddle_llm.data.packing import GREEDY_BUFFER, pack_best_fit_decreasing, pack_greedy


def paddlenlp_packs(lengths: list[int], capacity: int) -> list[list[int]]:
    """PaddleNLP's ZeroPaddingMapDataset with greedy_zero_padding: its greedy packer over buffers of 500 samples."""
    from paddlenlp.datasets.zero_padding_dataset import generate_greedy_packs

    packs = []
    for start in range(0, len(lengths), GREEDY_BUFFER):
        examples = [{"input_ids": [0] * n, "index": start + i} for i, n in enumerate(lengths[start : start + GREEDY_BUFFER])]
        packs += [[record["index"] for record in pack] for pack in generate_greedy_packs(examples, capacity) if pack]
    return packs


@pytest.mark.parametrize("seed, count, capacity", [(0, 40, 64), (1, 1234, 256), (2, 501, 100)])
def test_greedy_packing_is_paddlenlps(seed, count, capacity):
    lengths = [int(n) for n in np.random.default_rng(seed).integers(1, capacity + 1, count)]
    packs = pack_greedy(lengths, capacity)
    assert packs == paddlenlp_packs(lengths, capacity)
    assert sorted(i for pack in packs for i in pack) == list(range(count))
    assert all(sum(lengths[i] for i in pack) <= capacity for pack in packs)
    assert packs != pack_best_fit_decreasing(lengths, capacity)  # a different packing from the default one


def test_greedy_packing_refuses_a_sample_longer_than_a_pack():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than the pack capacity 8"):
        pack_greedy([3, 9], 8)


def test_a_split_packs_greedily_when_asked(tmp_path):
    import json

    from paddle_llm.data.sft import Limits, build_split, family_layout
    from paddle_llm.models.registry import family_named, load_tokenizer

    path = tmp_path / "train.json"
    path.write_text("".join(json.dumps({"src": "word " * (3 * i % 17 + 1), "tgt": "reply " * (i % 5 + 1)}) + "\n" for i in range(30)))
    tokenizer = load_tokenizer("tiny-llama")
    layout = family_layout(family_named("llama"), tokenizer)
    limits = Limits(64, 96)
    greedy = build_split(str(path), layout, tokenizer, limits, zero_padding=True, greedy_zero_padding=True)
    best_fit = build_split(str(path), layout, tokenizer, limits, zero_padding=True)
    lengths = [len(s) for s in greedy.samples]

    def packs_of(split):
        position = {id(sample): i for i, sample in enumerate(split.samples)}
        return [[position[id(sample)] for sample in row] for row in split.dataset.rows]

    assert packs_of(greedy) == pack_greedy(lengths, 96) != packs_of(best_fit) == pack_best_fit_decreasing(lengths, 96)
