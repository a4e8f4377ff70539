"""OpenAI's presence and frequency penalties and logit_bias, on single rows of logits (no model)."""

import numpy as np
import pytest

from paddle_llm.serving.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_presence_frequency_penalty,
    sample_token,
)


def test_frequency_penalty_scales_with_count_presence_does_not():
    logits = np.zeros(4)
    generated = np.array([1, 1, 1, 2])
    penalised = apply_presence_frequency_penalty(logits, generated, presence=0.5, frequency=0.25)
    assert penalised.tolist() == [0.0, -(3 * 0.25 + 0.5), -(0.25 + 0.5), 0.0]
    assert logits.tolist() == [0.0] * 4  # the caller's row is untouched


def test_negative_penalties_encourage_repeats():
    assert apply_presence_frequency_penalty(np.zeros(2), np.array([0]), -1.0, -1.0).tolist() == [2.0, 0.0]


def test_logit_bias_adds_and_can_force_or_ban():
    logits = np.array([3.0, 0.0, 1.0])
    assert apply_logit_bias(logits, ((1, 100.0), (0, -100.0))).tolist() == [-97.0, 100.0, 1.0]
    params = SamplingParams(temperature=0.0, logit_bias=((2, 5.0),))
    assert sample_token(logits, params, np.random.default_rng(0), np.array([])) == 2


def test_penalty_applies_to_generated_tokens_in_greedy_decoding():
    logits = np.array([2.0, 1.9])
    params = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    rng = np.random.default_rng(0)
    assert sample_token(logits, params, rng, np.array([])) == 0
    assert sample_token(logits, params, rng, np.array([]), np.array([0])) == 1


@pytest.mark.parametrize("fields, name", [
    ({"presence_penalty": 2.1}, "presence_penalty"), ({"frequency_penalty": -2.1}, "frequency_penalty"),
    ({"logit_bias": ((1, 100.5),)}, "logit_bias"), ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
    ({"temperature": 2.01}, "temperature"), ({"logprobs": 21}, "logprobs"),
])
def test_out_of_range_names_the_field(fields, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        SamplingParams(**fields).validate()
