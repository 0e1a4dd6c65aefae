"""The package's shape: few top-level modules, and the product never imports the toy world
(it plugs in through entry points)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tuner"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_product_never_imports_the_toy_world():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if "toy" in path.relative_to(PACKAGE).parts:
            continue
        toy = {n for n in imported_modules(path) if n == "tuner.toy" or n.startswith("tuner.toy.")}
        if toy:
            offenders[str(path.relative_to(PACKAGE))] = sorted(toy)
    assert offenders == {}


def test_the_walk_sees_an_import_of_the_toy_world(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from tuner.toy import world\n")
    assert "tuner.toy" in imported_modules(probe)


@pytest.mark.slow  # a training subprocess
def test_training_a_tiny_builtin_leaves_the_toy_world_unloaded(tmp_path):
    code = (
        "import sys\n"
        "from tuner.cli import main\n"
        "from tuner import builtins, families\n"
        "from tuner.recipe import ModelSection\n"
        "family = families.for_model(ModelSection(path='builtin:tiny-sd15'))\n"
        "family.load(ModelSection(path='builtin:tiny-sd15'), __import__('torch').float32)\n"
        "print(sorted(m for m in sys.modules if m.startswith('tuner.toy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_at_most_five_plain_modules_at_the_top():
    assert len(list(PACKAGE.glob("*.py"))) <= 5
