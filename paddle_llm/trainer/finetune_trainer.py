"""``FinetuneTrainer``: ``LLMTrainer`` plus what fine-tuning needs.

* ``--optim sgd`` and ``--optim lomo`` (``paddle_llm.peft.lomo``): LOMO updates inside backward, so its training
  step hands the forward to the optimizer instead of calling ``loss.backward()``.
* A token-mean loss for models whose own loss is not one (``TokenMeanCrossEntropy``).
* Generation-based evaluation: exact match of greedy replies on the dev prompts, next to the loss.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import paddle

from paddle_llm.data.sft import IGNORE_INDEX
from paddle_llm.cpu.ops import CausalLMLoss
from paddle_llm.models.registry import ModelFamily
from paddle_llm.peft.lomo import LomoOptimizer
from paddle_llm.trainer.callbacks import MetricsFileCallback
from paddle_llm.trainer.generation import exact_match
from paddle_llm.trainer.trainer import LLMTrainer

GENERATIONS_FILE = "eval_generations.jsonl"


class TokenMeanCrossEntropy(paddle.nn.Layer):
    """Cross-entropy averaged over the tokens that have a label, as the Trainer's ``criterion(outputs, labels)``.

    ChatGLM-6B's head calls ``F.cross_entropy(logits, labels, ignore_index=-100)``, whose mean in Paddle 3.3 divides
    by *every* position, ignored ones included (tests/unit/test_sft_data.py pins this). Prompt and padding tokens
    would then shrink the loss, and a packed batch would not equal the same samples padded. The arithmetic is
    ChatGLM2's criterion rule (``cpu_fast.CausalLMLoss``); this layer only takes the logits out of the outputs.
    """

    def __init__(self):
        super().__init__()
        self.loss = CausalLMLoss(IGNORE_INDEX, count_positive_losses=False)

    def forward(self, outputs, labels):
        logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs.logits
        return self.loss(logits, labels)


def criterion_for(family: ModelFamily, tensor_parallel_degree: int):
    """The criterion the Trainer should use, or None for the model's own loss.

    With tensor parallelism ChatGLM's head filters the ignored labels itself (and its logits are vocabulary-split,
    which a plain cross-entropy cannot read), so its own loss is kept there.
    """
    if family.token_mean_loss and tensor_parallel_degree <= 1:
        return TokenMeanCrossEntropy()
    return None


@dataclass(frozen=True)
class MeasuredNorm:
    """A gradient norm measured elsewhere, in the shape ``MetricsFileCallback`` reads (``recorder.norm``)."""

    norm: float | None


class FinetuneMetricsCallback(MetricsFileCallback):
    """``metrics.jsonl`` rows for fine-tuning. LOMO frees each gradient inside backward and never runs a gradient
    clip, so the norm its clipping pass measured is reported instead of one measured at the clip."""

    def on_optimizer_begin(self, args, state, control, optimizer=None, scaler=None, **kwargs):
        if isinstance(optimizer, LomoOptimizer):
            self.recorder = MeasuredNorm(optimizer.last_grad_norm)
            return
        super().on_optimizer_begin(args, state, control, optimizer=optimizer, scaler=scaler, **kwargs)


class FinetuneTrainer(LLMTrainer):
    """``LLMTrainer`` with SGD/LOMO, and exact match by greedy decoding when ``generation`` is given.

    Args:
        generation: ``GenerationEval`` (dev prompts, tokenizer, collator, new-token budget) or None.
        Everything else goes to ``LLMTrainer``.
    """

    def __init__(self, *args, generation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation = generation

    def create_optimizer(self, lr_scheduler=None):
        name = str(getattr(self.args.optim, "value", self.args.optim))
        if self.optimizer is not None or name not in ("sgd", "lomo"):
            return super().create_optimizer(lr_scheduler)
        learning_rate = self.lr_scheduler if lr_scheduler is None else lr_scheduler
        # the same decay rule as PaddleNLP's Trainer: no decay on biases and norms
        decayed = {p.name for n, p in self.model.named_parameters() if not any(word in n for word in ("bias", "norm"))}
        if name == "lomo":
            self.optimizer = LomoOptimizer(
                learning_rate,
                self.model.parameters(),
                weight_decay=self.args.weight_decay,
                apply_decay_param_fun=lambda parameter_name: parameter_name in decayed,
                max_grad_norm=self.args.max_grad_norm,
            )
        else:
            self.optimizer = paddle.optimizer.SGD(
                learning_rate=learning_rate,
                parameters=self.model.parameters(),
                weight_decay=self.args.weight_decay or None,
                grad_clip=paddle.nn.ClipGradByGlobalNorm(self.args.max_grad_norm) if self.args.max_grad_norm > 0 else None,
            )
        return self.optimizer

    def training_step(self, model, inputs, step_control=0):
        if not isinstance(self.optimizer, LomoOptimizer):
            return super().training_step(model, inputs, step_control)
        model.train()
        inputs = self._prepare_inputs(inputs)

        def compute_loss():
            with self.autocast_smart_context_manager():
                return self.compute_loss(model, dict(inputs))  # compute_loss pops labels; each pass needs them

        return self.optimizer.fused_step(compute_loss).detach()

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval", max_eval_iters=-1):
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix, max_eval_iters=max_eval_iters
        )
        if self.generation is not None and metric_key_prefix == "eval":
            accuracy, predictions = self.generation.run(self.model)
            output.metrics[f"{metric_key_prefix}_exact_match"] = accuracy
            if self.args.process_index == 0:
                os.makedirs(self.args.output_dir, exist_ok=True)
                with open(os.path.join(self.args.output_dir, GENERATIONS_FILE), "w", encoding="utf-8") as f:
                    for item in predictions:
                        f.write(json.dumps({"step": self.state.global_step, "reference": item.reference, "prediction": item.prediction, "correct": item.correct}, ensure_ascii=False) + "\n")
        return output


class GenerationEval:
    """Exact match of greedy replies on a fixed list of dev prompts."""

    def __init__(self, prompts, collator, tokenizer, max_new_tokens: int):
        self.prompts = prompts
        self.collator = collator
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens

    def run(self, model):
        return exact_match(model, self.prompts, self.collator, self.tokenizer, self.max_new_tokens)

