"""The pretraining recipe behind ``run_pretrain.py`` and ``paddle-llm pretrain``.

setup: parse flags, validate everything, apply CPU fallbacks (before any process group exists).
main:  build tokenizer, model, datasets and the trainer.
fit:   train (resuming from the last complete checkpoint), save, evaluate, write results.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from paddle_llm.config.parser import ArgumentError, ParsedArgs, parse_flags
from paddle_llm.config.validation import apply_cpu_fallbacks, check_device, check_parallel, check_precision, check_split
from paddle_llm.data.jsonl import DataError
from paddle_llm.models.registry import ModelSource, hf_split_errors, resolve_model

EXIT_BAD_CONFIG = 2
HELP_USAGE = """usage: run_pretrain.py [ARGS.json] --flag value ...   (or: paddle-llm pretrain ...)

Pretrain or continue-pretraining a Llama / ChatGLM / ChatGLM2 model on .bin/.idx data from `paddle-llm preprocess`.
Flags are PaddleNLP's run_pretrain.py flags; a JSON args file may come first and the command line overrides it.
Booleans take 1/0/true/false, and a bare boolean flag means true."""
HELP_EPILOG = """examples:
  run_pretrain.py --model_name_or_path tiny-llama --input_dir data/demo --output_dir out --max_steps 100 \\
      --max_seq_length 128 --do_train --do_eval --device cpu
  python -m paddle.distributed.launch --nproc_per_node 2 run_pretrain.py args.json --device cpu
