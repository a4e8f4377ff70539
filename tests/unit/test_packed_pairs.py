"""PaddleNLP's packed DPO layout (``--flash_mask``): one row per pair, the prompt once, the rejected reply masked from
the chosen one. Its log-probabilities, and so its loss, equal the two-row layout's."""

from __future__ import annotations

import os

import numpy as np
import pytest

from paddle_llm.data.preference import PackedPairCollator, PreferenceCollator, PreferenceLimits, build_preference_split, shared_prefix_length

PREFERENCES = os.path.join(os.path.dirname(__file__), "..", "..", "paddle_llm", "assets", "preferences", "train.jsonl")


@pytest.fixture(scope="module")
def tiny(request):
    """tiny-llama with seeded random weights, its layout and 4 pairs of the shipped preference task."""
    import paddle

    from paddle_llm.data.sft import family_layout
    from paddle_llm.models.registry import build_config, build_model, load_tokenizer, resolve_model

    paddle.seed(0)
    source = resolve_model("tiny-llama")
    model = build_model(source, build_config(source), load_weights=False)
    tokenizer = load_tokenizer("tiny-llama")
    layout = family_layout(source.family, tokenizer)
    pairs = build_preference_split(PREFERENCES, layout, tokenizer, PreferenceLimits(128, 96)).dataset.pairs[:4]
    return model, layout, pairs


def test_a_packed_row_holds_the_prompt_once_and_restarts_positions_for_the_rejected_reply(tiny):
    _, layout, pairs = tiny
    batch = PackedPairCollator(layout)(pairs)
    pair, shared = pairs[0], shared_prefix_length(pairs[0])
    chosen_end = len(pair.chosen)
    assert 0 < shared < chosen_end and batch["input_ids"].shape == (4, max(len(p.chosen) + len(p.rejected) - shared_prefix_length(p) for p in pairs))
    assert list(batch["position_ids"][0, chosen_end : chosen_end + 3]) == [shared, shared + 1, shared + 2]
    mask = batch["attention_mask"][0, 0]
    assert mask[chosen_end, :shared].all() and not mask[chosen_end, shared:chosen_end].any()  # sees the prompt, not the chosen reply
    assert mask[chosen_end, chosen_end] and not mask[chosen_end - 1, chosen_end]  # causal
    assert (batch["chosen_labels"][0] != -100).sum() == (pair.chosen.labels != -100).sum()
    assert (batch["rejected_labels"][0] != -100).sum() == (pair.rejected.labels != -100).sum()


@pytest.mark.parametrize("average", [False, True])
def test_packed_pairs_log_probabilities_loss_and_gradients_equal_the_two_row_layout(tiny, average):
    import paddle

    from paddle_llm.trainer.dpo_trainer import PreferenceLoss, pair_log_probs, preference_loss

    model, layout, pairs = tiny
    results, gradients = [], []
    for collator in (PreferenceCollator(layout), PackedPairCollator(layout)):
        inputs = {key: paddle.to_tensor(value) for key, value in collator(pairs).items()}
        chosen, rejected, count = pair_log_probs(model, inputs, average)
        # a fixed reference a little apart from the policy, so the loss is not at its log(2) start
        reference = chosen.detach() * 1.01, rejected.detach() * 0.99
        loss, _, _ = preference_loss(chosen, rejected, *reference, PreferenceLoss(beta=0.5))
        loss.backward()  # what a training step does with it
        results.append([value.numpy() for value in (chosen, rejected, count, loss)])
        gradients.append({p.name: p.grad.numpy() for p in model.parameters() if p.grad is not None})
        model.clear_gradients()
    for unpacked, packed in zip(*results):
        np.testing.assert_allclose(packed, unpacked, rtol=1e-5, atol=1e-6)
    assert abs(float(results[0][3]) - np.log(2)) > 1e-3
    unpacked, packed = gradients
    assert sorted(packed) == sorted(unpacked) and len(unpacked) == len(model.parameters())
    scale = max(float(np.abs(g).max()) for g in unpacked.values())
    assert max(float(np.abs(packed[name] - unpacked[name]).max()) for name in unpacked) <= 1e-5 * scale


def test_a_glm_context_cannot_be_packed():
    from types import SimpleNamespace

    layout = SimpleNamespace(glm_context=True, family=SimpleNamespace(name="chatglm"))
    with pytest.raises(ValueError, match="chatglm's context is bidirectional"):
        PackedPairCollator(layout)
