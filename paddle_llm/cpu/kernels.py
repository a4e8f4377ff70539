"""Build and load ``kernels.cc``, the fused fp32 CPU kernels behind ``cpu_fast``'s composites.

The source is compiled once per CPU instruction set level (``config.cpu_features``), Python, Paddle version and
source text, with Paddle's own JIT extension builder (it needs a C++ compiler, ~20 s), into
``$PADDLE_LLM_KERNEL_CACHE`` (default ``~/.cache/paddle_llm/cpu_kernels``). Later processes load the built library
directly. Concurrent first uses (a multi-process launch) wait on a file lock, so one of them compiles and the rest
reuse its library.

When compiling is impossible (no compiler, a read-only home) or ``PADDLE_LLM_CPU_KERNELS=0`` is set, ``load()``
returns None, the reason is logged once, and ``cpu_fast`` keeps its pure-Paddle composites: the same maths, about
a third slower per step at small shapes.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from paddle_llm.cpu import features as cpu_features
from paddle_llm.console import captured_output


logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cc")
MODULE_NAME = "paddle_llm_cpu_kernels"
SWITCH_VARIABLE = "PADDLE_LLM_CPU_KERNELS"
CACHE_VARIABLE = "PADDLE_LLM_KERNEL_CACHE"
# The instruction set flags come from config.cpu_features (this CPU's CPUID), and the cache key includes them.
# -ffast-math is what lets GCC call glibc's vectorised expf (8 values per call); the kernels never test for
# infinities, so finite maths is harmless.
BASE_COMPILE_FLAGS = ["-O3", "-ffast-math", "-fopenmp"]
# The attention kernel calls MKL's sgemm; it is compiled only where Paddle's wheel ships MKL (x86-64 builds do).
WITH_MKL_FLAG = "-DPADDLE_LLM_WITH_MKL"
MKL_LIBRARY = "libmklml_intel.so"


def _paddle_ships(library: str) -> bool:
    import paddle

    return (Path(paddle.__file__).parent / "libs" / library).exists()


def compile_flags() -> list[str]:
    isa_flags = list(cpu_features.kernel_compile_flags(cpu_features.detect()))
    return BASE_COMPILE_FLAGS + isa_flags + ([WITH_MKL_FLAG] if _paddle_ships(MKL_LIBRARY) else [])


def link_flags() -> list[str]:
    """Link the OpenMP runtime and the MKL Paddle uses, so kernels and matrix multiplies share one thread pool.

    With GNU OpenMP (-fopenmp's default) each kernel left its threads spinning while MKL's next matrix multiply
    wanted the same cores: a 256/4 Llama step took 307 ms instead of 192. Intel OpenMP implements the GNU entry
    points, and ``configure_threads`` already makes its idle threads sleep at once.
    """
    flags = ["-l:libiomp5.so"] if _paddle_ships("libiomp5.so") else ["-fopenmp"]
    return flags + ([f"-l:{MKL_LIBRARY}"] if _paddle_ships(MKL_LIBRARY) else [])


def build_directory() -> Path:
    """Where this source is built for this CPU's instruction set level, Python and Paddle."""
    import paddle

    key = hashlib.sha256()
    isa = cpu_features.detect().isa
    for part in (SOURCE.read_bytes(), paddle.__version__.encode(), sys.version.encode(), platform.machine().encode(),
                 isa.name.encode(), " ".join(isa.needs).encode(), " ".join(compile_flags() + link_flags()).encode()):
        key.update(part)
    root = Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "paddle_llm" / "cpu_kernels")
    return root / key.hexdigest()[:16]


def _import_built(directory: Path) -> ModuleType:
    # Paddle's loader for a built library; load() below would re-run its setup.py (a 3 s subprocess) every time.
    from paddle.utils.cpp_extension.extension_utils import _import_module_from_library

    return _import_module_from_library(MODULE_NAME, str(directory / MODULE_NAME))


def _build_and_import(directory: Path) -> ModuleType:
    from paddle.utils.cpp_extension import load as jit_load

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be compiling the same source
        if (directory / MODULE_NAME / f"{MODULE_NAME}.so").exists():
            return _import_built(directory)
        logger.info("compiling paddle_llm's CPU kernels into %s (once per machine, about 20 s)", directory)
        started = time.perf_counter()
        with captured_output():  # Paddle's build prints its setup.py steps and g++ lines; kept for a failed build
            module = jit_load(MODULE_NAME, [str(SOURCE)], extra_cxx_cflags=compile_flags(), extra_ldflags=link_flags(),
                              build_directory=str(directory))
        logger.info("compiled paddle_llm's CPU kernels in %.0f s", time.perf_counter() - started)
        return module


_unavailable_because: list[str] = []  # why load() returned None, once it has


@functools.lru_cache(maxsize=None)
def load() -> ModuleType | None:
    """The compiled kernels module, or None (with the reason logged once) when they cannot be used here."""
    if os.environ.get(SWITCH_VARIABLE, "1") == "0":
        _unavailable_because.append(f"{SWITCH_VARIABLE}=0")
        logger.info("paddle_llm CPU kernels off (%s=0): using the pure-Paddle composites", SWITCH_VARIABLE)
        return None
    try:
        directory = build_directory()
        if (directory / MODULE_NAME / f"{MODULE_NAME}.so").exists():
            return _import_built(directory)
        return _build_and_import(directory)
    except Exception as error:  # any failure to build or load means the pure-Paddle composites, never a crash
        _unavailable_because.append(f"{type(error).__name__}: {error}"[:300])
        logger.warning("paddle_llm CPU kernels unavailable, using the pure-Paddle composites (slower): %s", error)
        return None


def describe() -> str:
    """What the CPU composites run on, for the line a trainer logs at start (loads the kernels if needed)."""
    if load() is not None:
        return "compiled CPU kernels"
    return f"pure-Paddle composites ({_unavailable_because[-1]})"


# The panel width of paddle_llm_packed_matmul's weight layout (kPanelColumns in kernels.cc).
PANEL_COLUMNS = 16


def pack_panels(weight: np.ndarray) -> np.ndarray:
    """A ``[k, n]`` weight as ``paddle_llm_packed_matmul`` reads it: ``[ceil(n / 16), k, 16]``, each panel of 16
    columns contiguous, the last one zero-padded. The layout is the same on every CPU, so export writes it once."""
    k, n = weight.shape
    panels = -(-n // PANEL_COLUMNS)
    padded = np.zeros((k, panels * PANEL_COLUMNS), dtype=weight.dtype)
    padded[:, :n] = weight
    return np.ascontiguousarray(padded.reshape(k, panels, PANEL_COLUMNS).transpose(1, 0, 2))
