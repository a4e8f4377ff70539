"""Math-library threads and the other process-wide CPU settings that training on CPU needs.

What Paddle 3.3.1 does on CPU without them, measured on a 2-core AMD EPYC (``benchmarks/cpu_train_speed.py``):

- Threads. ``import paddle`` sets ``OMP_NUM_THREADS=1`` when it is unset and calls MKL with one thread, and even with
  ``OMP_NUM_THREADS=2`` exported MKL stays on one thread until ``paddle.base.core.set_num_threads(n)`` is called
  (a 2048^3 matmul: cpu time / wall time 1.0 before, 2.0 after). MKL's dynamic mode still drops to one thread
  whenever it sees a loaded machine, so a run's speed depends on its neighbours; ``MKL_DYNAMIC=FALSE`` makes the
  count we set the count used. Intel OpenMP's idle threads spin 200 ms before sleeping, which on a shared machine
  steals the core from the next op; we make them sleep at once.
- MKL's code path. Paddle ships MKL-ML, which on a non-Intel CPU picks its slowest GEMM kernels: 34 GFLOP/s instead
  of 78 on one core here. ``MKL_DEBUG_CPU_TYPE=5`` selects the AVX2 kernels; it is read at MKL's first call.
- The heap. Every tensor above ~1 MiB is a fresh ``mmap`` from glibc, page-faulted on first write and unmapped
  when freed: a same-shape multiply of 0.7M floats takes 1.0 ms instead of 0.06 ms. ``mallopt`` keeps freed blocks
  in the heap for reuse, as a caching allocator would (peak memory is kept instead of returned to the OS).
- Strided views. With ``FLAGS_use_stride_kernel`` on (the default), ``transpose`` returns a view that the next
  matmul copies with a slow strided kernel: transpose + matmul + their grads take 9 ms on [8, 128, 4, 64] instead of
  2.5 ms. Off, Paddle copies with its dense transpose kernel, as Paddle 2.x always did.

All of these act on the whole process and some only before the first matrix multiply, so call
``configure_cpu_runtime`` first thing, before building a model.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from paddle_llm import USER_OMP_NUM_THREADS

# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD and M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Tensors below this size come from the heap and stay there when freed. glibc caps the mmap threshold at 32 MiB on
# some versions, so that is the fallback.
_HEAP_CACHE_BYTES = (1 << 30, 32 << 20)
# MKL's domain number for its vector maths library (mkl_types.h: MKL_DOMAIN_VML).
_MKL_DOMAIN_VML = 3
# How long Intel OpenMP's idle threads spin before sleeping (MKL's matrix multiplies and our compiled kernels share
# its threads). Its default, 200 ms, made a 64/2 Llama step 2-3x slower on a machine shared with other processes:
# the spinning thread took the core the next op needed. 0 makes every op pay a thread wake-up (~60 us): a 64/2
# step took 34.9 ms instead of 24.6 ms with 1 ms on an idle 2-core machine, alternating steps in one process.
# With 1 ms, two such trainings sharing the 2 cores ran ~10% slower than with 0; an idle machine is the common case.
OPENMP_BLOCKTIME_MS = 1
# MKL_DEBUG_CPU_TYPE=5 selects MKL's AVX2 kernels regardless of the CPU vendor.
_MKL_AVX2_CPU_TYPE = "5"


def launched_processes() -> int:
    """Training processes in this job, as ``paddle.distributed.launch`` tells each of them (1 when not launched)."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def configure_threads(requested: int | None = None, processes_sharing_cores: int = 1) -> int:
    """Set the math-library (MKL and OpenMP) thread count and return it.

    Args:
        requested: the thread count to use (``--num_threads``); None uses ``OMP_NUM_THREADS`` if the user set it,
            else the available cores.
        processes_sharing_cores: training processes on this host (CPU data parallel); the default count is the
            available cores divided among them, so they do not oversubscribe the cores.

    Returns:
        The thread count set, for the trainer to report at start.

    Raises:
        ValueError: ``requested`` or ``processes_sharing_cores`` is below 1.
    """
    if requested is not None and requested < 1:
        raise ValueError(f"the CPU thread count must be at least 1 (got {requested}); omit it to use every core")
    if processes_sharing_cores < 1:
        raise ValueError(f"processes_sharing_cores must be at least 1 (got {processes_sharing_cores})")

    from_environment = int(USER_OMP_NUM_THREADS) if (USER_OMP_NUM_THREADS or "").isdigit() and int(USER_OMP_NUM_THREADS) > 0 else None
    count = requested or from_environment or max(1, available_cores() // processes_sharing_cores)
    # Paddle's bootstrap pins OMP_NUM_THREADS on import; importing first keeps its "OMP_NUM_THREADS is not 1"
    # warning away, and the variables set afterwards still reach MKL (read at its first call) and child processes.
    import paddle

    os.environ["OMP_NUM_THREADS"] = str(count)
    os.environ["MKL_NUM_THREADS"] = str(count)
    os.environ["MKL_DYNAMIC"] = "FALSE"
    os.environ["KMP_BLOCKTIME"] = str(OPENMP_BLOCKTIME_MS)
    openmp = _paddle_library(paddle, "libiomp5.so")
    if openmp is not None:
        openmp.kmp_set_blocktime(OPENMP_BLOCKTIME_MS)
    paddle.base.core.set_num_threads(count)
    mkl = _paddle_library(paddle, "libmklml_intel.so")  # Paddle loads MKL lazily; setting the threads loads it
    if mkl is not None:
        mkl.MKL_Set_Dynamic(0)  # MKL reads MKL_DYNAMIC at its first call, which may already have happened
        # Paddle's CPU softmax and cross entropy call MKL's vector maths (VML) once per row. With more than one
        # thread each 128-value row forks a thread team: softmax over [8, 8, 128, 128] took 80-120 ms instead of
        # 1.2 ms here. Matrix multiplies (the BLAS domain) keep every thread.
        mkl.MKL_Domain_Set_Num_Threads(1, _MKL_DOMAIN_VML)
    return count


def _paddle_library(paddle, name: str):
    """A native library Paddle already loaded (MKL-ML, Intel OpenMP), or None in a build without it."""
    try:
        return ctypes.CDLL(os.path.join(os.path.dirname(paddle.__file__), "libs", name), mode=os.RTLD_NOLOAD)
    except OSError:
        return None


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _select_mkl_avx2_on_non_intel() -> bool:
    """Make MKL use its AVX2 kernels on AMD and other non-Intel CPUs (it must precede MKL's first call)."""
    if os.environ.get("MKL_DEBUG_CPU_TYPE") or _cpu_vendor() in ("", "GenuineIntel"):
        return False  # already chosen by the user, or Intel, where MKL already picks its best kernels
    os.environ["MKL_DEBUG_CPU_TYPE"] = _MKL_AVX2_CPU_TYPE
    return True


def _keep_freed_tensors_in_heap() -> bool:
    """Stop glibc from mmapping (and unmapping) each large tensor; False where that is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    for size in _HEAP_CACHE_BYTES:
        if libc.mallopt(_M_MMAP_THRESHOLD, size) == 1:
            return libc.mallopt(_M_TRIM_THRESHOLD, size) == 1
    return False


def _use_dense_transposes() -> bool:
    import paddle

    paddle.set_flags({"FLAGS_use_stride_kernel": False})
    return True


@dataclass(frozen=True)
class CpuRuntime:
    """What ``configure_cpu_runtime`` set; ``summary()`` is the line a trainer logs at start."""

    device: str
    threads: int
    cores: int
    mkl_avx2_kernels: bool = False
    heap_caching: bool = False
    dense_transposes: bool = False

    def summary(self) -> str:
        if self.device != "cpu":
            return f"cpu runtime: {self.threads} math threads (device {self.device}; CPU-only settings not applied)"
        settings = [f"{self.threads} math threads of {self.cores} cores (MKL vector maths: 1)"]
        if self.mkl_avx2_kernels:
            settings.append("MKL AVX2 kernels on a non-Intel CPU")
        if self.heap_caching:
            settings.append("freed tensors kept in the heap")
        if self.dense_transposes:
            settings.append("dense transposes (FLAGS_use_stride_kernel=0)")
        return "cpu runtime: " + ", ".join(settings)


def configure_cpu_runtime(
    requested_threads: int | None = None, device: str | None = None, processes_sharing_cores: int = 1
) -> CpuRuntime:
    """Apply every setting in this module's docstring when training on CPU; on other devices only the threads.

    Call it before building the model: MKL reads its environment at its first matrix multiply.

    Args:
        requested_threads: see ``configure_threads``.
        device: the training device (``cpu``, ``gpu``, ``gpu:0``...); None asks Paddle for its current device.
        processes_sharing_cores: see ``configure_threads``.

    Returns:
        What was set.
    """
    import paddle

    device = (device or paddle.device.get_device()).split(":")[0]
    if device != "cpu":
        threads = configure_threads(requested_threads, processes_sharing_cores)
        return CpuRuntime(device=device, threads=threads, cores=available_cores())
    # Before configure_threads: setting MKL's thread count may be its first call, which fixes its kernels.
    mkl_avx2_kernels = _select_mkl_avx2_on_non_intel()
    return CpuRuntime(
        device=device,
        threads=configure_threads(requested_threads, processes_sharing_cores),
        cores=available_cores(),
        mkl_avx2_kernels=mkl_avx2_kernels,
        heap_caching=_keep_freed_tensors_in_heap(),
        dense_transposes=_use_dense_transposes(),
    )
