"""The layer table of ``kdcourse/__init__.py`` is true: no module imports from
a higher layer, and the training loop imports no concrete loss or objective."""
from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "kdcourse"

# module (or package) -> layer, as in the package docstring
LAYERS = {
    "losses": 1,
    "runtime": 2, "profiles": 2, "data": 2, "models": 2, "features": 2,
    "train": 3,
    "teacher_cache": 4, "distill": 4,
    "zoo": 5, "runs": 5, "datafree": 5,
    "recipes": 6, "deploy": 6, "checks": 6, "lesson": 6, "lab_end": 6, "widgets": 6, "plots": 6,
    "labgen": 7, "grading": 7, "tools": 7, "benchmarks": 7,
    "cli": 8, "__main__": 8,
}
SHIMS = {"feature_kd", "selfdistill", "transformers_kd", "text", "notebooks", "report"}  # old paths, on top

# Imports still to move (files whose owners move them next); each entry must
# still exist, so the list shrinks as they are fixed.
PENDING = {
    ("benchmarks/lab3.py", "transformers_kd"),
    ("benchmarks/lab5.py", "transformers_kd"),
    ("lesson.py", "selfdistill"),
    ("grading/bench.py", "cli"),  # the grading benchmark reuses the CLI's parser
}


def _top(module_path: pathlib.Path) -> str:
    return module_path.relative_to(PKG).parts[0].removesuffix(".py")


def _imports(path: pathlib.Path):
    """kdcourse modules imported by ``path`` (module level and inside
    functions; the old-path ``__getattr__`` shims are left out)."""
    tree = ast.parse(path.read_text())
    rel_pkg = path.relative_to(PKG).parent.parts
    skip = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
            for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel_pkg[: len(rel_pkg) - (node.level - 1)]) if node.level > 1 else list(rel_pkg)
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # "from . import x" at the package root
                    parts = [node.names[0].name]
            elif node.module and node.module.split(".")[0] == "kdcourse":
                parts = node.module.split(".")[1:] or [node.names[0].name]
            else:
                continue
            yield parts[0], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "kdcourse" and len(a.name.split(".")) > 1:
                    yield a.name.split(".")[1], node.lineno


FILES = sorted(p for p in PKG.rglob("*.py") if _top(p) not in SHIMS and p.name != "__init__.py" or p.parent != PKG)
FILES = [p for p in FILES if _top(p) not in SHIMS and p != PKG / "__init__.py"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_run_down_the_layers(path):
    own = _top(path)
    rel = str(path.relative_to(PKG))
    assert own in LAYERS, f"{own} is not in the layer table of kdcourse/__init__.py (add it there and here)"
    for target, line in _imports(path):
        if target == own or target not in LAYERS and target not in SHIMS or (rel, target) in PENDING:
            continue
        assert target not in SHIMS, f"{path.name}:{line} imports the old path kdcourse.{target}; import its new home"
        assert LAYERS[target] <= LAYERS[own], (f"{path.relative_to(PKG)}:{line} (layer {LAYERS[own]}) imports "
                                               f"{target} (layer {LAYERS[target]})")


def test_the_loop_imports_no_concrete_loss_or_objective():
    targets = {t for t, _ in _imports(PKG / "train.py")}
    assert not targets & {"losses", "distill", "teacher_cache"}, targets


@pytest.mark.parametrize("rel,target", sorted(PENDING))
def test_pending_list_is_current(rel, target):
    assert target in {t for t, _ in _imports(PKG / rel)}, f"{rel} no longer imports {target}: remove it from PENDING"
