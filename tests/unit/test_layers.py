"""The import contract of paddle_llm: layers that hold, no cycles, and lazy imports only where they buy speed.

Layers, lowest first; a module may import its own layer and the layers below it, never one above::

    0 foundation   paddle_llm (the package root), console, config, files
    1 cpu          cpu (what the processor can do, and the kernels and fast paths chosen from it)
    2 components   data, models, peft, parallel, estimator
    3 inference    inference (the step graph, the decoder, loading a checkpoint and adapter to run it)
    4 trainer      trainer (Trainer classes, callbacks, checkpoints, health, report)
    5 recipes      recipes (the spine and one module per recipe: pretrain, finetune, dpo)
    6 delivery     export, serving (both stand on inference; neither imports the other)
    7 commands     tools (check, doctor, selftest, demo), cli, __main__

``cpu`` sits under the families because each family's fast path (``models/<family>/cpu_fast.py``) is built from
its ops. ``estimator`` is pure maths over model configs, so it sits beside ``models`` (whose registry it reads).
The tools drive every layer below them, like ``cli``. Inside a layer any direction is allowed as long as no
two packages import each other (``data`` asks ``models`` for tokenizers and chat templates, so ``models`` never
imports ``data``; ``serving`` and ``export`` never import each other), and no two modules import each other at all.

Every import counts, at module level or inside a function: an import inside a function is still an edge, it only
runs later. Such a "lazy" import is allowed for one reason only: it keeps a heavy dependency out of a module that
is otherwise light: ``paddle-llm --help`` and ``estimate`` never load Paddle (~0.7 s) or PaddleNLP (~2.5 s), the
doctor's module imports without them (it reports a broken ``import paddle`` instead of dying of it), and the
recipes, ``check`` and serving load them when they run, not when they are imported. So a lazy import must
  * name a package in ``HEAVY`` (each entry says why it is heavy) that the module does not already load at import,
  * or name a paddle_llm module that loads, at import, a package of ``HEAVY`` that this module does not.
Anything else belongs at the top of its file. ``test_help_estimate_and_doctor_import_do_not_load_paddle`` checks
the result in a fresh interpreter.

To change the contract, edit ``LAYERS`` or ``HEAVY`` here, with the reason, in the same commit as the code.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "paddle_llm"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("paddle_llm", "paddle_llm.console", "paddle_llm.config", "paddle_llm.files")),
    ("cpu", ("paddle_llm.cpu",)),
    ("components", ("paddle_llm.data", "paddle_llm.models", "paddle_llm.peft", "paddle_llm.parallel", "paddle_llm.estimator")),
    ("inference", ("paddle_llm.inference",)),
    ("trainer", ("paddle_llm.trainer",)),
    ("recipes", ("paddle_llm.recipes",)),
    ("delivery", ("paddle_llm.export", "paddle_llm.serving")),
    ("commands", ("paddle_llm.tools", "paddle_llm.cli", "paddle_llm.__main__")),
]
LAYER_OF_UNIT = {unit: index for index, (_, units) in enumerate(LAYERS) for unit in units}
ORDER = " -> ".join("/".join(unit.split(".")[-1] for unit in units) for _, units in LAYERS)

# Third-party packages a function may import lazily, and why each is worth it (import times on the 2-core CI box).
HEAVY = {
    "paddle": "~0.7 s, starts its thread pools and C++ logging; --help and estimate never need it, doctor imports it guarded",
    "paddlenlp": "~2.5 s (and loads paddle); only building models, tokenizers and trainers needs it",
    "matplotlib": "~0.15 s plus a font cache built on first use; only report.html's figures need it",
    "openai": "~0.5 s; only the demo's client question needs it",
}
# Loading the key loads these too.
HEAVY_IMPLIES = {"paddlenlp": {"paddle"}}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    path: str  # its file, relative to the repository
    line: int
    text: str  # the import statement, on one line
    target: str  # the imported module, dotted (a paddle_llm module, or a third-party package path)
    function: str | None  # the enclosing function, None at module level

    def where(self) -> str:
        inside = f" (inside {self.function}())" if self.function else ""
        return f"{self.path}:{self.line}: `{self.text}`{inside}"


def _module_files() -> dict[str, str]:
    files = {}
    for directory, subdirectories, names in os.walk(os.path.join(ROOT, PACKAGE)):
        subdirectories[:] = sorted(d for d in subdirectories if d != "__pycache__")
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.relpath(os.path.join(directory, name), ROOT)
            parts = path[: -len(".py")].split(os.sep)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = _module_files()


def _resolve(module: str, path: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The modules an import statement loads: ``from pkg import sub`` names ``pkg.sub`` when that is a module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    return submodules if len(submodules) == len(node.names) else [base, *submodules]


def _imports_of(module: str, path: str) -> list[Import]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found: list[Import] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                text = ast.unparse(child)
                found.extend(Import(module, path, child.lineno, text, target, function) for target in _resolve(module, path, child))
            visit(child, child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function)

    visit(tree, None)
    return found


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports_of(module, path)]
INTERNAL = [imp for imp in IMPORTS if imp.target == PACKAGE or imp.target.startswith(PACKAGE + ".")]


def unit_of(module: str) -> str:
    """The package (``paddle_llm.data``) or top-level module (``paddle_llm.tools.doctor``) a module belongs to."""
    return ".".join(module.split(".")[:2])


def _ancestors(module: str) -> list[str]:
    """The packages whose ``__init__`` runs when ``module`` is imported, and the module itself."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES]


