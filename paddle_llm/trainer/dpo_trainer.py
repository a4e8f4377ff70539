"""``DPOTrainer``: ``LLMTrainer`` with the preference losses of PaddleNLP's ``paddlenlp.trl`` DPO.

The loss is a function of four log-probabilities per pair: the policy's and the reference model's, of the chosen
and of the rejected reply (each summed over the reply's tokens, or averaged for ``ipo``, ``or`` and ``simpo``)::

    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    sigmoid  -logsigmoid(beta * logits) * (1 - label_smoothing) - logsigmoid(-beta * logits) * label_smoothing
    hinge    relu(1 - beta * logits)
    ipo      (logits - 1 / (2 * beta)) ** 2
    simpo    sigmoid, on logits - simpo_gamma / beta (reference-free)
    or       -logsigmoid(log-odds(chosen) - log-odds(rejected))    (ORPO's odds ratio; reference-free)
    loss = pref_loss_ratio * mean(...) + sft_loss_ratio * (-sum of chosen log-probs / chosen tokens)

The reference model is, by preference: nothing (``--reference_free``: its log-probabilities are 0); the policy
itself with its LoRA adapters switched off (``--lora``: no second copy of the weights); or a frozen copy of the
starting weights (full DPO), as PaddleNLP's run_dpo.py builds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn.functional as F
from paddle.distributed import fleet
from paddle.distributed.fleet.meta_parallel import ParallelCrossEntropy

from paddle_llm.data.preference import PACKED_LABELS
from paddle_llm.data.sft import IGNORE_INDEX
from paddle_llm.trainer.trainer import LLMTrainer

AVERAGED_LOSS_TYPES = ("ipo", "or", "simpo")  # these compare per-token averages, not sums
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


@dataclass(frozen=True)
class PreferenceLoss:
    """The loss settings (PaddleNLP's ``DPOConfig`` fields, after run_dpo.py's ``orpo`` mapping)."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0
    pref_loss_ratio: float = 1.0
    sft_loss_ratio: float = 0.0

    @property
    def average_log_prob(self) -> bool:
        return self.loss_type in AVERAGED_LOSS_TYPES


def token_log_probs(logits: paddle.Tensor, labels: paddle.Tensor, vocab_split: bool = False) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Per position: ``log p(label)`` (0 where nothing is predicted), and the float mask of labelled positions.

    Args:
        logits: ``[rows, seq, vocab]``, or under tensor parallel ``[rows, seq, vocab / ranks]`` when
            ``vocab_split``: each rank holds its slice of the vocabulary, and the softmax is taken across the ranks
            (fleet's ``ParallelCrossEntropy``, as PaddleNLP's ``DPOCriterion`` does), so no rank gathers all the logits.
        labels: ``[rows, seq]``, already shifted; ``IGNORE_INDEX`` where nothing is predicted.
    """
    mask = labels != IGNORE_INDEX
    safe_labels = paddle.where(mask, labels, paddle.zeros_like(labels)).unsqueeze(-1)
    if vocab_split:
        losses = ParallelCrossEntropy()(logits.astype("float32"), safe_labels)
    else:
        losses = F.cross_entropy(logits.astype("float32"), safe_labels, reduction="none")
    mask = mask.astype("float32")
    return -losses.squeeze(-1) * mask, mask


def sequence_log_probs(logits: paddle.Tensor, labels: paddle.Tensor, vocab_split: bool = False) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Per row: the sum of ``log p(label)`` over the labelled positions, and how many there are
    (``token_log_probs``' arguments)."""
    log_probs, mask = token_log_probs(logits, labels, vocab_split)
    return log_probs.sum(axis=-1), mask.sum(axis=-1)


def vocab_split(config) -> bool:
    """Whether a model of ``config`` returns logits split over the tensor-parallel ranks (``tensor_parallel_output``)."""
    return config.tensor_parallel_degree > 1 and bool(config.tensor_parallel_output)


def _sigmoid_loss(logits, policy_chosen, policy_rejected, settings):
    """DPO's: the log-sigmoid of the scaled margin, with ``label_smoothing`` of assumed flipped preferences."""
    beta, smoothing = settings.beta, settings.label_smoothing
    return -F.log_sigmoid(beta * logits) * (1 - smoothing) - F.log_sigmoid(-beta * logits) * smoothing


def _hinge_loss(logits, policy_chosen, policy_rejected, settings):
    return F.relu(1 - settings.beta * logits)


def _ipo_loss(logits, policy_chosen, policy_rejected, settings):
    return (logits - 1 / (2 * settings.beta)) ** 2


def _simpo_loss(logits, policy_chosen, policy_rejected, settings):
    """SimPO: the sigmoid loss with a target margin ``simpo_gamma`` (its log-probabilities are averages)."""
    return _sigmoid_loss(logits - settings.simpo_gamma / settings.beta, policy_chosen, policy_rejected, settings)


