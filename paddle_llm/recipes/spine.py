"""The spine every training recipe (pretrain, finetune, dpo) shares.

A recipe file holds only what is its own: its argument dataclasses, its checks, its data and its trainer subclass.
Everything else is here, in the order a run meets it:

0. ``Recipe``: the record each recipe module declares (``RECIPE``), read by the CLI, ``check`` and the root
   scripts.
1. ``run_recipe``: help, parse and validate (``check_model_and_runtime`` and the recipe's own checks, before any
   process group exists), warnings, then fit; errors become one line each and an exit code, never a traceback.
2. ``start``: collectives, the arguments (fleet.init), device, seed, math threads, the resume checkpoint.
3. ``build_model_and_tokenizer`` and ``log_cpu_fast_paths``.
4. ``add_run_callbacks``: ``metrics.jsonl`` and the numerical-health watch every run gets.
5. ``train_save_evaluate``: train (resuming), save, evaluate, and ``report.html`` / ``run_summary.json``.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Mapping

from paddle_llm.config.parser import ArgumentError, ParsedArgs, parse_flags
from paddle_llm.cpu.threads import configure_cpu_runtime, launched_processes
from paddle_llm.config.validation import apply_cpu_fallbacks, check_device, check_parallel, check_precision, check_training
from paddle_llm.data.jsonl import DataError
from paddle_llm.estimator.flags import setup_from_flags
from paddle_llm.estimator.memory import shape_of
from paddle_llm.estimator.planner import startup_report
from paddle_llm.cpu import kernels as cpu_kernels
from paddle_llm.files import OutputLock, OutputPathError, existing_output_refusal, output_overlap, write_marker
from paddle_llm.models.hf_checkpoint import CheckpointError
from paddle_llm.models.registry import ModelFamily, ModelSource, build_config, build_model, hf_split_errors, load_tokenizer, resolve_model
from paddle_llm.peft.lora import apply_lora, load_lora, lora_variant, pissa_as_plain_lora
from paddle_llm.peft.prefix import apply_prefix
from paddle_llm.peft.quantize import QuantSpec
from paddle_llm.trainer.checkpoint import (
    EXIT_CHECKPOINT_NOT_SAVED,
    EXIT_PREEMPTED,
    CheckpointNotSaved,
    checkpoint_problems,
    is_complete,
    latest_complete_checkpoint,
    remove_incomplete_checkpoints,
    set_aside_damaged_checkpoints,
)
from paddle_llm.console import log, warn
from paddle_llm.trainer.process_exit import end_launched_run

EXIT_BAD_CONFIG = 2
RESUMING_HELP = (
    "Rerunning the same command after a crash resumes from the last complete checkpoint that verifies.\n"
    f"SIGTERM or Ctrl-C saves a checkpoint after the current step and exits {EXIT_PREEMPTED}; a second signal exits at once."
)

def world_size() -> int:
    """Processes in this launch (1 when not launched); readable before any process group exists."""

    return launched_processes()


@dataclass
class RecipeSetup:
    """What ``setup`` hands to ``fit``: the validated flags, the model source and warnings to print first."""

    parsed: ParsedArgs
    source: ModelSource
    warnings: list[str]


def resolve_source(values: Mapping) -> ModelSource:
    """The model ``--model_name_or_path`` names.

    Raises:
        ArgumentError: neither a preset nor a directory with a config.
    """
    try:
        return resolve_model(values["model_name_or_path"])
    except (FileNotFoundError, ValueError) as err:
        raise ArgumentError(f"--model_name_or_path: {err}") from None


def apply_fallbacks(parsed: ParsedArgs) -> list[str]:
    """Apply the CPU fallbacks (``config.validation``) to the parsed flags; return the warnings to print."""
    values = parsed.as_dict()
    warnings = apply_cpu_fallbacks(values)
    for name, value in values.items():
        parsed.set(name, value)
    return warnings


def check_model_and_runtime(values: Mapping, explicit: set[str], source: ModelSource, reads_weights: bool = True) -> list[str]:
    """The checks every recipe makes: model type, device, precision, parallel layout, the training numbers and paths.

    ``reads_weights``: the run starts from the checkpoint's weights; a model trained from scratch only takes the
    config, so a Hugging Face directory's unsplit weights do not stop a split layout.
    """
    import paddle

    errors = []
    if values.get("model_type") and values["model_type"] not in (source.family.name,) + source.family.model_types:
        errors.append(f"--model_type {values['model_type']} does not match the model's config ({source.family.name})")
    model_fields = dict(source.config_fields)
    if values.get("num_hidden_layers"):
        model_fields["num_hidden_layers"] = values["num_hidden_layers"]
    errors += check_device(values, paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0)
    errors += check_precision(values, explicit)
    errors += check_parallel(values, model_fields, world_size(), pipeline_supported=source.family.pipe_model_class is not None)
    if reads_weights:
        errors += hf_split_errors(source, dict(values))
    errors += source.family.layer_option_errors(model_fields, values)
    errors += check_training(values)
    length, flag = training_sequence_length(values)
    errors += source.family.window_errors(model_fields, length, flag)
    return errors


def training_sequence_length(values: Mapping) -> tuple[int, str]:
    """The longest sequence a run trains on and the flag that sets it, in each recipe's spelling: pretraining's
    ``--max_seq_length``, fine-tuning's ``--max_length`` (else ``--src_length`` + ``--tgt_length``), DPO's
    ``--max_seq_len``."""
    for flag in ("max_seq_length", "max_seq_len", "max_length"):
        if values.get(flag):
            return int(values[flag]), f"--{flag}"
    return int(values.get("src_length") or 0) + int(values.get("tgt_length") or 0), "--src_length + --tgt_length"


# The flags whose paths a training run reads: its --output_dir may not equal, hold or sit inside any of them, except
# that a run resumes checkpoints inside its own output directory.
TRAINING_INPUT_FLAGS = ("model_name_or_path", "tokenizer_name_or_path", "input_dir", "dataset_name_or_path",
                        "train_dataset_path", "dev_dataset_path", "lora_path", "prefix_path", "resume_from_checkpoint")


def _input_paths(flag: str, value) -> tuple[str, ...]:
    """The paths on disk a flag's value names: ``--input_dir`` is a directory, a prefix (its .bin and .idx) or a
    blend ``weight prefix weight prefix ...``."""
    if not value:
        return ()
    if flag != "input_dir":
        return (str(value),)
    words = str(value).split()
    prefixes = words[1::2] if len(words) > 1 else words
    return tuple(path for prefix in prefixes for path in ((prefix,) if os.path.isdir(prefix) else (prefix + ".bin", prefix + ".idx")))


LAUNCHER_WORKER_LOG = re.compile(r"^workerlog\.\d+$")


def launcher_log_dirs(output_dir: str) -> tuple[str, ...]:
    """The directories in ``output_dir`` that ``paddle.distributed.launch --log_dir`` wrote, not the user: this
    launch's (``PADDLE_LOG_DIR`` in its workers), and, for the other nodes of a multi-node launch on shared storage,
    any holding a ``workerlog.N`` or still empty (a launcher that has just made it)."""
    found = [os.environ["PADDLE_LOG_DIR"]] if os.environ.get("PADDLE_LOG_DIR") else []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            entries = os.listdir(path)
            if not entries or any(LAUNCHER_WORKER_LOG.match(entry) for entry in entries):
                found.append(path)
    return tuple(found)


def output_dir_errors(values: Mapping, command: str) -> list[str]:
    """``--output_dir`` must not overlap an input (even with ``--overwrite_output_dir``: full fine-tuning into the
    model's directory would overwrite the base weights), and may hold only an earlier run of ``command`` (which this
    run resumes) unless ``--overwrite_output_dir``."""
    output_dir = values.get("output_dir")
    if not output_dir:
        return []
    inputs = {f"--{flag}": _input_paths(flag, values.get(flag)) for flag in TRAINING_INPUT_FLAGS}
    refusal = output_overlap("--output_dir", output_dir, inputs, may_contain=("--resume_from_checkpoint",))
    # A file where the directory should be is config.validation's to report; a checkpoint of ours from before
    # output directories were marked is resumed as before.
    if refusal is None and os.path.isdir(output_dir) and not latest_complete_checkpoint(output_dir):
        refusal = existing_output_refusal("--output_dir", output_dir, command, "--overwrite_output_dir",
                                          bool(values.get("overwrite_output_dir")), not_the_users=launcher_log_dirs(output_dir))
    return [refusal] if refusal else []


def parse_and_check(argv: list[str], dataclass_types, command: str,
                    reads_weights: Callable[[Mapping], bool] = lambda values: True) -> tuple[ParsedArgs, dict, ModelSource, list[str]]:
    """The first half of every recipe's ``setup``: parse the flags, resolve the model, and make the checks every
    recipe makes (model and runtime, the output directory). Returns the parsed flags, their values, the model source
    and the problems found; the recipe adds its own before raising. ``reads_weights(values)``: whether this run
    starts from the checkpoint's weights (fine-tuning and DPO always do; pretraining with ``--continue_training``)."""
    parsed = parse_flags(argv, dataclass_types)
    values = parsed.as_dict()
    source = resolve_source(values)
    errors = check_model_and_runtime(values, parsed.explicit, source, reads_weights(values))
    return parsed, values, source, errors + output_dir_errors(values, command)


