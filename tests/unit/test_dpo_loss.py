"""The DPO losses and rewards equal an independent implementation of their papers' formulas, and the reference
log-probabilities come from the model DPO started from."""

from __future__ import annotations

import math

import numpy as np
import pytest

from paddle_llm.data.sft import IGNORE_INDEX
from paddle_llm.models.registry import FAMILIES

RNG = np.random.default_rng(0)
PAIRS = 16
# Log-probabilities of a few replies: sums are large negatives, averages (ipo, or, simpo) lie in (-inf, 0).
POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED = (RNG.uniform(-40, -1, PAIRS) for _ in range(4))
AVERAGES = tuple(RNG.uniform(-4, -0.05, PAIRS) for _ in range(4))


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def paper_loss(loss_type, pc, pr, rc, rr, beta, label_smoothing=0.0, gamma=0.5):
    """Per pair, written from the papers: DPO (Rafailov et al. eq. 7, with cDPO's label smoothing), hinge (SLiC),
    IPO (Azar et al. eq. 17), SimPO (Meng et al., reference-free with a margin) and ORPO's odds ratio (Hong et al.)."""
    h = (pc - rc) - (pr - rr)  # log pi/pi_ref (chosen) - log pi/pi_ref (rejected)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * log_sigmoid(beta * h) - label_smoothing * log_sigmoid(-beta * h)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "simpo":
        return -(1 - label_smoothing) * log_sigmoid(beta * (pc - pr) - gamma) - label_smoothing * log_sigmoid(-(beta * (pc - pr) - gamma))
    if loss_type == "or":
        odds = lambda logp: logp - np.log1p(-np.exp(logp))  # noqa: E731  log(p / (1 - p))
        return -log_sigmoid(odds(pc) - odds(pr))
    raise AssertionError(loss_type)


CASES = [
    ("sigmoid", 0.1, 0.0, False),
    ("sigmoid", 0.5, 0.2, False),
    ("hinge", 0.1, 0.0, False),
    ("ipo", 0.1, 0.0, True),
    ("simpo", 2.0, 0.0, True),
    ("or", 0.1, 0.0, True),
]


@pytest.mark.parametrize("loss_type,beta,label_smoothing,averaged", CASES)
def test_loss_and_rewards_equal_the_papers_formulas(loss_type, beta, label_smoothing, averaged):
    import paddle
    from paddle_llm.trainer.dpo_trainer import PreferenceLoss, preference_loss

    pc, pr, rc, rr = AVERAGES if averaged else (POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED)
    if loss_type in ("simpo", "or"):  # reference-free, as run_dpo.py makes them
        rc, rr = np.zeros(PAIRS), np.zeros(PAIRS)
    settings = PreferenceLoss(loss_type, beta, label_smoothing=label_smoothing, pref_loss_ratio=0.7)
    assert settings.average_log_prob == averaged
    tensors = [paddle.to_tensor(v, dtype="float64") for v in (pc, pr, rc, rr)]
    loss, chosen_rewards, rejected_rewards = preference_loss(*tensors, settings)
    expected = 0.7 * paper_loss(loss_type, pc, pr, rc, rr, beta, label_smoothing).mean()
    assert float(loss) == pytest.approx(expected, abs=1e-6, rel=1e-6)
    np.testing.assert_allclose(chosen_rewards.numpy(), beta * (pc - rc), atol=1e-6)
    np.testing.assert_allclose(rejected_rewards.numpy(), beta * (pr - rr), atol=1e-6)


def test_a_pair_the_policy_has_not_moved_costs_log_2():
    import paddle
    from paddle_llm.trainer.dpo_trainer import PreferenceLoss, preference_loss

    zeros = paddle.zeros([4])
    loss, chosen, rejected = preference_loss(zeros - 5, zeros - 7, zeros - 5, zeros - 7, PreferenceLoss())
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert not (chosen > rejected).any()  # a tie is not a win: reward accuracy starts at 0 with a reference


def test_sequence_log_probs_sum_only_the_labelled_positions():
    import paddle
    from paddle_llm.trainer.dpo_trainer import sequence_log_probs

    logits = RNG.normal(size=(3, 6, 11)).astype("float32")
    labels = RNG.integers(0, 11, size=(3, 6))
    labels[:, :2] = IGNORE_INDEX  # the prompt
    labels[2, 4:] = IGNORE_INDEX  # padding
    total, count = sequence_log_probs(paddle.to_tensor(logits), paddle.to_tensor(labels))
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = [sum(log_softmax[r, t, labels[r, t]] for t in range(6) if labels[r, t] != IGNORE_INDEX) for r in range(3)]
    np.testing.assert_allclose(total.numpy(), expected, rtol=1e-5)
    np.testing.assert_array_equal(count.numpy(), [4, 4, 2])


def _tiny_llama():
    import paddle
    from paddle_llm.models.registry import build_config, build_model, resolve_model

    paddle.seed(3)
    source = resolve_model("tiny-llama")
    return build_model(source, build_config(source), load_weights=False)


def _batch():
    import paddle

    ids = RNG.integers(3, 500, size=(4, 12)).astype("int64")
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[:, 6:-1] = ids[:, 7:]
    return {"input_ids": paddle.to_tensor(ids), "labels": paddle.to_tensor(labels)}


def test_lora_reference_is_the_base_model_with_adapters_off_and_no_second_copy(tmp_path):
    import paddle
    from paddle_llm.trainer.dpo_trainer import DPOTrainer, PreferenceLoss, pair_log_probs
    from paddlenlp.trainer import TrainingArguments

    from paddle_llm.peft.lora import apply_lora

    base = _tiny_llama()
    batch = _batch()
    base_chosen, base_rejected, _ = pair_log_probs(base, batch, average=False)
    model = apply_lora(base, FAMILIES["llama"], 4)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # trained adapters: the policy now differs from the base
            parameter.set_value(paddle.full(parameter.shape, 0.05, parameter.dtype))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=["none"], device="cpu")
    trainer = DPOTrainer(model=model, args=args, settings=PreferenceLoss(), reference="adapters_off")
    assert trainer.reference_model is None
    reference_chosen, reference_rejected = trainer._reference_log_probs(batch)
    np.testing.assert_allclose(reference_chosen.numpy(), base_chosen.numpy(), rtol=1e-6)
    np.testing.assert_allclose(reference_rejected.numpy(), base_rejected.numpy(), rtol=1e-6)
    policy_chosen, _, _ = pair_log_probs(model, batch, average=False)
    assert np.abs(policy_chosen.numpy() - base_chosen.numpy()).max() > 1e-3  # the adapters were on again



def test_the_private_pipeline_attributes_dpo_sets_are_still_read_by_the_installed_paddle_and_paddlenlp():
    """DPO under pipeline parallel sets ``PIPELINE_PRIVATES``; each must still be read where recorded. After an
    upgrade, re-run tests/integration/test_parallel_equivalence.py's DPO rows, then bump ``PIPELINE_PRIVATES_VERIFIED``."""
    import importlib
    import inspect

    import paddle
    import paddlenlp

    from paddle_llm.trainer.dpo_trainer import PIPELINE_PRIVATES, PIPELINE_PRIVATES_VERIFIED

    assert {"paddlepaddle": paddle.__version__, "paddlenlp": paddlenlp.__version__} == PIPELINE_PRIVATES_VERIFIED
    for module, owner, attribute, fragment, _ in PIPELINE_PRIVATES:
        assert attribute in fragment
        assert fragment in inspect.getsource(getattr(importlib.import_module(module), owner)), (module, owner, fragment)
