"""Numerical health: each failure triggered deliberately, through the real PaddleNLP Trainer where Paddle allows.

The trainer cases run a few steps of a real tiny model on CPU in this process. Two things a CPU cannot produce are
faked and named as such: a GPU's compute capability (to get the flash-attention diagnosis), and the fp16 loss
scaler (Paddle disables ``GradScaler`` on CPU), whose private attributes are guarded by a test of their own.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest


VOCAB, SEQ = 32, 8
T4 = (7, 5)  # Turing: no flash attention kernels
A100 = (8, 0)


class TinyCausalLM(paddle.nn.Layer):
    """Embedding -> linear head, PaddleNLP's ``(loss, logits)`` convention.

    Args:
        leak_labels: add the labels to the logits, as an attention that sees the future does: the loss goes to 0.
        activation_scale: multiply the hidden states and the logits, to overflow the logits to +-inf like fp16
            activations past 65504.
    """

    def __init__(self, leak_labels: bool = False, activation_scale: float = 1.0):
        super().__init__()
        self.embed = paddle.nn.Embedding(VOCAB, 16)
        self.head = paddle.nn.Linear(16, VOCAB)
        self.leak_labels = leak_labels
        self.activation_scale = activation_scale

    def forward(self, input_ids, labels=None):
        logits = self.head(self.embed(input_ids) * self.activation_scale) * self.activation_scale
        if labels is None:
            return (logits,)
        targets = paddle.clip(labels, 0, VOCAB - 1)
        if self.leak_labels:
            logits = logits + 1000.0 * F.one_hot(targets, VOCAB)
        # The loss written out: Paddle's cross entropy kernel turns a row of non-finite logits into ln(vocab)
        # instead of NaN (see the NaN-weights test), which would hide the overflow this model demonstrates.
        token_losses = -paddle.take_along_axis(F.log_softmax(logits, axis=-1), targets.unsqueeze(-1), axis=-1).squeeze(-1)
        counted = (labels != -100).astype("float32")
        loss = (token_losses * counted).sum() / paddle.clip(counted.sum(), min=1.0)
        return loss, logits


def tiny_llama():
    from paddle_llm.models.registry import build_config, build_model, resolve_model

    source = resolve_model("tiny-llama")
    return build_model(source, build_config(source), load_weights=False)


def batches(count: int = 8, masked_labels: bool = False, vocab: int = VOCAB) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(count):
        tokens = rng.integers(0, vocab, SEQ + 1).astype("int64")
        labels = np.full(SEQ, -100, dtype="int64") if masked_labels else tokens[1:]
        rows.append({"input_ids": tokens[:-1], "labels": labels})
    return rows


def train(model, data, callback, tmp_path, max_steps: int = 3, learning_rate: float = 1e-3, criterion=None):
    """A few real Trainer steps on CPU with the callback (constant learning rate); returns the trainer."""
    from paddlenlp.trainer import TrainingArguments
    from paddle_llm.trainer.trainer import LLMTrainer

    paddle.set_device("cpu")
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        per_device_train_batch_size=2,
        logging_steps=1,
        save_steps=10_000,
        report_to=["none"],
        disable_tqdm=True,
        device="cpu",
        seed=0,
    )
    trainer = LLMTrainer(model=model, args=args, train_dataset=data, callbacks=[callback], criterion=criterion)
    trainer.train()
    return trainer


# -- the checks, one per symptom, through the real trainer ---------------------------------------------------------


def test_all_labels_masked_stops_before_the_forward_pass_with_the_length_flags(tmp_path):
    from paddle_llm.trainer.health import NumericalHealthCallback, NumericalHealthError

    paddle.seed(0)
    with pytest.raises(NumericalHealthError) as raised:
        train(tiny_llama(), batches(masked_labels=True, vocab=1024), NumericalHealthCallback(), tmp_path)
    diagnosis = raised.value.diagnosis
    assert diagnosis.step == 1
    assert "-100" in diagnosis.symptom and "masked" in diagnosis.symptom
    assert "--src_length" in diagnosis.fix and "--max_length" in diagnosis.fix and "data format" in diagnosis.fix


def test_nan_weights_give_a_nan_gradient_norm_though_the_loss_stays_finite(tmp_path):
    # Paddle 3.3.1's CPU cross entropy returns ln(vocab) for a row of NaN logits (measured, for vocabularies of 32
    # and more), so NaN weights show up as a finite loss and NaN gradients: the gradient check is what catches them.
    from paddle_llm.trainer.health import NumericalHealthCallback, NumericalHealthError

    paddle.seed(0)
    model = tiny_llama()
    with paddle.no_grad():
        weight = model.llama.embed_tokens.weight
        weight.set_value(paddle.full_like(weight, float("nan")))
    with pytest.raises(NumericalHealthError) as raised:
        train(model, batches(vocab=1024), NumericalHealthCallback(), tmp_path)
    diagnosis = raised.value.diagnosis
    assert diagnosis.step == 1 and "gradient norm is nan" in diagnosis.symptom
    assert "starting weights" in diagnosis.cause
    assert "--model_name_or_path" in diagnosis.fix and "--use_flash_attention" in diagnosis.fix


def test_a_learning_rate_that_blows_up_the_weights_is_diagnosed_as_divergence_after_a_healthy_step(tmp_path):
    from paddle_llm.trainer.health import NumericalHealthCallback, NumericalHealthError

    paddle.seed(0)
    with pytest.raises(NumericalHealthError) as raised:
        train(TinyCausalLM(), batches(), NumericalHealthCallback(), tmp_path, learning_rate=1e30)
    diagnosis = raised.value.diagnosis
    assert diagnosis.step == 2 and "1 step(s) were healthy" in diagnosis.cause
    assert diagnosis.fix.startswith("lower --learning_rate (now 1e+30)")


def test_loss_exactly_zero_from_attention_that_sees_the_labels_blames_flash_attention_on_a_faked_t4_gpu(tmp_path):
    from paddle_llm.trainer.health import NumericalHealthCallback, NumericalHealthError, RunContext

    paddle.seed(0)
    faked_t4 = RunContext(use_flash_attention=True, gpu_compute_capability=T4)
    with pytest.raises(NumericalHealthError) as raised:
        train(TinyCausalLM(leak_labels=True), batches(), NumericalHealthCallback(context=faked_t4), tmp_path)
    diagnosis = raised.value.diagnosis
    assert diagnosis.symptom == "the training loss is exactly 0"
    assert "7.5" in diagnosis.cause and diagnosis.fix == "pass --use_flash_attention 0"


def test_loss_exactly_zero_on_cpu_points_at_labels_and_masking(tmp_path):
    from paddle_llm.trainer.health import NumericalHealthCallback, NumericalHealthError

    paddle.seed(0)
    with pytest.raises(NumericalHealthError) as raised:
        train(TinyCausalLM(leak_labels=True), batches(), NumericalHealthCallback(), tmp_path)
    assert "shifted left by one" in raised.value.diagnosis.fix


class LogitsOnly(paddle.nn.Layer):
    """A model without its own loss: the Trainer's criterion computes it (as FinetuneTrainer does for ChatGLM)."""

    def __init__(self, inner: TinyCausalLM):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        return self.inner(input_ids)


