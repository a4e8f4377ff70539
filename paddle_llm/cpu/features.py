"""What this CPU can execute, read once from CPUID, and every CPU kernel path chosen from it.

Why: some of Paddle's fused CPU kernels use AVX-512 without checking the CPU. On a machine without it (AMD EPYC and
Ryzen before Zen 4, most laptops, many cloud VMs) they die with SIGILL, taking the whole process with them. So the
kernels a run may use are decided here from the CPU's feature bits, never assumed:

- ``PADDLE_CPU_KERNEL_NEEDS``: the Paddle ops whose CPU kernel needs an instruction set extension, with the feature;
  our graphs and layers use such an op only where ``missing_features`` is empty;
- ``kernel_compile_flags``: the ``-m`` flags for ``cpu/kernels.cc`` (never ``-march=native``: under an
  emulator, or a home directory shared by two machines, the compiler's idea of "native" is another CPU's);
- ``inference_passes_to_delete``: Paddle Inference passes that would fuse a graph into such a kernel.

The feature bits come from CPUID and XGETBV as numpy's runtime dispatcher reads them (``__cpu_features__``), not
from ``/proc/cpuinfo``: an emulator (QEMU user mode) passes the host's ``/proc/cpuinfo`` through while executing
only the emulated CPU's instructions, and XGETBV also says whether the OS saves the AVX-512 registers.
"""

from __future__ import annotations

import functools
import importlib
import platform
from dataclasses import dataclass

# numpy's table of the running CPU's features (private module, public name): numpy sets it at import from CPUID,
# for its own SIMD dispatch. Checked against numpy 1.26 and 2.x by tests/unit/test_cpu_features.py.
_NUMPY_FEATURE_TABLES = ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath")

FROM_CPUID = "CPUID"

# The AVX-512 subsets Skylake-SP and every later AVX-512 CPU share (x86-64-v4), which GCC's -mavx512* flags name.
AVX512_CORE = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
AVX2_LEVEL = ("avx", "avx2", "fma3", "f16c")


@dataclass(frozen=True)
class IsaLevel:
    """A vector instruction set level: the features it needs and the compiler flags that target exactly it."""

    name: str
    needs: tuple[str, ...]
    compile_flags: tuple[str, ...]


# Best first. Each level's flags enable only what its features guarantee.
ISA_LEVELS = (
    IsaLevel("avx512", AVX2_LEVEL + AVX512_CORE,
             ("-mavx2", "-mfma", "-mf16c") + tuple(f"-m{feature}" for feature in AVX512_CORE)),
    IsaLevel("avx2", AVX2_LEVEL, ("-mavx2", "-mfma", "-mf16c")),
    IsaLevel("avx", ("avx",), ("-mavx",)),
    IsaLevel("sse4.2", ("sse42",), ("-msse4.2",)),
    IsaLevel("x86-64", (), ()),
)

# Paddle ops whose CPU kernel executes an extension without checking for it, and the feature it needs, as read in
# Paddle's phi/kernels/fusion/cpu sources (checked against 3.3.1). tests/integration/test_portability.py exports,
# serves and trains on an emulated AVX2 CPU, so an op our paths use that needs more than AVX2 fails it.
PADDLE_CPU_KERNEL_NEEDS = {
    # paddle.incubate.nn.functional.fused_rms_norm (rms_norm_quant_avx_kernel.cc: __m512 throughout)
    "fused_rms_norm_quant": "avx512f",
    # the same kernel under its older op name (rms_norm_avx_kernel.cc)
    "rms_norm": "avx512f",
    # paddle.incubate.nn.functional.fused_layer_norm (fused_layer_norm_avx_kernel.cc)
    "fused_bias_residual_layernorm": "avx512f",
    # what oneDNN's self_attention_fuse_pass fuses attention into (scaled_dp_attention_functor.h)
    "self_dp_attention": "avx512f",
}

# Paddle Inference passes that fuse ordinary ops into one of the kernels above, by the op they produce.
INFERENCE_PASSES_PRODUCING = {"self_attention_fuse_pass": "self_dp_attention"}


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's instruction set extensions, lower case (``avx2``, ``fma3``, ``avx512f``, ...)."""

    flags: frozenset[str]
    source: str

    def has(self, *features: str) -> bool:
        return all(feature in self.flags for feature in features)

    @property
    def isa(self) -> IsaLevel:
        return next(level for level in ISA_LEVELS if self.has(*level.needs))


def _numpy_feature_table() -> dict[str, bool] | None:
    for module_name in _NUMPY_FEATURE_TABLES:
        try:
            return dict(importlib.import_module(module_name).__cpu_features__)
        except (ImportError, AttributeError):
            continue
    return None


@functools.lru_cache(maxsize=None)
def detect() -> CpuFeatures:
    """This process's CPU, once. Outside x86-64, or without numpy's table, no extension is assumed."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return CpuFeatures(frozenset(), f"{platform.machine()}: no x86 extensions")
    table = _numpy_feature_table()
    if table is None:
        return CpuFeatures(frozenset(), "CPUID unreadable (numpy has no __cpu_features__): baseline x86-64 assumed")
    return CpuFeatures(frozenset(name.lower() for name, present in table.items() if present), FROM_CPUID)


def missing_features(op_types, features: CpuFeatures) -> dict[str, str]:
    """``{op: feature}`` for each of ``op_types`` whose Paddle CPU kernel needs a feature this CPU lacks."""
    return {op: PADDLE_CPU_KERNEL_NEEDS[op] for op in sorted(set(op_types))
            if op in PADDLE_CPU_KERNEL_NEEDS and not features.has(PADDLE_CPU_KERNEL_NEEDS[op])}


def fused_rms_norm_allowed(features: CpuFeatures) -> bool:
    """Paddle's fused RMSNorm (one op instead of five) has only an AVX-512 CPU kernel."""
    return not missing_features(["fused_rms_norm_quant"], features)


def kernel_compile_flags(features: CpuFeatures) -> tuple[str, ...]:
    return features.isa.compile_flags


def inference_passes_to_delete(features: CpuFeatures) -> list[str]:
    return sorted(name for name, op in INFERENCE_PASSES_PRODUCING.items() if missing_features([op], features))


def describe(features: CpuFeatures) -> list[str]:
    """One phrase per CPU kernel path chosen from the features: what ``paddle-llm doctor`` shows."""
    deleted = inference_passes_to_delete(features)
    return [
        f"compiled kernels {' '.join(kernel_compile_flags(features)) or 'baseline x86-64'}",
        "fused RMSNorm yes" if fused_rms_norm_allowed(features) else "fused RMSNorm no (needs avx512f; composed)",
        f"inference passes without {', '.join(deleted)} (needs avx512f)" if deleted else "all inference passes",
    ]
