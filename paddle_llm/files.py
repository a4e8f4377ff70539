"""A user's paths are sacred: what an output may be, writing it atomically, and one writer per output directory.

* ``output_overlap``: an output that equals, contains or sits inside an input would destroy or mix with it; every
  command refuses it before any work starts.
* ``existing_output_refusal``: an existing output directory is replaced only when a previous run of the same
  command wrote it (``OUTPUT_MARKER``), or when the user passes the overwrite flag.
* ``replace_directory_atomically``: a crash never leaves a half-written directory where a finished one is expected.
* ``OutputLock``: a training run holds ``LOCK_FILE`` in its output directory, so two runs never interleave logs or
  resume each other's checkpoints.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Callable, Mapping

OUTPUT_MARKER = ".paddle_llm_output.json"  # {"command": ...}: this directory was written by paddle-llm <command>
LOCK_FILE = ".paddle_llm.lock"  # {"pid", "host", "started"}: a run is writing this directory


class OutputPathError(ValueError):
    """An output path that would destroy an input or someone else's files; the message names flags and paths."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip(os.sep) + os.sep)


def output_overlap(output_flag: str, output_path: str, inputs: Mapping[str, str | tuple[str, ...] | None],
                   may_contain: tuple[str, ...] = ()) -> str | None:
    """Why ``output_path`` may not be written given these inputs, or None.

    Paths are compared resolved (symlinks followed). An input that is not on disk (a preset name) is only refused as
    the output itself.

    Args:
        output_flag: the output's flag as the user typed it, e.g. ``--output_dir``.
        inputs: flag -> input path (or paths), e.g. ``{"--model_name_or_path": "out/base"}``.
        may_contain: input flags the output may hold (a training run resumes a checkpoint inside its own
            ``output_dir``); they are still refused when the output equals them or sits inside them.
    """
    output = _real(output_path)
    pairs = [(flag, path) for flag, paths in inputs.items() for path in ((paths,) if isinstance(paths, str) else paths or ())]
    for flag, path in pairs:
        if not path:
            continue
        source = _real(path)
        if output == source:
            relation = "is"
        elif not os.path.exists(path):
            continue
        elif _inside(source, output) and flag not in may_contain:
            relation = "contains"
        elif _inside(output, source):
            relation = "is inside"
        else:
            continue
        return (
            f"{output_flag} {output_path} {relation} the input {flag} {path}: writing there would overwrite or delete "
            f"the input. Pick an {output_flag} outside every input (e.g. a new directory next to it)"
        )
    return None


