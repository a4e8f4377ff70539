"""``paddle-llm doctor``: can this machine train, and will the numbers be right? One table, a fix for each failure.

Usage: ``paddle-llm doctor [training flags]``. Paste the flags of the run you intend (``--model_name_or_path``,
``--output_dir``, ``--max_seq_length``, ``--per_device_train_batch_size``, ``--fp16``, ``--use_flash_attention``...);
the doctor uses the ones it needs and ignores the rest, so a whole ``run_pretrain.py`` command line works.

The machine is read once, by :func:`gather_facts`, into an :class:`EnvironmentFacts`; the intended run becomes a
:class:`TrainingPlan`. Every check is a pure function of those two, so tests feed faked facts (a GPU of compute
capability 7.5, a mismatched Paddle, a CPU without AVX) that this machine cannot produce.

What is checked, and why:

* Python, Paddle and PaddleNLP versions against ``constraints.txt`` (the one list of tested pins): PaddleNLP 3
  betas break on other Paddle releases in ways that surface as import errors or wrong losses, not version errors.
* AVX/AVX2: Paddle's PyPI wheels are compiled for AVX; without it ``import paddle`` fails with an illegal
  instruction, so the doctor reads the CPU's features (CPUID, ``config.cpu_features``) before importing Paddle at
  all, and shows the vector ISA and which CPU kernel paths it allows (AVX-512-only kernels are never run without it).
* GPU model, compute capability, CUDA, cuDNN and NCCL as Paddle sees them.
* flash attention: its kernels need Ampere (compute capability 8.0) or newer; on older GPUs the loss falls to
  0.00x within a few steps instead of failing (reported by users of PaddleNLP's llama scripts on V100/T4).
* fused ops (``--use_fused_rms_norm``, ``--use_fused_rope``): CUDA-only kernels.
* ``--output_dir`` can be written (not a file, not read-only), and its free disk against the checkpoints the run will write, and RAM (and GPU memory) against the
  memory estimator's figure for the plan.

Exit code 0 when nothing blocks training (warnings allowed), 1 when a check failed.
"""

from __future__ import annotations

import argparse
import enum
import importlib.metadata
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import tomllib
from dataclasses import asdict, dataclass, replace
from importlib.resources import files
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from paddle_llm.cpu import features as cpu_features
from paddle_llm.cpu.memory import host_memory, read_text
from paddle_llm.config.parser import FALSE_WORDS, TRUE_WORDS
from paddle_llm.config.validation import (
    FLASH_ATTENTION_MIN_CAPABILITY,
    check_device as validate_device,
    supports_flash_attention,
)
from paddle_llm.estimator.flags import estimate_for_flags
from paddle_llm.estimator.memory import HEADROOM, MemoryEstimate, format_bytes
from paddle_llm.models.registry import resolve_model

EXIT_OK = 0
EXIT_BLOCKED = 1

CONSTRAINTS_FILE = "constraints.txt"
# Without a model to size checkpoints from, warn below this much free disk.
MIN_FREE_DISK_BYTES = 1 << 30
PADDLE_DISTRIBUTIONS = ("paddlepaddle", "paddlepaddle-gpu")
PADDLE_GPU_INDEX = "https://www.paddlepaddle.org.cn/packages/stable/cu118/"
# Defaults of the training scripts for the flags the estimate needs (PaddleNLP's, and DataArguments').
TRAINING_DEFAULTS = {"max_seq_length": 1024, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}


