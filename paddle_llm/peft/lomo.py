"""LOMO (LOw-Memory Optimization, Lv et al. 2023): SGD fused into the backward pass.

A standard step keeps a gradient for every parameter until the optimizer runs, plus the optimizer's state (AdamW:
two more copies of the model). LOMO updates each parameter the moment its gradient is complete and frees that
gradient at once, so at most a few gradients exist at any time and there is no optimizer state: full fine-tuning
needs little more memory than inference.

How it runs in Paddle: every trainable parameter gets a *backward hook* (``Tensor._register_backward_hook``), which
Paddle calls right after it has accumulated that parameter's gradient, i.e. after every use of the parameter in the
graph has contributed. The hook applies ``p <- p * (1 - lr * wd) - lr * clip * g`` in place and releases ``g``.
Updating in place during backward is safe because the hook fires only after the last gradient node that reads the
parameter has run.

Gradient-norm clipping needs the global norm before the first update, which LOMO cannot know in one pass. As in the
paper, a first backward pass only sums squared gradients, freeing each as it goes; the second pass updates with the
clipping factor. The paper keeps the graph for the second pass (``retain_graph``); in Paddle 3.3 a second backward
through a retained Llama graph gives different gradients (off by ~1e-2), so the second pass re-runs the forward
instead, under the same random state (dropout masks repeat). ``max_grad_norm <= 0`` skips the first pass.

Limits: one process (a data-parallel all-reduce would have to run inside each hook); no gradient accumulation (the
gradients are gone after each backward); no fp16 loss scaling (use float32 or bf16).
"""

from __future__ import annotations

import math
from functools import partial

import paddle

# Hook modes: what a backward pass through the hooked parameters does.
_IDLE, _NORM, _UPDATE = "idle", "norm", "update"


class LomoOptimizer(paddle.optimizer.Optimizer):
    """An optimizer whose work happens inside ``fused_step``; ``step`` and ``clear_grad`` have nothing left to do.

    It still is a ``paddle.optimizer.Optimizer``, so the PaddleNLP Trainer drives its learning-rate scheduler, and
    saves and restores its (scheduler-only) state in checkpoints like any other.

    Args:
        learning_rate: a float or a ``paddle.optimizer.lr.LRScheduler``.
        parameters: the model's parameters; those with ``stop_gradient`` (frozen) are left alone.
        weight_decay: decoupled decay, applied with each update as AdamW does.
        apply_decay_param_fun: takes a parameter name, returns whether to decay it (None: all).
        max_grad_norm: clip the global gradient norm to this (two backward passes); <= 0 disables clipping.
    """

    def __init__(self, learning_rate, parameters, weight_decay: float = 0.0, apply_decay_param_fun=None, max_grad_norm: float = 0.0):
        parameters = list(parameters)
        super().__init__(learning_rate=learning_rate, parameters=parameters)
        self.trainable = [p for p in parameters if not p.stop_gradient]
        self.weight_decay = float(weight_decay or 0.0)
        self.decayed = {p.name for p in self.trainable if apply_decay_param_fun is None or apply_decay_param_fun(p.name)}
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.last_grad_norm: float | None = None  # the global norm of the last step (when clipping measured it)
        self._mode = _IDLE
        self._squared_norm = None
        self._learning_rate_now = 0.0
        self._clip_factor = 1.0
        for parameter in self.trainable:
            parameter._register_backward_hook(partial(self._on_gradient_ready, parameter))

    def _on_gradient_ready(self, parameter) -> None:
        gradient = parameter.grad
        if self._mode == _IDLE or gradient is None:
            return  # an ordinary backward (not ours): leave the gradient where Paddle put it
        with paddle.no_grad():
            if self._mode == _NORM:
                square = paddle.sum(paddle.square(gradient.astype("float32")))
                self._squared_norm = square if self._squared_norm is None else self._squared_norm + square
            else:
                if self.weight_decay and parameter.name in self.decayed:
                    parameter.scale_(1.0 - self._learning_rate_now * self.weight_decay)
                # the gradient is about to be freed, so scale it in place rather than allocate a scaled copy
                gradient.scale_(-self._learning_rate_now * self._clip_factor)
                parameter.add_(gradient if gradient.dtype == parameter.dtype else gradient.astype(parameter.dtype))
        # Release the gradient's memory through the tensor itself: in Paddle 3.3, once a no_grad block has run in
        # this hook, clear_gradient(set_to_zero=False) alone leaves the buffer allocated (tests/integration check
        # that no gradient survives a step).
        gradient._clear_data()
        parameter.clear_gradient(set_to_zero=False)

    def fused_step(self, compute_loss) -> paddle.Tensor:
        """Run one training step: forward, backward, and every trainable parameter updated as its gradient appears.

        Args:
            compute_loss: runs the forward pass and returns the loss; with clipping it is called twice.

        Returns:
            The loss (of the updating pass).
        """
        self._learning_rate_now = float(self.get_lr())
        self._clip_factor = 1.0
        try:
            if self.max_grad_norm > 0:
                random_state = paddle.get_rng_state()
                self._mode, self._squared_norm = _NORM, None
                compute_loss().backward()
                norm = math.sqrt(float(self._squared_norm.item())) if self._squared_norm is not None else 0.0
                self.last_grad_norm = norm
                # the rule of paddle.nn.ClipGradByGlobalNorm: scale down only when the norm exceeds the limit
                self._clip_factor = self.max_grad_norm / max(norm, self.max_grad_norm)
                paddle.set_rng_state(random_state)
            self._mode = _UPDATE
            loss = compute_loss()
            loss.backward()
        finally:
            self._mode = _IDLE
        return loss

    @paddle.no_grad()
    def step(self):
        """Nothing to do: ``fused_step`` already applied this step's updates."""

    def clear_grad(self, set_to_zero: bool = True):
        """Nothing to clear: each gradient was freed in its hook."""
