"""Trainer callbacks: ``metrics.jsonl`` with loss, learning rate, gradient norm and tokens/s."""

from __future__ import annotations

import json
import math
import os

import paddle
from paddlenlp.trainer import TrainerCallback

METRICS_FILE = "metrics.jsonl"


def global_grad_norm(parameters, loss_scale: float = 1.0) -> float:
    """L2 norm over all gradients, as gradient clipping sees it (unscaled when a loss scaler is active)."""
    squares = [paddle.sum(paddle.square(p.grad.astype("float32"))) for p in parameters if p.grad is not None]
    if not squares:
        return 0.0
    return math.sqrt(float(paddle.add_n(squares).item())) / loss_scale


class MetricsFileCallback(TrainerCallback):
    """Append one JSON object per logging step (and per evaluation) to ``OUTPUT_DIR/metrics.jsonl``.

    Training rows: ``step, loss, learning_rate, grad_norm, tokens_per_second``; evaluation rows: ``step, eval_loss,
    eval_ppl``. On resume, rows after the resumed step are dropped, so the file never holds a step twice.
    """

    def __init__(self, output_dir: str, tokens_per_sample: int):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.tokens_per_sample = tokens_per_sample
        self.grad_norm: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)

    def on_optimizer_begin(self, args, state, control, optimizer=None, scaler=None, **kwargs):
        # Gradients are final here (after accumulation and the data-parallel all-reduce), and only needed on
        # logging steps, so the extra reduction costs nothing on the other steps.
        step = state.global_step + 1
        logs_this_step = (args.logging_steps > 0 and step % args.logging_steps == 0) or (step == 1 and args.logging_first_step)
        if optimizer is None or not logs_this_step:
            return
        scale = float(scaler._scale.item()) if scaler is not None else 1.0
        parameters = getattr(optimizer, "_parameter_list", None) or []
        if parameters and isinstance(parameters[0], dict):  # parameter groups
            parameters = [p for group in parameters for p in group["params"]]
        self.grad_norm = global_grad_norm(parameters, scale)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = None
        if "loss" in logs:
            samples_per_second = logs.get("interval_samples_per_second")
            row = {
                "step": state.global_step,
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": self.grad_norm,
                "tokens_per_second": None if samples_per_second is None else round(samples_per_second * self.tokens_per_sample, 2),
            }
        elif "eval_loss" in logs:
            row = {"step": state.global_step, "eval_loss": logs["eval_loss"], "eval_ppl": logs.get("eval_ppl")}
        if row is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
