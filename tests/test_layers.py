"""Imports point one way only (DESIGN.md, "Dependency direction"): cli -> pipeline -> dashboards -> evals -> vsae ->
activations. Every import statement counts, including those inside functions: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("activations", "vsae", "evals", "dashboards", "pipeline", "cli")


def _layer(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in LAYERS else None


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import; relative imports stay within their package and are skipped."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def layer_violations(root: Path) -> list[str]:
    """`file:line: layer imports higher layer` for every import that points up (or sideways into cli)."""
    files = [root / "cli.py"] + sorted(p for layer in LAYERS[:-1] for p in (root / layer).rglob("*.py"))
    found = []
    for path in files:
        if not path.is_file():
            continue
        own = _layer(path.relative_to(root).with_suffix("").as_posix().replace("/", "."))
        for line, module in _imported(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            other = _layer(module)
            if other is not None and LAYERS.index(other) > LAYERS.index(own):
                found.append(f"{path.relative_to(root)}:{line}: {own} imports {module} ({other} is above {own})")
    return found


def test_imports_point_only_down_the_layers():
    assert layer_violations(ROOT) == []


def test_the_check_sees_upward_imports(tmp_path):
    for layer in LAYERS[:-1]:
        (tmp_path / layer).mkdir()
    (tmp_path / "cli.py").write_text("import pipeline.study\n")
    (tmp_path / "activations" / "cache.py").write_text("import numpy\nfrom . import loader\n")
    (tmp_path / "vsae" / "trainer.py").write_text("from activations.loader import ActivationLoader\n")
    (tmp_path / "evals" / "driver.py").write_text("def f():\n    from dashboards.html import esc\n")
    (tmp_path / "dashboards" / "x.py").write_text("import evals.metrics, pipeline\n")
    (tmp_path / "pipeline" / "study.py").write_text("from cli import main\n")
    assert layer_violations(tmp_path) == [
        "dashboards/x.py:1: dashboards imports pipeline (pipeline is above dashboards)",
        "evals/driver.py:2: evals imports dashboards.html (dashboards is above evals)",
        "pipeline/study.py:1: pipeline imports cli (cli is above pipeline)",
    ]
