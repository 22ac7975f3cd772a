"""Grading a folder of submissions: a score no student code can change.

    python -m kdcourse grade labs/01_classic_kd.ipynb submissions/ --out grades/

Modules: ``result`` (what grading one notebook returns), ``grade`` (one
notebook: the grader's side, deciding in its own process), ``runner`` (the
kernel's side, inside the sandbox), ``sandbox`` (bubblewrap around each
kernel, and the grading copy of the package), ``safe_io`` (reading and
writing the grader's own files), ``tables`` (CSV, Markdown, LMS CSV, feedback
files) and ``batch`` (the command line and the batch). The ``grade``
subcommand's parser and body live in :mod:`kdcourse.grading.batch`.
"""


def add_arguments(parser) -> None:
    from .batch import add_arguments as add

    add(parser)


def main(args) -> int:
    from .batch import main as run

    return run(args)
