"""Numerical health in the first steps of a run: stop early, name the likely cause and the flag to change.

A run that is numerically broken rarely crashes; it trains for hours on garbage. The failures users meet most:

* flash attention on a GPU older than Ampere: the loss falls to 0.00x within a few steps (the kernel computes the
  wrong attention, so the model sees the tokens it predicts);
* fp16 overflow: NaN losses, or the dynamic loss scaler skipping step after step until the scale collapses;
* a prompt template or truncation that masks every label: nothing to learn, loss 0 or NaN.

:class:`NumericalHealthCallback` watches the first ``check_steps`` optimizer steps (20 by default) and raises
:class:`NumericalHealthError` with a diagnosis; the recipe prints it without a traceback and exits non-zero. After
the window it removes its hooks and costs nothing.

Where each symptom is seen, without changing the trainer:

* labels: ``on_load_data_end``, which PaddleNLP's Trainer calls with every batch before the forward pass;
* loss: a forward post-hook on the model (while it is in training mode), so every micro-batch's loss is read, not
  just the logging steps' averages, and before PaddleNLP's own NaN assertion (which has no diagnosis). A trainer
  whose loss comes from a separate ``criterion`` (the model returns logits only) passes it as ``loss_layers``;
* gradient norm: ``on_optimizer_begin``, when gradients are final (skipped under fp16, where overflowing gradients
  are the loss scaler's job);
* loss scale: ``on_optimizer_end``, after the scaler decided to step or skip.

The diagnoses are pure functions of the observed value and a :class:`RunContext`, tested without training.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import paddle
from paddlenlp.trainer import TrainerCallback

from paddle_llm.config.validation import FLASH_ATTENTION_MIN_CAPABILITY, supports_flash_attention
from paddle_llm.data.sft import IGNORE_INDEX
from paddle_llm.trainer.callbacks import global_grad_norm

DEFAULT_CHECK_STEPS = 20
# The flash-attention failure drives the loss to 0.00x; no real run gets there within its first steps.
DEFAULT_MIN_PLAUSIBLE_LOSS = 0.01
DEFAULT_MIN_LOSS_SCALE = 1.0
# The scaler halves the scale at each overflow; 10 skips in a row from 32768 means 32 still overflows.
DEFAULT_MAX_CONSECUTIVE_SKIPPED_STEPS = 10
EXIT_NUMERICAL_HEALTH = 3


@dataclass(frozen=True)
class Diagnosis:
    """What went wrong, at which step, why it probably happened, and what to change.

    Attributes:
        step: the optimizer step being computed (1-based).
        symptom: what was observed.
        cause: the likely cause.
        fix: the flag or input to change.
    """

    step: int
    symptom: str
    cause: str
    fix: str

    def message(self) -> str:
        return f"numerical health check failed at step {self.step}: {self.symptom}\n  likely cause: {self.cause}\n  fix: {self.fix}"


class NumericalHealthError(RuntimeError):
    """Training stopped by a numerical health check; ``str(err)`` is the diagnosis, ``err.diagnosis`` its parts."""

    def __init__(self, diagnosis: Diagnosis):
        super().__init__(diagnosis.message())
        self.diagnosis = diagnosis


@dataclass(frozen=True)
class RunContext:
    """The settings a diagnosis depends on.

    Attributes:
        use_flash_attention: flash attention is on.
        gpu_compute_capability: the training GPU's, or None on CPU.
        fp16, bf16: mixed precision in use.
        scale_loss: the initial fp16 loss scale (``--scale_loss``).
        learning_rate: the peak learning rate (``--learning_rate``).
    """

    use_flash_attention: bool = False
    gpu_compute_capability: tuple[int, int] | None = None
    fp16: bool = False
    bf16: bool = False
    scale_loss: float | None = None
    learning_rate: float | None = None

    @property
    def flash_attention_unsupported(self) -> bool:
        capability = self.gpu_compute_capability
        return self.use_flash_attention and capability is not None and not supports_flash_attention(capability)

    @property
    def bf16_supported(self) -> bool | None:
        """bf16 needs the same Ampere tensor cores as flash attention; None when the GPU is unknown."""
        capability = self.gpu_compute_capability
        return None if capability is None else supports_flash_attention(capability)


def _capability(capability: tuple[int, int] | None) -> str:
    return "unknown" if capability is None else f"{capability[0]}.{capability[1]}"


def _flash_attention_diagnosis(step: int, symptom: str, context: RunContext) -> Diagnosis:
    minimum = ".".join(map(str, FLASH_ATTENTION_MIN_CAPABILITY))
    return Diagnosis(
        step,
        symptom,
        f"flash attention on a GPU of compute capability {_capability(context.gpu_compute_capability)}: its kernels "
        f"need {minimum} (Ampere, e.g. A100) or newer, and on older GPUs they compute the wrong attention",
        "pass --use_flash_attention 0",
    )


def _divergence_diagnosis(step: int, symptom: str, healthy_steps: int, context: RunContext) -> Diagnosis:
    """After healthy steps, the weights themselves were blown up by the updates: kernels or bad weights would have
    failed the first step already."""
    rate = f" (now {context.learning_rate:g})" if context.learning_rate else ""
    return Diagnosis(
        step,
        symptom,
        f"training diverged: {healthy_steps} step(s) were healthy, then the updates blew up the weights",
        f"lower --learning_rate{rate}, keep --max_grad_norm 1.0, and warm up with --warmup_steps",
    )


def _without_fp16(context: RunContext) -> str:
    """The precision to switch to: bf16 where the GPU has it, else fp32 or O1."""
    if context.bf16_supported is False:
        return "drop --fp16 (train in fp32) or use --fp16_opt_level O1; bf16 needs an Ampere or newer GPU"
    return "use --bf16 instead of --fp16 (fp32's range, no loss scaling; Ampere or newer)"


def diagnose_labels(step: int, labels: np.ndarray, ignore_index: int = IGNORE_INDEX) -> Diagnosis | None:
    """A batch whose every label is ``ignore_index`` has nothing to learn; its loss is 0 or NaN.

    Args:
        step: the step being computed (1-based).
        labels: the batch's labels, any shape.
        ignore_index: the value that masks a label.

    Returns:
        A diagnosis, or None when some label is real.
    """
    if labels.size and np.any(labels != ignore_index):
        return None
    return Diagnosis(
        step,
        f"every label in the batch ({labels.size} of them) is {ignore_index}, i.e. masked",
        "the prompt template masks the whole answer, or truncation cut the answer off because the prompt filled "
        "the length budget",
        "check --src_length and --max_length (the prompt's src_length must leave room for the answer within "
        "max_length) and the data format (every example needs a non-empty target, e.g. 'tgt')",
    )


def diagnose_loss(
    step: int,
    loss: float,
    context: RunContext,
    min_plausible_loss: float | None = DEFAULT_MIN_PLAUSIBLE_LOSS,
    healthy_steps: int = 0,
) -> Diagnosis | None:
    """A training loss that is NaN/inf, exactly 0, or implausibly close to 0 in the first steps.

    Args:
        step: the step being computed (1-based).
        loss: one micro-batch's training loss.
        context: the run's settings.
        min_plausible_loss: losses below this (but above 0) count as collapsed; None checks only for exactly 0.
        healthy_steps: steps of this run that completed without a finding.

    Returns:
        A diagnosis, or None for a healthy loss.
    """
    if not math.isfinite(loss):
        symptom = f"the training loss is {loss}"
        if context.flash_attention_unsupported:
            return _flash_attention_diagnosis(step, symptom, context)
        if context.fp16:
            return Diagnosis(
                step,
                symptom,
                "fp16 overflow in the forward pass: activations beyond fp16's 65504 become inf; loss scaling only "
                "protects the backward pass",
                _without_fp16(context),
            )
        if healthy_steps:
            return _divergence_diagnosis(step, symptom, healthy_steps, context)
        return Diagnosis(
            step,
            symptom,
            "the weights or the inputs hold NaN/inf (a corrupt or mismatched checkpoint), or the first updates diverged",
            "check the weights in --model_name_or_path (with --continue_training 1), lower --learning_rate, and keep "
            "--max_grad_norm 1.0",
        )
    collapsed = loss == 0.0 or (min_plausible_loss is not None and loss < min_plausible_loss)
    if not collapsed:
        return None
    symptom = f"the training loss is {'exactly 0' if loss == 0.0 else f'{loss:.6f}, already near 0'}"
    if context.flash_attention_unsupported:
        return _flash_attention_diagnosis(step, symptom, context)
    if context.use_flash_attention:
        return Diagnosis(
            step,
            symptom,
            "the model sees the tokens it predicts: with flash attention the causal masking is the kernel's, and "
            "this Paddle/PaddleNLP pair may not apply it",
            "rerun with --use_flash_attention 0; if the loss is then normal, run `paddle-llm doctor` and use the "
            "tested versions",
        )
    return Diagnosis(
        step,
        symptom,
        "the model sees the tokens it predicts (labels equal to input_ids without the one-token shift, or an "
        "attention mask that is not causal), or the data is one repeated token",
        "check the data and collator: labels must be input_ids shifted left by one, and the corpus must not be "
        "empty or constant (inspect the .bin/.idx written by `paddle-llm preprocess`)",
    )


def diagnose_grad_norm(step: int, grad_norm: float, context: RunContext, healthy_steps: int = 0) -> Diagnosis | None:
    """A NaN/inf gradient norm while the loss was finite (checked before), without a loss scaler.

    A finite loss does not clear the weights: Paddle's cross entropy returns ln(vocab) for a row of NaN logits, so
    NaN weights show up here first.

    Args:
        step: the step being computed (1-based).
        grad_norm: the global L2 norm of the gradients.
        context: the run's settings.
        healthy_steps: steps of this run that completed without a finding.

    Returns:
        A diagnosis, or None for a finite norm.
    """
    if math.isfinite(grad_norm):
        return None
    symptom = f"the gradient norm is {grad_norm} while the loss is finite"
    if context.flash_attention_unsupported:
        return _flash_attention_diagnosis(step, symptom, context)
    if healthy_steps:
        return _divergence_diagnosis(step, symptom, healthy_steps, context)
    return Diagnosis(
        step,
        symptom,
        "NaN/inf in the starting weights (a corrupt or mismatched checkpoint), or a backward kernel that overflows "
        "or is unsupported here: a flash or fused kernel (attention, RMSNorm, rotary), or 16-bit gradients under "
        "--fp16_opt_level O2",
        "check the weights in --model_name_or_path; turn off --use_flash_attention, --use_fused_rms_norm and "
        "--use_fused_rope to find a kernel; under O2 add --amp_master_grad 1",
    )


def diagnose_loss_scale(
    step: int,
    scale: float,
    consecutive_skipped: int,
    context: RunContext,
    min_loss_scale: float = DEFAULT_MIN_LOSS_SCALE,
    max_consecutive_skipped: int = DEFAULT_MAX_CONSECUTIVE_SKIPPED_STEPS,
) -> Diagnosis | None:
    """fp16 dynamic loss scaling that collapsed: the scale fell below ``min_loss_scale``, or the scaler skipped
    ``max_consecutive_skipped`` steps in a row because the gradients overflowed.

    Returns:
        A diagnosis, or None while scaling is healthy.
    """
    if scale >= min_loss_scale and consecutive_skipped < max_consecutive_skipped:
        return None
    started = f", started at {context.scale_loss:g}" if context.scale_loss else ""
    symptom = (
        f"fp16 loss scaling collapsed: {consecutive_skipped} step(s) in a row overflowed and were skipped "
        f"(scale now {scale:g}{started})"
    )
    if context.flash_attention_unsupported:
        return _flash_attention_diagnosis(step, symptom, context)
    if scale < min_loss_scale:
        return Diagnosis(
            step,
            symptom,
            f"the gradients overflow fp16 even at a scale of {scale:g}, so no --scale_loss can help",
            _without_fp16(context),
        )
    return Diagnosis(
        step,
        symptom,
        "fp16 overflow in the backward pass: the initial scale is too large for this model, and every skipped step "
        "is a step not trained",
        f"{_without_fp16(context)}; or lower --scale_loss (e.g. --scale_loss 1024)",
    )


def _to_numpy(value) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def loss_from_output(output):
    """The loss in a causal LM's forward output: ``(loss, logits, ...)``, a ``ModelOutput``/dict with ``loss``, or
    None when the output carries no scalar loss (no labels were passed)."""
    if isinstance(output, dict):
        candidate = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        candidate = output[0]
    else:
        candidate = output
    shape = getattr(candidate, "shape", None)
    if shape is None or int(np.prod(shape)) != 1:
        return None
    return candidate


def _scaler_found_inf(scaler) -> bool:
    # Paddle's GradScaler keeps this private; 2.6 spelled it _cache_founf_inf (PaddleNLP reads both the same way).
    found = getattr(scaler, "_cache_found_inf", getattr(scaler, "_cache_founf_inf", False))
    return bool(found)


def _scaler_scale(scaler) -> float:
    return float(_to_numpy(scaler._scale).reshape(-1)[0])


def run_context_from_training(args, model=None) -> RunContext:
    """Read the context from PaddleNLP's training arguments, the model config and the device.

    The model config is preferred for ``use_flash_attention`` because the CPU fallback switches it off there.
    """
    config = getattr(model, "config", None)
    use_flash = bool(getattr(config, "use_flash_attention", getattr(args, "use_flash_attention", False)))
    capability = None
    on_gpu = str(getattr(args, "device", "")).startswith("gpu") or paddle.get_device().startswith("gpu")
    if on_gpu and paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        capability = tuple(paddle.device.cuda.get_device_capability())
    return RunContext(
        use_flash_attention=use_flash,
        gpu_compute_capability=capability,
        fp16=bool(getattr(args, "fp16", False)),
        bf16=bool(getattr(args, "bf16", False)),
        scale_loss=getattr(args, "scale_loss", None),
        learning_rate=getattr(args, "learning_rate", None),
    )


class NumericalHealthCallback(TrainerCallback):
    """Stop a run whose first steps are numerically broken, with a diagnosis.

    Args:
        check_steps: optimizer steps to watch after training (re)starts; 0 disables every check.
        ignore_index: the label value that masks a token.
        min_plausible_loss: a loss below this within the window counts as collapsed (None: only exactly 0).
        min_loss_scale, max_consecutive_skipped_steps: the fp16 loss-scale collapse thresholds.
        context: the run's settings; read from the trainer's arguments and model at train begin when None.
        loss_layers: layers besides the model whose output is the loss, e.g. the Trainer's ``criterion``.

    Raises (from inside ``trainer.train()``):
        NumericalHealthError: with the diagnosis.
    """

    def __init__(
        self,
        check_steps: int = DEFAULT_CHECK_STEPS,
        ignore_index: int = IGNORE_INDEX,
        min_plausible_loss: float | None = DEFAULT_MIN_PLAUSIBLE_LOSS,
        min_loss_scale: float = DEFAULT_MIN_LOSS_SCALE,
        max_consecutive_skipped_steps: int = DEFAULT_MAX_CONSECUTIVE_SKIPPED_STEPS,
        context: RunContext | None = None,
        loss_layers: tuple = (),
    ):
        if check_steps < 0:
            raise ValueError(f"check_steps must be 0 (off) or positive, got {check_steps}")
        self.check_steps = check_steps
        self.ignore_index = ignore_index
        self.min_plausible_loss = min_plausible_loss
        self.min_loss_scale = min_loss_scale
        self.max_consecutive_skipped_steps = max_consecutive_skipped_steps
        self.context = context
        self._run_context = context or RunContext()  # the given context, else the one read at train begin
        self.loss_layers = tuple(loss_layers)
        self._model = None
        self._first_step = 0
        self._current_step = 0  # 1-based step being computed
        self._consecutive_skipped = 0
        self._hooks: list = []

    def _watching(self) -> bool:
        return self._current_step - self._first_step <= self.check_steps

    @property
    def _healthy_steps(self) -> int:
        """Steps of this run completed without a finding (a finding raises, so: every completed step)."""
        return self._current_step - 1 - self._first_step

    def _raise_if(self, diagnosis: Diagnosis | None) -> None:
        if diagnosis is not None:
            self._remove_hooks()
            raise NumericalHealthError(diagnosis)

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._first_step = state.global_step
        self._current_step = state.global_step + 1
        self._consecutive_skipped = 0
        if self.check_steps == 0:
            return
        if self.context is None:
            self._run_context = run_context_from_training(args, model)
        self._model = model
        for layer in (model, *self.loss_layers):
            if layer is not None and hasattr(layer, "register_forward_post_hook"):
                self._hooks.append(layer.register_forward_post_hook(self._check_forward_output))

    def on_load_data_end(self, args, state, control, inputs=None, **kwargs):
        self._current_step = state.global_step + 1
        if not self._watching() or not isinstance(inputs, dict) or inputs.get("labels") is None:
            return
        self._raise_if(diagnose_labels(self._current_step, _to_numpy(inputs["labels"]), self.ignore_index))

    def _check_forward_output(self, layer, inputs, output):
        # The model's mode, not the layer's: a criterion outside the model stays in training mode during evaluation.
        if self._model is None or not self._model.training or not self._watching():
            return None
        loss = loss_from_output(output)
        if loss is not None:
            value = float(_to_numpy(loss).reshape(-1)[0])
            diagnosis = diagnose_loss(self._current_step, value, self._run_context, self.min_plausible_loss, self._healthy_steps)
            self._raise_if(diagnosis)
        return None  # keep the output unchanged

    def on_optimizer_begin(self, args, state, control, model=None, scaler=None, **kwargs):
        if not self._watching() or scaler is not None or model is None:
            return
        trainable = [p for p in model.parameters() if not p.stop_gradient]
        norm = global_grad_norm(trainable)
        self._raise_if(diagnose_grad_norm(self._current_step, norm, self._run_context, self._healthy_steps))

    def on_optimizer_end(self, args, state, control, scaler=None, **kwargs):
        if not self._watching() or scaler is None:
            return
        self._consecutive_skipped = self._consecutive_skipped + 1 if _scaler_found_inf(scaler) else 0
        diagnosis = diagnose_loss_scale(
            self._current_step,
            _scaler_scale(scaler),
            self._consecutive_skipped,
            self._run_context,
            self.min_loss_scale,
            self.max_consecutive_skipped_steps,
        )
        self._raise_if(diagnosis)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step - self._first_step >= self.check_steps:
            self._remove_hooks()

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()


def print_health_error(error: NumericalHealthError, program: str) -> int:
    """Print a health diagnosis for the user (no traceback) and return the exit code to use.

    Args:
        error: the raised error.
        program: the command's name for the prefix, e.g. ``paddle-llm pretrain``.

    Returns:
        :data:`EXIT_NUMERICAL_HEALTH`.
    """
    print(f"{program}: stopped: {error}", file=sys.stderr, flush=True)
    return EXIT_NUMERICAL_HEALTH
