"""A recipe is one record. A tiny example recipe, declared here as its own module would declare it and added to
``recipes.RECIPES`` (the one registry line), becomes a ``paddle-llm`` subcommand, a script name that
``paddle-llm check`` and the root scripts accept, and runs through the spine's flow: help, parse, validate with one
line per problem and exit code 2, fit. Nothing else names it, which is what ``docs/dev/adding-a-recipe.md`` claims:
a new recipe touches its module, its data reader and one line in ``recipes/__init__.py``."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import pytest

from paddle_llm import cli, recipes
from paddle_llm.config.parser import ArgumentError, format_help, parse_flags
from paddle_llm.recipes.spine import EXIT_BAD_CONFIG, Recipe, RecipeSetup, resolve_source
from paddle_llm.tools import check


# ----- what recipes/echo.py would hold -----

@dataclass
class EchoArguments:
    """The example's flags."""

    model_name_or_path: str = field(default="tiny-llama", metadata={"help": "a preset or a model directory"})
    words: int = field(default=1, metadata={"help": "how many words to say"})


def _arguments():
    return (EchoArguments,)


def _setup(argv: list[str]) -> RecipeSetup:
    parsed = parse_flags(argv, _arguments())
    values = parsed.as_dict()
    if values["words"] < 1:
        raise ArgumentError(f"--words {values['words']}: must be at least 1")
    return RecipeSetup(parsed, resolve_source(values), [])


def _fit(plan: RecipeSetup) -> int:
    print(" ".join(["echo"] * plan.parsed.value("words")), f"({plan.source.family.name})")
    return 0


RECIPE = Recipe(
    name="echo",
    scripts=("run_echo.py",),
    summary="say a word a few times (an example recipe)",
    arguments=_arguments,
    setup=_setup,
    fit=_fit,
    help=lambda: format_help(_arguments(), "usage: run_echo.py --words N"),
)


# ----- the one registry line -----

@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(recipes, "RECIPES", (*recipes.RECIPES, RECIPE))


def test_the_shipped_recipes_are_records_with_their_paddlenlp_script_names():
    assert [(recipe.name, recipe.scripts) for recipe in recipes.RECIPES] == [
        ("pretrain", ("run_pretrain.py",)),
        ("finetune", ("finetune_generation.py", "run_finetune.py")),
        ("dpo", ("run_dpo.py",)),
    ]
    assert recipes.recipe_named("llm/run_dpo.py") is recipes.RECIPES[2]
    assert recipes.recipe_named("orpo") is None


def test_a_registered_recipe_is_a_subcommand_listed_in_help(registered, capsys):
    assert cli.main(["--help"]) == 0
    assert "echo                say a word a few times (an example recipe)" in capsys.readouterr().out
    assert cli.main(["echo", "--words", "3"]) == 0
    assert capsys.readouterr().out.strip() == "echo echo echo (llama)"
    assert cli.main(["echo", "--help"]) == 0
    assert "--words" in capsys.readouterr().out


def test_a_registered_recipes_errors_are_one_line_each_and_exit_2(registered, capsys):
    assert cli.main(["echo", "--words", "0"]) == EXIT_BAD_CONFIG
    assert capsys.readouterr().err.strip() == "paddle-llm echo: error: --words 0: must be at least 1"


def test_check_takes_a_registered_recipes_script_name(registered, capsys):
    world_before = os.environ.get("PADDLE_TRAINERS_NUM")
    assert check.main(["--nproc_per_node", "2", "run_echo.py", "--words", "2"]) == 0
    assert capsys.readouterr().out.startswith("OK (echo): 2 processes")
    # check tells the recipe the world size only while it checks: a later run from this process is not a 2-rank one
    assert os.environ.get("PADDLE_TRAINERS_NUM") == world_before
    assert check.main(["run_echo.py", "--words", "0"]) == check.EXIT_BAD_CONFIG
    assert "paddle-llm check: error: --words 0: must be at least 1" in capsys.readouterr().err


def test_a_root_script_runs_the_recipe_its_file_name_names(registered, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["run_echo.py", "--words", "2"])
    assert recipes.script_main("/anywhere/run_echo.py") == 0
    assert capsys.readouterr().out.strip() == "echo echo (llama)"
