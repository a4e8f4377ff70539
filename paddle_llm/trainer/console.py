"""What the training recipes print for the user: one logger, rank 0 only.

Its own module so that everything a recipe runs (``pretrain``, ``finetune``, ``process_exit``) can print through
it without importing the recipe that prints it.
"""

from __future__ import annotations

import logging
import os

# Printed as "[paddle_llm] ..." (config.output); the demo turns its INFO lines off to fit on one screen.
logger = logging.getLogger("paddle_llm.trainer")


def log(message: str, level: int = logging.INFO) -> None:
    """A line for the user, from rank 0 only: every rank would print the same."""
    if int(os.environ.get("PADDLE_TRAINER_ID", "0")) == 0:
        logger.log(level, message)


def warn(message: str) -> None:
    """A warning the user should act on (kept when the demo turns the INFO lines off)."""
    log(message, logging.WARNING)