def _odds_ratio_loss(logits, policy_chosen, policy_rejected, settings):
    """ORPO's odds-ratio term, from the policy alone (``or``; run_dpo.py's ``orpo`` adds the SFT loss)."""
    log_odds = (policy_chosen - policy_rejected) - (paddle.log1p(-paddle.exp(policy_chosen)) - paddle.log1p(-paddle.exp(policy_rejected)))
    return -F.log_sigmoid(log_odds)


# --loss_type -> per-pair loss of (logits: the policy's chosen-minus-rejected margin less the reference's, the
# policy's chosen and rejected log-probabilities, PreferenceLoss). A new loss is one function and one line here.
LOSSES = {
    "sigmoid": _sigmoid_loss,
    "hinge": _hinge_loss,
    "ipo": _ipo_loss,
    "simpo": _simpo_loss,
    "or": _odds_ratio_loss,
}


def preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, settings: PreferenceLoss):
    """The pair-wise loss (mean over pairs, times ``pref_loss_ratio``) and each pair's chosen/rejected rewards.

    All four inputs are per-pair log-probabilities of the same kind (sums, or averages for ``average_log_prob``).

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``; a reward is ``beta * (policy - reference)``.
    """
    if settings.loss_type not in LOSSES:
        raise ValueError(f"unknown loss type {settings.loss_type!r}; use one of {', '.join(LOSSES)}")
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    losses = LOSSES[settings.loss_type](logits, policy_chosen, policy_rejected, settings)
    chosen_rewards = settings.beta * (policy_chosen - reference_chosen)
    rejected_rewards = settings.beta * (policy_rejected - reference_rejected)
    return losses.mean() * settings.pref_loss_ratio, chosen_rewards, rejected_rewards


def step_loss(policy_chosen, policy_rejected, chosen_tokens, reference_chosen, reference_rejected, settings: PreferenceLoss):
    """``preference_loss`` plus ``sft_loss_ratio`` times the chosen replies' language-model loss (per token)."""
    loss, chosen_rewards, rejected_rewards = preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, settings)
    if settings.sft_loss_ratio:
        summed = policy_chosen * chosen_tokens if settings.average_log_prob else policy_chosen
        loss = loss + settings.sft_loss_ratio * (-summed.sum() / chosen_tokens.sum())
    return loss, chosen_rewards, rejected_rewards


def _logits(outputs) -> paddle.Tensor:
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs.logits if hasattr(outputs, "logits") else outputs


LABEL_KEYS = ("labels",) + PACKED_LABELS


def pair_count(inputs: dict) -> int:
    """Pairs in a batch: one per row when packed (``chosen_labels`` present), else half the rows."""
    rows = inputs["input_ids"].shape[0]
    return rows if "chosen_labels" in inputs else rows // 2


def pair_log_probs(model, inputs: dict, average: bool, split: bool = False):
    """The chosen and rejected replies' log-probabilities under ``model``, summed or averaged over each reply's
    tokens, and the chosen replies' token counts, for a ``PreferenceCollator`` batch (chosen rows first) or a
    ``PackedPairCollator`` one (a pair per row, each reply labelled apart). ``split``: the logits are split over
    the tensor-parallel ranks (``vocab_split``)."""
    forward_inputs = {key: value for key, value in inputs.items() if key not in LABEL_KEYS}
    logits = _logits(model(**forward_inputs))
    if "chosen_labels" in inputs:
        return packed_log_probs(logits, inputs["chosen_labels"], inputs["rejected_labels"], average, split)
    total, count = sequence_log_probs(logits, inputs["labels"], split)
    pairs = total.shape[0] // 2
    return _per_pair(total[:pairs], total[pairs:], count[:pairs], count[pairs:], average)


def packed_log_probs(logits, chosen_labels, rejected_labels, average: bool, split: bool):
    """``pair_log_probs`` of packed rows, from their logits: each row's chosen and rejected replies are labelled apart."""
    # the replies' positions do not overlap: one pass over the logits reads both
    labels = paddle.where(chosen_labels != IGNORE_INDEX, chosen_labels, rejected_labels)
    log_probs, _ = token_log_probs(logits, labels, split)
    chosen_mask = (chosen_labels != IGNORE_INDEX).astype("float32")
    rejected_mask = (rejected_labels != IGNORE_INDEX).astype("float32")
    chosen, rejected = (log_probs * chosen_mask).sum(axis=-1), (log_probs * rejected_mask).sum(axis=-1)
    return _per_pair(chosen, rejected, chosen_mask.sum(axis=-1), rejected_mask.sum(axis=-1), average)


