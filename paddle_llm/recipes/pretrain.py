"""The pretraining recipe behind ``run_pretrain.py`` and ``paddle-llm pretrain``.

setup: parse flags, validate everything, apply CPU fallbacks (before any process group exists).
fit:   the .bin/.idx datasets and an ``LLMTrainer`` on the shared spine (``trainer.recipe``): start, model,
       train (resuming from the last complete checkpoint), save, evaluate, write results.
"""

from __future__ import annotations


from paddle_llm.config.parser import ArgumentError, format_help
from paddle_llm.config.validation import check_split
from paddle_llm.data.pretraining import CausalLMCollator, build_pretraining_datasets, check_data_prefixes, resolve_data_prefixes
from paddle_llm.recipes.spine import (
    RESUMING_HELP,
    Recipe,
    RecipeSetup,
    add_run_callbacks,
    apply_fallbacks,
    build_model_and_tokenizer,
    log,
    log_cpu_fast_paths,
    log_memory_estimate,
    parse_and_check,
    start,
    train_save_evaluate,
)

HELP_USAGE = """usage: run_pretrain.py [ARGS.json] --flag value ...   (or: paddle-llm pretrain ...)

Pretrain or continue-pretraining a Llama / ChatGLM / ChatGLM2 model on .bin/.idx data from `paddle-llm preprocess`.
Flags are PaddleNLP's run_pretrain.py flags; a JSON args file may come first and the command line overrides it.
Booleans take 1/0/true/false, and a bare boolean flag means true."""
HELP_EPILOG = """examples:
  run_pretrain.py --model_name_or_path tiny-llama --input_dir data/demo --output_dir out --max_steps 100 \\
      --max_seq_length 128 --do_train --do_eval --device cpu
  python -m paddle.distributed.launch --nproc_per_node 2 run_pretrain.py args.json --device cpu
""" + RESUMING_HELP


def _dataclass_types():
    from paddle_llm.config.arguments import DataArguments, ModelArguments, PretrainingArguments

    return ModelArguments, DataArguments, PretrainingArguments


def setup(argv: list[str]) -> RecipeSetup:
    """Parse and validate; nothing distributed or heavy happens here.

    Raises:
        ArgumentError: bad flags or configuration (every problem found, one per line).
    """
    parsed, values, source, errors = parse_and_check(argv, _dataclass_types(), "pretrain",
                                                  reads_weights=lambda values: bool(values.get("continue_training")))
    errors += check_split(values["split"])
    if values.get("continue_training") and not source.has_weights:
        errors.append(f"--continue_training needs weights, but {values['model_name_or_path']} has none: pass a directory saved by a previous run")
    trained_positions = source.config_fields.get(source.family.max_positions_field)
    if values.get("continue_training") and trained_positions and values["max_seq_length"] > trained_positions:
        # Positions past what the model was trained on give silently wrong outputs (rotary tables end there).
        errors.append(
            f"--max_seq_length {values['max_seq_length']} exceeds the model's {source.family.max_positions_field}="
            f"{trained_positions}; with --continue_training use --max_seq_length {trained_positions} or less"
        )
    if (values.get("do_train") or values.get("do_eval")) and not values.get("input_dir"):
        errors.append("--input_dir is required with --do_train/--do_eval: a directory or prefix written by `paddle-llm preprocess`")
    if values.get("do_train") and int(values.get("max_steps") or -1) <= 0:
        errors.append("--max_steps must be positive for pretraining: the sample index is sized from it")
    if errors:
        raise ArgumentError("\n".join(errors))
    return RecipeSetup(parsed, source, apply_fallbacks(parsed))


def _num_samples(training_args) -> tuple[int, int, int]:
    per_step = training_args.dataset_world_size * training_args.gradient_accumulation_steps
    train = training_args.per_device_train_batch_size * per_step * training_args.max_steps
    evaluations = training_args.max_steps // max(1, training_args.eval_steps or training_args.max_steps) + 1
    valid = training_args.per_device_eval_batch_size * training_args.dataset_world_size * training_args.eval_iters * evaluations
    test = training_args.per_device_eval_batch_size * training_args.dataset_world_size * training_args.test_iters
    return train, valid, test


def pretraining_lr_scheduler(training_args):
    """PaddleNLP's run_pretrain.py schedule for ``--lr_scheduler_type cosine|linear`` (None: the Trainer's own).

    As there, the warmup may be fractional (``warmup_ratio * max_steps``) and the scheduler starts at step 1
    (``last_epoch=0``), so the first update already uses the first warmup rate instead of a wasted rate of 0.
    """
    from paddlenlp.transformers import CosineAnnealingWithWarmupDecay, LinearAnnealingWithWarmupDecay

    scheduler_name = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    scheduler_class = {"cosine": CosineAnnealingWithWarmupDecay, "linear": LinearAnnealingWithWarmupDecay}.get(scheduler_name)
    if scheduler_class is None:
        return None
    return scheduler_class(
        max_lr=training_args.learning_rate,
        min_lr=training_args.min_learning_rate,
        warmup_step=training_args.warmup_steps if training_args.warmup_steps > 0 else training_args.warmup_ratio * training_args.max_steps,
        decay_step=training_args.decay_steps or training_args.max_steps,
        last_epoch=0,
    )


def fit(plan: RecipeSetup) -> int:
    from paddle_llm.trainer.callbacks import MetricsFileCallback
    from paddle_llm.trainer.trainer import LLMTrainer

    started = start(plan, _dataclass_types(), ("Model", "Data"))
    model_args, data_args, training_args = started.arguments
    model, tokenizer, config = build_model_and_tokenizer(plan.source, model_args, data_args, training_args)
    log_cpu_fast_paths(model, plan.source.family, training_args)
    data_prefix = resolve_data_prefixes(data_args.input_dir)
    for prefix, (documents, tokens) in check_data_prefixes(data_prefix, config.vocab_size).items():
        log(f"data: {prefix}: {documents} documents, {tokens} tokens")
    data = build_pretraining_datasets(
        data_prefix,
        data_args.split,
        data_args.max_seq_length,
        training_args.seed,
        _num_samples(training_args),
        data_args.data_cache,
        skip_warmup=data_args.skip_warmup,
        share_folder=data_args.share_folder,
    )

    trainer = LLMTrainer(
        model=model,
        args=training_args,
        data_collator=CausalLMCollator(plan.source.family.causal_lm_inputs),
        train_dataset=data.train if training_args.do_train else None,
        eval_dataset=data.valid if training_args.do_eval else None,
        tokenizer=tokenizer,
        optimizers=(None, pretraining_lr_scheduler(training_args)),
    )
    trainer.is_pretraining = True
    tokens_per_sample = data_args.max_seq_length
    add_run_callbacks(trainer, MetricsFileCallback(training_args.output_dir, tokens_per_sample))
    train_save_evaluate(trainer, tokenizer, plan.parsed, started.resume_from, tokens_per_sample)
    return 0


RECIPE = Recipe(
    name="pretrain",
    scripts=("run_pretrain.py",),
    summary="pretrain or continue-pretrain (same flags as run_pretrain.py)",
    arguments=_dataclass_types,
    setup=setup,
    fit=fit,
    help=lambda: format_help(_dataclass_types(), HELP_USAGE, HELP_EPILOG),
    announce=lambda plan: log_memory_estimate(plan.source.config_fields, plan.parsed.as_dict(), "run_pretrain.py"),
)
