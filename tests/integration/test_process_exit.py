"""A successful rank of a multi-process launch leaves together with its peers and skips native teardown.

Each launch runs two real gloo ranks that record, in files, what happened around ``end_launched_run``: whether it
returned, whether the interpreter's exit hooks ran, whether interpreter teardown ran (a module-level object's
finaliser), and when each rank got there.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import run_script

RANK_SCRIPT = textwrap.dedent(
    """
    import atexit, os, sys, time
    from paddle.distributed import fleet

    fleet.init(is_collective=True)
    from paddle_llm.trainer.process_exit import end_launched_run

    out, exit_code = sys.argv[1], int(sys.argv[2])
    rank = int(os.environ["PADDLE_TRAINER_ID"])

    def record(name, text=""):
        with open(os.path.join(out, f"{name}.{rank}"), "w") as file:
            file.write(text)

    class TornDown:  # finalised at interpreter teardown (which os._exit skips), when builtins are already gone
        def __init__(self):
            self.path = os.path.join(out, f"teardown.{rank}")

        def __del__(self, os_open=os.open, os_close=os.close, flags=os.O_CREAT | os.O_WRONLY):
            os_close(os_open(self.path, flags))

    torn_down = TornDown()
    atexit.register(lambda: record("exit_hooks", repr(time.time())))
    if rank == 0 and exit_code == 0:
        time.sleep(1.5)  # rank 1 must wait for this at the barrier
    record("reached", repr(time.time()))
    returned = end_launched_run(exit_code)
    record("returned", str(returned))
    sys.exit(returned)
    """
)


def launch_ranks(tmp_path, exit_code: int):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    args = ["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "log"), str(script), str(out), str(exit_code)]
    result = run_script(args, timeout=300, check=exit_code == 0, PADDLE_LLM_CPU_KERNELS="0")
    return result, out


def recorded(out, name: str) -> dict[int, str]:
    return {rank: (out / f"{name}.{rank}").read_text() for rank in (0, 1) if (out / f"{name}.{rank}").exists()}


@pytest.mark.slow  # a two-process launch
def test_successful_ranks_wait_for_each_other_run_exit_hooks_and_skip_teardown(tmp_path):
    _, out = launch_ranks(tmp_path, 0)
    assert recorded(out, "returned") == {}, "a successful launched rank must exit inside end_launched_run"
    hooks = recorded(out, "exit_hooks")
    assert sorted(hooks) == [0, 1], "the interpreter's exit hooks (logging, shared memory, children) must still run"
    assert recorded(out, "teardown") == {}, "interpreter and native teardown must be skipped"
    rank0_reached = float(recorded(out, "reached")[0])
    assert float(hooks[1]) >= rank0_reached, "rank 1 left before rank 0 reached the end: no barrier"


@pytest.mark.slow  # a two-process launch
def test_a_failed_rank_returns_its_code_and_exits_normally(tmp_path):
    result, out = launch_ranks(tmp_path, 3)
    assert result.returncode != 0
    returned = recorded(out, "returned")  # the launcher stops the other rank once the first one fails
    assert returned and set(returned.values()) == {"3"}, returned
    assert set(recorded(out, "teardown")) >= set(returned), "a failed rank must exit normally, with teardown"


def test_a_single_process_run_returns_its_code(monkeypatch):
    from paddle_llm.trainer.process_exit import end_launched_run

    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    assert end_launched_run(0) == 0
    assert end_launched_run(2) == 2


@pytest.mark.parametrize("dropped", [False, True])
def test_dropping_paddles_native_teardown_hooks_keeps_its_kernel_registry_through_the_exit_hooks(dropped):
    """The hooks named are the objects Paddle registered: dropped, its kernel registry survives the exit hooks."""
    script = textwrap.dedent(
        f"""
        import atexit, os
        from paddle.base import core
        from paddle_llm.trainer.process_exit import paddle_native_teardown_hooks
        if {dropped}:
            for hook in paddle_native_teardown_hooks():
                atexit.unregister(hook)
        atexit._run_exitfuncs()
        print("kernels after exit hooks:", len(core._get_registered_phi_kernels("function")))
        os._exit(0)
        """
    )
    kernels = int(run_script(["-c", script]).stdout.split("kernels after exit hooks:")[1])
    assert (kernels > 0) == dropped, kernels
