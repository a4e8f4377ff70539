"""How a rank of a multi-process launch ends once its run succeeded: together with its peers, without native teardown.

Why: 2-process CPU launches (tensor parallel, tensor-parallel LoRA) sometimes ended with rank 0 killed by SIGABRT
(exit -6) after training and saving were done: in three CI runs, and once in three local runs, but not in 72 local
repetitions of the same test since. At exit Paddle destroys its native state in two places:
  * exit hooks registered by ``paddle.base`` (``ProcessGroupIdMap.destroy`` tears down the gloo process groups and
    their connections, plus the kernel registry, device manager and executor caches), which Paddle registers to
    "clean up in advance manually" rather than leave that state to the C++ static destructors;
  * the C++ static destructors that ``exit()`` runs after the interpreter has shut down.
Either can run in one rank while its peer is closing the connections between them. The abort never reproduced
here, so this removes those suspects rather than a diagnosed cause: a successful rank waits for
every rank at a barrier, drops Paddle's native-teardown hooks, runs the remaining exit hooks (Python-level cleanup:
logging, DataLoader shared memory, child processes), and leaves with ``os._exit``, which skips the destructors.
The operating system reclaims what the teardown would have freed.
"""

from __future__ import annotations

import atexit
import os
import sys

from paddle_llm.cpu.threads import launched_processes
from paddle_llm.console import log


def paddle_native_teardown_hooks() -> list:
    """The exit hooks ``paddle.base`` registers to free native state (their registration order)."""
    from paddle.base import core

    return [
        core.clear_executor_cache,
        core.pir.clear_cinn_compilation_cache,
        core.clear_device_manager,
        core.clear_kernel_factory,
        core.ProcessGroupIdMap.destroy,
    ]


def end_launched_run(exit_code: int, ranks_agree: bool | None = None) -> int:
    """Return ``exit_code`` unchanged, except in a multi-process launch whose ranks all end the same way (a run
    that succeeded, or one every rank stopped after the same preemption checkpoint): there, wait for every rank,
    say so on rank 0, and exit the process with ``exit_code`` now.

    A failed rank returns its code and exits normally: the launcher stops its peers, so waiting for them could
    only hang.

    Args:
        ranks_agree: every rank reaches this point with this code (default: when ``exit_code`` is 0).
    """
    import paddle.distributed as dist

    if ranks_agree is None:
        ranks_agree = exit_code == 0
    if not ranks_agree or launched_processes() <= 1 or not dist.is_initialized():
        return exit_code
    dist.barrier()
    log(f"all {dist.get_world_size()} ranks finished; exiting without native teardown")
    for hook in paddle_native_teardown_hooks():
        atexit.unregister(hook)
    atexit._run_exitfuncs()  # noqa: SLF001 - the Python-level hooks a normal exit would run, before os._exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
