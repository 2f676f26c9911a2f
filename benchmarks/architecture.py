"""The layout's figures, for the working tree or any git revision: modules per package, import
levels, cycles, the requantize flow's body length, the largest class, the README's length.

    PYTHONPATH=. .venv/bin/python benchmarks/architecture.py            # the working tree
    PYTHONPATH=. .venv/bin/python benchmarks/architecture.py --rev REV  # a commit, exported to a temp folder

Levels: a module that imports nothing of requant is level 0, any other is 1 + the highest level it
imports (lazy and TYPE_CHECKING imports included; a cycle counts as one level).
"""

from __future__ import annotations

import argparse
import ast
import collections
import subprocess
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from tests.import_graph import ROOT, cycles, import_levels, read_graph


def figures(root: Path) -> dict:
    """The layout's figures for a checkout at `root`."""
    graph = read_graph(("tasks", "flows"), root=root)
    levels = import_levels(graph)
    per_package = collections.Counter(
        m.rsplit(".", 1)[0] for m, mi in graph.items() if mi.path.name != "__init__.py")
    classes = []
    for mi in graph.values():
        for node in ast.walk(ast.parse(mi.path.read_text())):
            if isinstance(node, ast.ClassDef):
                methods = sum(isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)) for b in node.body)
                classes.append((node.end_lineno - node.lineno + 1, methods, f"{mi.name}.{node.name}"))
    flow = next(n for n in ast.parse((root / "flows" / "requantize.py").read_text()).body
                if isinstance(n, ast.FunctionDef) and n.name == "requantize")
    return {
        "modules per package": dict(sorted(per_package.items())),
        "import levels (tasks)": 1 + max(v for m, v in levels.items() if m.startswith("tasks")),
        "import levels (tasks + flows)": 1 + max(levels.values()),
        "cycles": cycles(graph),
        "requantize flow body (lines)": flow.end_lineno - flow.lineno + 1,
        "largest class (lines, methods)": max(classes),
        "README.md lines": len((root / "README.md").read_text().splitlines()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", help="a git revision to measure instead of the working tree")
    args = parser.parse_args()
    if args.rev is None:
        result = figures(ROOT)
    else:
        archive = subprocess.run(["git", "archive", args.rev], cwd=ROOT, capture_output=True, check=True).stdout
        with tempfile.TemporaryDirectory() as tmp:
            with tarfile.open(fileobj=BytesIO(archive)) as tar:
                tar.extractall(tmp, filter="data")
            result = figures(Path(tmp))
    print(f"layout of {args.rev or 'the working tree'}:")
    for key, value in result.items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
