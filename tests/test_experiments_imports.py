"""The modules of ``experiments/`` import one another without a circle.

Walks ``experiments/`` with ``ast``. Unlike ``tests/test_architecture.py`` (module level only),
every import counts here: inside a function and under ``if TYPE_CHECKING:`` too. A circle that
goes through a lazy import still means neither module can be read, changed or reused without the
other (report.py and dashboard.py once imported each other that way); the shared part belongs in
a module both import.
"""
from __future__ import annotations

import ast
from pathlib import Path

from import_graph import find_circle

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "experiments"


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (``experiments`` for its __init__)."""
    out = {}
    for path in (root / PACKAGE).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from experiments import report` and `from . import frontier` name submodules
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known and name != module}
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {module: imported(module, path, known) for module, path in known.items()}


def test_experiments_modules_import_each_other_without_a_circle():
    graph = import_graph()
    assert "experiments.report" in graph and "experiments.dashboard" in graph
    circle = find_circle(graph)
    assert circle is None, "import circle in experiments/: " + " -> ".join(circle)


def test_report_and_dashboard_share_the_report_model_and_views():
    """The dashboard reads the report through the shared modules, not through report.py."""
    graph = import_graph()
    assert "experiments.report" not in graph["experiments.dashboard"]
    assert {"experiments.report_model", "experiments.report_views"} <= graph["experiments.dashboard"]


def test_the_walk_sees_a_circle_through_a_lazy_import(tmp_path):
    """The checker itself works: a circle closed only inside a function (and one under
    TYPE_CHECKING) is found, and absolute and relative imports both resolve."""
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from experiments.c import g\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\n")
    circle = find_circle(import_graph(tmp_path))
    assert circle == ["experiments.a", "experiments.b", "experiments.c", "experiments.a"]
    (package / "c.py").write_text("import json\n")
    assert find_circle(import_graph(tmp_path)) is None