Rerunning the same command after a crash resumes from the last complete checkpoint."""


# Printed as "[paddle_llm] ..." (config.output); the demo turns its INFO lines off to fit on one screen.
logger = logging.getLogger("paddle_llm.trainer")


def log(message: str, level: int = logging.INFO) -> None:
    """A line for the user, from rank 0 only: every rank would print the same."""
    if int(os.environ.get("PADDLE_TRAINER_ID", "0")) == 0:
        logger.log(level, message)


def warn(message: str) -> None:
    """A warning the user should act on (kept when the demo turns the INFO lines off)."""
    log(message, logging.WARNING)


@dataclass
class PretrainSetup:
    parsed: ParsedArgs
    source: ModelSource
    warnings: list[str]


def _dataclass_types():
    from paddle_llm.config.arguments import DataArguments, ModelArguments, PretrainingArguments

    return ModelArguments, DataArguments, PretrainingArguments


def _world_size() -> int:
    from paddle_llm.config.threads import launched_processes

    return launched_processes()


def setup(argv: list[str]) -> PretrainSetup:
    """Parse and validate; nothing distributed or heavy happens here.

    Raises:
        ArgumentError: bad flags or configuration (every problem found, one per line).
    """
    import paddle

    parsed = parse_flags(argv, _dataclass_types())
    values = parsed.as_dict()
    errors = []
    try:
        source = resolve_model(values["model_name_or_path"])
    except (FileNotFoundError, ValueError) as err:
        raise ArgumentError(f"--model_name_or_path: {err}") from None
    if values.get("model_type") and values["model_type"] not in (source.family.name,) + source.family.model_types:
        errors.append(f"--model_type {values['model_type']} does not match the model's config ({source.family.name})")
    model_fields = dict(source.config_fields)
    if values.get("num_hidden_layers"):
        model_fields["num_hidden_layers"] = values["num_hidden_layers"]
    errors += check_device(values, paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0)
    errors += check_precision(values, parsed.explicit)
    errors += check_parallel(values, model_fields, _world_size(), pipeline_supported=source.family.pipe_model_class is not None)
    errors += hf_split_errors(source, dict(values))
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
    warnings = apply_cpu_fallbacks(values)
    for name, value in values.items():
        parsed.set(name, value)
    return PretrainSetup(parsed, source, warnings)


def log_memory_estimate(config_fields: dict, values: dict, script: str) -> None:
    """Print the estimator's per-device figure before any weight is allocated; on a GPU that is too small, warn
    and name the planner's fastest layout that fits."""
    import paddle

    from paddle_llm.estimator.flags import setup_from_flags
    from paddle_llm.estimator.memory import shape_of
    from paddle_llm.estimator.planner import startup_report

    gpu_memory_gb = None
    if str(values.get("device", "gpu")).startswith("gpu") and paddle.device.cuda.device_count() > 0:
        gpu_memory_gb = paddle.device.cuda.get_device_properties().total_memory / 2**30
    local_devices = int(os.environ.get("PADDLE_LOCAL_SIZE", _world_size()))
    try:
        setup = setup_from_flags({**values, "num_gpus": local_devices, "num_nodes": max(1, _world_size() // local_devices), "gpu_memory_gb": gpu_memory_gb})
        log("memory estimate (paddle-llm estimate):\n" + startup_report(shape_of(config_fields), setup, values["model_name_or_path"], script))
    except ValueError as err:  # an estimate is advice; a layout the estimator does not model must not stop training
        log(f"memory estimate unavailable: {err}")


VOCAB_MULTIPLE = 128  # PaddleNLP's run_pretrain.py rounds a grown vocabulary up to this, for AMP-friendly shapes


def embedding_rows(source: ModelSource, tokenizer_size: int, tokenizer_path: str, continuing: bool) -> int:
    """The vocabulary size to build the model with, for a tokenizer of ``tokenizer_size`` tokens.

    A model trained from scratch (a preset, a config-only directory, or no ``--continue_training``) grows to hold
    the tokenizer, rounded up to a multiple of 128, as PaddleNLP's run_pretrain.py does: a tokenizer trained on the
    user's own corpus (thousands of pieces for Chinese) then just works. Trained weights keep their rows.

    Raises:
        DataError: continuing from weights with a tokenizer that has more tokens than the weights have rows.
    """
    rows = int(source.config_fields.get("vocab_size") or source.family.classes()[0]().vocab_size)  # else the class default
    if continuing:
        if tokenizer_size > rows:
            raise DataError(
                f"the tokenizer {tokenizer_path} has {tokenizer_size} tokens but the weights in {source.directory} have "
                f"{rows} rows (vocab_size in {os.path.join(source.directory, 'config.json')}): pass the tokenizer the model "
                "was trained with as --tokenizer_name_or_path, or train a new model from scratch (run_pretrain.py "
                "without --continue_training)"
            )
        return rows
    where = source.directory or f"preset {source.name_or_path}"
    grown = max(rows, -(-tokenizer_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    if grown != rows:
        log(
            f"vocab size {rows} -> {grown}: {where} starts from random weights and the tokenizer {tokenizer_path} has "
            f"{tokenizer_size} tokens (rounded up to a multiple of {VOCAB_MULTIPLE}, as PaddleNLP's run_pretrain.py does)"
        )
    return grown


def build_model_and_tokenizer(source: ModelSource, model_args, data_args, training_args):
    """Tokenizer and model, with training flags folded into the model config."""
    import paddle
    from paddlenlp.transformers.configuration_utils import LlmMetaConfig

    from paddle_llm.models.registry import build_config, build_model, load_tokenizer

    family = source.family
    tokenizer_path = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_path, family)
    overrides = {"vocab_size": embedding_rows(source, len(tokenizer), tokenizer_path, bool(model_args.continue_training))}
    if model_args.num_hidden_layers:
        overrides["num_hidden_layers"] = model_args.num_hidden_layers
    if not model_args.continue_training:
        # A fresh model may be given longer positions; a trained one keeps what it learned.
        current = source.config_fields.get(family.max_positions_field) or 0
        overrides[family.max_positions_field] = max(current, data_args.max_seq_length)
    config = build_config(source, **overrides)
    LlmMetaConfig.set_llm_config(config, training_args)
    if "seq_length" not in family.field_aliases:  # ChatGLM2's seq_length is its max positions, not the batch length
        config.seq_length = data_args.max_seq_length
    config.hidden_dropout_prob = model_args.hidden_dropout_prob
    config.attention_probs_dropout_prob = model_args.attention_probs_dropout_prob
    config.use_fast_layer_norm = model_args.use_fast_layer_norm
    for name in ("fuse_attention_qkv", "fuse_attention_ffn"):
        if getattr(model_args, name) is not None:
            setattr(config, name, getattr(model_args, name))
    if training_args.fp16_opt_level == "O2" and (training_args.fp16 or training_args.bf16):
        config.dtype = "float16" if training_args.fp16 else "bfloat16"
    model = build_model(source, config, load_weights=bool(model_args.continue_training))
    if config.dtype != "float32":
        model = model.astype(config.dtype) if hasattr(model, "astype") else model
    log(f"model: {family.name}, {sum(p.numel().item() for p in model.parameters()) / 1e6:.2f}M parameters, device {paddle.get_device()}")
    return model, tokenizer, config


def install_collectives_when_distributed(device: str) -> None:
    """Before TrainingArguments (fleet.init) and the model: gloo lacks ops fleet's hybrid parallel calls."""
    if _world_size() > 1:
        from paddle_llm.parallel.cpu_collectives import install_cpu_collectives

        install_cpu_collectives(device)


def resume_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: ``--resume_from_checkpoint``, else the last complete one in ``output_dir``
    (unless ``--overwrite_output_dir``); half-written checkpoints a crash left are removed first."""
    import paddle

    from paddle_llm.trainer.checkpoint import latest_complete_checkpoint, remove_incomplete_checkpoints

    resume_from = training_args.resume_from_checkpoint
    if training_args.do_train and not training_args.overwrite_output_dir and resume_from is None:
        if training_args.process_index == 0:
            for path in remove_incomplete_checkpoints(training_args.output_dir):
                log(f"removed {path}: its save never finished (crash mid-save)")
        if paddle.distributed.get_world_size() > 1:
            paddle.distributed.barrier()
        resume_from = latest_complete_checkpoint(training_args.output_dir)
        if resume_from:
            log(f"resuming from {resume_from} (pass --overwrite_output_dir to start over)")
    return resume_from


def configure_runtime(training_args) -> str:
    """Set math threads (and, on CPU, the allocator and MKL kernels) before the first matrix multiply; return the
    line to log. Processes launched on one host share its cores."""
    from paddle_llm.config.threads import configure_cpu_runtime

    local_processes = int(os.environ.get("PADDLE_LOCAL_SIZE", _world_size()))
    runtime = configure_cpu_runtime(training_args.num_threads, training_args.device, processes_sharing_cores=local_processes)
    return runtime.summary()


def log_cpu_fast_paths(model, training_args) -> None:
    """On CPU, swap PaddleNLP's slow composites for numerically equal fast ones (a no-op on GPU), unless
    ``--cpu_fast_paths False`` asks to keep PaddleNLP's."""
    from paddle_llm.models import cpu_kernels
    from paddle_llm.models.cpu_fast import apply_cpu_fast_paths, model_is_on_cpu

    if not training_args.cpu_fast_paths:
        if model_is_on_cpu(model):
            log("cpu fast paths off (--cpu_fast_paths False): PaddleNLP's own RMSNorm, rotary, attention, MLP and loss")
        return
    replaced = apply_cpu_fast_paths(model)
    if replaced:
        log(f"cpu fast paths on {cpu_kernels.describe()}: " + ", ".join(replaced))


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


def run_recipe(argv: list[str], program: str, setup_fn, fit_fn, help_text, announce=None) -> int:
    """The shared command-line flow of the training recipes: help, parse and validate, announce, fit.

    Configuration and data problems end with one line per problem and exit code 2, numerical-health failures with
    a diagnosis and exit code 3; neither prints a traceback. A successful rank of a multi-process launch waits for
    its peers and exits here (``process_exit``).

    Args:
        argv: the flags (a JSON args file may come first).
        program: the name errors are printed under (``paddle-llm pretrain``).
        setup_fn: ``argv -> plan`` (raises ArgumentError); the plan has ``warnings``.
        fit_fn: ``plan -> exit code``.
        help_text: ``() -> str`` for ``--help``.
        announce: ``plan -> None``, run after the warnings and before fitting (e.g. the memory estimate).
    """
    from paddle_llm.trainer.health import NumericalHealthError, print_health_error
    from paddle_llm.trainer.process_exit import end_launched_run

    if any(flag in argv for flag in ("-h", "--help")):
        print(help_text())
        return 0
    try:
        plan = setup_fn(argv)
    except ArgumentError as err:
        for line in str(err).splitlines():
            print(f"{program}: error: {line}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    for warning in plan.warnings:
        warn(warning)
    if announce is not None:
        announce(plan)
    try:
        exit_code = fit_fn(plan)
    except (DataError, FileNotFoundError, ArgumentError) as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except NumericalHealthError as err:
        return print_health_error(err, program)
    return end_launched_run(exit_code)


def main(argv: list[str] | None = None) -> int:
    from paddle_llm.config.parser import format_help

    return run_recipe(
        list(sys.argv[1:] if argv is None else argv),
        "paddle-llm pretrain",
        setup,
        fit,
        lambda: format_help(_dataclass_types(), HELP_USAGE, HELP_EPILOG),
        announce=lambda plan: log_memory_estimate(plan.source.config_fields, plan.parsed.as_dict(), "run_pretrain.py"),
    )


def fit(plan: PretrainSetup) -> int:
    import paddle
    from paddlenlp.trainer import set_seed

    from paddle_llm.data.pretraining import (
        CausalLMCollator,
        build_pretraining_datasets,
        check_data_prefixes,
        resolve_data_prefixes,
    )
    from paddle_llm.trainer.callbacks import MetricsFileCallback
    from paddle_llm.trainer.health import NumericalHealthCallback
    from paddle_llm.trainer.trainer import LLMTrainer

    install_collectives_when_distributed(plan.parsed.value("device"))
    model_args, data_args, training_args = plan.parsed.build(_dataclass_types())
    paddle.set_device(training_args.device)
    set_seed(training_args.seed)
    log(configure_runtime(training_args))
    training_args.print_config(model_args, "Model")
    training_args.print_config(data_args, "Data")

    resume_from = resume_checkpoint(training_args)

    model, tokenizer, config = build_model_and_tokenizer(plan.source, model_args, data_args, training_args)
    log_cpu_fast_paths(model, training_args)
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
    trainer.add_callback(MetricsFileCallback(training_args.output_dir, tokens_per_sample))
    trainer.add_callback(NumericalHealthCallback())
    train_save_evaluate(trainer, tokenizer, plan.parsed, resume_from, tokens_per_sample)
    return 0


def train_save_evaluate(trainer, tokenizer, parsed: ParsedArgs, resume_from: str | None, tokens_per_row: float) -> None:
    """Every recipe's tail: train (resuming), save the model and tokenizer, evaluate, and write the metrics files,
    with ``report.html`` and ``run_summary.json`` (``ReportCallback``) for every run."""
    from paddle_llm.trainer.report import ReportCallback

    training_args = trainer.args
    trainer.add_callback(ReportCallback(parsed.as_dict(), parsed.explicit))
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        metrics = dict(result.metrics)
        metrics["train_tokens_per_second"] = round(metrics.get("train_samples_per_second", 0.0) * tokens_per_row, 2)
        trainer.save_model()
        if training_args.process_index == 0:
            tokenizer.save_pretrained(training_args.output_dir)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    sys.exit(main())
