"""The multi-run experiments a lab notebook calls (``from kdcourse.recipes import lab4``).

Each module composes data, models, objectives (:mod:`kdcourse.distill`) and
seeded runs (:mod:`kdcourse.runs`) into the comparisons one lab makes; the
ideas themselves live in those layers.
"""