class Status(str, enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"  # upper case: the rows to act on stand out in the table
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    """One row of the table.

    Attributes:
        name: what was checked.
        status: ok, warn, FAIL (blocks training or gives wrong results) or skip (does not apply here).
        found: what the machine has.
        fix: what to do about a warn or FAIL; empty otherwise.
    """

    name: str
    status: Status
    found: str
    fix: str = ""


@dataclass(frozen=True)
class GpuFacts:
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int


@dataclass(frozen=True)
class PaddleFacts:
    """What an imported Paddle reports; ``import_error`` is set (and the rest empty) when the import failed.

    Attributes:
        version: ``paddle.__version__`` (``0.0.0`` for develop builds).
        commit: the git commit of the build, which identifies develop builds.
        import_error: the exception text when ``import paddle`` failed, or why it was not attempted.
        compiled_with_cuda, compiled_with_nccl: build flags.
        cuda_version: the CUDA the build targets (``11.8``); cudnn_version and nccl_version as loaded at runtime.
        gpus: visible devices (respects ``CUDA_VISIBLE_DEVICES``).
        has_flash_attention, has_fused_ops: the Python APIs PaddleNLP calls for ``--use_flash_attention`` and
            ``--use_fused_rms_norm/--use_fused_rope`` exist in this build.
    """

    version: str | None = None
    commit: str | None = None
    import_error: str | None = None
    compiled_with_cuda: bool = False
    compiled_with_nccl: bool = False
    cuda_version: str | None = None
    cudnn_version: str | None = None
    nccl_version: str | None = None
    gpus: tuple[GpuFacts, ...] = ()
    has_flash_attention: bool = False
    has_fused_ops: bool = False


@dataclass(frozen=True)
class EnvironmentFacts:
    """Everything the checks read about the machine, gathered once by :func:`gather_facts`.

    Attributes:
        python_version: ``3.11.7``.
        python_requirement: paddle_llm's ``Requires-Python`` (``>=3.10``), or None when unknown.
        pins: distribution name -> version specifier from ``constraints.txt`` (``{"paddlepaddle": "==3.3.1"}``).
        pins_source: the constraints file read, or None when none was found.
        installed: distribution name -> installed version (None when absent), for every pinned name; Paddle is
            listed under ``paddlepaddle`` whichever of its distributions is installed.
        paddle_distribution: ``paddlepaddle`` or ``paddlepaddle-gpu``, or None.
        paddlenlp_import_error: the exception text when ``import paddlenlp`` failed.
        machine: ``platform.machine()``.
        cpu_model: from ``/proc/cpuinfo``.
        cpu_flags: instruction-set extensions from CPUID (``config.cpu_features``: ``avx2``, ``fma3``,
            ``avx512f``...); None when unknown.
        driver_gpus: GPU names the NVIDIA driver lists, independent of Paddle (a CPU build sees none itself).
        paddle: what Paddle reports.
        output_dir: the directory checked for free space.
        free_disk_bytes: free bytes there (at its nearest existing parent), or None.
        output_dir_problem: why a run could not write ``output_dir`` (a file, read-only), or None.
        total_ram_bytes, available_ram_bytes: host memory, limited by the container's cgroup when it has one.
    """

    python_version: str
    python_requirement: str | None
    pins: dict[str, str]
    pins_source: str | None
    installed: dict[str, str | None]
    paddle_distribution: str | None
    paddlenlp_import_error: str | None
    machine: str
    cpu_model: str | None
    cpu_flags: frozenset[str] | None
    driver_gpus: tuple[str, ...]
    paddle: PaddleFacts
    output_dir: str
    free_disk_bytes: int | None
    total_ram_bytes: int | None
    available_ram_bytes: int | None
    output_dir_problem: str | None = None


@dataclass(frozen=True)
class TrainingPlan:
    """The run the user intends, from their training flags.

    Attributes:
        device: ``--device`` as given, or None when not given.
        use_flash_attention, use_fused_ops: whether those switches are on.
        processes: training processes on this host (``--nproc_per_node`` / ``--gpus`` count).
        estimate: the memory estimator's answer for the plan, or None (no ``--model_name_or_path``, or an error).
        estimate_error: why there is no estimate.
    """

    device: str | None = None
    use_flash_attention: bool = False
    use_fused_ops: bool = False
    processes: int = 1
    estimate: MemoryEstimate | None = None
    estimate_error: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------------


def parse_constraints(text: str) -> dict[str, str]:
    """``constraints.txt`` text -> ``{distribution: specifier}``; comments and blank lines are skipped.

    Raises:
        ValueError: a line that is not a requirement.
    """
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement as err:
            raise ValueError(f"{CONSTRAINTS_FILE} line {number}: {err}") from None
        pins[requirement.name.lower()] = str(requirement.specifier)
    return pins


def version_satisfies(installed: str, specifier: str) -> bool:
    """Whether ``installed`` meets ``specifier``, ignoring build suffixes (``3.3.1.post118``, ``3.3.1+cu118``).

    Paddle's GPU index tags wheels with ``.postNNN`` or a local ``+cuNNN`` for the CUDA version; that is not a
    different Paddle release.
    """
    try:
        version = Version(installed)
    except InvalidVersion:
        return False
    without_build = re.sub(r"\.post\d+$", "", version.public)
    return any(SpecifierSet(specifier).contains(candidate, prereleases=True) for candidate in (installed, without_build))


def format_version_code(code: int | str | None) -> str | None:
    """cuDNN and NCCL report ``major*1000 + minor*100 + patch`` (``8906`` -> 8.9.6), or, from cuDNN 9 and NCCL
    2.9 on, ``major*10000 + minor*100 + patch`` (``90100`` -> 9.1.0, ``21602`` -> 2.16.2). ``0``/None -> None."""
    try:
        value = int(code)
    except (TypeError, ValueError):
        return None
    if value <= 0:
        return None
    major_unit = 10000 if value >= 10000 else 1000
    return f"{value // major_unit}.{(value % major_unit) // 100}.{value % 100}"


def _capability_text(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def training_device(facts: EnvironmentFacts, plan: TrainingPlan) -> str:
    """The device the run will use: ``--device`` when given, else a GPU when Paddle can use one."""
    if plan.device:
        return plan.device.split(":")[0]
    return "gpu" if facts.paddle.compiled_with_cuda and facts.paddle.gpus else "cpu"


# ----------------------------------------------------------------------------------------------------------------
# Checks: pure functions of (facts, plan)
# ----------------------------------------------------------------------------------------------------------------


def check_python(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    if not facts.python_requirement:
        return CheckResult("python", Status.SKIP, f"{facts.python_version} (paddle_llm's Requires-Python is unknown)")
    found = f"{facts.python_version} (needs {facts.python_requirement})"
    if version_satisfies(facts.python_version, facts.python_requirement):
        return CheckResult("python", Status.OK, found)
    return CheckResult(
        "python", Status.FAIL, found,
        f"create the environment with a Python that meets {facts.python_requirement} (3.11 is what CI tests)",
    )


def _unpinned(name: str, found: str) -> CheckResult:
    return CheckResult(name, Status.WARN, f"{found}; no pin found", f"run from a paddle_llm checkout, which has {CONSTRAINTS_FILE}")


def _pin_install_hint(facts: EnvironmentFacts) -> str:
    constraints = facts.pins_source or CONSTRAINTS_FILE
    return f"pip install -c {constraints} -r requirements.txt"


def check_paddle(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    pinned = facts.pins.get("paddlepaddle")
    paddle = facts.paddle
    installed = facts.installed.get("paddlepaddle")
    gpu_build = facts.paddle_distribution == "paddlepaddle-gpu" or paddle.compiled_with_cuda or bool(facts.driver_gpus)
    version_wanted = pinned.lstrip("=") if pinned and pinned.startswith("==") else None
    if gpu_build:
        install = f"pip install paddlepaddle-gpu=={version_wanted or '<pinned version>'} -i {PADDLE_GPU_INDEX}"
        install += " (pick the cuXXX index that matches your driver; docs/install.md, 'GPU install')"
    else:
        install = f"pip install paddlepaddle=={version_wanted or '<pinned version>'}"
    if installed is None and paddle.version is None:
        return CheckResult("paddle", Status.FAIL, "not installed", install)
    version = paddle.version or installed
    name = facts.paddle_distribution or "paddle"
    if paddle.import_error:
        return CheckResult("paddle", Status.FAIL, f"{name} {version}: import failed: {paddle.import_error}", install)
    if version == "0.0.0":
        # Develop (nightly) builds all report 0.0.0; PaddleNLP's old llama notes asked for one.
        commit = f" (develop build, commit {paddle.commit[:10]})" if paddle.commit else " (develop build)"
        return CheckResult(
            "paddle", Status.FAIL, f"{name} {version}{commit}; tested: {pinned}",
            f"develop builds change APIs PaddleNLP relies on; {install}",
        )
    if not pinned:
        return _unpinned("paddle", f"{name} {version}")
    found = f"{name} {version} (tested: {pinned})"
    if version_satisfies(version, pinned):
        return CheckResult("paddle", Status.OK, found)
    return CheckResult("paddle", Status.FAIL, found, install)


def check_paddlenlp(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    pinned = facts.pins.get("paddlenlp")
    installed = facts.installed.get("paddlenlp")
    install = f"pip install paddlenlp{pinned or ''} (every pin at once: {_pin_install_hint(facts)})"
    if installed is None:
        return CheckResult("paddlenlp", Status.FAIL, "not installed", install)
    if facts.paddlenlp_import_error:
        return CheckResult("paddlenlp", Status.FAIL, f"{installed}: import failed: {facts.paddlenlp_import_error}", install)
    if not pinned:
        return _unpinned("paddlenlp", installed)
    found = f"{installed} (tested: {pinned})"
    if version_satisfies(installed, pinned):
        return CheckResult("paddlenlp", Status.OK, found)
    return CheckResult("paddlenlp", Status.FAIL, found, install)


def check_other_pins(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    """The remaining pins (datasets, pyarrow, protobuf...): each works around a known breakage, so a mismatch is a
    warning rather than a certain failure."""
    if facts.pins_source is None:
        return CheckResult(
            "other pins", Status.WARN, f"{CONSTRAINTS_FILE} not found",
            f"run from a paddle_llm checkout (its {CONSTRAINTS_FILE} lists every tested version)",
        )
    others = {name: spec for name, spec in facts.pins.items() if name not in ("paddlepaddle", "paddlenlp")}
    wrong = []
    for name, spec in sorted(others.items()):
        installed = facts.installed.get(name)
        if installed is None or not version_satisfies(installed, spec):
            wrong.append(f"{name} {installed or 'missing'} (tested: {spec})")
    if not wrong:
        return CheckResult("other pins", Status.OK, f"{len(others)} packages as pinned")
    return CheckResult("other pins", Status.WARN, "; ".join(wrong), _pin_install_hint(facts))


def check_cpu(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    model = f"{facts.cpu_model}: " if facts.cpu_model else ""
    if facts.machine.lower() not in ("x86_64", "amd64"):
        return CheckResult("cpu instructions", Status.SKIP, f"{model}{facts.machine}: AVX applies to x86-64 only")
    if facts.cpu_flags is None:
        return CheckResult("cpu instructions", Status.SKIP, f"{model}unknown (no /proc/cpuinfo)")
    has = [flag for flag in ("avx", "avx2", "avx512f") if flag in facts.cpu_flags]
    found = f"{model}{', '.join(f.upper() for f in has) or 'no AVX'}"
    if "avx" not in facts.cpu_flags:
        return CheckResult(
            "cpu instructions", Status.FAIL, found,
            "Paddle's PyPI wheels need AVX (import paddle dies with an illegal instruction): use a machine with AVX "
            "(any x86-64 CPU since 2011, and every cloud VM), or a no-AVX Paddle build from Paddle's install guide",
        )
    if "avx2" not in facts.cpu_flags:
        return CheckResult(
            "cpu instructions", Status.WARN, found,
            "no AVX2: Paddle runs, but its oneDNN kernels take slower paths; expect lower CPU throughput",
        )
    return CheckResult("cpu instructions", Status.OK, found)


def check_cpu_kernel_paths(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    if facts.machine.lower() not in ("x86_64", "amd64") or facts.cpu_flags is None:
        return CheckResult("cpu kernel paths", Status.SKIP, "x86-64 only")
    features = cpu_features.CpuFeatures(facts.cpu_flags, "facts")
    return CheckResult("cpu kernel paths", Status.OK, f"{features.isa.name}: {'; '.join(cpu_features.describe(features))}")


def check_device(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    usable_gpu = facts.paddle.compiled_with_cuda and bool(facts.paddle.gpus)
    if plan.device is None:
        device = training_device(facts, plan)
        if device == "cpu":
            return CheckResult(
                "device", Status.WARN, "cpu (no --device given)",
                "the training scripts default to --device gpu, which this machine cannot use: pass --device cpu",
            )
        return CheckResult("device", Status.OK, "gpu (no --device given; the scripts' default)")
    errors = validate_device({"device": plan.device}, usable_gpu)
    if errors:
        return CheckResult("device", Status.FAIL, f"--device {plan.device}", errors[0])
    return CheckResult("device", Status.OK, f"--device {plan.device}")


def check_gpu(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    paddle = facts.paddle
    wants_gpu = training_device(facts, plan) == "gpu"
    if not paddle.compiled_with_cuda:
        if facts.driver_gpus:
            return CheckResult(
                "gpu", Status.FAIL if wants_gpu else Status.WARN,
                f"the driver lists {len(facts.driver_gpus)} GPU(s) ({facts.driver_gpus[0]}), but Paddle is a CPU build",
                f"pip install paddlepaddle-gpu from Paddle's index ({PADDLE_GPU_INDEX}; docs/install.md, 'GPU install')",
            )
        return CheckResult("gpu", Status.SKIP, "none (CPU build of Paddle, no NVIDIA driver)")
    if not paddle.gpus:
        return CheckResult(
            "gpu", Status.FAIL if wants_gpu else Status.WARN,
            f"Paddle is built for CUDA {paddle.cuda_version} but sees no GPU",
            "check nvidia-smi, the driver, and CUDA_VISIBLE_DEVICES",
        )
    models = {}
    for gpu in paddle.gpus:
        label = f"{gpu.name} (compute capability {_capability_text(gpu.compute_capability)}, {format_bytes(gpu.total_memory_bytes)})"
        models[label] = models.get(label, 0) + 1
    devices = ", ".join(f"{count} x {label}" for label, count in models.items())
    runtime = f"CUDA {paddle.cuda_version}, cuDNN {paddle.cudnn_version or 'not loaded'}"
    found = f"{devices}; {runtime}"
    if not paddle.cudnn_version:
        return CheckResult(
            "gpu", Status.FAIL, found, "cuDNN did not load: reinstall paddlepaddle-gpu from Paddle's index, which bundles it"
        )
    return CheckResult("gpu", Status.OK, found)


def check_nccl(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    paddle = facts.paddle
    if not paddle.compiled_with_cuda:
        return CheckResult("nccl", Status.SKIP, "CPU build (multi-process CPU runs use gloo)")
    found = f"NCCL {paddle.nccl_version}" if paddle.compiled_with_nccl and paddle.nccl_version else "no NCCL"
    if paddle.compiled_with_nccl and paddle.nccl_version:
        return CheckResult("nccl", Status.OK, found)
    if len(paddle.gpus) > 1 or plan.processes > 1:
        return CheckResult(
            "nccl", Status.FAIL, found,
            "multi-GPU training needs NCCL: install the paddlepaddle-gpu wheel from Paddle's index (it bundles NCCL)",
        )
    return CheckResult("nccl", Status.WARN, found, "fine for one GPU; multi-GPU training will need NCCL")


def check_flash_attention(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    gpus = facts.paddle.gpus if facts.paddle.compiled_with_cuda else ()
    if not gpus or training_device(facts, plan) != "gpu":
        return CheckResult("flash attention", Status.SKIP, "no GPU: --use_flash_attention falls back to standard attention")
    old = sorted({g.compute_capability for g in gpus if not supports_flash_attention(g.compute_capability)})
    if old:
        found = (
            f"compute capability {', '.join(map(_capability_text, old))} < {_capability_text(FLASH_ATTENTION_MIN_CAPABILITY)} "
            "(needs Ampere, e.g. A100, A10, RTX 30xx, or newer)"
        )
        why = "flash attention on this GPU makes the loss fall to 0.00x within a few steps instead of failing"
        if plan.use_flash_attention:
            return CheckResult("flash attention", Status.FAIL, found + "; requested", f"pass --use_flash_attention 0: {why}")
        return CheckResult("flash attention", Status.WARN, found, f"keep --use_flash_attention 0: {why}")
    if not facts.paddle.has_flash_attention:
        status = Status.FAIL if plan.use_flash_attention else Status.WARN
        return CheckResult(
            "flash attention", status, "this Paddle build has no flash attention API",
            "pass --use_flash_attention 0, or install paddlepaddle-gpu 3.x",
        )
    return CheckResult("flash attention", Status.OK, "usable (Ampere or newer)")


def check_fused_ops(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    usable_gpu = facts.paddle.compiled_with_cuda and bool(facts.paddle.gpus) and training_device(facts, plan) == "gpu"
    if not usable_gpu:
        return CheckResult("fused ops", Status.SKIP, "no GPU: --use_fused_rms_norm/--use_fused_rope fall back to composed ops")
    if facts.paddle.has_fused_ops:
        return CheckResult("fused ops", Status.OK, "fused_rms_norm and fused_rotary_position_embedding available")
    return CheckResult(
        "fused ops", Status.FAIL if plan.use_fused_ops else Status.WARN,
        "this Paddle build lacks paddle.incubate's fused_rms_norm/fused_rotary_position_embedding",
        "pass --use_fused_rms_norm 0 --use_fused_rope 0, or install paddlepaddle-gpu 3.x",
    )


def checkpoint_bytes(estimate: MemoryEstimate) -> int:
    """Bytes one checkpoint takes: weights plus optimizer states of every rank (sharded states add up to a whole)."""
    per_rank = estimate.per_device.params + estimate.per_device.optimizer
    return per_rank * estimate.setup.world_size


def check_output_dir(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    if facts.output_dir_problem:
        return CheckResult("output dir", Status.FAIL, facts.output_dir_problem,
                           "pass an --output_dir you can write to (a new directory on a writable disk)")
    return CheckResult("output dir", Status.OK, f"{facts.output_dir}: writable")


def check_disk(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    if facts.free_disk_bytes is None:
        return CheckResult("disk", Status.SKIP, f"{facts.output_dir}: free space unknown")
    found = f"{format_bytes(facts.free_disk_bytes)} free in {facts.output_dir}"
    if plan.estimate is not None:
        # Two checkpoints exist at once while the newer is written and the older rotated out, plus the final model.
        needed = 2 * checkpoint_bytes(plan.estimate) + plan.estimate.per_device.params * plan.estimate.setup.world_size
        found += f"; the run needs about {format_bytes(needed)} (2 checkpoints + final model)"
        if facts.free_disk_bytes < needed:
            return CheckResult(
                "disk", Status.FAIL, found,
                "free space, or point --output_dir at a larger disk; --save_total_limit 1 keeps one checkpoint",
            )
        return CheckResult("disk", Status.OK, found)
    if facts.free_disk_bytes < MIN_FREE_DISK_BYTES:
        return CheckResult("disk", Status.WARN, found, "checkpoints of real models take GBs: free space or pick another --output_dir")
    return CheckResult("disk", Status.OK, found)


def check_ram(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    if plan.estimate is None:
        hint = plan.estimate_error or "pass --model_name_or_path and your training flags to compare RAM with the estimate"
        total = f"{format_bytes(facts.total_ram_bytes)} RAM; " if facts.total_ram_bytes else ""
        return CheckResult("ram", Status.SKIP, f"{total}no estimate", hint)
    needed = plan.estimate.per_host_cpu
    if facts.total_ram_bytes is None:
        return CheckResult("ram", Status.SKIP, f"estimate {format_bytes(needed)}; RAM unknown")
    available = facts.available_ram_bytes if facts.available_ram_bytes is not None else facts.total_ram_bytes
    found = f"estimate {format_bytes(needed)} per host; {format_bytes(available)} available of {format_bytes(facts.total_ram_bytes)}"
    smaller = "lower --per_device_train_batch_size or --max_seq_length, add --recompute 1, or use LoRA (--lora 1)"
    if needed > facts.total_ram_bytes:
        return CheckResult("ram", Status.FAIL, found, f"the run cannot fit in this machine's RAM: {smaller}")
    if needed > available:
        return CheckResult("ram", Status.WARN, found, f"stop other processes first, or {smaller}")
    return CheckResult("ram", Status.OK, found)


def check_gpu_memory(facts: EnvironmentFacts, plan: TrainingPlan) -> CheckResult:
    gpus = facts.paddle.gpus if facts.paddle.compiled_with_cuda else ()
    if plan.estimate is None or not gpus or training_device(facts, plan) != "gpu":
        return CheckResult("gpu memory", Status.SKIP, "no estimate or no GPU")
    needed = plan.estimate.per_device.total
    smallest = min(g.total_memory_bytes for g in gpus)
    usable = int(smallest * (1 - HEADROOM))
    found = f"estimate {format_bytes(needed)} per GPU; {format_bytes(usable)} usable of {format_bytes(smallest)}"
    if needed > usable:
        return CheckResult(
            "gpu memory", Status.FAIL, found,
            "add --recompute 1, --sharding stage2, or --fp16/--bf16 --fp16_opt_level O2; `paddle-llm estimate` plans a layout",
        )
    return CheckResult("gpu memory", Status.OK, found)


CHECKS = (
    check_python,
    check_paddle,
    check_paddlenlp,
    check_other_pins,
    check_cpu,
    check_cpu_kernel_paths,
    check_device,
    check_gpu,
    check_nccl,
    check_flash_attention,
    check_fused_ops,
    check_output_dir,
    check_disk,
    check_ram,
    check_gpu_memory,
)


def run_checks(facts: EnvironmentFacts, plan: TrainingPlan) -> list[CheckResult]:
    """Every check, in table order. Pure: the same facts and plan give the same rows."""
    return [check(facts, plan) for check in CHECKS]


def blocks_training(results: list[CheckResult]) -> bool:
    return any(result.status is Status.FAIL for result in results)


def format_table(results: list[CheckResult]) -> str:
    """The table as text: one line per check, its fix indented below it."""
    name_width = max(len(r.name) for r in results)
    status_width = max(len("status"), *(len(r.status.value) for r in results))
    lines = [f"{'check'.ljust(name_width)}  {'status'.ljust(status_width)}  found"]
    for result in results:
        lines.append(f"{result.name.ljust(name_width)}  {result.status.value.ljust(status_width)}  {result.found}")
        if result.fix:
            lines.append(f"{''.ljust(name_width)}  {''.ljust(status_width)}  fix: {result.fix}")
    failed = sum(r.status is Status.FAIL for r in results)
    warned = sum(r.status is Status.WARN for r in results)
    if failed:
        lines.append(f"\n{failed} check(s) FAILED: training would not start or would give wrong numbers; apply the fixes above.")
    else:
        lines.append(f"\nready to train ({warned} warning(s)).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Gathering facts: the only part that reads the machine
# ----------------------------------------------------------------------------------------------------------------


def find_constraints_file() -> Path | None:
    """``constraints.txt``: shipped inside the package when installed with it as package data, else the checkout's.

    One file is the source of truth for every pin; the Makefile installs with it and the doctor reads it.
    """
    packaged = files("paddle_llm").joinpath(CONSTRAINTS_FILE)
    if packaged.is_file():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / CONSTRAINTS_FILE
    return checkout if checkout.is_file() else None


def _python_requirement() -> str | None:
    try:
        return importlib.metadata.metadata("paddle_llm").get("Requires-Python")
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        return tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}).get("requires-python")
    return None


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model_name(text: str) -> str | None:
    """``/proc/cpuinfo`` text -> the first processor's model name. Its flags are not read: under an emulator they
    are the host's, not the CPU that executes."""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return model.group(1).strip() if model else None


def _driver_gpus() -> tuple[str, ...]:
    """GPU names from the NVIDIA driver's /proc files: visible even when Paddle is a CPU build."""
    root = "/proc/driver/nvidia/gpus"
    names = []
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        info = read_text(os.path.join(root, entry, "information")) or ""
        match = re.search(r"^Model:\s*(.+)$", info, re.MULTILINE)
        names.append(match.group(1).strip() if match else entry)
    return tuple(names)


def _nearest_existing(path: str) -> str:
    directory = os.path.abspath(path)
    while not os.path.exists(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    return directory


def _output_dir_problem(path: str) -> str | None:
    """Why a run could not write ``path``: it is a file, or it (or the nearest parent it would be made in) does not
    take a new file. A real file is written, since permission bits do not stop root but a read-only mount does."""
    directory = _nearest_existing(path)
    if not os.path.isdir(directory):
        return f"{directory} is a file, not a directory"
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return f"{directory} is not writable ({err.strerror or err})"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is not writable (permissions)"
    return None


def _free_disk(path: str) -> int | None:
    directory = _nearest_existing(path)
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _paddle_facts(may_import: bool) -> PaddleFacts:
    if not may_import:
        return PaddleFacts(import_error="not imported: this CPU lacks AVX, which Paddle's wheels need")
    try:
        import paddle
    except Exception as err:  # noqa: BLE001 - any import failure is the finding
        return PaddleFacts(import_error=f"{type(err).__name__}: {err}".splitlines()[0])
    from paddle.base import core

    compiled_with_cuda = bool(paddle.device.is_compiled_with_cuda())
    gpus: list[GpuFacts] = []
    cudnn = None
    if compiled_with_cuda:
        for index in range(paddle.device.cuda.device_count()):
            props = paddle.device.cuda.get_device_properties(index)
            gpus.append(GpuFacts(props.name, (props.major, props.minor), int(props.total_memory)))
        cudnn = format_version_code(paddle.get_cudnn_version()) if gpus else None
    try:
        import paddle.incubate.nn.functional as incubate_functional

        has_fused = all(hasattr(incubate_functional, n) for n in ("fused_rms_norm", "fused_rotary_position_embedding"))
    except ImportError:
        has_fused = False
    try:
        from paddle.nn.functional import flash_attention  # noqa: F401

        has_flash = True
    except ImportError:
        has_flash = False
    cuda_version = str(paddle.version.cuda())
    return PaddleFacts(
        version=paddle.__version__,
        commit=getattr(paddle.version, "commit", None),
        compiled_with_cuda=compiled_with_cuda,
        compiled_with_nccl=bool(core.is_compiled_with_nccl()),
        cuda_version=None if cuda_version in ("False", "None", "") else cuda_version,
        cudnn_version=cudnn,
        nccl_version=format_version_code(paddle.version.nccl()),
        gpus=tuple(gpus),
        has_flash_attention=has_flash and compiled_with_cuda,
        has_fused_ops=has_fused and compiled_with_cuda,
    )


def _paddlenlp_import_error(paddle_ok: bool) -> str | None:
    if not paddle_ok:
        return "not imported: Paddle did not import"
    try:
        import paddlenlp  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure is the finding
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def gather_facts(output_dir: str) -> EnvironmentFacts:
    """Read the machine: versions, CPU, GPUs as Paddle sees them, disk and memory.

    Paddle is imported only when the CPU has AVX (or is not x86), since the import itself would crash otherwise.
    """
    pins_path = find_constraints_file()
    pins = parse_constraints(pins_path.read_text(encoding="utf-8")) if pins_path else {}
    installed = {name: _installed_version(name) for name in pins}
    paddle_distribution = next((d for d in PADDLE_DISTRIBUTIONS if _installed_version(d)), None)
    installed["paddlepaddle"] = _installed_version(paddle_distribution) if paddle_distribution else None
    installed.setdefault("paddlenlp", _installed_version("paddlenlp"))
    cpuinfo = read_text("/proc/cpuinfo")
    cpu_model = cpu_model_name(cpuinfo) if cpuinfo else None
    features = cpu_features.detect()
    cpu_flags = features.flags if features.source == cpu_features.FROM_CPUID else None
    machine = platform.machine()
    x86 = machine.lower() in ("x86_64", "amd64")
    paddle = _paddle_facts(may_import=not (x86 and cpu_flags is not None and "avx" not in cpu_flags))
    total_ram, available_ram = host_memory()
    return EnvironmentFacts(
        python_version=platform.python_version(),
        python_requirement=_python_requirement(),
        pins=pins,
        pins_source=str(pins_path) if pins_path else None,
        installed=installed,
        paddle_distribution=paddle_distribution,
        paddlenlp_import_error=_paddlenlp_import_error(paddle.import_error is None) if installed.get("paddlenlp") else None,
        machine=machine,
        cpu_model=cpu_model,
        cpu_flags=cpu_flags,
        driver_gpus=_driver_gpus(),
        paddle=paddle,
        output_dir=os.path.abspath(output_dir),
        free_disk_bytes=_free_disk(output_dir),
        total_ram_bytes=total_ram,
        available_ram_bytes=available_ram,
        output_dir_problem=_output_dir_problem(output_dir),
    )


# ----------------------------------------------------------------------------------------------------------------
# The intended run
# ----------------------------------------------------------------------------------------------------------------


def _boolean(text: str) -> bool:
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"takes a boolean (1/0/true/false), got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paddle-llm doctor",
        allow_abbrev=False,  # a pasted flag we do not know must not be taken for one of ours by prefix
        description="Check this machine for the run you intend; paste your training flags (others are ignored).",
    )
    parser.add_argument("--output_dir", default=".", help="where the run will write (checked: writable, free disk)")
    parser.add_argument("--model_name_or_path", default=None, help="preset or model directory, for the memory estimate")
    parser.add_argument("--device", default=None, help="gpu, cpu...; default: what training would pick")
    parser.add_argument("--nproc_per_node", type=int, default=None, help="training processes on this host")
    parser.add_argument("--gpus", default=None, help="paddle.distributed.launch --gpus list, e.g. 0,1,2,3")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    for name in (*TRAINING_DEFAULTS, "max_length", "tensor_parallel_degree", "pipeline_parallel_degree", "lora_rank", "r"):
        parser.add_argument(f"--{name}", type=int, default=None)
    for name in ("fp16_opt_level", "sharding", "recompute_granularity", "optim"):
        parser.add_argument(f"--{name}", default=None)
    for name in (
        "fp16", "bf16", "recompute", "use_flash_attention", "use_fused_rms_norm", "use_fused_rope", "lora",
        "prefix_tuning", "amp_master_grad", "sequence_parallel",
    ):
        parser.add_argument(f"--{name}", type=_boolean, nargs="?", const=True, default=False)
    return parser


def plan_from_args(args: argparse.Namespace, facts: EnvironmentFacts) -> TrainingPlan:
    """Turn the parsed flags into a :class:`TrainingPlan`, with the memory estimate when a model is named."""
    processes = args.nproc_per_node or (len(args.gpus.split(",")) if args.gpus else 1)
    plan = TrainingPlan(
        device=args.device,
        use_flash_attention=args.use_flash_attention,
        use_fused_ops=args.use_fused_rms_norm or args.use_fused_rope,
        processes=processes,
    )
    if not args.model_name_or_path:
        return plan

    flags = {k: v for k, v in vars(args).items() if v is not None}
    if "max_length" in flags:  # finetune_generation.py's name for the sequence length
        flags.setdefault("max_seq_length", flags["max_length"])
    flags = {**TRAINING_DEFAULTS, **flags, "num_gpus": processes, "device": training_device(facts, plan)}
    try:
        return replace(plan, estimate=estimate_for_flags(resolve_model(args.model_name_or_path).config_fields, flags))
    except (ValueError, FileNotFoundError) as err:
        return replace(plan, estimate_error=f"no estimate: {err}")


def main(argv: list[str] | None = None) -> int:
    """``paddle-llm doctor``: print the table; exit 1 when a check failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, ignored = build_parser().parse_known_args(argv)
    facts = gather_facts(args.output_dir)
    plan = plan_from_args(args, facts)
    results = run_checks(facts, plan)
    if args.json:
        print(json.dumps([{**asdict(r), "status": r.status.value} for r in results], indent=2))
    else:
        ignored_flags = sorted({token for token in ignored if token.startswith("--")})
        if ignored_flags:
            print(f"(not needed for these checks: {' '.join(ignored_flags)})\n")
        print(format_table(results))
    return EXIT_BLOCKED if blocks_training(results) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
