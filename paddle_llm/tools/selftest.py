"""``paddle-llm selftest``: prove a planned run's numbers on this hardware in a few minutes, before the long job.

    python -m paddle.distributed.launch --gpus 0,1 selftest.py [the planned run's flags]
    python -m paddle.distributed.launch --nproc_per_node 2 selftest.py [flags] --device cpu
    paddle-llm selftest [flags]          # one process: the planned precision and kernels, no layout

(Paddle's launcher starts ``python -u SCRIPT``, so it takes the repository's ``selftest.py``, not ``-m``.)

Every launched rank runs this. It builds a tiny model of the planned model's family (its key/value head ratio
kept, heads enough for the tensor-parallel degree), trains it 5 steps on the shipped corpus under the planned
layout and precision (each rank starts its part of that run as a child process that inherits its launch variables,
so the child is that rank of the job), then rank 0 runs the reference (one device, fp32, no fused kernels) on the
same data and weights and prints one table:

  * loss curve and gradient norm: every step against the reference, within the precision's tolerance;
  * checkpoint round trip: the step-3 checkpoint saved under the planned layout, merged into one process and
    resumed there, must continue as the run that saved it did;
  * fused kernels: each kernel the flags ask for (on CPU: the compiled CPU kernels) against its composed ops;
  * export parity: the round-tripped model exported in the planned precision decodes like its checkpoint.

A failed row carries a ``fix:`` line and the exit code is 1. Each rank also records its own gradient norm per step,
so a failing run says which rank disagreed first; under ``--nnodes`` that needs ``--selftest_dir`` on storage every
node sees (the default is ``./selftest_output``).

Test-only: ``PADDLE_LLM_SELFTEST_FAULT`` (``trainer.rank_records.FAULTS``) injects a fault the table must catch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import paddle
from safetensors.numpy import load_file, save_file

from paddle_llm.config.parser import ArgumentError, parse_flags
from paddle_llm.cpu.threads import launched_processes
from paddle_llm.data.preprocess import preprocess
from paddle_llm.tools.demo import DEMO_CORPUS
from paddle_llm.export.exporter import ExportRequest, export_checkpoint
from paddle_llm.export.parity import check_export
from paddle_llm.cpu import agreement as kernel_agreement
from paddle_llm.models.registry import build_config, build_model, load_tokenizer, resolve_model
from paddle_llm.trainer.convert_checkpoint import merge_unified_checkpoint, shard_files
from paddle_llm.trainer.rank_records import RECORDS_VARIABLE, injected_fault
from paddle_llm.tools.equivalence import (
    Run,
    command_line,
    compare_runs,
    first_disagreeing_ranks,
    read_rank_records,
    standalone_environment,
    steps,
)
from paddle_llm.recipes.pretrain import _dataclass_types
from paddle_llm.recipes.pretrain import setup as pretrain_setup

STEPS = 5
SAVE_STEP = 3  # the round trip resumes here and trains to STEPS
GLOBAL_BATCH = 4  # sequences per step in every layout (as tests/integration/test_parallel_equivalence.py)
DEFAULT_DIRECTORY = "selftest_output"
PRETRAIN = "-m paddle_llm pretrain"
# The planned run's flags that shape the layout, precision and kernels; everything else (model, data, schedule,
# output) is the selftest's own.
PLANNED_FLAGS = (
    "device", "tensor_parallel_degree", "pipeline_parallel_degree", "sharding", "sharding_parallel_degree",
    "gradient_accumulation_steps", "fp16", "bf16", "fp16_opt_level", "amp_master_grad", "use_flash_attention",
    "use_fused_rms_norm", "use_fused_rope", "recompute", "sequence_parallel", "pipeline_parallel_config",
    "virtual_pp_degree", "sep_parallel_degree", "context_parallel_degree",
)
PRECISION_FLAGS = ("fp16", "bf16", "fp16_opt_level", "amp_master_grad")
# Relative tolerance of the loss curve and gradient norm against the fp32 reference, per precision. fp32 layouts
# reorder sums only (measured under 1e-6 on CPU; GPU reductions are less deterministic); half precision rounds
# every activation, so five steps drift by about its precision.
TOLERANCE = {("cpu", "float32"): 1e-5, ("gpu", "float32"): 1e-4, ("gpu", "float16"): 1e-2, ("gpu", "bfloat16"): 3e-2}
# Where a family keeps its key/value head count, so the tiny model keeps the planned grouping ratio.
KV_HEADS_FIELD = {"llama": "num_key_value_heads", "qwen2": "num_key_value_heads", "chatglm2": "multi_query_group_num"}
# The presets' width fields (hidden and MLP), widened with the heads when the tensor-parallel degree needs more heads.
WIDTH_FIELDS = ("hidden_size", "intermediate_size", "ffn_hidden_size", "inner_hidden_size")
# A tiny model deepened for pipeline stages (PP4 x virtual PP 2: 8 layers) trains at this rate: at the usual 0.003
# its gradient spikes at step 3, and summation order alone then moves the gradient norm past the fp32 tolerance.
LEARNING_RATE = 0.003
DEEP_LEARNING_RATE = 0.0003
PARITY_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
WAIT_SECONDS = 600


@dataclass
class Row:
    """One check of the table."""

    check: str
    measured: str
    tolerance: str
    passed: bool
    fix: str = ""
    detail: str = ""


@dataclass
class Plan:
    """What the selftest will run, derived from the planned run's flags."""

    family: str
    overrides: dict  # the tiny preset's config fields changed to fit the planned model and layout
    layout: dict
    device: str
    dtype: str
    world_size: int
    directory: str

    @property
    def tolerance(self) -> float:
        return TOLERANCE[(self.device, self.dtype)]

    @property
    def learning_rate(self) -> float:
        return DEEP_LEARNING_RATE if "num_hidden_layers" in self.overrides else LEARNING_RATE

    @property
    def micro_batch(self) -> int:
        """Sequences per rank per micro-step: the global batch split over the data-parallel ranks."""
        return max(1, GLOBAL_BATCH // self.data_degree)

    @property
    def data_degree(self) -> int:
        degrees = ("tensor_parallel_degree", "pipeline_parallel_degree", "sep_parallel_degree", "context_parallel_degree")
        return max(1, self.world_size // math.prod(int(self.layout.get(name) or 1) for name in degrees))

    def describe(self) -> str:
        layout = ", ".join(f"{name}={value}" for name, value in self.layout.items() if name != "device")
        layout = layout or ("data parallel" if self.world_size > 1 else "one process")
        return f"{self.family} family (tiny), {self.world_size} process(es), {layout}, {self.dtype} on {self.device}, {STEPS} steps"


def tiny_shape(family: str, planned: dict, tensor_parallel: int, pipeline_chunks: int = 1) -> dict:
    """Overrides of the family's tiny preset: as many heads as the tensor-parallel degree needs (widths grow with
    them, head size kept), the planned model's query-to-key/value head ratio where the layout allows it, and layers
    enough for every pipeline chunk (``pipeline_parallel_degree × virtual_pp_degree``) to hold the same number."""
    tiny = resolve_model(f"tiny-{family}").config_fields
    heads = tiny["num_attention_heads"]
    widened = math.lcm(heads, tensor_parallel)
    overrides = {}
    if tiny["num_hidden_layers"] % pipeline_chunks:
        overrides["num_hidden_layers"] = math.lcm(tiny["num_hidden_layers"], pipeline_chunks)
    if widened != heads:
        overrides |= {"num_attention_heads": widened, **{name: tiny[name] * widened // heads for name in WIDTH_FIELDS if name in tiny}}
    kv_field = KV_HEADS_FIELD.get(family)
    if kv_field and planned.get(kv_field) and planned.get("num_attention_heads"):
        group = max(1, planned["num_attention_heads"] // planned[kv_field])
        kv_heads = max(tensor_parallel, widened // group)
        overrides[kv_field] = kv_heads if widened % kv_heads == 0 else widened
    elif kv_field and widened != heads:
        overrides[kv_field] = max(tensor_parallel, tiny[kv_field])
    return overrides


def make_plan(argv: list[str]) -> Plan:
    """Read the planned run's flags (PaddleNLP's run_pretrain.py flags; a JSON args file may come first).

    Raises:
        ArgumentError: an unknown flag, or a model the selftest cannot build a tiny twin of.
    """
    directory = DEFAULT_DIRECTORY
    if "--selftest_dir" in argv:
        at = argv.index("--selftest_dir")
        directory, argv = argv[at + 1], argv[:at] + argv[at + 2:]
    # The planned run's --output_dir is never written; a planned command without one is still a plan.
    parsed = parse_flags(argv + ([] if "--output_dir" in argv else ["--output_dir", directory]), _dataclass_types())
    values = parsed.as_dict()
    try:
        source = resolve_model(values["model_name_or_path"] or "tiny-llama")
    except (ValueError, FileNotFoundError) as err:
        raise ArgumentError(f"--model_name_or_path: {err}") from err
    family = source.family.name
    pipeline_chunks = int(values.get("pipeline_parallel_degree") or 1) * int(values.get("virtual_pp_degree") or 1)
    overrides = tiny_shape(family, source.config_fields, int(values.get("tensor_parallel_degree") or 1), pipeline_chunks)
    device = "cpu" if str(values.get("device") or "gpu").startswith("cpu") else "gpu"
    dtype = "float32" if device == "cpu" else "bfloat16" if values.get("bf16") else "float16" if values.get("fp16") else "float32"
    layout = {name: values[name] for name in PLANNED_FLAGS if name in parsed.explicit}
    layout["device"] = values.get("device") or "gpu"
    return Plan(family, overrides, layout, device, dtype, launched_processes(), os.path.abspath(directory))


# ---------------------------------------------------------------------------------------------------------------
# Inputs: the tiny model and the shipped corpus, made once per node
# ---------------------------------------------------------------------------------------------------------------


def _rank() -> int:
    return int(os.environ.get("PADDLE_TRAINER_ID", "0"))


def prepare_inputs(plan: Plan) -> str:
    """The tiny model (seed 0, with the tokenizer) and the tokenized corpus under ``DIR/inputs-FAMILY``.

    The first rank of each node writes them (to a temporary name, renamed whole); the other ranks wait for the
    directory, so every rank reads the same files.
    """
    name = "-".join([f"inputs-{plan.family}", *(f"{field}{value}" for field, value in sorted(plan.overrides.items()))])
    inputs = os.path.join(plan.directory, name)
    if os.environ.get("PADDLE_RANK_IN_NODE", "0") != "0":
        deadline = time.monotonic() + WAIT_SECONDS
        while not os.path.isdir(inputs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{inputs} did not appear within {WAIT_SECONDS} s: did the first rank of this node fail?")
            time.sleep(1)
        return inputs
    if os.path.isdir(inputs):
        return inputs
    staging = f"{inputs}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    tiny = resolve_model(f"tiny-{plan.family}")
    paddle.seed(0)
    model = build_model(tiny, build_config(tiny, **plan.overrides), load_weights=False)
    model.save_pretrained(os.path.join(staging, "model"))
    load_tokenizer(f"tiny-{plan.family}").save_pretrained(os.path.join(staging, "model"))
    preprocess(DEMO_CORPUS, os.path.join(staging, "data", "corpus"), os.path.join(staging, "model"), append_eos=True, show_progress=False)
    try:
        os.rename(staging, inputs)
    except OSError:  # another node sharing the storage got there first with the same files
        shutil.rmtree(staging, ignore_errors=True)
    return inputs


def base_flags(inputs: str, output_dir: str, plan: Plan) -> list[str]:
    flags = {
        "model_name_or_path": os.path.join(inputs, "model"),
        "input_dir": os.path.join(inputs, "data", "corpus"),
        "output_dir": output_dir,
        "device": plan.layout["device"],
        "continue_training": 1,
        "max_steps": STEPS,
        "max_seq_length": 64,
        "learning_rate": plan.learning_rate,
        "warmup_steps": 2,
        "logging_steps": 1,
        "save_steps": SAVE_STEP,
        "unified_checkpoint": 1,
        "overwrite_output_dir": 1,
        "report_to": "none",
        "disable_tqdm": 1,
        "seed": 7,
        "do_train": 1,
    }
    return [str(token) for name, value in flags.items() for token in (f"--{name}", value)]


def _run(arguments: list[str], log_path: str, environment: dict) -> int:
    """Run ``python arguments`` with its output in ``log_path`` (the table is the selftest's only output)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.run([sys.executable] + arguments, stdout=log, stderr=subprocess.STDOUT, env=environment).returncode


def _log_tail(path: str, lines: int = 15) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def reference_run(plan: Plan, micro_batch: int) -> Run:
    """One device, fp32, composed ops, the planned global batch."""
    accumulation = plan.layout.get("gradient_accumulation_steps", 1)
    return Run(PRETRAIN, 1, {"per_device_train_batch_size": micro_batch, "gradient_accumulation_steps": accumulation})


def planned_flags(plan: Plan) -> list[str]:
    flags = dict(plan.layout, per_device_train_batch_size=plan.micro_batch)
    if int(flags.get("pipeline_parallel_degree") or 1) > 1:  # a pipeline needs a micro-batch per stage
        flags["gradient_accumulation_steps"] = max(int(flags.get("gradient_accumulation_steps") or 1), int(flags["pipeline_parallel_degree"]))
    return [str(token) for name, value in flags.items() for token in (f"--{name}", value)]


# ---------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------

TRAINING_FIX = (
    "fix: the planned layout trains different numbers from one device. Rerun with one parallel flag at a time to "
    "find the one at fault; across machines check NCCL_SOCKET_IFNAME / NCCL_IB_HCA and that every node runs the same "
    "Paddle; with --use_flash_attention on a card older than Ampere (compute capability < 8.0) drop that flag; with "
    "--fp16 a collapsing loss scale points to --bf16."
)


def training_rows(plan: Plan, planned: str, reference: str, records: str) -> list[Row]:
    comparisons = compare_runs(planned, reference, range(1, STEPS + 1), plan.tolerance)
    attribution = first_disagreeing_ranks(read_rank_records(records, plan.world_size), steps(reference), plan.tolerance)
    rows = []
    for comparison, check in zip(comparisons, (f"loss curve ({STEPS} steps)", "gradient norm")):
        rows.append(Row(
            check, f"{comparison.worst:.1e} rel" if not comparison.missing else f"steps {list(comparison.missing)} missing",
            f"{comparison.tolerance:.0e}", comparison.passed,
            fix="" if comparison.passed else TRAINING_FIX,
            detail="" if comparison.passed else f"{comparison.describe()}\nfirst disagreeing rank: {attribution}",
        ))
    return rows


def corrupt_last_model_shard(checkpoint: str) -> None:
    """The test-only ``shard`` fault: one tensor of the last model shard file, off by 1e-2."""
    path = os.path.join(checkpoint, shard_files(checkpoint)["model.safetensors.index.json"][-1])
    tensors = load_file(path)
    name = sorted(name for name, value in tensors.items() if value.dtype.kind == "f")[0]
    tensors[name] = tensors[name] + 1e-2
    save_file(tensors, path, metadata={"format": "np"})


def round_trip_row(plan: Plan, planned: str, micro_batch: int, fault: str | None) -> tuple[Row, str | None]:
    """Merge the planned layout's step-3 checkpoint, resume it on one device to step 5, and compare with the
    planned run's own steps 4-5: a checkpoint must continue as the run that saved it did (so this row isolates
    saving and loading from the training rows). Returns the row and the resumed run's directory (None when it
    could not run)."""
    checkpoint = os.path.join(planned, f"checkpoint-{SAVE_STEP}")
    merged = os.path.join(plan.directory, f"checkpoint-{SAVE_STEP}-single")
    resumed = os.path.join(plan.directory, "round_trip")
    check = f"checkpoint round trip (step {SAVE_STEP} -> 1 process)"
    fix = ("fix: a checkpoint saved under this layout does not resume on one device as trained: check the storage "
           "(every shard file complete and the same on every node) and merge with `paddle-llm convert-checkpoint` "
           "before resuming on fewer devices.")
    if fault == "shard":
        corrupt_last_model_shard(checkpoint)
    shutil.rmtree(merged, ignore_errors=True)
    merge_unified_checkpoint(checkpoint, merged)
    run = reference_run(plan, micro_batch)
    # in the planned precision, so a half-precision checkpoint's master weights are read as the run saved them
    precision = {name: value for name, value in plan.layout.items() if name in PRECISION_FLAGS}
    run = Run(run.script, 1, {**run.flags, **precision, "resume_from_checkpoint": merged, "save_steps": 100})
    log_path = os.path.join(plan.directory, "logs", "round_trip.log")
    code = _run(command_line(run, resumed, base_flags(prepare_inputs(plan), resumed, plan)), log_path, standalone_environment())
    if code != 0:
        return Row(check, f"exit {code}", "-", False, fix=fix, detail=f"see {log_path}:\n{_log_tail(log_path)}"), None
    comparisons = compare_runs(resumed, planned, range(SAVE_STEP + 1, STEPS + 1), plan.tolerance)
    worst = max(comparison.worst for comparison in comparisons)
    passed = all(comparison.passed for comparison in comparisons)
    detail = "" if passed else "; ".join(comparison.describe() for comparison in comparisons)
    return Row(check, f"{worst:.1e} rel", f"{plan.tolerance:.0e}", passed, fix="" if passed else fix, detail=detail), resumed


def kernel_rows(plan: Plan, fault: str | None) -> list[Row]:
    dtype = plan.dtype if plan.device == "gpu" else "float32"
    if plan.device == "cpu" and not kernel_agreement.cpu_kernels_built():
        return [Row("fused kernels", "not built", "-", True, detail="the CPU kernels could not be compiled: runs use the composed ops")]
    rows = []
    for case in kernel_agreement.cases_for(plan.layout, plan.device):
        tolerance = kernel_agreement.TOLERANCE[dtype if case.name != "flash_attention" or dtype != "float32" else "float16"]
        case_dtype = "float16" if case.name == "flash_attention" and dtype == "float32" else dtype
        try:
            difference = kernel_agreement.measure(case, case_dtype, distortion=1e-3 if fault == "kernel" else 0.0)
            measured, passed = f"{difference:.1e} rel", difference <= tolerance
        except Exception as err:  # noqa: BLE001 - a kernel this build or card lacks raises anything; the row reports it
            measured, passed = f"error: {type(err).__name__}: {err}".splitlines()[0][:120], False
        fix = (f"fix: drop {case.asked_by} (the composed ops run instead), or install a Paddle build whose "
               f"{case.name} supports this device" if case.asked_by.startswith("--")
               else "fix: PADDLE_LLM_CPU_KERNELS=0 makes every run use the composed ops; report this CPU "
                    "(`paddle-llm doctor`) with this table")
        rows.append(Row(f"kernel {case.name} ({case_dtype})", measured, f"{tolerance:.0e}", passed, fix="" if passed else fix))
    return rows


def export_row(plan: Plan, resumed: str | None) -> Row:
    check = f"export parity ({plan.dtype})"
    if resumed is None:
        return Row(check, "not run", "-", False, fix="fix: the round trip failed first; fix that row")
    export_dir = os.path.join(plan.directory, "export")
    atol = PARITY_TOLERANCE[plan.dtype]
    export_checkpoint(ExportRequest(model_name_or_path=resumed, output_path=export_dir, dtype=plan.dtype), log=lambda message: None)
    report = check_export(export_dir, resumed, atol=atol)
    fix = ("fix: serve from an export in --dtype float32, or from the checkpoint; `paddle-llm export --check_only "
           f"{export_dir}` reruns this check")
    if report.skipped:
        return Row(check, "skipped", f"{atol:.0e}", True, detail=report.skipped)
    return Row(check, f"{report.max_abs_diff:.1e} abs", f"{atol:.0e}", report.passed,
               fix="" if report.passed else fix, detail="; ".join(report.mismatches))


def write_atomically(path: str, text: str) -> None:
    staging = f"{path}.tmp-{os.getpid()}"
    with open(staging, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(staging, path)


def format_table(plan: Plan, rows: list[Row]) -> str:
    width = max(len(row.check) for row in rows)
    shown = set()  # a fix or attribution shared by several rows is printed under the first
    lines = [f"paddle-llm selftest: {plan.describe()}", f"{'check'.ljust(width)}  {'measured':>13}  {'tolerance':>9}  result"]
    for row in rows:
        lines.append(f"{row.check.ljust(width)}  {row.measured:>13}  {row.tolerance:>9}  {'PASS' if row.passed else 'FAIL'}")
        for line in [*row.detail.splitlines(), row.fix]:
            if line.strip() and line not in shown:
                lines.append(f"    {line}")
                shown.add(line)
    failed = sum(not row.passed for row in rows)
    lines.append(f"selftest {'FAILED' if failed else 'PASSED'}: {len(rows) - failed}/{len(rows)} checks pass; logs and runs in {os.path.relpath(plan.directory)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(flag in argv for flag in ("-h", "--help")):
        print(__doc__.split("Test-only:")[0].rstrip())
        return 0
    try:
        plan = make_plan(argv)
        fault = injected_fault()
    except (ArgumentError, ValueError) as err:
        print(f"paddle-llm selftest: error: {err}", file=sys.stderr)
        return 2
    rank = _rank()
    inputs = prepare_inputs(plan)
    planned = os.path.join(plan.directory, "planned")
    try:  # the planned layout's own checks (degrees against heads and world size...), before any child starts
        pretrain_setup([*base_flags(inputs, planned, plan), *planned_flags(plan)])
    except ArgumentError as err:
        for line in str(err).splitlines():
            print(f"paddle-llm selftest: error: {line}", file=sys.stderr)
        return 2
    records = os.path.join(plan.directory, "rank_records")
    os.makedirs(records, exist_ok=True)
    record_path = os.path.join(records, f"rank{rank}.jsonl")
    if os.path.exists(record_path):
        os.remove(record_path)  # a previous selftest's steps
    environment = dict(os.environ, **{RECORDS_VARIABLE: records})
    log_path = os.path.join(plan.directory, "logs", f"planned.rank{rank}.log")
    code = _run([*PRETRAIN.split(), *base_flags(inputs, planned, plan), *planned_flags(plan)], log_path, environment)
    if code != 0:
        print(f"paddle-llm selftest: rank {rank}: the planned run failed (exit {code}); its log, {log_path}, ends:\n{_log_tail(log_path)}", file=sys.stderr)
        return 1
    if rank != 0:
        return 0
    reference = os.path.join(plan.directory, "reference")
    micro_batch = plan.micro_batch * plan.data_degree
    reference_log = os.path.join(plan.directory, "logs", "reference.log")
    code = _run(command_line(reference_run(plan, micro_batch), reference, base_flags(inputs, reference, plan)), reference_log, standalone_environment())
    if code != 0:
        print(f"paddle-llm selftest: the one-device reference run failed (exit {code}); {reference_log} ends:\n{_log_tail(reference_log)}", file=sys.stderr)
        return 1
    rows = training_rows(plan, planned, reference, records)
    row, resumed = round_trip_row(plan, planned, micro_batch, fault)
    rows += [row, *kernel_rows(plan, fault), export_row(plan, resumed)]
    table = format_table(plan, rows)
    print(table)
    write_atomically(os.path.join(plan.directory, "selftest.txt"), table + "\n")
    write_atomically(os.path.join(plan.directory, "selftest.json"), json.dumps({"plan": asdict(plan), "fault": fault, "rows": [asdict(row) for row in rows]}, indent=2) + "\n")
    return 1 if any(not row.passed for row in rows) else 0