def _per_pair(chosen, rejected, chosen_count, rejected_count, average: bool):
    """(chosen, rejected, chosen token counts): sums, or per-token averages when ``average``."""
    if average:
        chosen, rejected = chosen / chosen_count, rejected / rejected_count
    return chosen, rejected, chosen_count


FEATURE_KEYS = ("input_ids", "attention_mask", "position_ids")  # what a pipeline's first stage reads of a packed batch
# The private attributes DPO under pipeline parallel sets, as (module, class, attribute, where it is read, why), checked
# against these versions by tests/unit/test_dpo_loss.py (which fails when the installed Paddle/PaddleNLP stop using them).
PIPELINE_PRIVATES_VERIFIED = {"paddlepaddle": "3.3.1", "paddlenlp": "3.0.0b4"}
PIPELINE_PRIVATES = (
    ("paddle.distributed.fleet.meta_parallel.parallel_layers.pp_layers", "PipelineLayer", "_loss_fn",
     "self._loss_fn = loss_fn if isinstance(loss_fn, list) else [loss_fn]",
     "the last stage's loss functions: the preference loss, set after PaddleNLP's Pipe model built its LM criterion"),
    ("paddlenlp.trainer.trainer", "Trainer", "_prepare_pipeline_inputs_func",
     "inputs = model._prepare_pipeline_inputs_func(self._pp_data_buffer)",
     "how the Trainer turns a step's micro-batches into pipeline inputs: the reference scores them there first"),
)


class PipelinePairLoss(paddle.nn.Layer):
    """The loss a pipeline's last stage runs per micro-batch of packed pairs (``PackedPairCollator``).

    ``labels`` are ``(chosen_labels, rejected_labels)`` when scoring for the reference: the pair log-probabilities
    are kept in ``scored`` and the returned loss is 0; or ``(chosen_labels, rejected_labels, reference_chosen,
    reference_rejected)`` when training: the preference loss, whose metrics go to ``on_pairs``.
    """

    def __init__(self, settings: PreferenceLoss, split: bool, on_pairs=None):
        super().__init__()
        self.settings, self.split, self.on_pairs = settings, split, on_pairs
        self.scored: list[tuple[paddle.Tensor, paddle.Tensor]] = []

    def forward(self, logits, labels):
        chosen_labels, rejected_labels = labels[0], labels[1]
        chosen, rejected, chosen_tokens = packed_log_probs(logits, chosen_labels, rejected_labels, self.settings.average_log_prob, self.split)
        if len(labels) == 2:
            self.scored.append((chosen.detach(), rejected.detach()))
            return paddle.zeros([], dtype="float32")
        loss, chosen_rewards, rejected_rewards = step_loss(chosen, rejected, chosen_tokens, labels[2], labels[3], self.settings)
        if self.on_pairs is not None:
            self.on_pairs(loss, chosen_rewards, rejected_rewards, chosen, rejected)
        return loss


