"""The import graph of requant's own code, read from the source (nothing is imported).

Used by tests/test_architecture.py (no cycles, stages import only lower stages, MLflow and Prefect
stay where they belong) and by benchmarks/architecture.py (the figures of the layout).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ModuleImports:
    """What one module imports: requant modules (with the line) and third-party top-level names."""

    name: str
    path: Path
    internal: dict[str, int] = field(default_factory=dict)
    external: set[str] = field(default_factory=set)


def module_name(path: Path, root: Path = ROOT) -> str:
    """`tasks/measure/timing.py` -> `tasks.measure.timing`; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that `name` is or lies in (`tasks.a.b.func` -> `tasks.a.b`)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def read_graph(packages: tuple[str, ...] = ("tasks", "flows"), root: Path = ROOT) -> dict[str, ModuleImports]:
    """Every module under `packages` with what it imports, at any depth (lazy and TYPE_CHECKING too)."""
    paths = [p for package in packages for p in sorted((root / package).rglob("*.py"))]
    modules = {module_name(p, root): ModuleImports(module_name(p, root), p) for p in paths}
    known = set(modules)
    for mod in modules.values():
        package = mod.name if mod.path.name == "__init__.py" else mod.name.rpartition(".")[0]
        for node in ast.walk(ast.parse(mod.path.read_text(), str(mod.path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                inner = _resolve(target, known)
                if inner is None:
                    if target.split(".")[0] not in packages:
                        mod.external.add(target.split(".")[0])
                elif inner != mod.name and not mod.name.startswith(inner + "."):
                    mod.internal.setdefault(inner, node.lineno)
    # `from tasks.x import y` names both the package and the module: keep the module only.
    for mod in modules.values():
        for dep in list(mod.internal):
            if any(other.startswith(dep + ".") for other in mod.internal) and modules[dep].path.name == "__init__.py":
                del mod.internal[dep]
    return modules


def cycles(graph: dict[str, ModuleImports]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v].internal:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_levels(graph: dict[str, ModuleImports]) -> dict[str, int]:
    """Each module's level: 0 imports nothing of ours, otherwise 1 + the highest level it imports.

    Modules in one cycle share a level (the cycle is counted as one step).
    """
    component_of = {m: m for m in graph}
    for component in cycles(graph):
        for m in component:
            component_of[m] = component[0]
    levels: dict[str, int] = {}

    def level(m: str, seen: frozenset[str] = frozenset()) -> int:
        c = component_of[m]
        if c in levels:
            return levels[c]
        members = [x for x in graph if component_of[x] == c]
        deps = {component_of[d] for x in members for d in graph[x].internal} - {c}
        levels[c] = 1 + max((level(d) for d in deps), default=-1)
        return levels[c]

    return {m: level(m) for m in graph}
