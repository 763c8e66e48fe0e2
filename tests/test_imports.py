"""The import graph: no module imports itself through others, and loading a config stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("actors", "analysis", "bench", "cluster", "common")


def modules() -> dict[str, Path]:
    """Every module of the project by its dotted name (a package by its own)."""
    found = {"moe_outliers": ROOT / "moe_outliers.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict) -> set[str]:
    """The project modules `path` imports, at the top or inside a function (a lazy import is
    still an arrow); `from package import submodule` is an arrow to the submodule."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(known)
            found |= submodules or {node.module}
            if len(submodules) < len(node.names):
                found.add(node.module)
    return found & set(known)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    assert graph["actors.stage"] >= {"actors.handoff", "actors.shard"}  # the graph is read at all
    assert circles(graph) == []


def test_a_circle_is_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_loading_a_config_imports_neither_polars_matplotlib_nor_ray():
    code = ("import sys, cluster.config; cluster.config.load_config('configs/tiny_moe.yaml'); "
            "print(sorted(m for m in ('polars', 'matplotlib', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_packages_import_downward_only():
    # common/ imports only itself; actors/ and analysis/ never each other; nothing imports the
    # driver (cluster/) but the driver, the API and the benches.
    allowed = {"common": {"common"}, "actors": {"actors", "common"}, "analysis": {"analysis", "common"},
               "cluster": {"actors", "analysis", "cluster", "common"}}
    known = modules()
    upward = [f"{name} -> {other}" for name, path in known.items() for other in imports(path, known)
              if name.split(".")[0] in allowed and other.split(".")[0] not in allowed[name.split(".")[0]]]
    assert upward == []
