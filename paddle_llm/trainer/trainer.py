"""``LLMTrainer``: PaddleNLP's Trainer with crash-safe checkpoints, bounded evaluation and perplexity."""

from __future__ import annotations

import errno
import math
import os
import time

import paddle
from paddlenlp.trainer import Trainer
from paddlenlp.trainer.trainer_utils import speed_metrics
from paddlenlp.utils.batch_sampler import DistributedBatchSampler

from paddle_llm.trainer.checkpoint import CheckpointNotSaved, disk_full_message, mark_complete


class LLMTrainer(Trainer):
    """PaddleNLP's Trainer, changed where a long unattended run needs it.

    * A checkpoint counts only once every rank finished writing it (see ``trainer.checkpoint``); older ones are
      rotated out only after that, so a crash mid-save always leaves a usable checkpoint behind. A disk that fills
      during a save ends the run with one message (``CheckpointNotSaved``) instead of a traceback.
    * Evaluation reads at most ``args.eval_iters`` batches and reports perplexity next to the loss.
    * Samplers keep the dataset's order: pretraining datasets are already shuffled by their sample index, and a
      fixed order is what makes a resumed run replay exactly the batches an uninterrupted one would see.
    """

    reports_perplexity = True  # exp(eval loss) means something only for a language-model loss

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rotation_deferred = False
        self._last_evaluation: tuple[int, dict] | None = None

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        if self._rotation_deferred:
            return
        super()._rotate_checkpoints(use_mtime=use_mtime, output_dir=output_dir)

    def _save_checkpoint(self, model, metrics=None):
        checkpoint_dir = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        self._rotation_deferred = True
        try:
            super()._save_checkpoint(model, metrics=metrics)
            if paddle.distributed.get_world_size() > 1:
                paddle.distributed.barrier()
            if self.args.process_index == 0:
                mark_complete(checkpoint_dir, self.state.global_step)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            parameter_bytes = sum(p.numel().item() * p.element_size() for p in self.model.parameters())
            raise CheckpointNotSaved(disk_full_message(checkpoint_dir, self.state.global_step, parameter_bytes)) from None
        finally:
            self._rotation_deferred = False
        if self.args.process_index == 0:
            self._rotate_checkpoints(use_mtime=False, output_dir=self.args.output_dir)

    def _get_train_sampler(self):
        return DistributedBatchSampler(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            shuffle=False,
            num_replicas=self.args.dataset_world_size,
            rank=self.args.dataset_rank,
            drop_last=self.args.dataloader_drop_last,
        )

    def _get_eval_sampler(self, eval_dataset):
        return DistributedBatchSampler(
            eval_dataset,
            batch_size=self.args.per_device_eval_batch_size,
            shuffle=False,
            num_replicas=self.args.dataset_world_size,
            rank=self.args.dataset_rank,
            drop_last=self.args.dataloader_drop_last,
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if eval_dataset is None and self._last_evaluation and self._last_evaluation[0] == self.state.global_step:
            return self._last_evaluation[1]  # the final --do_eval right after an eval_steps evaluation of the same weights
        start = time.time()
        dataloader = self.get_eval_dataloader(eval_dataset if eval_dataset is not None else self.eval_dataset)
        max_iters = getattr(self.args, "eval_iters", -1)
        output = self.evaluation_loop(
            dataloader,
            description="Evaluation",
            prediction_loss_only=True,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
            max_eval_iters=max_iters,
        )
        metrics = output.metrics
        loss = metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None and self.reports_perplexity:
            metrics[f"{metric_key_prefix}_ppl"] = math.exp(min(loss, 50.0))  # cap: exp overflows long before 50 matters
        metrics.update(speed_metrics(metric_key_prefix, start, num_samples=output.num_samples))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        if eval_dataset is None:
            self._last_evaluation = (self.state.global_step, metrics)
        return metrics
