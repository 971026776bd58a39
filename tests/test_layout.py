"""The package's layers: every import (at module level or inside a function) goes down or sideways, never up, and no
two modules import each other, directly or in a circle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vulnsteer

PACKAGE = Path(vulnsteer.__file__).parent
# Lowest first. A module may import its own layer and the ones below.
LAYERS = [
    {"errors"},
    {"cwes", "data", "prompts", "records", "architecture", "verdicts", "models", "metrics", "neardup", "protocol"},
    {"steering"},
    {"engine"},
    {"backends"},
    {"extract"},
    {"experiments"},
    {"pipeline"},
    {"cli"},
]


# Every module, lowest first: a module imports only modules listed before it (its package's `__init__` comes
# after the modules it re-exports). Read top to bottom, it is the order to read the code in; a new module gets a
# place here, and an import that goes against it is a design change to make here first.
ORDER = [
    "errors",
    "neardup",
    "cwes",
    "models",
    "architecture",
    "data",
    "prompts",
    "protocol",
    "records",
    "metrics",
    "verdicts",
    "steering.reft",
    "steering.hooks",
    "steering.buffers",
    "steering",
    "engine.planner",
    "engine.prompt_pass",
    "engine.trunk",
    "engine.static",
    "engine.runners",
    "engine.evaluate",
    "engine.api",
    "engine",
    "backends",
    "extract",
    "extract.activations",
    "extract.llama_cpp",
    "extract.trained",
    "extract.lora",
    "extract.vectors",
    "extract.lm_eval",
    "extract.probe",
    "experiments",
    "experiments.tables",
    "experiments.store",
    "experiments.side_effects",
    "experiments.reasoning",
    "experiments.summary",
    "experiments.backends",
    "experiments.cluster",
    "experiments.sweep",
    "experiments.analysis",
    "experiments.report",
    "pipeline",
    "cli",
]
BENCH = PACKAGE.parent.parent / "bench"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """The vulnsteer modules `path` imports, anywhere in the file."""
    found = set()
    known = modules()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("vulnsteer.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vulnsteer"):
            for alias in node.names:  # `from vulnsteer.engine import planner` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found - {"vulnsteer"}


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    for number, layer in enumerate(LAYERS):
        if top in layer:
            return number
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


@pytest.mark.parametrize("module", sorted(set(modules()) - {"vulnsteer"}))
def test_imports_go_down_or_sideways(module):
    path = modules()[module]
    upward = sorted(target for target in imports(path) if layer_of(target) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports from above: {upward}"


def test_each_module_imports_only_the_modules_before_it():
    listed = [f"vulnsteer.{m}" for m in ORDER]
    assert sorted(listed) == sorted(set(modules()) - {"vulnsteer"}), "ORDER lists exactly the package's modules"
    assert [layer_of(m) for m in listed] == sorted(layer_of(m) for m in listed), "ORDER keeps the layers' order"
    place = {m: k for k, m in enumerate(listed)}
    later = {m: sorted(t for t in imports(modules()[m]) - {m} if place[t] > place[m]) for m in listed}
    assert not any(later.values()), {m: t for m, t in later.items() if t}


def bench_imports() -> list[tuple[str, str, list[str]]]:
    """(script, vulnsteer module, names) for every `from vulnsteer... import ...` in bench/, at any depth."""
    found = []
    for path in sorted(BENCH.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vulnsteer"):
                found.append((str(path.relative_to(BENCH)), node.module, [a.name for a in node.names]))
    return found


def test_every_benchmark_imports_names_that_exist_and_the_package_never_imports_bench():
    """A refactor that renames what a benchmark uses breaks the benchmark only when someone runs it: caught here."""
    import importlib

    assert len(bench_imports()) > 20
    missing = [
        f"{script}: {module}.{name}"
        for script, module, names in bench_imports()
        for name in names
        if not hasattr(importlib.import_module(module), name) and f"{module}.{name}" not in modules()
    ]
    assert not missing, missing
    for path in modules().values():
        assert not any(
            isinstance(n, (ast.Import, ast.ImportFrom)) and "bench" in ast.dump(n)
            for n in ast.walk(ast.parse(path.read_text()))
        ), path


def test_no_import_circles():
    graph = {module: imports(path) - {module} for module, path in modules().items() if module != "vulnsteer"}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import circle: " + " -> ".join(trail + [module])
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            visit(target, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_the_public_api_is_small_typed_and_importable():
    """`from vulnsteer import *` gives the names a user needs, each a documented function or class."""
    assert 8 <= len(vulnsteer.__all__) <= 24
    for name in vulnsteer.__all__:
        value = getattr(vulnsteer, name)
        assert callable(value) and value.__doc__, name


def test_importing_the_library_changes_no_environment_variable():
    """Only the command line sets OMP_WAIT_POLICY: a library import must leave a user's process as it was."""
    code = (
        "import os, sys; before = dict(os.environ); import vulnsteer, vulnsteer.pipeline; "
        "sys.exit(0 if dict(os.environ) == before else 1)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
    cli = "import os, vulnsteer.cli; print(os.environ['OMP_WAIT_POLICY'])"
    assert subprocess.run([sys.executable, "-c", cli], env=env, capture_output=True, text=True).stdout == "PASSIVE\n"


def test_records_load_without_torch():
    """Every layer imports the records; they are plain data, so importing them must not load torch."""
    code = "import sys, vulnsteer.records; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
