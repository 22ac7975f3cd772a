"""The grading copy of the package: a read-only copy of ``kdcourse`` in
which the lab's reference answers refuse to run and its visible checks stay
quiet, mounted into the sandbox in place of the instructor's package
(:class:`GradingCopy`; used by :mod:`kdcourse.grading.sandbox`)."""
from __future__ import annotations

import ast
import compileall
import os
import shutil
import sys
import tempfile

REFUSAL_MARK = "refuses to run while grading"
QUIET_MARK = "visible check skipped while grading"

def _package_dir() -> str:
    import kdcourse

    return os.path.dirname(os.path.abspath(kdcourse.__file__))


def _target(fn) -> tuple[str, str]:
    """(path of the module relative to the package folder, qualname) of a
    package function."""
    fn = getattr(fn, "__wrapped__", fn) if not hasattr(fn, "__code__") else fn
    module = getattr(fn, "__module__", "") or ""
    qualname = getattr(fn, "__qualname__", "") or ""
    if module != "kdcourse" and not module.startswith("kdcourse."):
        raise ValueError(f"{fn!r} is not defined in the kdcourse package (module {module!r}); only package "
                         f"functions can be replaced in the grading copy")
    if "<" in qualname:
        raise ValueError(f"{module}.{qualname} is not a module-level function or method; declare the reference "
                         f"as a named function so that the grading copy can replace it")
    mod = sys.modules[module]
    rel = os.path.relpath(os.path.abspath(mod.__file__), _package_dir())
    return rel, qualname


def _replace_defs(source: str, replacements: dict[str, str], filename: str) -> str:
    """``source`` with each named top-level function (or ``Class.method``)
    replaced by the body given (the decorators stay)."""
    tree = ast.parse(source, filename)
    lines = source.split("\n")
    spans = []
    for qualname, body in replacements.items():
        parts = qualname.split(".")
        scope, node = tree.body, None
        for k, part in enumerate(parts):
            found = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part]
            if not found:
                raise ValueError(f"{filename}: no definition of {qualname!r} to replace")
            node = found[-1]
            scope = node.body
        indent = " " * node.col_offset
        if isinstance(node, ast.ClassDef):  # a class answer (an nn.Module): its body becomes a refusing __init__
            first = node.body[0]
            start = first.lineno if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)) \
                else first.end_lineno + 1
            if start <= node.lineno:  # a one-line class: keep its header only
                raise ValueError(f"{filename}: class {qualname!r} is written on one line; the grading copy cannot "
                                 f"replace its body")
            new = [f"{indent}    def __init__(self, *args, **kwargs):"] + \
                  [f"{indent}        {b}" for b in body.split("\n")]
            spans.append((start, node.end_lineno, new))
            continue
        new = [f"{indent}def {node.name}(*args, **kwargs):"] + [f"{indent}    {b}" for b in body.split("\n")]
        spans.append((node.lineno, node.end_lineno, new))
    for start, end, new in sorted(spans, reverse=True):
        lines[start - 1:end] = new
    return "\n".join(lines)


class GradingCopy:
    """A read-only copy of the package for the kernels of one batch.

    ``refuse``: package functions (the exercises' references) whose bodies
    become ``raise RuntimeError("... refuses to run while grading ...")``
    (a class: its whole body becomes an ``__init__`` that raises);
    ``quiet``: the visible checks, whose bodies become a printed line and
    ``return True``. :attr:`root` is the folder to put on ``PYTHONPATH``
    (it holds ``kdcourse/``); :meth:`remove` deletes it."""

    def __init__(self, root: str, replaced: dict):
        self.root = root
        self.replaced = replaced  # {relative module path: [qualnames]}

    @classmethod
    def make(cls, refuse=(), quiet=(), parent: str | None = None) -> "GradingCopy":
        src = _package_dir()
        root = tempfile.mkdtemp(prefix="kdgrade-pkg-", dir=parent)
        try:
            return cls._fill(root, src, refuse, quiet)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise

    @classmethod
    def _fill(cls, root, src, refuse, quiet) -> "GradingCopy":
        dest = os.path.join(root, "kdcourse")
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
                        symlinks=False)
        edits: dict[str, dict[str, str]] = {}
        for fn in refuse:
            rel, qualname = _target(fn)
            name = f"{fn.__module__}.{qualname}"
            msg = (f"{name} is the reference answer of an exercise; it {REFUSAL_MARK} "
                   f"(a graded exercise must be the student's own code)")
            edits.setdefault(rel, {})[qualname] = f"raise RuntimeError({msg!r})"
        for fn in quiet:
            rel, qualname = _target(fn)
            edits.setdefault(rel, {}).setdefault(
                qualname, f"print({(f'({qualname}: {QUIET_MARK}; the grader checks this exercise itself)')!r})\n"
                          f"return True")
        for rel, repl in edits.items():
            path = os.path.join(dest, rel)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            with open(path, "w", encoding="utf-8") as f:
                f.write(_replace_defs(text, repl, rel))
        compileall.compile_dir(dest, quiet=1, workers=1)
        for base, dirs, files in os.walk(root):
            os.chmod(base, 0o755)
            for name in files:
                os.chmod(os.path.join(base, name), 0o644)
        return cls(root, {rel: sorted(r) for rel, r in edits.items()})

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


# --------------------------------------------------------------------------
# Starting and stopping a sandboxed kernel
# --------------------------------------------------------------------------