class DPOTrainer(LLMTrainer):
    """``LLMTrainer`` whose loss is a preference loss over batches from ``PreferenceCollator``.

    A batch holds ``2 x pairs`` rows, the chosen samples then the rejected ones, or (packed, ``--flash_mask``) one
    row per pair. The reward metrics of every step
    (and of every evaluation, with an ``eval_`` prefix) are averaged over the pairs since the last log, across all
    ranks, and logged next to the loss, so ``metrics.jsonl`` and ``report.html`` carry them.

    Args:
        settings: the ``PreferenceLoss``.
        reference: ``"free"``, ``"adapters_off"`` (LoRA) or ``"copy"``.
        reference_model: the frozen copy, for ``"copy"``.
        Everything else goes to ``LLMTrainer``.
    """

    reports_perplexity = False

    def __init__(self, *args, settings: PreferenceLoss, reference: str, reference_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        if (reference == "copy") != (reference_model is not None):
            raise ValueError("reference 'copy' needs a reference_model, and only it does")
        self.settings = settings
        self.reference = reference
        self.reference_model = reference_model
        self._sums = {"train": {}, "eval": {}}
        self.vocab_split = vocab_split(self.model.config)
        if self.args.pipeline_parallel_degree > 1:
            self._set_pipeline_losses()

    def _set_pipeline_losses(self) -> None:
        """Under pipeline parallel the last stage computes the loss (``PipelinePairLoss``), for the policy and for
        the frozen reference, which runs as a pipeline of its own (``fleet.distributed_model``)."""
        if self.reference == "adapters_off":
            raise ValueError("LoRA DPO does not run under pipeline parallel here")
        self.model._loss_fn = [PipelinePairLoss(self.settings, self.vocab_split, lambda *values: self._accumulate("train", *values))]
        self.reference_scorer = PipelinePairLoss(self.settings, self.vocab_split)
        if self.reference_model is not None:
            self.reference_model._loss_fn = [self.reference_scorer]
            self.reference_model = fleet.distributed_model(self.reference_model)

    def training_pipeline_step(self, model, inputs):
        # the Trainer asks the model for its micro-batches once per step: the reference scores them there first
        model._prepare_pipeline_inputs_func = self._micro_batches_with_reference
        return super().training_pipeline_step(model, inputs)

    def _micro_batches_with_reference(self, batches: list[dict]):
        """``[features, labels]`` for the pipeline, a list of micro-batches each; labels carry each pair's reference
        log-probabilities, scored by the reference pipeline (on its last stage, the only one that reads them)."""
        features = tuple([batch[key] for batch in batches] for key in FEATURE_KEYS)
        labels = tuple([batch[key] for batch in batches] for key in PACKED_LABELS)
        if self.reference_model is None:
            reference = [[paddle.zeros([batch["input_ids"].shape[0]], dtype="float32") for batch in batches]] * 2
        else:
            scorer = self.reference_model
            scorer.micro_batch_size, scorer.accumulate_steps = self.args.per_device_train_batch_size, len(batches)
            self.reference_scorer.scored.clear()
            with paddle.no_grad():
                scorer.eval_batch(data=[features, labels], compute_loss=True)
            # only the last stage scores; the other stages pass placeholders they never read
            scored = self.reference_scorer.scored or [(paddle.zeros([batch["input_ids"].shape[0]]),) * 2 for batch in batches]
            reference = [[chosen for chosen, _ in scored], [rejected for _, rejected in scored]]
        return [features, labels + tuple(reference)]

    def _reference_log_probs(self, inputs: dict):
        if self.reference == "free":
            zeros = paddle.zeros([pair_count(inputs)], dtype="float32")
            return zeros, zeros
        with paddle.no_grad():
            if self.reference == "copy":
                chosen, rejected, _ = pair_log_probs(self.reference_model, inputs, self.settings.average_log_prob, self.vocab_split)
                return chosen, rejected
            # The same weights with every LoRA adapter bypassed: the model DPO started from.
            self.model.disable_lora()
            try:
                chosen, rejected, _ = pair_log_probs(self.model, inputs, self.settings.average_log_prob, self.vocab_split)
            finally:
                self.model.enable_lora()
            return chosen, rejected

    def compute_loss(self, model, inputs, return_outputs=False):
        policy_chosen, policy_rejected, chosen_tokens = pair_log_probs(model, inputs, self.settings.average_log_prob, self.vocab_split)
        reference_chosen, reference_rejected = self._reference_log_probs(inputs)
        loss, chosen_rewards, rejected_rewards = step_loss(policy_chosen, policy_rejected, chosen_tokens, reference_chosen, reference_rejected, self.settings)
        self._accumulate("train" if model.training else "eval", loss, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
        return (loss, {}) if return_outputs else loss  # no outputs to keep: evaluation reads only the loss

    def _accumulate(self, split: str, loss, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> None:
        values = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).astype("float32"),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy_chosen,
            "logps/rejected": policy_rejected,
        }
        sums = self._sums[split]
        for name in METRICS:
            sums[name] = sums.get(name, 0.0) + values[name].detach().astype("float32").sum()
        pairs = float(chosen_rewards.shape[0])
        if split == "eval":
            # PaddleNLP's evaluation loop repeats each batch's loss once per row (2 per pair) and then truncates to
            # the dataset's length in pairs, so its eval_loss would cover only the first half of the dev set.
            sums["loss"] = sums.get("loss", 0.0) + loss.detach().astype("float32") * pairs
        sums["pairs"] = sums.get("pairs", 0.0) + pairs

    def _averaged(self, split: str) -> dict:
        """The metrics since the last log, averaged over every pair on every rank (all ranks log together)."""
        sums = self._sums[split]
        self._sums[split] = {}
        distributed = paddle.distributed.get_world_size() > 1
        if not sums and not distributed:
            return {}
        # every rank reduces the same names, including a pipeline stage that saw no pair (its sums are 0)
        names = METRICS + (("loss",) if split == "eval" else ())
        totals = paddle.stack([paddle.to_tensor(sums.get(name, 0.0), dtype="float32").reshape([]) for name in names + ("pairs",)])
        if distributed:
            paddle.distributed.all_reduce(totals)
        totals = totals.numpy()
        if totals[-1] == 0:
            return {}
        prefix = "eval_" if split == "eval" else ""
        return {f"{prefix}{name}": round(float(total / totals[-1]), 6) for name, total in zip(names, totals[:-1])}

    def log(self, logs: dict, **kwargs) -> None:
        # In place: evaluate() returns the dict it logs, so eval_results.json carries the rewards too.
        if "loss" in logs:
            logs.update(self._averaged("train"))
        elif "eval_loss" in logs:
            logs.update(self._averaged("eval"))  # eval_loss too: the mean over every dev pair
        super().log(logs, **kwargs)
