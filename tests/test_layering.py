"""The layers of docs/architecture.md, checked on the source: envs/ below agents/ below the craft_bench top layer,
and no import cycles anywhere (imports inside functions count: a cycle hidden in a function is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> the import name it installs as (pyproject.toml's package-dir).
SOURCES = {"envs": "craft_bench.envs", "agents": "craft_bench.agents", "craft_bench": "craft_bench"}
#: The top layer: what envs/ and agents/ may never import.
TOP = ("craft_bench.run", "craft_bench.bench", "craft_bench.leaderboard", "craft_bench.loggers",
       "craft_bench.registration", "craft_bench.__main__")


def _modules() -> dict[str, Path]:
    """Every module of the project by its import name."""
    found = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules `name` imports, resolved to the most specific module that exists."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    resolved = set()
    for target in targets:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _is_top(module: str) -> bool:
    return module == "craft_bench" or any(module == top or module.startswith(top + ".") for top in TOP)


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith(("craft_bench.envs", "craft_bench.agents"))])
def test_lower_layers_never_import_the_top_layer(name):
    upward = sorted(target for target in GRAPH[name] if _is_top(target))
    assert not upward, f"{name} imports the top layer: {upward}"


@pytest.mark.parametrize("name", [m for m in MODULES if m.startswith("craft_bench.envs")])
def test_envs_never_import_agents(name):
    upward = sorted(target for target in GRAPH[name] if target.startswith("craft_bench.agents"))
    assert not upward, f"{name} imports agents/: {upward}"


def test_no_import_cycles():
    # Package __init__ files re-export their submodules; an edge into a package's own __init__ from inside the
    # package is how Python resolves `from package.sub import x`, not a dependency, so it is left out.
    def edges(name):
        return {t for t in GRAPH[name] if not name.startswith(t + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name):
        state[name] = 1
        stack.append(name)
        for target in sorted(edges(name)):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
