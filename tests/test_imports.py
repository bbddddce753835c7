"""The package's import graph, read from the source (nothing is imported): no cycles, none hidden in
functions, no upward import.

An import inside a function hides a cycle until the day someone moves it to the top. Imports under
``if TYPE_CHECKING:`` never run and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "oialr_tune"

# The floors of the package, lowest first, as the data flows (DESIGN.md): a module imports only
# modules on its own floor or below. A new module must be given a floor here.
FLOORS = [
    # helpers with no concept of a run, and the OIALR method (torch only)
    {"oialr_tune", "errors", "files", "stats", "schema", "plugins", "metrics", "safe_load", "precision",
     "oialr", "oialr.controller", "oialr.distributed", "oialr.export", "oialr.lowrank", "oialr.optimizer_state",
     "oialr.presets", "oialr.full_rank", "oialr.selection"},
    # what a run trains on: models, data, the trainer config, the task, its data-parallel workers
    {"models", "vit", "zoo", "config", "splits", "user_data", "data", "tasks", "lr_schedule", "distributed"},
    # search spaces and the checks run before a sweep
    {"space", "space._budget", "space._distributions", "checks"},
    # the records every loop and every sweep writes: the run record and the sweep folder's state
    {"run_record", "sweep_state"},
    # the training loops
    {"loop", "trainer", "lightning", "lightning_trainable", "progress"},
    # reading what runs and sweeps left: the results folder, model files
    {"results", "model_io", "trust", "best_format"},
    # Ray Tune + Optuna
    {"tuning", "tuning.arm", "tuning.cluster", "tuning.collect", "tuning.driver", "tuning.hooks",
     "tuning.parallel", "tuning.search", "tuning.storage", "tuning.study", "tuning.worker", "tuning._internals"},
    # the user's jobs on top
    {"retrain", "compare", "report", "cli"},
]  # fmt: skip
# The config/model/data layer imports itself at module level, except for these deliberate lazy imports:
# vit and zoo import torch, which validating a config (models.check_model_args) must not.
CORE = {"config", "schema", "models", "vit", "zoo", "data", "splits", "user_data", "plugins", "errors", "files"}
LAZY_OK = {("oialr_tune.models", "oialr_tune.vit"), ("oialr_tune.models", "oialr_tune.zoo")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported package module, at module level?) for each import statement in `path`."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()  # statements under `if TYPE_CHECKING:`
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    top = {id(n) for n in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        found += [(t, id(node) in top) for t in targets if t in modules and t != name]
    return found


def _graph() -> dict[str, list[tuple[str, bool]]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, list[tuple[str, bool]]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w, _ in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle() -> None:
    cycles = _cycles(_graph())
    assert cycles == []


def test_the_config_model_and_data_modules_import_each_other_at_module_level() -> None:
    core = {f"oialr_tune.{m}" for m in CORE}
    lazy = {(a, b) for a, imports in _graph().items() if a in core for b, at_top in imports
            if b in core and not at_top}
    assert lazy == LAZY_OK


def test_no_module_is_over_600_lines() -> None:
    """A module that grows past this is doing more than one job: split it by concern."""
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > 600} == {}


def _floor_of() -> dict[str, int]:
    return {f"oialr_tune.{m}" if m != "oialr_tune" else m: i for i, floor in enumerate(FLOORS) for m in floor}


def test_every_module_has_a_floor() -> None:
    assert set(_modules()) == set(_floor_of())


def test_no_module_imports_one_on_a_higher_floor() -> None:
    """Imports inside functions count too: a lazy upward import is still an upward dependency."""
    floor = _floor_of()
    upward = sorted((a, b) for a, imports in _graph().items() for b, _ in imports if floor[b] > floor[a])
    assert upward == []


def test_the_oialr_method_imports_only_torch() -> None:
    """`oialr_tune.oialr` is a plain PyTorch library: besides itself and the standard library, only torch."""
    import sys

    third_party = set()
    for path in (PACKAGE / "oialr").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                third_party |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                third_party.add((node.module or "").split(".")[0])
    assert third_party - set(sys.stdlib_module_names) - {"__future__"} == {"torch"}


def test_the_tests_readme_indexes_every_module() -> None:
    """tests/README.md's index names every module of the package, and only test files that exist."""
    import re

    text = (PACKAGE.parent / "tests" / "README.md").read_text()
    index = text[text.index("## Index"):text.index("## Faults")]
    rows = [line.split("|")[1:3] for line in index.splitlines() if line.startswith("| `")]
    names = {m for cell, _ in rows for m in re.findall(r"`([\w.]+)`", cell)}
    listed = {f"oialr_tune.{m}" if m != "oialr_tune" else m for m in names}
    files = {f for _, cell in rows for f in re.findall(r"`(test_\w+\.py)`", cell)}
    assert listed == set(_modules())
    assert files and all((PACKAGE.parent / "tests" / f).is_file() for f in files)


def test_the_readme_layout_lists_every_module_on_its_floor() -> None:
    """README's Layout names every module, one paragraph per floor of `FLOORS`, lowest first.

    A ``name.py`` in a paragraph about a package (``oialr_tune/tuning/``) is that package's module.
    """
    import re

    text = (PACKAGE.parent / "README.md").read_text()
    section = text[text.index("## Layout"):]
    block = section.split("```")[1]
    modules = _modules()
    floors: list[set[str]] = []
    package = None
    for line in block.splitlines():
        if not line.strip():
            package = None
            continue
        if line.startswith("oialr_tune/"):
            if package is None:
                floors.append(set())
            found = re.match(r"oialr_tune/(\w+)/", line)
            package = found.group(1) if found else ""
            if package:  # the package and its modules
                floors[-1] |= {m for m in modules if f"{m}.".startswith(f"oialr_tune.{package}.")}
        elif not line.startswith(" "):
            package = None  # search_spaces/, tests/, ...: not the package
        if package is None:
            continue
        for name in re.findall(r"\b(\w+)\.py\b", line):
            inside = f"oialr_tune.{package}.{name}"
            floors[-1].add(inside if inside in modules else f"oialr_tune.{name}")
    expected = [{f"oialr_tune.{m}" for m in floor} - {"oialr_tune.oialr_tune"} for floor in FLOORS]
    assert floors == expected