@cache
def heavy_loads(module: str) -> frozenset[str]:
    """The ``HEAVY`` packages that importing ``module`` loads (module-level imports, followed through paddle_llm)."""
    loads: set[str] = set()
    seen: set[str] = set()
    stack = _ancestors(module)
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for imp in IMPORTS:
            if imp.source != current or imp.function is not None:
                continue
            if imp.target.split(".")[0] == PACKAGE:
                stack.extend(_ancestors(imp.target))
            elif imp.target.split(".")[0] in HEAVY:
                root = imp.target.split(".")[0]
                loads |= {root, *HEAVY_IMPLIES.get(root, ())}
    return frozenset(loads)


def _cycles(edges: dict[tuple[str, str], list[Import]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def _describe_cycles(edges: dict[tuple[str, str], list[Import]], what: str) -> list[str]:
    problems = []
    for component in _cycles(edges):
        members = set(component)
        lines = [
            f"  {imp.where()}"
            for (a, b), imps in sorted(edges.items())
            if a in members and b in members
            for imp in imps
        ]
        problems.append(
            f"cycle rule: the {what} {', '.join(component)} import each other; break it by moving the shared code "
            "into the lower one (or a new module both import). The edges:\n" + "\n".join(lines)
        )
    return problems


def _report(problems: list[str]) -> str:
    return f"{len(problems)} import contract violation(s) (see tests/unit/test_layers.py's docstring):\n\n" + "\n\n".join(problems)


def test_every_module_has_a_layer():
    units = sorted({unit_of(module) for module in MODULES if module != PACKAGE})
    missing = [unit for unit in units if unit not in LAYER_OF_UNIT]
    assert not missing, f"add {missing} to LAYERS in tests/unit/test_layers.py, in the layer they belong to"


def test_imports_flow_down_the_layers():
    problems = []
    for imp in INTERNAL:
        source, target = unit_of(imp.source), unit_of(imp.target)
        if LAYER_OF_UNIT.get(target, 0) > LAYER_OF_UNIT.get(source, 0):
            source_layer, target_layer = LAYERS[LAYER_OF_UNIT[source]][0], LAYERS[LAYER_OF_UNIT[target]][0]
            problems.append(
                f"{imp.where()}\n  layer rule: {source} ({source_layer}) must not import {target} ({target_layer}); "
                f"imports flow {ORDER}. Move the code both need down to {source}'s layer or below, or move this "
                f"code up to {target_layer}."
            )
    assert not problems, _report(problems)


def test_no_cycle_between_packages():
    edges: dict[tuple[str, str], list[Import]] = {}
    for imp in INTERNAL:
        source, target = unit_of(imp.source), unit_of(imp.target)
        if source != target:
            edges.setdefault((source, target), []).append(imp)
    problems = _describe_cycles(edges, "packages")
    assert not problems, _report(problems)


def test_no_cycle_between_modules():
    edges: dict[tuple[str, str], list[Import]] = {}
    for imp in INTERNAL:
        if imp.source != imp.target:
            edges.setdefault((imp.source, imp.target), []).append(imp)
    problems = _describe_cycles(edges, "modules")
    assert not problems, _report(problems)


def test_function_level_imports_only_for_heavy_dependencies():
    problems = []
    for imp in (imp for imp in IMPORTS if imp.function is not None):
        already = heavy_loads(imp.source)
        root = imp.target.split(".")[0]
        if root == PACKAGE:
            gain = set().union(*(heavy_loads(module) for module in _ancestors(imp.target))) - already
            if not gain:
                problems.append(
                    f"{imp.where()}\n  lazy-import rule: {imp.target} loads no heavy package that {imp.source} does "
                    "not already load, so the lazy import buys nothing; move it to the top of the file."
                )
        elif root not in HEAVY:
            problems.append(
                f"{imp.where()}\n  lazy-import rule: {root} is not a heavy dependency (HEAVY: {', '.join(HEAVY)}); "
                "move the import to the top of the file."
            )
        elif root in already:
            problems.append(
                f"{imp.where()}\n  lazy-import rule: {imp.source} already loads {root} when it is imported, so the "
                "lazy import buys nothing; move it to the top of the file."
            )
    assert not problems, _report(problems)


def test_help_estimate_and_doctor_import_do_not_load_paddle():
    """What the lazy imports are for, run for real: ``--help`` and ``estimate`` never load Paddle, and the doctor's
    module imports without it (the doctor imports Paddle itself, guarded, to report a broken install)."""
    code = (
        "import contextlib, io, json, sys\n"
        "from paddle_llm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    codes = [main(['--help']), main(['estimate', '--model_name_or_path', 'tiny-llama'])]\n"
        "import paddle_llm.tools.doctor\n"
        "print(json.dumps([codes, sorted(m for m in ('paddle', 'paddlenlp') if m in sys.modules)]))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    codes, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert codes == [0, 0]
    assert loaded == [], f"--help, estimate or importing the doctor loaded {loaded}: find the import that does it"
