"""``kdcourse bench grading``: the grader's speed (see :mod:`kdcourse.grading.bench`;
parts ``one`` and ``batch``)."""
from __future__ import annotations


def main(profile: str = "smoke", repeats: int = 5, only=()) -> int:
    from ..grading.bench import main as run

    return run(profile="smoke", repeats=repeats, only=only)