class LeakyCriterion(paddle.nn.Layer):
    def forward(self, outputs, labels):
        logits = outputs[0] + 1000.0 * F.one_hot(labels, VOCAB)
        return F.cross_entropy(logits, labels.unsqueeze(-1))


def test_a_separate_criterion_passed_as_a_loss_layer_is_checked_too(tmp_path):
    from paddle_llm.trainer.health import NumericalHealthCallback, NumericalHealthError

    paddle.seed(0)
    criterion = LeakyCriterion()
    callback = NumericalHealthCallback(loss_layers=(criterion,))
    with pytest.raises(NumericalHealthError, match="loss is exactly 0"):
        train(LogitsOnly(TinyCausalLM()), batches(), callback, tmp_path, criterion=criterion)


def test_overflowing_activations_give_a_nan_loss_and_the_fp16_diagnosis_says_bf16(tmp_path):
    from paddle_llm.trainer.health import NumericalHealthCallback, NumericalHealthError, RunContext

    paddle.seed(0)
    fp16_on_a100 = RunContext(fp16=True, gpu_compute_capability=A100, scale_loss=32768)
    with pytest.raises(NumericalHealthError) as raised:
        train(TinyCausalLM(activation_scale=1e20), batches(), NumericalHealthCallback(context=fp16_on_a100), tmp_path)
    diagnosis = raised.value.diagnosis
    assert diagnosis.symptom == "the training loss is nan"
    assert "fp16 overflow" in diagnosis.cause and "--bf16" in diagnosis.fix


