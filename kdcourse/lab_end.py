"""The end of a lab: the skills it taught, its self-test, and open extensions.

Re-exported by :mod:`kdcourse.lesson` (``lesson.you_can_now``,
``lesson.extensions``, ``lesson.Numeric``, ``lesson.Choice``,
``lesson.self_test``); see that module's docstring for the API.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence


def _show_markdown(text: str) -> str:
    from . import lesson  # the one way lessons show things (looked up at call time)

    return lesson._show_markdown(text)


def _items(items, what: str) -> list[str]:
    if isinstance(items, str) or not isinstance(items, Sequence) or not items:
        raise ValueError(f"{what} must be a non-empty list of strings, got {items!r}")
    out = []
    for it in items:
        if isinstance(it, tuple) and len(it) == 2:
            it = f"**{it[0]}** {it[1]}"
        if not isinstance(it, str) or not it.strip():
            raise ValueError(f"each entry of {what} must be a non-empty string (or a (title, text) pair), got {it!r}")
        out.append(it.strip())
    return out


def you_can_now(skills: Sequence[str]) -> str:
    """Show "You can now …" with one bullet per skill; returns the Markdown."""
    return _show_markdown("### You can now\n\n" + "\n".join(f"- {s}" for s in _items(skills, "skills")))


def extensions(items: Sequence) -> str:
    """Show the open extensions (strings, or (title, text) pairs); returns the Markdown."""
    return _show_markdown("### Going further (open)\n\n" + "\n".join(f"{i}. {s}" for i, s in
                                                                    enumerate(_items(items, "extensions"), 1)))


@dataclass
class Numeric:
    """A question whose answer is a number, right within ``tol`` (absolute)."""

    key: str
    text: str
    expected: float
    tol: float
    explain: str

    def judge(self, answer) -> bool:
        try:
            value = float(answer)
        except (TypeError, ValueError):
            return False
        return math.isfinite(value) and abs(value - float(self.expected)) <= self.tol


@dataclass
class Choice:
    """A multiple-choice question: answer with the option's text (any case)
    or its letter (a, b, c, ...)."""

    key: str
    text: str
    options: Sequence[str]
    correct: str
    explain: str

    def __post_init__(self):
        if self.correct not in self.options:
            raise ValueError(f"question {self.key!r}: correct={self.correct!r} is not one of the options {list(self.options)}")

    def judge(self, answer) -> bool:
        if not isinstance(answer, str):
            return False
        a = re.sub(r"\s+", " ", answer.strip().lower()).strip("() .")
        letter = chr(97 + list(self.options).index(self.correct))
        return a == letter or a == re.sub(r"\s+", " ", self.correct.strip().lower())


def self_test(questions: Sequence, answers: Mapping) -> dict:
    """Check each answer; print ✓, or ✗ with the explanation. Returns
    ``{key: True (right) / False (wrong) / None (not answered)}``."""
    if isinstance(questions, (str, Mapping)) or not isinstance(questions, Sequence) or not questions:
        raise ValueError(f"questions must be a non-empty list of lesson.Numeric / lesson.Choice, got {questions!r}")
    if not isinstance(answers, Mapping):
        raise ValueError(f"answers must be a dict key -> your answer, got {type(answers).__name__}")
    keys = [q.key for q in questions]
    unknown = sorted(set(answers) - set(keys))
    if unknown:
        raise ValueError(f"answers has keys no question uses: {unknown}; the questions are {keys}")
    results, lines = {}, []
    for i, q in enumerate(questions, 1):
        given = answers.get(q.key)
        options = ("\n" + "\n".join(f"   ({chr(97 + j)}) {o}" for j, o in enumerate(q.options))) if isinstance(q, Choice) else ""
        lines.append(f"{i}. [{q.key}] {q.text}{options}")
        if given is None:
            results[q.key] = None
            lines.append("   – not answered yet")
            continue
        ok = q.judge(given)
        results[q.key] = ok
        lines.append(f"   ✓ {given!r}" if ok else f"   ✗ {given!r} is not right. {q.explain}")
    right = sum(1 for v in results.values() if v)
    lines.append(f"{right} of {len(questions)} right")
    print("\n".join(lines))
    return results
