"""The DPO recipe behind ``run_dpo.py`` and ``paddle-llm dpo``: preference alignment with PaddleNLP's
llm/alignment/dpo/run_dpo.py flags.

setup: parse, validate, apply run_dpo.py's own adjustments (``orpo`` is ``or`` plus the SFT loss; ``or`` and
       ``simpo`` are reference-free), apply CPU fallbacks; nothing distributed yet.
prepare: on the shared spine (``trainer.recipe``): the model (full or LoRA), its reference (none, the adapters
       switched off, or a frozen copy), the preference pairs and a ``DPOTrainer``.
fit:   prepare, then train (resuming), save, evaluate.

Example (LoRA DPO on CPU, on the shipped preference task):
  python run_dpo.py --model_name_or_path MODEL_DIR --train_dataset_path paddle_llm/assets/preferences/train.jsonl \\
      --dev_dataset_path paddle_llm/assets/preferences/dev.jsonl --output_dir out --do_train --do_eval \\
      --lora True --beta 0.1 --learning_rate 3e-4 --device cpu
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from paddle_llm.config.parser import ArgumentError
from paddle_llm.config.validation import check_peft_variants
from paddle_llm.data.preference import PACKED_LABELS, PackedPairCollator, PreferenceCollator, PreferenceLimits, build_preference_split
from paddle_llm.data.sft import family_layout
from paddle_llm.recipes.spine import (
    RESUMING_HELP,
    Recipe,
    RecipeSetup,
    add_run_callbacks,
    apply_fallbacks,
    apply_peft,
    build_model_and_tokenizer,
    log,
    log_cpu_fast_paths,
    parse_and_check,
    random_base_warning,
    start,
    train_save_evaluate,
    warn,
)

MAX_SKIPPED_SHOWN = 5
REFERENCE_FREE_LOSSES = ("or", "simpo")  # run_dpo.py turns reference_free on for these
ORPO = "orpo"  # run_dpo.py's name for the "or" loss plus the SFT loss, reference-free
REFERENCE_DESCRIPTIONS = {
    "free": "none (--reference_free)",
    "adapters_off": "the same weights with the LoRA adapters off",
    "copy": "a frozen copy of the starting weights",
}


# PaddleNLP's llm/alignment/dpo/dpo_argument.py field names. LoRA takes ``PeftArguments`` (``--lora``, ``--lora_rank``,
# ``--lora_path``, ``--lora_alpha``), the model ``ModelArguments``, training ``DPOTrainingArguments`` (config.arguments).


@dataclass
class DPODataArguments:
    """Where the preference data is and how long a pair may be."""

    train_dataset_path: str = field(default="./data/train.jsonl", metadata={"help": "training preferences (jsonl)"})
    dev_dataset_path: str = field(default="./data/dev.jsonl", metadata={"help": "held-out preferences (jsonl)"})
    max_seq_len: int = field(default=4096, metadata={"help": "most tokens of prompt and both replies together"})
    max_prompt_len: int = field(default=2048, metadata={"help": "a prompt keeps its last this many tokens when a pair is too long"})
    skip_bad_lines: bool = field(
        default=False, metadata={"help": "skip malformed records (each is reported) instead of stopping at the first"}
    )
    strict_data: bool = field(
        default=False,
        metadata={"help": "stop with an error on records that read fine but teach nothing (a pair whose chosen and rejected replies are the same) instead of counting them in one warning line"},
    )
    greedy_zero_padding: bool = field(default=False, metadata={"help": "PaddleNLP's packing of several pairs per row; not supported here (a row holds one pair; --flash_mask packs it into one row)"})
    lazy: bool = field(default=False, metadata={"help": "read each pair from the file when the trainer asks for it instead of holding them all (the same pairs, order and batches)"})

    @property
    def max_seq_length(self) -> int:
        """The longest row the model sees: a prompt with one reply is at most ``max_seq_len``."""
        return self.max_seq_len


@dataclass
class DPOArguments:
    """The preference loss (PaddleNLP's ``DPOConfig``)."""

    beta: float = field(default=0.1, metadata={"help": "how far the policy may move from the reference (the DPO beta)"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin"})
    label_smoothing: float = field(default=0.0, metadata={"help": "assumed fraction of flipped preferences (sigmoid, simpo)"})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid, hinge, ipo, simpo or orpo (= or with sft_loss_ratio 1)"})
    pref_loss_ratio: float = field(default=1.0, metadata={"help": "weight of the preference loss"})
    sft_loss_ratio: float = field(default=0.0, metadata={"help": "weight of the chosen replies' language-model loss"})
    reference_free: bool = field(default=False, metadata={"help": "no reference model: its log-probabilities count as 0"})
    dpop_lambda: float = field(default=50, metadata={"help": "PaddleNLP's dpop loss; not supported here"})
    ref_model_update_steps: int = field(default=-1, metadata={"help": "PaddleNLP's reference refresh; not supported here (-1)"})


def _dataclass_types():
    from paddle_llm.config.arguments import DPOTrainingArguments, ModelArguments, PeftArguments

    return ModelArguments, DPODataArguments, PeftArguments, DPOArguments, DPOTrainingArguments


def check_dpo(values: Mapping) -> list[str]:
    """The DPO rules: a pure function of the flag values, every problem reported."""
    from paddle_llm.trainer.dpo_trainer import LOSSES

    errors = []
    loss_types = list(LOSSES)
    loss_types.insert(loss_types.index("or"), ORPO)  # run_dpo.py's name, listed before the loss it builds on
    if values.get("loss_type") not in loss_types:
        errors.append(f"--loss_type {values.get('loss_type')!r} must be one of {', '.join(loss_types)}")
    if float(values.get("beta") or 0) <= 0:
        errors.append(f"--beta {values.get('beta')}: must be positive (0.1 is PaddleNLP's default)")
    if not 0 <= float(values.get("label_smoothing") or 0) < 0.5:
        errors.append(f"--label_smoothing {values.get('label_smoothing')}: must be in [0, 0.5)")
    pp = int(values.get("pipeline_parallel_degree") or 1)
    if pp > 1:
        # the pipeline cuts a batch into micro-batches by rows and runs the loss on each: a pair must be one row
        if not values.get("flash_mask"):
            errors.append(f"--pipeline_parallel_degree {pp}: DPO's micro-batches are cut by rows, so each pair must be one row: add --flash_mask True (packed pairs)")
        for flag, why in (("lora", "the reference would be the pipeline with its adapters off"), ("do_eval", "evaluation runs on one pipeline stage's rows")):
            if values.get(flag):
                errors.append(f"--{flag} does not run with DPO under --pipeline_parallel_degree {pp} here ({why}): drop it, or use tensor parallel")
    if values.get("prefix_tuning"):
        errors.append("--prefix_tuning does not run with DPO: use --lora True, or full DPO")
    if values.get("lora_path") and not values.get("lora"):
        errors.append("--lora_path loads a LoRA adapter: add --lora True")
    if values.get("merge_weights"):
        errors.append("--merge_weights is not run by DPO: merge afterwards with `paddle-llm merge-lora`")
    if values.get("weight_quantize_algo"):
        errors.append("--weight_quantize_algo (QLoRA) is not supported by DPO yet: run LoRA DPO on the float base, or QLoRA fine-tuning with finetune_generation.py")
    errors += check_peft_variants(values)
    if values.get("pissa"):
        errors.append("--pissa is fine-tuning's (PaddleNLP's DPO has no PiSSA): LoRA DPO's reference is the base with the adapters off, which PiSSA rewrites; use --rslora or --lora_plus_scale")
    if values.get("lora") and int(values.get("r") or 0) < 1:
        errors.append(f"--lora_rank {values.get('r')}: the LoRA rank must be at least 1")
    if str(values.get("optim")) in ("sgd", "lomo"):
        errors.append(f"--optim {values.get('optim')} is fine-tuning's; DPO uses PaddleNLP's optimizers (adamw)")
    max_seq_len, max_prompt_len = int(values.get("max_seq_len") or 0), int(values.get("max_prompt_len") or 0)
    if max_prompt_len < 1:
        errors.append(f"--max_prompt_len {max_prompt_len}: must be at least 1")
    elif max_seq_len < max_prompt_len + 2:
        errors.append(f"--max_seq_len {max_seq_len} leaves no room for two replies after --max_prompt_len {max_prompt_len}: raise --max_seq_len")
    if values.get("greedy_zero_padding"):
        errors.append("--greedy_zero_padding is not supported here (a row holds one pair: two padded rows, or one packed row with --flash_mask): drop it")
    if values.get("dpop_lambda") != 50:
        errors.append("--dpop_lambda belongs to PaddleNLP's dpop loss, which is not supported here: drop it")
    if int(values.get("ref_model_update_steps", -1)) != -1:
        errors.append("--ref_model_update_steps is not supported here: the reference stays the starting model (-1)")
    for flag, wanted in (("train_dataset_path", values.get("do_train")), ("dev_dataset_path", values.get("do_eval"))):
        if wanted and not os.path.isfile(str(values.get(flag))):
            errors.append(f"--{flag} {values.get(flag)}: no such file (jsonl preferences; paddle_llm never downloads datasets)")
    return errors


def adjust_like_run_dpo(values: dict) -> list[str]:
    """run_dpo.py's own adjustments, said out loud: ``orpo`` is the ``or`` loss with reference_free and
    sft_loss_ratio 1; ``or`` and ``simpo`` need no reference. PaddleNLP's ``--lora_alpha -1`` means 2 x rank."""
    warnings = []
    if values["loss_type"] == ORPO:
        values.update(loss_type="or", reference_free=True, sft_loss_ratio=1.0)
        log("--loss_type orpo: the 'or' loss plus the SFT loss (sft_loss_ratio 1), reference-free, as PaddleNLP's run_dpo.py")
    if values["loss_type"] in REFERENCE_FREE_LOSSES and not values["reference_free"]:
        values["reference_free"] = True
        warnings.append(f"--loss_type {values['loss_type']} needs no reference model: --reference_free set to True (as PaddleNLP's run_dpo.py does)")
    if values.get("lora_alpha") == -1:
        values["lora_alpha"] = None
    return warnings


def setup(argv: list[str]) -> RecipeSetup:
    """Parse and validate; nothing distributed or heavy happens here.

    Raises:
        ArgumentError: bad flags or configuration (every problem found, one per line).
    """
    parsed, values, source, errors = parse_and_check(argv, _dataclass_types(), "dpo")
    errors += check_dpo(values)
    if values.get("flash_mask") and source.family.glm_context:
        errors.append(f"--flash_mask packs each pair into one row, which needs a causal model; {source.family.name}'s prompt is "
                      "bidirectional: drop --flash_mask (pairs are then two padded rows)")
    if errors:
        raise ArgumentError("\n".join(errors))
    warnings = adjust_like_run_dpo(values)
    for name in ("loss_type", "reference_free", "sft_loss_ratio", "lora_alpha"):
        parsed.set(name, values[name])
    packed = bool(values.get("flash_mask"))
    warnings += [w for w in apply_fallbacks(parsed) if not (packed and w.startswith("--flash_mask"))]
    if packed:
        # PaddleNLP's DPO layout, kept: the flash-mask kernel is GPU-only, its mask is an explicit tensor here
        parsed.set("flash_mask", True)
        log("--flash_mask: each pair is one row (prompt once, then both replies, the rejected one masked from the chosen), "
            "as PaddleNLP's DPO packs it; on CPU the mask is an explicit tensor")
    if not source.has_weights:
        warnings.append(random_base_warning(source, "aligns"))
    return RecipeSetup(parsed, source, warnings)


def reference_for(model, dpo_args, peft_args) -> tuple[str, object]:
    """How the reference log-probabilities are made (``DPOTrainer``'s ``reference``), and the frozen copy if any.

    Full DPO keeps a frozen copy of the starting weights (PaddleNLP's run_dpo.py does the same): it costs one more
    set of weights, without gradients or optimizer state, and the reference pass then runs on exactly the batch the
    policy sees, under any sampler, data-parallel layout or resume. Precomputing every pair's reference
    log-probabilities once would save that memory, but adds a pass over the data before training and per-pair
    state to every sampler, shuffle and checkpoint. LoRA needs neither: its base weights are the reference.
    """
    if dpo_args.reference_free:
        return "free", None
    if peft_args.lora:
        return "adapters_off", None
    import paddle

    # A second model of the same class and config, then the weights: a deep copy would copy the tensor-parallel
    # layers' process groups, which cannot be copied. Building it draws random initial weights; the generator's
    # state is put back so the run after this point is the run without a reference.
    rng_state = paddle.get_rng_state()
    reference = type(model)(model.config)
    paddle.set_rng_state(rng_state)
    reference.set_state_dict(model.state_dict())
    reference.eval()
    for parameter in reference.parameters():
        parameter.stop_gradient = True
    return "copy", reference


def load_preference_splits(layout, tokenizer, data_args, training_args) -> dict:
    limits = PreferenceLimits(data_args.max_seq_len, data_args.max_prompt_len)
    splits = {}
    for name, path, wanted, seed in (
        ("train", data_args.train_dataset_path, training_args.do_train, training_args.seed),
        ("dev", data_args.dev_dataset_path, training_args.do_eval, None),
    ):
        if not wanted:
            continue
        split = build_preference_split(path, layout, tokenizer, limits, skip_bad_lines=data_args.skip_bad_lines,
                                       strict_data=data_args.strict_data, shuffle_seed=seed, lazy=data_args.lazy)
        log(f"data: {split.summary()}")
        for message in split.read.skipped[:MAX_SKIPPED_SHOWN]:
            warn(f"skipped {message}")
        if split.read.questionable:
            warn(split.read.questionable)
        splits[name] = split
    return splits


@dataclass
class DPORun:
    """Everything ``prepare`` built: the trainer (holding the policy and its reference), the tokenizer, tokens per
    pair and the checkpoint to resume from."""

    trainer: object
    tokenizer: object
    tokens_per_pair: float
    resume_from: str | None


def prepare(plan: RecipeSetup) -> DPORun:
    """Build the model (with its adapter) and its reference, the pairs and the trainer, ready to train."""
    from paddle_llm.trainer.callbacks import MetricsFileCallback
    from paddle_llm.trainer.dpo_trainer import DPOTrainer, PreferenceLoss

    started = start(plan, _dataclass_types(), ("Model", "Data", "PEFT", "DPO"))
    model_args, data_args, peft_args, dpo_args, training_args = started.arguments
    family = plan.source.family
    model_args.continue_training = plan.source.has_weights  # DPO starts from the model's weights, as fine-tuning does
    model, tokenizer, _ = build_model_and_tokenizer(plan.source, model_args, data_args, training_args)
    log_cpu_fast_paths(model, family, training_args)
    reference, reference_model = reference_for(model, dpo_args, peft_args)
    if reference_model is not None and training_args.cpu_fast_paths:
        from paddle_llm.cpu.fast_paths import apply_cpu_fast_paths

        apply_cpu_fast_paths(reference_model, family)  # the policy's kernels, so a reward starts at exactly 0
    model = apply_peft(model, family, peft_args, plan.source.name_or_path)
    log(f"reference model: {REFERENCE_DESCRIPTIONS[reference]}")

    layout = family_layout(family, tokenizer)
    splits = load_preference_splits(layout, tokenizer, data_args, training_args)
    if model_args.flash_mask:
        collator = PackedPairCollator(layout, pad_to=data_args.max_seq_len if training_args.pipeline_parallel_degree > 1 else None)
        training_args.label_names = list(PACKED_LABELS)  # the evaluation loop computes a loss only when it finds them
    else:
        collator = PreferenceCollator(layout)
    settings = PreferenceLoss(
        dpo_args.loss_type, dpo_args.beta, dpo_args.simpo_gamma, dpo_args.label_smoothing, dpo_args.pref_loss_ratio, dpo_args.sft_loss_ratio
    )
    trainer = DPOTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=splits["train"].dataset if "train" in splits else None,
        eval_dataset=splits["dev"].dataset if "dev" in splits else None,
        tokenizer=tokenizer,
        settings=settings,
        reference=reference,
        reference_model=reference_model,
    )
    tokens_per_pair = next(iter(splits.values())).tokens_per_row if splits else 0.0
    # A preference loss may legitimately fall near 0 (a hinge loss reaches it): only NaN/inf and exact 0 are alarms.
    add_run_callbacks(trainer, MetricsFileCallback(training_args.output_dir, tokens_per_pair), min_plausible_loss=None)
    return DPORun(trainer, tokenizer, tokens_per_pair, started.resume_from)


def fit(plan: RecipeSetup) -> int:
    run = prepare(plan)
    train_save_evaluate(run.trainer, run.tokenizer, plan.parsed, run.resume_from, run.tokens_per_pair)
    return 0


RECIPE = Recipe(
    name="dpo",
    scripts=("run_dpo.py",),
    summary="align with preference pairs: DPO, full or LoRA (same flags as PaddleNLP's run_dpo.py)",
    arguments=_dataclass_types,
    setup=setup,
    fit=fit,
    help=lambda: __doc__ + "\nPairs whose chosen and rejected replies are the same teach no preference: they are counted in one\n"
    "warning line (the first few as file:line); --strict_data makes them an error.\n"
    "\nFlags are PaddleNLP's llm/alignment/dpo/run_dpo.py flags; see docs/dpo.md.\n" + RESUMING_HELP,
)
