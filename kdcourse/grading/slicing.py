"""What the grading kernel runs: the exercises' definitions and what they need.

    cells = exercise_slice(nb, ["soft_targets", "kd_loss"])   # {cell index: source to run}

The score depends only on the exercise functions, so the kernel does not
run a lab's experiments (training runs, sweeps, plots). It runs the
*slice* of the notebook that the exercise functions need, found by name:

1. Every code cell is split into its top-level statements (IPython syntax
   first turned into Python, as the kernel does).
2. The statements that bind an exercise's name (``def kd_loss``, also an
   assignment ``kd_loss = ...``) are in the slice.
3. Repeatedly: for each statement in the slice, the module-level names it
   uses — at run time (``x = f(y)``), in default arguments and decorators,
   and the globals its functions' and classes' bodies read when they are
   called (Python's own scoping, :mod:`symtable`) — and every statement, in
   any cell, before or after, that binds one of those names (``import``,
   ``def``, ``class``, assignment, ``for``/``with`` targets, ``global``
   inside a function), or changes its contents (``NAME[...] = ``,
   ``NAME.attr = ``, ``NAME.method(...)`` for a name not bound by an
   import), or star-imports, joins it.
4. The statements of the slice run in notebook order, each cell's chosen
   statements together (the other lines blank), so a name's last binding is
   the one "Run All" would leave.

A student may therefore define a helper in its own cell, import in a later
cell, or keep a constant beside the exercise; an experiment statement
(``T_MAIN = pick_on_validation(t_runs)``) does not run unless an exercise
needs its name. A cell that does not parse runs whole when it defines an
exercise (so its error is reported), else not at all.

What a name-based slice cannot see (a name bound through ``exec`` or
``globals()[...]``, an object changed through an alias) shows up as a
``NameError`` or a missing exercise; the grader then grades that notebook
again running every cell up to its last exercise (:mod:`.grade`).
"""
from __future__ import annotations

import ast
import symtable
from dataclasses import dataclass, field

from .. import labgen


@dataclass
class Statement:
    cell: int
    first: int  # 1-based line range in the cell's Python source
    last: int
    defines: set = field(default_factory=set)
    uses: set = field(default_factory=set)
    mutates: set = field(default_factory=set)
    imports: set = field(default_factory=set)  # names bound by an import
    star: bool = False


def python_source(src: str) -> str:
    """The cell as the kernel compiles it (``%magic``, ``!cmd`` turned into calls)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(src)
    except Exception:  # an input IPython cannot transform: compiled as it is
        return src


def _root(node) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _mutated(node: ast.stmt) -> set:
    """Names whose contents a statement changes without rebinding them:
    ``NAME[...] = ``, ``NAME.attr += ``, ``del NAME[...]``, ``NAME.method(...)``."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute):
        name = _root(node.value.func.value)
        return {name} if name else set()
    if isinstance(node, (ast.Assign, ast.Delete)):
        targets = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
    else:
        return set()
    out = set()
    while targets:
        t = targets.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            targets.extend(t.elts)
        elif isinstance(t, ast.Starred):
            targets.append(t.value)
        elif isinstance(t, (ast.Attribute, ast.Subscript)) and _root(t):
            out.add(_root(t))
    return out


def _simple_statements(node: ast.stmt):
    """``node`` and the statements nested in its blocks (``for``, ``if``,
    ``with``, ``try``), not those inside function or class bodies."""
    yield node
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return
    for name in ("body", "orelse", "finalbody", "handlers", "cases"):
        for sub in getattr(node, name, None) or []:
            if isinstance(sub, ast.stmt):
                yield from _simple_statements(sub)
            else:  # an except handler or a match case: its body
                for s in getattr(sub, "body", []):
                    yield from _simple_statements(s)


def _scope_names(table: symtable.SymbolTable, top: bool, uses: set, defines: set) -> None:
    for sym in table.get_symbols():
        name = sym.get_name()
        if top:
            if sym.is_referenced():
                uses.add(name)
            if sym.is_assigned() or sym.is_imported():
                defines.add(name)
        else:
            if sym.is_global() and sym.is_referenced():
                uses.add(name)
            if sym.is_declared_global() and sym.is_assigned():
                defines.add(name)
    for child in table.get_children():
        _scope_names(child, False, uses, defines)


def statements(nb: dict) -> tuple[list[Statement], dict]:
    """The top-level statements of every code cell, and ``{cell: python
    source}``; a cell that does not parse gives no statements (its index is
    in ``broken``, returned as the source ``None``)."""
    out, sources = [], {}
    for i, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") != "code":
            continue
        src = python_source(labgen.source(cell))
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            sources[i] = None
            continue
        sources[i] = src
        lines = src.split("\n")
        units: list[list[ast.stmt]] = []
        for node in tree.body:  # statements sharing a line (``a = 1; b = 2``) form one unit
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            if units and first <= units[-1][-1].end_lineno:
                units[-1].append(node)
            else:
                units.append([node])
        for unit in units:
            first = min([unit[0].lineno] + [d.lineno for d in getattr(unit[0], "decorator_list", [])])
            last = max(n.end_lineno for n in unit)
            st = Statement(i, first, last)
            try:
                table = symtable.symtable("\n".join(lines[first - 1:last]), f"<cell {i}>", "exec")
                _scope_names(table, True, st.uses, st.defines)
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                st.star = True  # cannot be analysed: treated as binding anything (runs when it is in a needed cell)
            for node in unit:
                for sub in _simple_statements(node):
                    st.mutates |= _mutated(sub)
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for a in node.names:
                        if a.name == "*":
                            st.star = True
                        else:
                            st.imports.add(a.asname or a.name.split(".")[0])
            out.append(st)
    return out, sources


def exercise_slice(nb: dict, exercises, exercise_cells=()) -> dict:
    """``{cell index: source}`` of the statements that define ``exercises``
    and, transitively, every statement binding or changing a name they use
    (see the module docstring); cells in ``exercise_cells`` that do not
    parse are given whole."""
    stmts, sources = statements(nb)
    imported = set().union(*(s.imports for s in stmts)) if stmts else set()
    needed = set(exercises)
    chosen: set = set()
    changed = True
    while changed:
        changed = False
        for k, st in enumerate(stmts):
            if k in chosen:
                continue
            if st.star or st.defines & needed or (st.mutates & needed) - imported:
                chosen.add(k)
                needed |= st.uses
                changed = True
    keep: dict = {}
    for k in sorted(chosen):
        st = stmts[k]
        keep.setdefault(st.cell, set()).update(range(st.first, st.last + 1))
    out = {}
    for i in sorted(set(keep) | {i for i in exercise_cells if sources.get(i, "") is None}):
        if sources.get(i) is None:
            out[i] = labgen.source(nb["cells"][i])
            continue
        lines = sources[i].split("\n")
        out[i] = "\n".join(line if n in keep[i] else "" for n, line in enumerate(lines, 1)).rstrip() + "\n"
    return out
