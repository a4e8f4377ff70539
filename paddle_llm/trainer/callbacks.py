"""Trainer callbacks: ``metrics.jsonl`` with loss, learning rate, gradient norm and tokens/s."""

from __future__ import annotations

import json
import math
import os

import paddle
from paddle.distributed import fleet
from paddlenlp.trainer import TrainerCallback

METRICS_FILE = "metrics.jsonl"


def global_grad_norm(parameters, loss_scale: float = 1.0) -> float:
    """L2 norm over all gradients, as gradient clipping sees it (unscaled when a loss scaler is active)."""
    squares = [paddle.sum(paddle.square(p.grad.astype("float32"))) for p in parameters if p.grad is not None]
    if not squares:
        return 0.0
    return math.sqrt(float(paddle.add_n(squares).item())) / loss_scale


def _replica_ranks() -> tuple[int, int, int]:
    """``(model-parallel rank, sharding rank, data-parallel degree)`` of this process; ``(0, 0, world)`` without fleet."""
    hcg = getattr(fleet.fleet, "_hcg", None)
    if hcg is None:
        return 0, 0, paddle.distributed.get_world_size()
    return hcg.get_model_parallel_rank(), hcg.get_sharding_parallel_rank(), hcg.get_data_parallel_world_size()


def owned_grad_norm(params_grads) -> float:
    """Global L2 norm of the gradients every rank is about to apply, summed over all ranks exactly once.

    Each rank passes the (parameter, gradient) pairs its optimizer updates, as the gradient clip receives them.
    A gradient is counted on one rank only: tensor-parallel shards (``is_distributed``) on every model-parallel
    rank, replicated parameters on model-parallel rank 0; parameters stage 3 leaves whole (``unslice``) on
    sharding rank 0; a weight shared between pipeline stages on its first stage. Data-parallel replicas hold the
    same gradients, so the all-reduced sum is divided by their number.
    """
    mp_rank, sharding_rank, dp_degree = _replica_ranks()
    squares = []
    for parameter, grad in params_grads:
        if grad is None or not getattr(parameter, "need_clip", True) or not getattr(parameter, "is_firstly_shared", True):
            continue
        if not getattr(parameter, "is_distributed", False) and mp_rank != 0:
            continue
        if hasattr(parameter, "unslice") and sharding_rank != 0:
            continue
        squares.append(paddle.sum(paddle.square(grad.astype("float32"))))
    total = paddle.add_n(squares) if squares else paddle.zeros([], dtype="float32")
    if paddle.distributed.get_world_size() > 1:
        paddle.distributed.all_reduce(total)
    return math.sqrt(float(total.item()) / dp_degree)


class GradNormRecorder:
    """Stands in for an optimizer's gradient clip: measures the global gradient norm when asked, then clips.

    The clip is where every parallel layout's gradients are final: after the data-parallel all-reduce, the
    sharding reduce and its scaling, and the loss-scale unscale; and where each rank holds exactly the gradients
    it applies. Measuring anywhere earlier gives partial or unreduced norms under tensor parallel or sharding.
    """

    def __init__(self, clip):
        self.clip = clip
        self.measure_next = False
        self.norm: float | None = None

    def __call__(self, params_grads):
        if self.measure_next:
            self.norm = owned_grad_norm(params_grads)
            self.measure_next = False
        return params_grads if self.clip is None else self.clip(params_grads)

    def __getattr__(self, name):
        if name == "clip":  # not yet set (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.clip, name)


def _applying_optimizer(optimizer):
    """The innermost optimizer, the one that runs the gradient clip (fleet and sharding wrap it one or two deep)."""
    seen = {id(optimizer)}
    while True:
        inner = vars(optimizer).get("_inner_opt") or vars(optimizer).get("_optim")
        if inner is None or id(inner) in seen:  # stage 3 points the optimizer at itself
            return optimizer
        seen.add(id(inner))
        optimizer = inner


def grad_norm_recorder(optimizer) -> GradNormRecorder:
    """The optimizer's ``GradNormRecorder``, installed in front of its gradient clip on first use."""
    applying = _applying_optimizer(optimizer)
    if not isinstance(applying._grad_clip, GradNormRecorder):
        applying._grad_clip = GradNormRecorder(applying._grad_clip)
    return applying._grad_clip


class MetricsFileCallback(TrainerCallback):
    """Append one JSON object per logging step (and per evaluation) to ``OUTPUT_DIR/metrics.jsonl``.

    Training rows: ``step, loss, learning_rate, grad_norm, tokens_per_second``; evaluation rows: ``step, eval_loss,
    eval_ppl``. A recipe's own grouped metrics (``rewards/margins``, ``eval_rewards/accuracies``: names with a ``/``)
    join their row. On resume, rows after the resumed step are dropped, so the file never holds a step twice.
    """

    def __init__(self, output_dir: str, tokens_per_sample: int):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.tokens_per_sample = tokens_per_sample
        self.recorder: GradNormRecorder | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        kept = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
        # Written even when empty: a run shorter than --logging_steps still has a metrics file for its report.
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def on_optimizer_begin(self, args, state, control, optimizer=None, scaler=None, **kwargs):
        # The norm is measured inside the optimizer step, where gradients are final under every parallel layout
        # (see GradNormRecorder), and only on logging steps, so other steps pay no extra reduction.
        step = state.global_step + 1
        logs_this_step = (args.logging_steps > 0 and step % args.logging_steps == 0) or (step == 1 and args.logging_first_step)
        if optimizer is None:
            return
        self.recorder = grad_norm_recorder(optimizer)
        self.recorder.measure_next = logs_this_step

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
                "grad_norm": self.recorder.norm if self.recorder else None,
                "tokens_per_second": None if samples_per_second is None else round(samples_per_second * self.tokens_per_sample, 2),
            }
        elif "eval_loss" in logs:
            row = {"step": state.global_step, "eval_loss": logs["eval_loss"]}
            if "eval_ppl" in logs:  # a preference loss has no perplexity
                row["eval_ppl"] = logs["eval_ppl"]
        if row is not None:
            row.update({name: value for name, value in logs.items() if "/" in name})
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
