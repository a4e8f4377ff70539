"""``paddle-llm``: one command, a subcommand per step from raw text to a served model.

Each subcommand lives with the package that owns its job and is imported only when used, so
``paddle-llm --help`` stays instant and a serving host needs no training imports.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Callable

from paddle_llm import __version__
from paddle_llm.console import configure_output
from paddle_llm import recipes

# name -> (module:function taking argv and returning an exit code, one-line help); the training recipes join them
# from their own records (``recipes.RECIPES``), after preprocess.
STEPS_BEFORE_TRAINING: dict[str, tuple[str, str]] = {
    "demo": ("paddle_llm.tools.demo:main", "tiny end-to-end demo on CPU: preprocess, pretrain, generate"),
    "tokenizer": ("paddle_llm.data.tokenizer:main", "train a SentencePiece tokenizer: tokenizer train --input ..."),
    "preprocess": ("paddle_llm.data.preprocess:main", "tokenize jsonl into PaddleNLP's mmap .bin/.idx format"),
}
STEPS_AFTER_TRAINING: dict[str, tuple[str, str]] = {
    "merge-lora": ("paddle_llm.peft.merge:main", "fold a LoRA adapter into its base model: merge-lora --model_name_or_path --lora_path --output_path"),
    "check": ("paddle_llm.tools.check:main", "run every pre-launch check: check [--nproc_per_node N] SCRIPT FLAGS..."),
    "convert-checkpoint": ("paddle_llm.trainer.convert_checkpoint:main", "merge a multi-rank unified checkpoint so one device can resume it"),
    "estimate": ("paddle_llm.estimator.command:main", "memory estimate and layout planner"),
    "export": ("paddle_llm.export.command:main", "export a checkpoint: static inference graph, FastDeploy layout, or a Hugging Face directory (--format hf)"),
    "serve": ("paddle_llm.serving.command:main", "serve a model: OpenAI-compatible REST and gRPC"),
    "selftest": ("paddle_llm.tools.selftest:main", "before a long run: train a tiny twin under its layout and precision, compare with one device"),
    "doctor": ("paddle_llm.tools.doctor:main", "check versions, CPU, GPU, disk and RAM for a run; a fix for each failure"),
    "report": ("paddle_llm.trainer.report:main", "write OUTPUT_DIR/report.html: loss, learning rate, eval, tokens/s, config, memory"),
}


def subcommands() -> dict[str, tuple[Callable[[list[str]], int] | str, str]]:
    """name -> (the function taking argv and returning an exit code, or where to import it from; one-line help),
    in the order ``--help`` lists them."""
    return {
        **STEPS_BEFORE_TRAINING,
        **{recipe.name: (recipe.main, recipe.summary) for recipe in recipes.RECIPES},
        **STEPS_AFTER_TRAINING,
    }


def _usage() -> str:
    known = subcommands()
    width = max(len(name) for name in known)
    rows = "\n".join(f"  {name.ljust(width)}  {text}" for name, (_, text) in known.items())
    return (
        "usage: paddle-llm <subcommand> [flags]\n\n"
        f"subcommands:\n{rows}\n\n"
        "`paddle-llm <subcommand> --help` explains each one's flags."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    known = subcommands()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"paddle-llm: unknown subcommand {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2

    configure_output()  # before the subcommand imports Paddle, whose C++ logging reads its level as it loads
    entry = known[name][0]
    if isinstance(entry, str):
        module_name, function_name = entry.split(":")
        entry = getattr(importlib.import_module(module_name), function_name)
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
