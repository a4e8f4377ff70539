"""How a rank of a multi-process launch ends once its run succeeded: together with its peers, without native teardown.

Why: 2-process CPU launches (tensor parallel, tensor-parallel LoRA) sometimes ended with rank 0 killed by SIGABRT
(exit -6) after training and saving were done: in three CI runs, and once in three local runs, but not in 72 local
repetitions of the same test since. Exit-time aborts in Paddle jobs come from the C++ static destructors
that ``exit()`` runs after the interpreter has shut down (process groups, stores, the kernel registry, each
destroyed in an order nothing guarantees), and, with gloo, from one rank tearing down while its peer still holds
connections to it. So a successful rank waits for every rank at a barrier, runs the interpreter's exit hooks
(Python-level cleanup: logging, DataLoader shared memory, child processes, Paddle's own registries), and leaves
with ``os._exit``, which skips the destructors. Everything the run writes is closed before the barrier.
"""

from __future__ import annotations

import atexit
import os
import sys

from paddle_llm.config.threads import launched_processes


def end_launched_run(exit_code: int) -> int:
    """Return ``exit_code`` unchanged, except in a multi-process launch whose run succeeded: there, wait for every
    rank, say so on rank 0, and exit the process with code 0 now.

    A failed rank returns its code and exits normally: the launcher stops its peers, so waiting for them could
    only hang.
    """
    import paddle.distributed as dist

    if exit_code != 0 or launched_processes() <= 1 or not dist.is_initialized():
        return exit_code
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"[paddle_llm] all {dist.get_world_size()} ranks finished; exiting without native teardown", file=sys.stderr)
    atexit._run_exitfuncs()  # noqa: SLF001 - the exit hooks a normal exit would run, before os._exit skips them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