def written_by(directory: str) -> str | None:
    """The paddle-llm command whose marker ``directory`` carries, or None."""
    try:
        with open(os.path.join(directory, OUTPUT_MARKER), encoding="utf-8") as f:
            return json.load(f).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def write_marker(directory: str, command: str) -> None:
    """Mark ``directory`` as written by ``paddle-llm <command>``: a later run of it may replace or resume it."""
    with open(os.path.join(directory, OUTPUT_MARKER), "w", encoding="utf-8") as f:
        json.dump({"command": command, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)


def existing_output_refusal(output_flag: str, output_path: str, command: str, overwrite_flag: str, overwrite: bool,
                            not_the_users: tuple[str, ...] = ()) -> str | None:
    """Why ``output_path`` may not be replaced by ``paddle-llm <command>``, or None.

    A missing or empty directory (a lock file, and the paths in ``not_the_users`` aside), or one a previous run of
    ``command`` marked, may be replaced; any other directory only with ``overwrite_flag``. A file is never replaced
    by a directory.
    """
    if os.path.exists(output_path) and not os.path.isdir(output_path):
        return f"{output_flag} {output_path} is a file, not a directory: pick a directory path"
    if not os.path.isdir(output_path) or overwrite or written_by(output_path) == command:
        return None
    ignored = {LOCK_FILE} | {os.path.basename(path) for path in not_the_users
                             if os.path.dirname(os.path.realpath(path)) == os.path.realpath(output_path)}
    others = sorted(set(os.listdir(output_path)) - ignored)
    if not others:
        return None
    return (
        f"{output_flag} {output_path} already holds files paddle-llm {command} did not write ({', '.join(others[:3])}"
        f"{', ...' if len(others) > 3 else ''}): pick a new directory, or pass {overwrite_flag} if they may be replaced"
    )


def check_output_directory(output_flag: str, output_path: str, inputs: Mapping[str, str | None], command: str,
                           overwrite_flag: str = "--overwrite", overwrite: bool = False) -> None:
    """Before any work: refuse an output overlapping an input (whatever ``overwrite`` says), or an existing
    directory ``command`` did not write (unless ``overwrite``).

    Raises:
        OutputPathError: naming the flags and paths, and what to do.
    """
    refusal = output_overlap(output_flag, output_path, inputs) or existing_output_refusal(
        output_flag, output_path, command, overwrite_flag, overwrite)
    if refusal:
        raise OutputPathError(refusal)


def replace_directory_atomically(output_dir: str, write: Callable[[str], None], command: str, prefix: str = ".staging-",
                                 overwrite: bool = False, output_flag: str = "--output_path", overwrite_flag: str = "--overwrite") -> None:
    """Call ``write(staging_dir)``, mark it as ``command``'s, then swap the staging directory into ``output_dir``.

    The staging directory sits next to ``output_dir`` (same filesystem, so the rename is atomic) and is removed
    if ``write`` fails; an existing ``output_dir`` is replaced only once the new one is complete, and only if
    ``existing_output_refusal`` allows it (checked again here: the caller checked before its work started).

    Raises:
        OutputPathError: ``output_dir`` holds files ``command`` did not write and ``overwrite`` is false.
    """
    refusal = existing_output_refusal(output_flag, output_dir, command, overwrite_flag, overwrite)
    if refusal:
        raise OutputPathError(refusal)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        write(staging)
        write_marker(staging, command)
        # mkdtemp makes the directory private, and some writers (Paddle's graph saver) their files; an output
        # directory is shared data.
        os.chmod(staging, 0o755)
        for name in os.listdir(staging):
            path = os.path.join(staging, name)
            if os.path.isfile(path):
                os.chmod(path, 0o644)
        refusal = existing_output_refusal(output_flag, output_dir, command, overwrite_flag, overwrite)
        if refusal:  # someone wrote there while this command worked
            raise OutputPathError(refusal)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class OutputLock:
    """``LOCK_FILE`` in an output directory, held while one run writes there.

    Taken atomically (``O_EXCL``). A lock left by a process that is gone (same host, pid not running) is taken over
    with a warning; one held by a live process, or by another host, is refused with who holds it. Released by
    ``release``, at interpreter exit, and on SIGTERM/SIGINT/SIGHUP when those would otherwise kill the process
    without running exit hooks.
    """

    def __init__(self, directory: str, flag: str = "--output_dir"):
        self.directory, self.flag = directory, flag
        self.path = os.path.join(directory, LOCK_FILE)
        self.held = False
        self._previous_handlers: dict = {}

    def acquire(self, warn: Callable[[str], None]) -> None:
        """Raises: OutputPathError naming the holder."""
        os.makedirs(self.directory, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise OutputPathError(
                        f"{self.flag} {self.directory} is in use by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, started {holder.get('started')}; lock file {self.path}): wait for it "
                        f"to finish or pick another {self.flag}; if that run is gone, delete the lock file"
                    ) from None
                warn(f"{self.path}: taking over the lock of pid {holder.get('pid')} (started {holder.get('started')}), "
                     "which is no longer running on this host")
                os.remove(self.path)
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as f:
                json.dump(record, f)
            self.held = True
            atexit.register(self.release)
            self._release_on_signals()
            return
        raise OutputPathError(f"{self.path}: another run took the lock while a stale one was being replaced; retry")

    def _holder(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}  # being written by its holder right now, or unreadable: not known to be stale

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def _release_on_signals(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: exit hooks still release it
                return

    def _on_signal(self, signum, frame) -> None:
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        if callable(previous):  # e.g. Python's KeyboardInterrupt: the exit hooks release the lock afterwards
            previous(signum, frame)
            return
        if previous == signal.SIG_IGN:
            return
        self.release()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        for signum, handler in self._previous_handlers.items():
            if signal.getsignal(signum) == self._on_signal:  # None: a handler set outside Python, not restorable
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous_handlers.clear()
        try:
            if self._holder().get("pid") == os.getpid():
                os.remove(self.path)
        except OSError:
            pass