def test_healthy_run_trains_through_and_removes_its_hook_after_the_window(tmp_path):
    from paddle_llm.trainer.health import NumericalHealthCallback

    paddle.seed(0)
    model = TinyCausalLM()
    callback = NumericalHealthCallback(check_steps=2)
    train(model, batches(), callback, tmp_path, max_steps=4)
    assert callback._hooks == []
    assert not model._forward_post_hooks


def test_check_steps_zero_disables_every_check(tmp_path):
    from paddle_llm.trainer.health import NumericalHealthCallback

    paddle.seed(0)
    train(TinyCausalLM(leak_labels=True), batches(), NumericalHealthCallback(check_steps=0), tmp_path, max_steps=2)


def test_a_problem_after_the_window_is_not_reported(tmp_path):
    # The window is the first check_steps steps: a later loss of 0 is the user's business (and VisualDL's).
    from paddlenlp.trainer import TrainerCallback, TrainingArguments
    from paddle_llm.trainer.health import NumericalHealthCallback
    from paddle_llm.trainer.trainer import LLMTrainer

    paddle.seed(0)
    model = TinyCausalLM()
    callback = NumericalHealthCallback(check_steps=1)

    class LeakFromStepTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            model.leak_labels = True

    paddle.set_device("cpu")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                             report_to=["none"], disable_tqdm=True, device="cpu", save_steps=10_000)
    LLMTrainer(model=model, args=args, train_dataset=batches(), callbacks=[callback, LeakFromStepTwo()]).train()


# -- fp16 loss scaling: Paddle's GradScaler is disabled on CPU ------------------------------------------------------


class FakedGradScaler:
    """The two attributes of ``paddle.amp.GradScaler`` the callback reads (guarded by the test below)."""

    def __init__(self, scale: float):
        self._scale = paddle.to_tensor([scale], dtype="float32")
        self._cache_found_inf = False

    def overflow(self):
        """What GradScaler.update does on an overflowing step with decr_every_n_nan_or_inf=1: skip and halve."""
        self._cache_found_inf = True
        self._scale = self._scale * 0.5


def drive_optimizer_steps(callback, scaler, steps: int):
    from paddlenlp.trainer import TrainerControl, TrainerState, TrainingArguments

    args, state, control = TrainingArguments(output_dir="unused", device="cpu"), TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=None)
    for _ in range(steps):
        callback.on_load_data_end(args, state, control, inputs={})
        callback.on_optimizer_begin(args, state, control, model=None, scaler=scaler)
        scaler.overflow()
        callback.on_optimizer_end(args, state, control, scaler=scaler)
        state.global_step += 1


def test_fp16_loss_scale_collapse_with_faked_scaler_stops_after_ten_skipped_steps():
    from paddle_llm.trainer.health import NumericalHealthCallback, NumericalHealthError, RunContext

    context = RunContext(fp16=True, gpu_compute_capability=A100, scale_loss=32768)
    callback = NumericalHealthCallback(context=context)
    with pytest.raises(NumericalHealthError) as raised:
        drive_optimizer_steps(callback, FakedGradScaler(32768), steps=20)
    diagnosis = raised.value.diagnosis
    assert diagnosis.step == 10 and "10 step(s) in a row" in diagnosis.symptom
    assert "--bf16" in diagnosis.fix and "--scale_loss" in diagnosis.fix


def test_fp16_loss_scale_below_one_with_faked_scaler_on_a_faked_v100_says_fp32_not_bf16():
    from paddle_llm.trainer.health import NumericalHealthCallback, NumericalHealthError, RunContext

    context = RunContext(fp16=True, gpu_compute_capability=(7, 0), scale_loss=4)
    callback = NumericalHealthCallback(context=context)
    with pytest.raises(NumericalHealthError) as raised:
        drive_optimizer_steps(callback, FakedGradScaler(4), steps=20)
    diagnosis = raised.value.diagnosis
    assert diagnosis.step == 3  # 4 -> 2 -> 1 -> 0.5
    assert "no --scale_loss can help" in diagnosis.cause
    assert "drop --fp16" in diagnosis.fix and "bf16 needs an Ampere" in diagnosis.fix


def test_paddle_grad_scaler_still_has_the_attributes_the_callback_reads():
    # The callback reads GradScaler's private _scale and _cache_found_inf, as PaddleNLP's Trainer does. If a Paddle
    # upgrade renames them, this fails instead of the fp16 check silently never firing.
    source = inspect.getsource(paddle.amp.grad_scaler.AmpScaler)
    assert "self._scale" in source and "self._cache_found_inf" in source


