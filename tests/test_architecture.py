"""The layout holds: stages as packages in one order, no import cycles, MLflow and Prefect where they belong.

Read from the source (tests/import_graph.py), so a violation names the module and line to fix.
"""

from __future__ import annotations

import ast

import pytest

from tests.import_graph import ROOT, cycles, read_graph

# Lowest first: a package of tasks/ imports only itself and the packages before it (tasks/__init__.py).
ORDER = ["core", "recipes", "config", "data", "models", "serve", "track", "measure", "build", "evaluate", "decide",
         "fleet", "train"]
# The served models' own code: MLflow executes it when loading a logged model (tasks/serve/*_pyfunc.py).
SERVED_MODEL_CODE = {"tasks.serve.serving_pyfunc", "tasks.serve.generation_pyfunc"}


@pytest.fixture(scope="module")
def graph():
    return read_graph(("tasks", "flows"))


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[0] == "tasks" and len(parts) > 2 else ""


def test_no_module_of_tasks_or_flows_is_in_an_import_cycle(graph):
    assert cycles(graph) == []


def test_every_module_of_tasks_lives_in_a_stage_package_that_says_what_it_owns(graph):
    loose = [m for m, mi in graph.items() if m.startswith("tasks.") and m.count(".") == 1
             and mi.path.name != "__init__.py" and not mi.path.parent.joinpath(mi.path.stem, "__init__.py").exists()]
    assert loose == [], "modules directly under tasks/: move each into the package of its stage"
    packages = sorted(p.name for p in (ROOT / "tasks").iterdir() if (p / "__init__.py").exists())
    assert packages == sorted(ORDER)
    for name in ORDER:
        doc = ast.get_docstring(ast.parse((ROOT / "tasks" / name / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"tasks/{name}/__init__.py: its docstring must say what the package may import"


def test_a_stage_imports_only_itself_and_the_stages_before_it(graph):
    wrong = []
    for module, imports in graph.items():
        if not module.startswith("tasks."):
            continue
        for target, line in imports.internal.items():
            if target.startswith("flows"):
                wrong.append(f"{imports.path.relative_to(ROOT)}:{line} imports {target} (tasks never import flows)")
            elif (_package(module) and _package(target)
                  and ORDER.index(_package(target)) > ORDER.index(_package(module))):
                wrong.append(f"{imports.path.relative_to(ROOT)}:{line} imports {target}, a later stage")
    assert wrong == []


def test_only_the_track_package_imports_mlflow_and_no_task_imports_prefect(graph):
    mlflow_users = sorted(m for m, mi in graph.items() if "mlflow" in mi.external)
    assert [m for m in mlflow_users if not m.startswith("tasks.track") and m not in SERVED_MODEL_CODE] == []
    assert sorted(m for m, mi in graph.items() if m.startswith("tasks") and "prefect" in mi.external) == []


def test_the_requantize_flow_reads_as_its_steps():
    tree = ast.parse((ROOT / "flows" / "requantize.py").read_text())
    flow = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "requantize")
    assert flow.end_lineno - flow.lineno + 1 < 80
    called = [n.func.attr for n in ast.walk(flow) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and isinstance(n.func.value, ast.Name) and n.func.value.id == "steps"]
    card = ["data", "reference", "build", "measure", "search", "escalate", "select", "record_decision", "promote"]
    assert [s for s in called if s in card] == card, "the card's steps, in the card's order"


def test_the_import_graph_reader_sees_a_cycle_and_a_lazy_import(tmp_path):
    # The checks above pass on an empty graph too: the reader must find what it is for.
    package = tmp_path / "tasks"
    (package / "core").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "core" / "__init__.py").write_text("")
    (package / "core" / "a.py").write_text("from tasks.core.b import x\n")
    (package / "core" / "b.py").write_text("def f():\n    from tasks.core import a\n    import mlflow\n")
    found = read_graph(("tasks",), root=tmp_path)
    assert cycles(found) == [["tasks.core.a", "tasks.core.b"]]
    assert found["tasks.core.b"].external == {"mlflow"}
