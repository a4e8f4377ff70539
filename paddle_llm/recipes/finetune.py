"""The fine-tuning recipe behind ``finetune_generation.py`` (``run_finetune.py``) and ``paddle-llm finetune``.

setup:   parse PaddleNLP's fine-tune flags, validate everything, apply CPU fallbacks (before any process group exists).
prepare: build the model (full, LoRA or prefix), the data (padded or packed) and the trainer (AdamW, SGD or LOMO).
fit:     train, resuming from the last complete checkpoint; save; evaluate (loss, and exact match with generation);
         merge a LoRA adapter into the model when asked.

Example (the seed's single-device LoRA command, on CPU):
  python finetune_generation.py --model_name_or_path MODEL_DIR --dataset_name_or_path DATA_DIR --output_dir out \\
      --do_train --do_eval --lora True --r 8 --learning_rate 3e-4 --device cpu
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from paddle_llm.config.parser import ArgumentError
from paddle_llm.config.validation import check_peft_variants, check_quantization
from paddle_llm.data.sft import Limits, SftCollator, build_split, family_layout, generation_prompt
from paddle_llm.peft.lora import merge_lora
from paddle_llm.peft.merge import save_model_atomically
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
    world_size,
)

TRAIN_FILE, DEV_FILE = "train.json", "dev.json"
MERGED_DIR = "merged"
MAX_SKIPPED_SHOWN = 5


def _dataclass_types():
    from paddle_llm.config.arguments import FinetuneArguments, FinetuneDataArguments, ModelArguments, PeftArguments

    return ModelArguments, FinetuneDataArguments, PeftArguments, FinetuneArguments


def known_optimizers() -> tuple[str, ...]:
    from paddlenlp.trainer.training_args import OptimizerNames

    from paddle_llm.config.arguments import OWN_OPTIMIZERS

    return tuple(name.value for name in OptimizerNames) + OWN_OPTIMIZERS


def check_finetune(values: Mapping, processes: int) -> list[str]:
    """The fine-tuning rules: a pure function of the flag values and the process count, every problem reported.

    PaddleNLP's own rules (prefix tuning and generation-based evaluation do not run with pipeline parallel) are
    here so they fail before launch instead of deep inside the first step.
    """
    from paddle_llm.config.arguments import SFT_DATA_FORMATS

    errors = []
    pp = int(values.get("pipeline_parallel_degree") or 1)
    tp = int(values.get("tensor_parallel_degree") or 1)
    generation = values.get("eval_with_do_generation") or values.get("do_generation")
    if values.get("lora") and values.get("prefix_tuning"):
        errors.append("--lora and --prefix_tuning are exclusive: choose one adapter type")
    if values.get("prefix_tuning") and pp > 1:
        errors.append(f"--prefix_tuning does not run with --pipeline_parallel_degree {pp} (PaddleNLP's prefix model refuses pipeline models); use tensor or data parallel")
    if generation and pp > 1:
        errors.append(f"generation-based evaluation (--eval_with_do_generation/--do_generation) does not run with --pipeline_parallel_degree {pp}; turn it off or drop pipeline parallel")
    if values.get("lora_path") and not values.get("lora"):
        errors.append("--lora_path loads a LoRA adapter: add --lora True")
    if values.get("prefix_path") and not values.get("prefix_tuning"):
        errors.append("--prefix_path loads a prefix: add --prefix_tuning True")
    if values.get("merge_weights") and not values.get("lora"):
        errors.append("--merge_weights folds a LoRA adapter into the model: it needs --lora True")
    if values.get("lora") and int(values.get("r") or 0) < 1:
        errors.append(f"--r {values.get('r')}: the LoRA rank must be at least 1")
    if values.get("prefix_tuning") and int(values.get("num_prefix_tokens") or 0) < 1:
        errors.append(f"--num_prefix_tokens {values.get('num_prefix_tokens')}: must be at least 1")
    if values.get("data_format") not in SFT_DATA_FORMATS:
        errors.append(f"--data_format {values.get('data_format')!r} must be one of {', '.join(SFT_DATA_FORMATS)}")
    src_length = int(values.get("src_length") or 0)
    max_length = int(values.get("max_length") or src_length + int(values.get("tgt_length") or 0))
    if src_length < 1:
        errors.append(f"--src_length {src_length}: must be at least 1")
    elif max_length <= src_length:
        errors.append(f"--max_length {max_length} leaves no room for a reply after --src_length {src_length}: raise --max_length (or --tgt_length)")
    optimizer = str(values.get("optim"))
    if optimizer not in known_optimizers():
        errors.append(f"--optim {optimizer!r} must be one of {', '.join(known_optimizers())}")
    if optimizer == "lomo":
        accumulation = int(values.get("gradient_accumulation_steps") or 1)
        if accumulation > 1:
            errors.append(f"--optim lomo updates inside backward and keeps no gradients, so --gradient_accumulation_steps {accumulation} cannot work: use 1 and a larger batch")
        if processes > 1 or tp > 1 or pp > 1:
            errors.append("--optim lomo runs in one process here (its updates happen inside backward, before any all-reduce could); launch a single device")
    if values.get("greedy_zero_padding") and not values.get("zero_padding"):
        errors.append("--greedy_zero_padding chooses how --zero_padding packs samples: add --zero_padding True, or drop it")
    if values.get("lazy") and (values.get("eval_with_do_generation") or values.get("do_generation")):
        errors.append("--lazy keeps no records in memory, and generation-based evaluation (--eval_with_do_generation/--do_generation) prompts with the dev records: drop one of them")
    errors += check_peft_variants(values)
    if (values.get("do_train") or values.get("do_eval")) and not values.get("dataset_name_or_path"):
        errors.append(f"--dataset_name_or_path is required with --do_train/--do_eval: a directory holding {TRAIN_FILE} and {DEV_FILE}")
    return errors


def check_dataset_files(values: Mapping) -> list[str]:
    """The data directory holds the files the run will read (checked before any model is built)."""
    directory = values.get("dataset_name_or_path")
    if not directory or not (values.get("do_train") or values.get("do_eval")):
        return []
    if not os.path.isdir(directory):
        return [f"--dataset_name_or_path {directory}: not a directory. paddle_llm never downloads datasets: pass a local directory holding {TRAIN_FILE} and {DEV_FILE} (jsonl)"]
    needed = ([TRAIN_FILE] if values.get("do_train") else []) + ([DEV_FILE] if values.get("do_eval") else [])
    return [f"{os.path.join(directory, name)}: missing (needed by --{'do_train' if name == TRAIN_FILE else 'do_eval'})" for name in needed if not os.path.isfile(os.path.join(directory, name))]


def setup(argv: list[str]) -> RecipeSetup:
    """Parse and validate; nothing distributed or heavy happens here.

    Raises:
        ArgumentError: bad flags or configuration (every problem found, one per line).
    """
    parsed, values, source, errors = parse_and_check(argv, _dataclass_types(), "finetune")
    errors += check_finetune(values, world_size())
    errors += check_dataset_files(values)
    errors += check_quantization(values, source.config_fields)
    if errors:
        raise ArgumentError("\n".join(errors))
    warnings = apply_fallbacks(parsed)
    if not source.has_weights:
        warnings.append(random_base_warning(source))
    if parsed.value("optim") == "lomo" and parsed.value("fp16"):
        raise ArgumentError("--optim lomo has no fp16 loss scaling here (each update happens before an overflow check could run): use --bf16, or float32")
    return RecipeSetup(parsed, source, warnings)


def load_splits(layout, tokenizer, data_args, training_args):
    """Train and dev splits (whichever the run needs), with a summary line each."""

    limits = Limits(data_args.src_length, data_args.max_seq_length)
    splits = {}
    for name, file_name, wanted, seed in (("train", TRAIN_FILE, training_args.do_train, training_args.seed), ("dev", DEV_FILE, training_args.do_eval, None)):
        if not wanted:
            continue
        split = build_split(
            os.path.join(data_args.dataset_name_or_path, file_name),
            layout,
            tokenizer,
            limits,
            data_format=data_args.data_format,
            instruction_generation=data_args.instruction_generation,
            skip_bad_lines=data_args.skip_bad_lines,
            strict_data=data_args.strict_data,
            zero_padding=data_args.zero_padding,
            greedy_zero_padding=data_args.greedy_zero_padding,
            shuffle_seed=seed,
            lazy=data_args.lazy,
        )
        log(f"data: {split.summary()}")
        for message in split.read.skipped[:MAX_SKIPPED_SHOWN]:
            warn(f"skipped {message}")
        if split.read.questionable:
            warn(split.read.questionable)
        splits[name] = split
    return splits


def generation_eval(dev_split, layout, tokenizer, data_args, collator):
    from paddle_llm.trainer.finetune_trainer import GenerationEval

    limits = Limits(data_args.src_length, data_args.max_seq_length)
    prompts = [generation_prompt(r, layout, tokenizer, limits, data_args.tgt_length) for r in dev_split.read.records]
    return GenerationEval([p for p in prompts if p is not None], collator, tokenizer, data_args.tgt_length)


def save_merged_model(lora_model, tokenizer, output_dir: str) -> str:
    """Fold the LoRA adapter into the base weights and save a plain model under ``output_dir/merged``."""

    target = os.path.join(output_dir, MERGED_DIR)
    save_model_atomically(merge_lora(lora_model), tokenizer, target)
    return target


@dataclass
class FinetuneRun:
    """Everything ``prepare`` built: the trainer (holding the model), the tokenizer, the data and the arguments."""

    trainer: object
    tokenizer: object
    splits: dict
    tokens_per_row: float
    peft_args: object
    resume_from: str | None


def prepare(plan: RecipeSetup) -> FinetuneRun:
    """Build the model (with its adapter), the data and the trainer, ready to train."""
    from paddle_llm.trainer.finetune_trainer import FinetuneMetricsCallback, FinetuneTrainer, criterion_for

    started = start(plan, _dataclass_types(), ("Model", "Data", "PEFT"))
    model_args, data_args, peft_args, training_args = started.arguments

    family = plan.source.family
    # Fine-tuning starts from the model's weights; a preset (or a config without weights) starts from random ones.
    model_args.continue_training = plan.source.has_weights
    model, tokenizer, _ = build_model_and_tokenizer(plan.source, model_args, data_args, training_args)
    log_cpu_fast_paths(model, family, training_args)
    model = apply_peft(model, family, peft_args, plan.source.name_or_path)

    layout = family_layout(family, tokenizer)
    splits = load_splits(layout, tokenizer, data_args, training_args)
    collator = SftCollator(layout, pad_to=data_args.max_seq_length if training_args.pipeline_parallel_degree > 1 else None)
    generation = None
    if data_args.generation_eval and "dev" in splits:
        generation = generation_eval(splits["dev"], layout, tokenizer, data_args, collator)
    criterion = criterion_for(family, training_args.tensor_parallel_degree)
    trainer = FinetuneTrainer(
        model=model,
        args=training_args,
        criterion=criterion,
        data_collator=collator,
        train_dataset=splits["train"].dataset if "train" in splits else None,
        eval_dataset=splits["dev"].dataset if "dev" in splits else None,
        tokenizer=tokenizer,
        generation=generation,
    )
    tokens_per_row = next(iter(splits.values())).tokens_per_row if splits else 0.0
    add_run_callbacks(trainer, FinetuneMetricsCallback(training_args.output_dir, tokens_per_row), loss_layers=(criterion,) if criterion is not None else ())
    return FinetuneRun(trainer, tokenizer, splits, tokens_per_row, peft_args, started.resume_from)


def fit(plan: RecipeSetup) -> int:
    run = prepare(plan)
    trainer, training_args = run.trainer, run.trainer.args
    train_save_evaluate(trainer, run.tokenizer, plan.parsed, run.resume_from, run.tokens_per_row)
    if run.peft_args.merge_weights and training_args.process_index == 0:
        log(f"merged model written to {save_merged_model(trainer.model, run.tokenizer, training_args.output_dir)}")
    return 0


RECIPE = Recipe(
    name="finetune",
    scripts=("finetune_generation.py", "run_finetune.py"),  # PaddleNLP's old and current llm/ script names
    summary="fine-tune: full, LoRA, QLoRA, prefix or LOMO (same flags as finetune_generation.py)",
    arguments=_dataclass_types,
    setup=setup,
    fit=fit,
    help=lambda: __doc__ + "\nRecords with an empty reply train only the end-of-reply token: they are counted in one warning\n"
    "line (the first few as file:line); --strict_data makes them an error.\n"
    "\nFlags are PaddleNLP's finetune_generation.py flags; see docs/finetune.md.\n" + RESUMING_HELP,
    own_flags=("--dataset_name_or_path", "--lora", "--prefix_tuning", "--src_length", "--lora_path", "--prefix_path"),
)
