"""Notebook I/O: read, write, the source of a cell, outputs stripped.

The functions live in :mod:`kdcourse.labgen` (which generates the labs from
the solutions); this is the name the tooling imports them under.
"""
from ..labgen import clear_outputs, dumps, read, source, strip, write  # noqa: F401
