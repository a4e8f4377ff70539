"""Preemption: SIGTERM or SIGINT during training saves a complete checkpoint at the next step boundary and exits
with ``checkpoint.EXIT_PREEMPTED`` (75); rerunning the same command resumes from it.

Followed Megatron-LM's ``--exit-signal-handler`` (``megatron/training/dist_signal_handler.py``): the handler only
records the signal, and at each step boundary the ranks combine their flags with one collective, so every rank
stops after the same step and saves the same checkpoint, even when the scheduler signalled only some of them.
Unlike Megatron it is always armed while training (a scheduler's SIGTERM should never lose work), and it watches
SIGINT too (Ctrl-C).

A second signal ends the process at once (the default action of that signal, no cleanup): a save it interrupts
has no completion marker, so it is never resumed and the previous checkpoint stays in use. Paddle's launcher,
when it is itself signalled, forwards SIGTERM to each worker up to three times 0.2 s apart
(``paddle.distributed.launch.utils.process_context.ProcessContext.terminate``); repeats within
``REPEAT_WINDOW_SECONDS`` of the first signal are therefore one request, not a second signal.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time

import paddle
from paddlenlp.trainer import TrainerCallback

from paddle_llm.cpu.threads import launched_processes

REPEAT_WINDOW_SECONDS = 1.0
WATCHED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunPreempted(Exception):
    """Training stopped on a signal after saving ``checkpoint``; raised past the recipe's tail to ``run_recipe``."""

    def __init__(self, cause: str, step: int, checkpoint: str):
        super().__init__(f"{cause}: saved {checkpoint} (step {step})")
        self.step, self.checkpoint = step, checkpoint


class PreemptionCallback(TrainerCallback):
    """Arms the signal handlers for the training loop and turns a recorded signal into save-and-stop at the next
    step boundary, agreed by all ranks."""

    def __init__(self):
        self.signal_number: int | None = None
        self._first_signal_at = 0.0
        self._previous_handlers: dict = {}
        self.stopped_at_step: int | None = None

    def _handle(self, number: int, frame) -> None:
        now = time.monotonic()
        if self.signal_number is None:
            self.signal_number, self._first_signal_at = number, now
            print(
                f"received {signal.Signals(number).name}: saving a checkpoint after this step, then exiting "
                f"(a second signal exits at once without saving)",
                file=sys.stderr,
                flush=True,
            )
            return
        if now - self._first_signal_at < REPEAT_WINDOW_SECONDS:
            return  # the launcher repeating the first request
        print(
            f"received {signal.Signals(number).name} again: exiting now; a save in progress has no completion marker "
            "and is never resumed, the previous checkpoint is intact",
            file=sys.stderr,
            flush=True,
        )
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)

    def on_train_begin(self, args, state, control, **kwargs):
        for number in WATCHED_SIGNALS:
            self._previous_handlers[number] = signal.getsignal(number)
            signal.signal(number, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped_at_step is None:  # a preempted run keeps them until it exits: the launcher may repeat itself
            for number, handler in self._previous_handlers.items():
                signal.signal(number, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self._requested_on_any_rank():
            control.should_save = control.should_log = control.should_training_stop = True
            self.stopped_at_step = state.global_step

    def _requested_on_any_rank(self) -> bool:
        requested = self.signal_number is not None
        if paddle.distributed.get_world_size() <= 1:
            return requested
        flag = paddle.to_tensor([1.0 if requested else 0.0], dtype="float32")
        paddle.distributed.all_reduce(flag)  # SUM: gloo's all_reduce has it for float32
        return flag.item() > 0

    def preempted(self, output_dir: str) -> RunPreempted | None:
        """What to report when training stopped on a signal, else None."""
        if self.stopped_at_step is None:
            return None
        checkpoint = os.path.join(output_dir, f"checkpoint-{self.stopped_at_step}")
        cause = f"{signal.Signals(self.signal_number).name} received" if self.signal_number else "another rank was signalled"
        return RunPreempted(cause, self.stopped_at_step, checkpoint)


def resume_command() -> str:
    """This process's command line as the user typed it (under Paddle's launcher, with the launcher in front:
    a worker does not see the launcher's own flags, so those are the ones to repeat)."""
    script, flags = sys.argv[0], sys.argv[1:]
    if os.path.basename(script) == "__main__.py":
        command = ["python", "-m", os.path.basename(os.path.dirname(script))]
    elif script.endswith(".py"):
        command = ["python", script]
    else:
        command = [os.path.basename(script)]
    if launched_processes() > 1:
        local = os.environ.get("PADDLE_LOCAL_SIZE", str(launched_processes()))
        command = ["python", "-m", "paddle.distributed.launch", "--nproc_per_node", local] + command[1:]
    return shlex.join(command + flags)