def hold_output_dir(plan: RecipeSetup, command: str) -> OutputLock | None:
    """On rank 0 (the only rank that does), lock ``--output_dir`` against a second run and mark it as ``command``'s,
    before anything is written there.

    Raises:
        OutputPathError: another live run holds it (its pid, host and start time named).
    """
    output_dir = plan.parsed.as_dict().get("output_dir")
    if not output_dir or os.environ.get("PADDLE_TRAINER_ID", "0") != "0":
        return None
    lock = OutputLock(output_dir)
    lock.acquire(warn)
    write_marker(output_dir, command)
    return lock


def random_base_warning(source: ModelSource, doing: str = "fine-tunes") -> str:
    """Said before anything trains: a base without weights learns nothing useful from an adapter, and
    ``paddle-llm merge-lora`` refuses it afterwards."""
    what = f"{source.name_or_path} is a preset" if source.directory is None else f"{source.directory} has no weights"
    return (
        f"{what}, so this run {doing} a randomly initialised {source.family.name} model (`paddle-llm merge-lora` "
        "will refuse it as a base): to fine-tune a trained model, pass its directory as --model_name_or_path, e.g. the "
        "--output_dir of `paddle-llm pretrain`"
    )


def log_memory_estimate(config_fields: dict, values: dict, script: str) -> None:
    """Print the estimator's per-device figure before any weight is allocated; on a GPU that is too small, warn
    and name the planner's fastest layout that fits."""
    import paddle


    gpu_memory_gb = None
    if str(values.get("device", "gpu")).startswith("gpu") and paddle.device.cuda.device_count() > 0:
        gpu_memory_gb = paddle.device.cuda.get_device_properties().total_memory / 2**30
    local_devices = int(os.environ.get("PADDLE_LOCAL_SIZE", world_size()))
    try:
        setup = setup_from_flags({**values, "num_gpus": local_devices, "num_nodes": max(1, world_size() // local_devices), "gpu_memory_gb": gpu_memory_gb})
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
    """Tokenizer and model, with training flags folded into the model config.

    ``data_args.max_seq_length`` is the longest sequence the run feeds the model.
    """
    import paddle
    from paddlenlp.transformers.configuration_utils import LlmMetaConfig


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
    # The flags decide the dtype, never the checkpoint's config (a bf16 Hugging Face checkpoint trains in float32 on
    # CPU, where bf16 matmul has no kernel), as PaddleNLP's run_pretrain.py passes its own dtype to from_pretrained.
    config.dtype = "float32"
    if training_args.fp16_opt_level == "O2" and (training_args.fp16 or training_args.bf16):
        config.dtype = "float16" if training_args.fp16 else "bfloat16"
    model = build_model(source, config, load_weights=bool(model_args.continue_training))
    if config.dtype != "float32":
        model = model.astype(config.dtype) if hasattr(model, "astype") else model
    log(f"model: {family.name}, {sum(p.numel().item() for p in model.parameters()) / 1e6:.2f}M parameters, device {paddle.get_device()}")
    return model, tokenizer, config


def apply_peft(model, family: ModelFamily, peft_args, base_path: str):
    """Wrap the model for LoRA or prefix tuning (or return it unchanged), and log what trains.

    ``base_path`` (``--model_name_or_path``) is named when a saved adapter does not fit the model.
    """

    if peft_args.lora and peft_args.lora_path:
        model = load_lora(model, peft_args.lora_path, base_path)
    elif peft_args.lora:
        model = apply_lora(model, family, peft_args.r, target_modules=peft_args.lora_target_modules, **lora_variant(peft_args))
    elif peft_args.prefix_tuning:
        model = apply_prefix(model, family, peft_args.num_prefix_tokens, peft_args.prefix_path, peft_args.prefix_projection,
                             base_path)
    if peft_args.weight_quantize_algo:
        from paddle_llm.peft.qlora import quantize_lora_base

        log(quantize_lora_base(model, QuantSpec.from_arguments(peft_args)))
    trainable = sum(int(p.numel().item()) for p in model.parameters() if not p.stop_gradient)
    total = sum(int(p.numel().item()) for p in model.parameters())
    log(f"trainable parameters: {trainable / 1e6:.3f}M of {total / 1e6:.3f}M ({trainable / max(1, total):.2%})")
    return model


def install_collectives_when_distributed(device: str) -> None:
    """Before TrainingArguments (fleet.init) and the model: gloo lacks ops fleet's hybrid parallel calls."""
    if world_size() > 1:
        from paddle_llm.parallel.cpu_collectives import install_cpu_collectives

        install_cpu_collectives(device)


def resume_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: ``--resume_from_checkpoint``, else the last complete one in ``output_dir``
    (unless ``--overwrite_output_dir``) whose files match the sizes and checksums its marker recorded.
    Half-written checkpoints a crash left are removed first; damaged marked ones are moved aside, never deleted.

    Raises:
        ArgumentError: ``--resume_from_checkpoint`` names a marked checkpoint whose files no longer match it.
    """
    import paddle


    resume_from = training_args.resume_from_checkpoint
    if resume_from and os.path.isdir(resume_from) and is_complete(resume_from):
        problems = checkpoint_problems(resume_from)
        if problems:
            raise ArgumentError(
                f"--resume_from_checkpoint {resume_from}: damaged ({'; '.join(problems)}); pass an earlier checkpoint"
            )
    if training_args.do_train and not training_args.overwrite_output_dir and resume_from is None:
        if training_args.process_index == 0:
            for path in remove_incomplete_checkpoints(training_args.output_dir):
                log(f"removed {path}: its save never finished (crash mid-save)")
            for path, moved_to, problems in set_aside_damaged_checkpoints(training_args.output_dir):
                warn(f"{path} is damaged ({'; '.join(problems)}): moved to {moved_to} and not resumed from (an earlier complete one is, if there is one)")
        if paddle.distributed.get_world_size() > 1:
            paddle.distributed.barrier()
        resume_from = latest_complete_checkpoint(training_args.output_dir)
        if resume_from:
            log(f"resuming from {resume_from} (pass --overwrite_output_dir to start over)")
    return resume_from


def configure_runtime(training_args) -> str:
    """Set math threads (and, on CPU, the allocator and MKL kernels) before the first matrix multiply; return the
    line to log. Processes launched on one host share its cores."""

    local_processes = int(os.environ.get("PADDLE_LOCAL_SIZE", world_size()))
    runtime = configure_cpu_runtime(training_args.num_threads, training_args.device, processes_sharing_cores=local_processes)
    return runtime.summary()


def log_cpu_fast_paths(model, family: ModelFamily, training_args) -> None:
    """On CPU, swap PaddleNLP's slow composites for numerically equal fast ones (a no-op on GPU), unless
    ``--cpu_fast_paths False`` asks to keep PaddleNLP's."""
    from paddle_llm.cpu.fast_paths import apply_cpu_fast_paths, model_is_on_cpu

    if not training_args.cpu_fast_paths:
        if model_is_on_cpu(model):
            log("cpu fast paths off (--cpu_fast_paths False): PaddleNLP's own RMSNorm, rotary, attention, MLP and loss")
        return
    replaced = apply_cpu_fast_paths(model, family)
    if replaced:
        log(f"cpu fast paths on {cpu_kernels.describe()}: " + ", ".join(replaced))


@dataclass
class Started:
    """What ``start`` made: the built argument dataclasses (training arguments last) and the resume checkpoint."""

    arguments: list
    resume_from: str | None

    @property
    def training_args(self):
        return self.arguments[-1]


def start(plan: RecipeSetup, dataclass_types, titles: tuple[str, ...]) -> Started:
    """The prologue of every fit: collectives, the arguments (this runs fleet.init), device, seed, math threads,
    the printed configuration and the resume checkpoint.

    Args:
        dataclass_types: the recipe's argument dataclasses, the training arguments last.
        titles: a title for each dataclass before the training arguments, for ``print_config``.
    """
    import paddle
    from paddlenlp.trainer import set_seed

    install_collectives_when_distributed(plan.parsed.value("device"))
    arguments = plan.parsed.build(dataclass_types)
    training_args = arguments[-1]
    paddle.set_device(training_args.device)
    set_seed(training_args.seed)
    log(configure_runtime(training_args))
    for values, title in zip(arguments, titles):
        training_args.print_config(values, title)
    return Started(arguments, resume_checkpoint(training_args))


def add_run_callbacks(trainer, metrics_callback, **health_options) -> None:
    """The callbacks every run gets besides the report: ``metrics.jsonl`` and the numerical-health watch
    (``health_options`` go to ``NumericalHealthCallback``), and ``paddle-llm selftest``'s per-rank records in the
    runs it starts."""
    from paddle_llm.trainer.health import NumericalHealthCallback
    from paddle_llm.trainer.selftest_probe import selftest_callbacks

    trainer.add_callback(metrics_callback)
    trainer.add_callback(NumericalHealthCallback(**health_options))
    for callback in selftest_callbacks():
        trainer.add_callback(callback)


def train_save_evaluate(trainer, tokenizer, parsed: ParsedArgs, resume_from: str | None, tokens_per_row: float) -> None:
    """Every recipe's tail: train (resuming), save the model and tokenizer, evaluate, and write the metrics files,
    with ``report.html`` and ``run_summary.json`` (``ReportCallback``) for every run."""
    from paddle_llm.trainer.preemption import PreemptionCallback
    from paddle_llm.trainer.report import ReportCallback

    training_args = trainer.args
    trainer.add_callback(ReportCallback(parsed.as_dict(), parsed.explicit))
    preemption = PreemptionCallback()
    trainer.add_callback(preemption)
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_from)
        preempted = preemption.preempted(training_args.output_dir)
        if preempted:
            raise preempted
        metrics = dict(result.metrics)
        metrics["train_tokens_per_second"] = round(metrics.get("train_samples_per_second", 0.0) * tokens_per_row, 2)
        if pissa_as_plain_lora(trainer.model):
            log("PiSSA adapter saved as an ordinary LoRA adapter (rank 2r, scaling 1) on the original base weights")
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


@dataclass(frozen=True)
class Recipe:
    """One training recipe, declared once in its own module as ``RECIPE`` and listed in ``recipes.RECIPES``.

    ``paddle-llm <name>``, ``paddle-llm check SCRIPT ...`` and the PaddleNLP-style root scripts (``run_dpo.py``)
    all read this record, so a new recipe adds its module, its data reader and one line in ``recipes/__init__.py``.
    """

    name: str  # the subcommand, ``paddle-llm <name>``
    scripts: tuple[str, ...]  # PaddleNLP's script names for it, which ``check`` and the root scripts accept
    summary: str  # its line in ``paddle-llm --help``
    arguments: Callable[[], tuple[type, ...]]  # its argument dataclasses, training arguments last (they load PaddleNLP)
    setup: Callable[[list[str]], RecipeSetup]  # parse and validate, nothing distributed (raises ArgumentError)
    fit: Callable[[RecipeSetup], int]  # run it; returns an exit code
    help: Callable[[], str]  # the ``--help`` text
    announce: Callable[[RecipeSetup], None] | None = None  # after the warnings, before fitting (the memory estimate)
    # Flags only this recipe takes: ``check`` picks the recipe by them when the command line names no script.
    own_flags: tuple[str, ...] = ()

    @property
    def program(self) -> str:
        return f"paddle-llm {self.name}"

    def main(self, argv: list[str] | None = None) -> int:
        """``paddle-llm <name>`` and its root script: run the recipe on ``argv`` (default: the command line)."""
        return run_recipe(list(sys.argv[1:] if argv is None else argv), self)


def run_recipe(argv: list[str], recipe: Recipe) -> int:
    """The shared command-line flow of the training recipes: help, parse and validate, announce, fit.

    Configuration, data and checkpoint-file problems end with one line per problem and exit code 2, numerical-health
    failures with a diagnosis and exit code 3, a disk that filled during a checkpoint with what was and was not saved
    and exit code 4, SIGTERM/SIGINT with a checkpoint and the command that resumes and exit code 75 (``preemption``);
    none prints a traceback. Rank 0 holds ``--output_dir``'s lock from before ``fit`` until the run ends. A successful
    or preempted rank of a multi-process launch waits for its peers and exits here (``process_exit``).

    Args:
        argv: the flags (a JSON args file may come first).
        recipe: what to run; errors are printed under its ``program`` name.
    """
    from paddle_llm.trainer.health import NumericalHealthError, print_health_error
    from paddle_llm.trainer.preemption import RunPreempted, resume_command

    program = recipe.program
    if any(flag in argv for flag in ("-h", "--help")):
        print(recipe.help())
        return 0
    try:
        plan = recipe.setup(argv)
    except ArgumentError as err:
        for line in str(err).splitlines():
            print(f"{program}: error: {line}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    for warning in plan.warnings:
        warn(warning)
    if recipe.announce is not None:
        recipe.announce(plan)
    try:
        lock = hold_output_dir(plan, recipe.name)
    except OutputPathError as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    preempted = False
    try:
        exit_code = recipe.fit(plan)
    except (DataError, CheckpointError, FileNotFoundError, ArgumentError) as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except NumericalHealthError as err:
        return print_health_error(err, program)
    except CheckpointNotSaved as err:
        print(f"{program}: error: {err}", file=sys.stderr)
        return EXIT_CHECKPOINT_NOT_SAVED
    except RunPreempted as stopped:
        if int(os.environ.get("PADDLE_TRAINER_ID", "0")) == 0:
            print(f"{program}: stopped: {stopped}; exit code {EXIT_PREEMPTED}. Rerun the same command to resume from it: {resume_command()}", file=sys.stderr)
        exit_code, preempted = EXIT_PREEMPTED, True
    finally:
        if lock is not None:
            lock.release()
    # Preempted ranks all stopped after the same checkpoint, so they leave together as successful ones do.
    return end_launched_run(exit_code, ranks_agree=True if preempted else None)
