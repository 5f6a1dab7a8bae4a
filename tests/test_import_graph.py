"""The four packages' import graph: arrows point one way (DESIGN §1) and no module imports itself in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedcommon", "fedserver", "fedclient", "fedadmin")
# Which packages each package may import (besides itself).
ALLOWED = {"fedcommon": set(), "fedserver": {"fedcommon"}, "fedclient": {"fedcommon"}, "fedadmin": {"fedcommon"}}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "wire" in parts:  # generated code
                continue
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (lazy and TYPE_CHECKING imports included)."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = {
            dep
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for dep in _imported(module, path, node, modules)
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_any_package():
    assert cycles(import_graph()) == []


def test_packages_import_only_fedcommon_sideways():
    sideways = [
        f"{module} -> {dep}"
        for module, deps in import_graph().items()
        for dep in deps
        if dep.split(".")[0] != module.split(".")[0] and dep.split(".")[0] not in ALLOWED[module.split(".")[0]]
    ]
    assert sideways == []


def test_the_checker_finds_a_cycle_and_a_sideways_import():
    graph = {"fedserver.a": {"fedserver.b"}, "fedserver.b": {"fedserver.a"}, "fedserver.c": set()}
    assert cycles(graph) == [["fedserver.a", "fedserver.b"]]
    assert _imported(
        "fedserver.x",
        ROOT / "fedserver" / "x.py",
        ast.parse("from fedclient import admin").body[0],
        {"fedclient.admin": Path("a"), "fedserver.x": Path("b")},
    ) == ["fedclient.admin"]
