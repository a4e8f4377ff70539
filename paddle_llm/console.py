"""What a run prints: our own messages, progress bars, warnings that need action, and errors.

Paddle, PaddleNLP and their dependencies print a lot that a user can neither act on nor change, and it buries the
lines that matter. ``configure_output`` quiets each source below, once, at the start of every entry point
(``paddle-llm``, ``run_pretrain.py``, ``finetune_generation.py``; the server is ``paddle-llm serve``).
``PADDLE_LLM_VERBOSE=1`` leaves every third-party default alone, so everything prints again; child processes
inherit the variable (and ``GLOG_minloglevel``) with the environment.

- Paddle's C++ (glog) warnings, such as PIR's "not support input out tensor" at every export trace: warnings about
  Paddle's internals, never about the user's input. ``GLOG_minloglevel=2`` keeps glog's errors. glog reads it when
  Paddle's library loads, so it must be set before ``import paddle``; a user's own value wins.
- Paddle's "OMP_NUM_THREADS set to N, not 1 ... PLEASE USE OMP_NUM_THREADS WISELY", printed by ``import paddle``
  whenever the variable is above 1: a thread count above 1 is what ``cpu.threads`` chooses on purpose.
- Python warnings from third-party code, listed in ``_NOISY_WARNINGS`` with the reason for each. They are dropped
  where they would be printed (``warnings.showwarning``) rather than by a filter, because importing Paddle installs
  ``simplefilter("always", Warning)`` in front of every filter installed before it.
- The root logger. ``import paddle`` gives it a handler at INFO, so every library's INFO log prints: one
  ``HTTP Request:`` line per ``openai`` client call (httpx), matplotlib's font cache, setuptools' build steps.
  Configuring the root logger first at WARNING makes Paddle leave it alone.
- Paddle's custom-operator loader logs "using custom operator only" each time our compiled kernels load.
- PaddleNLP's logger (see ``_PaddleNLPFilter``): its DEBUG configuration dumps and its INFO chatter ("Loading
  configuration file", "All the weights of ... were initialized", "Model weights saved in") go; the trainer's
  loss, evaluation and metrics lines, the checkpoint it saves, and its warnings stay.
- What third-party steps print to stdout and stderr directly (PaddleNLP's sample-index builder, Paddle's compiler
  run for our kernels): ``captured_output`` holds it and shows it only if the step fails.

Our own messages go through the ``paddle_llm`` logger, printed as ``[paddle_llm] ...`` at INFO in both modes;
``log`` and ``warn`` are how the training recipes and everything they run print them, from rank 0 only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings

VERBOSE_VARIABLE = "PADDLE_LLM_VERBOSE"
# glog severities: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL.
_GLOG_ERRORS_ONLY = "2"
# Paddle's bootstrap prints these two lines to sys.stderr when OMP_NUM_THREADS is above 1 (paddle/base/__init__.py).
_PADDLE_THREAD_WARNING = re.compile(r"^(WARNING: OMP_NUM_THREADS set to \d+, not 1\..*|PLEASE USE OMP_NUM_THREADS WISELY\.)\n?", re.M)

# (warning category name, message pattern, why nobody needs to see it). Matched by name: the categories live in
# modules (Paddle's VisibleDeprecationWarning) that must not be imported just to be compared against.
_NOISY_WARNINGS = (
    ("UserWarning", "No ccache found",
     "importing paddle.utils.cpp_extension advises ccache for repeated rebuilds; our kernels are built once and cached"),
    ("UserWarning", "Setuptools is replacing distutils",
     "setuptools' shim notices that Paddle imported distutils first; nothing in the user's reach"),
    ("UserWarning", "Tensor do not have 'place' interface for pir graph mode",
     "raised while PaddleNLP's forward is traced for export; the traced graph does not use the place"),
    ("VisibleDeprecationWarning", r'API "paddle\.incubate\.',
     "PaddleNLP's models call paddle.incubate APIs deprecated in Paddle 3.3; the pinned PaddleNLP cannot change"),
)
_configured = False


def verbose() -> bool:
    """True when ``PADDLE_LLM_VERBOSE`` asks for every third-party line."""
    return os.environ.get(VERBOSE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no", "off")


def configure_output() -> None:
    """Apply this module's policy to the process; call it first thing in an entry point, before ``import paddle``.

    Our own logger is set up in both modes; with ``PADDLE_LLM_VERBOSE=1`` nothing else changes. Calling it again
    does nothing.
    """
    global _configured
    if _configured:
        return
    _configured = True
    _configure_our_logger()
    if verbose():
        return
    if "paddle" not in sys.modules:
        os.environ.setdefault("GLOG_minloglevel", _GLOG_ERRORS_ONLY)
    warnings.showwarning = _drop_noisy_warnings(warnings.showwarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # A filter, not a level: the module sets its logger's level to INFO when it is imported.
    logging.getLogger("utils.cpp_extension").addFilter(lambda record: record.levelno >= logging.WARNING)
    logging.getLogger("PaddleNLP").addFilter(_PaddleNLPFilter())
    if _threads_above_one() and "paddle" not in sys.modules:
        _import_paddle_without_thread_warning()


class _OurFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"[paddle_llm] {level}{record.getMessage()}"


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when each line is logged, so a later redirect (pytest's capture, a
    notebook's cell output, ``contextlib.redirect_stderr``) receives our lines like any other stderr output."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _configure_our_logger() -> None:
    logger = logging.getLogger("paddle_llm")
    handler = _CurrentStderrHandler()
    handler.setFormatter(_OurFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # Paddle's root handler would print each line a second time in its own format


def _drop_noisy_warnings(show):
    rules = [(category, re.compile(pattern)) for category, pattern, _ in _NOISY_WARNINGS]

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if not any(category.__name__ == name and pattern.search(text) for name, pattern in rules):
            show(message, category, filename, lineno, file, line)

    return showwarning


class _PaddleNLPFilter(logging.Filter):
    """PaddleNLP's log lines a user reads: its trainer's progress and results, and every warning and error.

    PaddleNLP logs at DEBUG (its configuration dumps) and INFO for everything else; only the INFO lines matched by
    ``KEPT_INFO`` are kept. ``DROPPED_WARNINGS`` are warnings that ask nothing of the user.
    """

    KEPT_INFO = re.compile(
        r"(loss|(eval|train|test)_\w+): "  # the trainer's log line every --logging_steps, at evaluation, at the end
        r"|\*{5} \w+ metrics \*{5}$|  \w+ +="  # trainer.log_metrics: the train / eval results table
        r"|Saving model checkpoint to "  # where each --save_steps checkpoint goes
    )
    DROPPED_WARNINGS = re.compile(
        r"evaluation_strategy reset to IntervalStrategy\.STEPS for do_eval"  # --do_eval with --eval_steps means that
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno <= logging.INFO:
            return record.levelno == logging.INFO and bool(self.KEPT_INFO.match(message))
        return not (record.levelno == logging.WARNING and self.DROPPED_WARNINGS.match(message))


def _threads_above_one() -> bool:
    value = os.environ.get("OMP_NUM_THREADS", "1")
    return value.isdigit() and int(value) > 1


def _import_paddle_without_thread_warning() -> None:
    """Import Paddle now, with its thread-count warning taken out of what the import prints (the rest is kept)."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            import paddle  # noqa: F401
    finally:
        sys.stderr.write(_PADDLE_THREAD_WARNING.sub("", printed.getvalue()))


@contextlib.contextmanager
def captured_output():
    """Hold everything printed inside the block, by this process's Python and native code and by its children, and
    print it only if the block raises. With ``PADDLE_LLM_VERBOSE=1`` it prints as it goes."""
    if verbose():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = (os.dup(1), os.dup(2))
        os.dup2(held.fileno(), 1)
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for target, descriptor in zip((1, 2), saved):
                os.dup2(descriptor, target)
                os.close(descriptor)
            if failed:
                held.seek(0)
                os.write(2, held.read())


# Printed as "[paddle_llm] ..."; the demo turns its INFO lines off to fit on one screen.
recipe_logger = logging.getLogger("paddle_llm.trainer")


def log(message: str, level: int = logging.INFO) -> None:
    """A line for the user, from rank 0 only: every rank would print the same."""
    if int(os.environ.get("PADDLE_TRAINER_ID", "0")) == 0:
        recipe_logger.log(level, message)


def warn(message: str) -> None:
    """A warning the user should act on (kept when the demo turns the INFO lines off)."""
    log(message, logging.WARNING)
