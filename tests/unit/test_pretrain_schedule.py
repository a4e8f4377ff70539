"""The pretraining learning-rate schedule is PaddleNLP's run_pretrain.py schedule, step for step."""

from types import SimpleNamespace

import pytest

from paddle_llm.recipes.pretrain import pretraining_lr_scheduler


def schedule(**flags):
    values = dict(lr_scheduler_type="cosine", learning_rate=1.0, min_learning_rate=0.1, warmup_steps=0, warmup_ratio=0.0, max_steps=100, decay_steps=None)
    return pretraining_lr_scheduler(SimpleNamespace(**{**values, **flags}))


def rates(scheduler, steps: int) -> list[float]:
    """The rate each of the first ``steps`` updates uses (the Trainer steps the scheduler after each update)."""
    used = []
    for _ in range(steps):
        used.append(scheduler.get_lr())
        scheduler.step()
    return used


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_the_first_update_already_uses_the_first_warmup_rate(kind):
    assert rates(schedule(lr_scheduler_type=kind, warmup_steps=4), 5) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0], abs=0.01)


def test_a_warmup_ratio_gives_a_fractional_warmup_as_in_paddlenlp():
    # 0.015 x 100 = 1.5 warmup steps, not 1
    assert rates(schedule(warmup_ratio=0.015), 2) == pytest.approx([1 / 1.5, 1.0], abs=1e-3)


def test_other_scheduler_types_are_left_to_the_trainer():
    assert schedule(lr_scheduler_type="constant") is None
