"""The training recipes, one module each, and the one tuple that lists them.

A recipe module holds what is its own (argument dataclasses, checks, data, trainer) and declares one record,
``RECIPE = Recipe(...)`` (``spine.Recipe``); the flow they share is ``spine``. ``paddle-llm``'s subcommands,
``paddle-llm check SCRIPT ...`` and the root scripts (``run_pretrain.py``, ``finetune_generation.py``,
``run_dpo.py``) all read ``RECIPES``: adding a recipe adds its module, its data reader and one line here.
"""

from __future__ import annotations

import os

from paddle_llm.recipes import dpo, finetune, pretrain
from paddle_llm.recipes.spine import Recipe

RECIPES: tuple[Recipe, ...] = (
    pretrain.RECIPE,
    finetune.RECIPE,
    dpo.RECIPE,
)


def recipe_named(name_or_script: str) -> Recipe | None:
    """The recipe a subcommand name (``dpo``) or a script path (``llm/run_dpo.py``) names; None for neither."""
    name = os.path.basename(name_or_script)
    return next((recipe for recipe in RECIPES if name == recipe.name or name in recipe.scripts), None)


def script_main(script: str) -> int:
    """A root script's body (``run_dpo.py``): run the recipe its file name names on the command line."""
    recipe = recipe_named(script)
    if recipe is None:
        raise SystemExit(f"{script}: no recipe has this script name; the recipes are {', '.join(r.name for r in RECIPES)}")
    return recipe.main()
