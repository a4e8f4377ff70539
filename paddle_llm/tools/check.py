"""``paddle-llm check``: every check a run makes before it starts, without starting it.

Prefix a launch command with it, keeping the launcher's process count and the script's flags:

    paddle-llm check --nproc_per_node 8 run_pretrain.py --sharding stage2 --model_name_or_path ... --device gpu
    paddle-llm check --gpus 0,1,2,3 finetune_generation.py args.json --tensor_parallel_degree 4

The recipe (``run_pretrain.py``/``pretrain``, ``finetune_generation.py`` or ``run_finetune.py``/``finetune``, or
``run_dpo.py``/``dpo``) is named by the script; without one, fine-tuning flags (``--dataset_name_or_path``, ``--lora``, ``--prefix_tuning``) select fine-tuning.
The world size comes from ``--world_size``, else ``--nproc_per_node`` × ``--nnodes`` (or the ``--gpus`` /
``--devices`` count), else the launcher's environment, else 1. The recipe's own ``setup`` runs the checks, so this
command and the run can never disagree; it also refuses resuming a multi-file unified checkpoint on one process.
Prints ``OK`` and the resolved layout, or every error; exits 2 on errors.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

from paddle_llm.config.parser import ArgumentError
from paddle_llm.config.validation import sharding_stages
from paddle_llm.trainer.convert_checkpoint import single_device_resume_problem
from paddle_llm import recipes
from paddle_llm.recipes import recipe_named
from paddle_llm.recipes.spine import Recipe

EXIT_BAD_CONFIG = 2
# launcher flag -> takes a value; these belong to `paddle.distributed.launch`, never to a recipe
LAUNCHER_FLAGS = ("nproc_per_node", "nnodes", "world_size", "gpus", "devices", "log_dir", "master", "rank", "ips", "job_id")

@dataclass(frozen=True)
class CheckRequest:
    """A check command line split into its parts."""

    recipe: Recipe
    world_size: int
    recipe_argv: list[str]


def _count(devices: str) -> int:
    return len([d for d in devices.split(",") if d.strip()])


def split_command(argv: list[str], environ=os.environ) -> CheckRequest:
    """Separate launcher flags, the recipe name and the recipe's own arguments; resolve the world size.

    Raises:
        ValueError: a launcher flag has no value or a non-numeric count.
    """
    launcher: dict[str, str] = {}
    recipe = None
    rest: list[str] = []
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        name, _, inline = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if name in LAUNCHER_FLAGS:
            if not inline and not tokens:
                raise ValueError(f"--{name} needs a value")
            launcher[name] = inline or tokens.pop(0)
        elif recipe is None and not rest and recipe_named(token) is not None:
            recipe = recipe_named(token)
        else:
            rest.append(token)
    if recipe is None:
        # No script named: the recipe whose own flags appear, else the first one (pretraining).
        flags = {token.split("=")[0] for token in rest}
        recipe = next((r for r in recipes.RECIPES if flags & set(r.own_flags)), recipes.RECIPES[0])
    try:
        if "world_size" in launcher:
            world_size = int(launcher["world_size"])
        elif "nproc_per_node" in launcher or "gpus" in launcher or "devices" in launcher:
            per_node = int(launcher["nproc_per_node"]) if "nproc_per_node" in launcher else _count(launcher.get("gpus") or launcher["devices"])
            world_size = per_node * int(str(launcher.get("nnodes", "1")).split(":")[0])
        else:
            world_size = int(environ.get("PADDLE_TRAINERS_NUM", "1"))
    except ValueError:
        raise ValueError(f"process counts must be whole numbers: {launcher}") from None
    return CheckRequest(recipe, max(1, world_size), rest)


def describe_layout(values, world_size: int) -> str:
    """One line: how the processes divide, and what the global batch is made of."""
    degree = {name: max(1, int(values.get(name) or 1)) for name in ("tensor_parallel_degree", "pipeline_parallel_degree", "sep_parallel_degree")}
    data_ranks = world_size // (degree["tensor_parallel_degree"] * degree["pipeline_parallel_degree"] * degree["sep_parallel_degree"])
    stages = sharding_stages(values.get("sharding"))
    sharding = 1
    if stages and world_size > 1:
        explicit = int(values.get("sharding_parallel_degree") or -1)
        sharding = explicit if explicit > 1 else data_ranks
    per_device = int(values.get("per_device_train_batch_size") or 1)
    accumulation = int(values.get("gradient_accumulation_steps") or 1)
    layout = (
        f"{world_size} process{'es' if world_size > 1 else ''}: data {data_ranks // sharding} × sharding {sharding} × "
        f"pipeline {degree['pipeline_parallel_degree']} × tensor {degree['tensor_parallel_degree']}"
    )
    if stages and sharding > 1:
        layout += f" (sharding {' '.join(stages)})"
    return (
        f"{layout}; global batch {per_device * accumulation * data_ranks} = {per_device} per device × "
        f"{accumulation} accumulation step{'s' if accumulation > 1 else ''} × {data_ranks} data-parallel rank{'s' if data_ranks > 1 else ''}"
    )


@contextlib.contextmanager
def _launcher_world_size(world_size: int):
    """The recipes read the world size from the launcher's variable: set it while their checks run, then put back
    what was there, so a process that calls ``check`` (a notebook, a test) does not later launch as that world."""
    before = os.environ.get("PADDLE_TRAINERS_NUM")
    os.environ["PADDLE_TRAINERS_NUM"] = str(world_size)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PADDLE_TRAINERS_NUM"]
        else:
            os.environ["PADDLE_TRAINERS_NUM"] = before


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    try:
        request = split_command(argv)
    except ValueError as err:
        print(f"paddle-llm check: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    errors: list[str] = []
    plan = None
    try:
        with _launcher_world_size(request.world_size):
            plan = request.recipe.setup(request.recipe_argv)
    except ArgumentError as err:
        errors += str(err).splitlines()
    if plan is not None:
        values = {k: v for group in plan.parsed.groups for k, v in group.items()}
        if request.world_size == 1 and values.get("resume_from_checkpoint"):
            problem = single_device_resume_problem(values["resume_from_checkpoint"])
            errors += [problem] if problem else []
    if errors:
        for line in errors:
            print(f"paddle-llm check: error: {line}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    for warning in plan.warnings:
        print(f"warning: {warning}")
    print(f"OK ({request.recipe.name}): {describe_layout(values, request.world_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
