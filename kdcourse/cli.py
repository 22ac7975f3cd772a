"""Command line: ``kdcourse <command>`` (or ``python -m kdcourse <command>``).

    labgen [--check]          generate labs/ from solutions/ (or verify them)
    strip FILE...             remove outputs (nbval-checked cells in solutions kept)
    record FILE...            execute solutions (smoke) and store the checked outputs
    bench labN [--profile P]  print a lab's measured speed/accuracy figures
    grade LAB SUBMISSIONS     grade a folder of student notebooks (kdcourse.grading)
    report [--profile P]      run every solution, write the course report (kdcourse.tools.report)
"""
from __future__ import annotations

import argparse
import os
import sys


def _labgen(args) -> int:
    from . import labgen

    changed = labgen.generate_all(args.solutions, args.labs, check=args.check)
    if args.check:
        problems = labgen.check_declarations(args.solutions)
        for p in problems:
            print(f"exercise declarations: {p}")
        if changed:
            print("stale labs (run `make labs`): " + ", ".join(changed))
        if changed or problems:
            return 1
        print("labs are in sync with solutions")
        return 0
    print("wrote: " + (", ".join(changed) if changed else "nothing (already in sync)"))
    return 0


def _strip(args) -> int:
    from . import labgen

    for path in args.files:
        nb = labgen.read(path)
        keep = os.path.basename(os.path.dirname(os.path.abspath(path))) == "solutions"
        new = labgen.strip(nb, keep_checked=keep)
        if labgen.dumps(new) != open(path, encoding="utf-8").read():
            labgen.write(new, path)
            print(f"stripped {path}")
    return 0


def _record(args) -> int:
    """Execute each solution in the smoke profile and keep only the outputs of
    cells marked NBVAL_CHECK_OUTPUT (what nbval compares)."""
    from . import labgen
    from .tools.notebooks import execute

    for path in args.files:
        original = labgen.read(path)
        executed = execute(path, profile="smoke", cwd=os.path.dirname(os.path.abspath(path)))
        outputs = {labgen.source(c): c.get("outputs", []) for c in executed["cells"] if c["cell_type"] == "code"}
        for cell in original["cells"]:
            if cell["cell_type"] == "code" and labgen.CHECK_MARK in labgen.source(cell):
                cell["outputs"] = outputs[labgen.source(cell)]
        labgen.write(labgen.strip(original, keep_checked=True), path)
        print(f"recorded checked outputs of {path}")
    return 0


def _bench(args) -> int:
    import importlib

    module = importlib.import_module(f"kdcourse.benchmarks.{args.what}")
    kwargs = {"only": tuple(p for p in args.only.split(",") if p)} if args.only else {}
    return module.main(profile=args.profile, repeats=args.repeats, **kwargs)


def _delegate(module_name: str):
    """Subcommands whose parser and body live in their own module
    (``add_arguments(parser)`` and ``main(args)``)."""
    import importlib

    return importlib.import_module(f"kdcourse.{module_name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdcourse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("labgen", help="generate labs/ from solutions/")
    p.add_argument("--check", action="store_true", help="only verify; exit 1 when a lab is stale")
    p.add_argument("--solutions", default="solutions")
    p.add_argument("--labs", default="labs")
    p.set_defaults(func=_labgen)
    p = sub.add_parser("strip", help="remove notebook outputs")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_strip)
    p = sub.add_parser("record", help="store the nbval-checked outputs of solutions")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_record)
    p = sub.add_parser("bench", help="print measured speed and accuracy figures")
    p.add_argument("what", help="lab1, lab2, ... (a module in kdcourse/benchmarks)")
    p.add_argument("--profile", default="laptop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated parts (each benchmark's docstring lists them)")
    p.set_defaults(func=_bench)
    for name, module_name, help_text in (("grade", "grading", "grade student notebooks"),
                                         ("report", "tools.report", "run all solutions and write the course report")):
        p = sub.add_parser(name, help=help_text)
        try:
            mod = _delegate(module_name)
        except ImportError:
            p.set_defaults(func=lambda a, n=name: print(f"'{n}' is not available in this version") or 2)
            continue
        mod.add_arguments(p)
        p.set_defaults(func=mod.main)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