# -- the diagnoses, as pure functions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, context, expected_fix",
    [
        (float("nan"), dict(use_flash_attention=True, gpu_compute_capability=T4), "--use_flash_attention 0"),
        (float("inf"), dict(fp16=True, gpu_compute_capability=A100), "--bf16"),
        (float("nan"), dict(fp16=True, gpu_compute_capability=T4), "drop --fp16"),
        (float("nan"), {}, "--learning_rate"),
        (0.0, dict(use_flash_attention=True, gpu_compute_capability=A100), "--use_flash_attention 0"),
        (0.004, dict(use_flash_attention=True, gpu_compute_capability=T4), "--use_flash_attention 0"),
    ],
)
def test_loss_diagnosis_names_the_flag(loss, context, expected_fix):
    from paddle_llm.trainer.health import RunContext, diagnose_loss

    assert expected_fix in diagnose_loss(3, loss, RunContext(**context)).fix


@pytest.mark.parametrize("loss", [6.93, 0.5, 0.011])
def test_plausible_losses_pass(loss):
    from paddle_llm.trainer.health import RunContext, diagnose_loss

    assert diagnose_loss(1, loss, RunContext()) is None


def test_min_plausible_loss_none_checks_only_exact_zero():
    from paddle_llm.trainer.health import RunContext, diagnose_loss

    assert diagnose_loss(1, 0.001, RunContext(), min_plausible_loss=None) is None
    assert diagnose_loss(1, 0.0, RunContext(), min_plausible_loss=None) is not None


def test_grad_norm_diagnosis():
    from paddle_llm.trainer.health import RunContext, diagnose_grad_norm

    assert diagnose_grad_norm(1, 12.5, RunContext()) is None
    assert "--use_flash_attention 0" in diagnose_grad_norm(1, math.inf, RunContext(True, T4)).fix
    assert "--model_name_or_path" in diagnose_grad_norm(1, math.inf, RunContext()).fix
    diverged = diagnose_grad_norm(4, math.nan, RunContext(learning_rate=0.5), healthy_steps=3)
    assert "3 step(s) were healthy" in diverged.cause and "lower --learning_rate (now 0.5)" in diverged.fix


def test_labels_diagnosis_passes_a_batch_with_one_real_label():
    from paddle_llm.trainer.health import diagnose_labels

    labels = np.full((2, 8), -100)
    assert diagnose_labels(1, labels) is not None
    labels[1, 7] = 5
    assert diagnose_labels(1, labels) is None
    assert diagnose_labels(1, np.zeros((2, 8), dtype="int64"), ignore_index=0) is not None


def test_loss_scale_diagnosis_thresholds():
    from paddle_llm.trainer.health import RunContext, diagnose_loss_scale

    context = RunContext(fp16=True)
    assert diagnose_loss_scale(5, 1024.0, 9, context) is None
    assert diagnose_loss_scale(5, 1024.0, 10, context) is not None
    assert diagnose_loss_scale(5, 0.5, 1, context) is not None
    assert "--use_flash_attention 0" in diagnose_loss_scale(5, 0.5, 1, RunContext(True, T4, fp16=True)).fix


def test_loss_from_output_reads_tuples_and_model_outputs():
    from paddle_llm.trainer.health import loss_from_output

    loss = paddle.to_tensor(1.5)
    assert loss_from_output((loss, paddle.zeros([1, 2, 3]))) is loss
    assert loss_from_output({"loss": loss, "logits": None}) is loss
    assert loss_from_output((paddle.zeros([1, 2, 3]),)) is None  # logits only: no labels were passed


def test_the_error_prints_without_a_traceback_and_exits_non_zero(capsys):
    from paddle_llm.trainer.health import EXIT_NUMERICAL_HEALTH, NumericalHealthError, RunContext, diagnose_loss, print_health_error

    error = NumericalHealthError(diagnose_loss(2, 0.0, RunContext(True, T4)))
    assert print_health_error(error, "paddle-llm pretrain") == EXIT_NUMERICAL_HEALTH != 0
    printed = capsys.readouterr().err
    assert printed.startswith("paddle-llm pretrain: stopped: numerical health check failed at step 2")
    assert "fix: pass --use_flash_attention 0" in printed and "Traceback" not in printed


def test_negative_check_steps_is_refused():
    from paddle_llm.trainer.health import NumericalHealthCallback

    with pytest.raises(ValueError, match="check_steps"):
        NumericalHealthCallback(check_steps=-1)
