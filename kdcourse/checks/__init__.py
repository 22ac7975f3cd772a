"""Checks for the exercises: accept correct code, name the usual mistakes.

One module per lab (``lab1``, ``lab2``, ...); this file holds the shared
machinery and re-exports every lab's ``check_*`` functions.

Each ``check_*`` runs the student's function on seeded random inputs,
compares it with the reference implementation in :mod:`kdcourse.losses`
(tolerance stated in the message), and when it differs, compares it with
each *known-wrong variant* to say what is wrong ("off by a factor T² — did you
scale the KL term?"). A passing check prints one line and returns ``True``;
a failing one raises :class:`CheckFailed` (an ``AssertionError``) with the
hint. ``NotImplementedError`` from an untouched exercise passes through.

Later labs add their own checks with :func:`diagnose`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


RTOL = 1e-4
ATOL = 1e-6


class CheckFailed(AssertionError):
    """The student's code disagrees with the reference; the message says how."""


@dataclass
class Case:
    """One input on which reference and student are compared."""

    args: tuple
    kwargs: dict
    label: str


def _close(a, b, rtol=RTOL, atol=ATOL) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.shape != b.shape:
        return False
    return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True))


def _err(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def diagnose(
    name: str,
    student: Callable,
    reference: Callable,
    cases: Sequence[Case],
    wrong_variants: dict[str, tuple[Callable, str]],
    rtol: float = RTOL,
    atol: float = ATOL,
) -> bool:
    """Compare ``student`` with ``reference`` on ``cases``.

    ``wrong_variants`` maps a short name to ``(function, hint)``; when the
    student disagrees with the reference but agrees with a variant on every
    case, the hint is raised. Returns ``True`` when all cases agree.
    """
    outputs = []
    for case in cases:
        try:
            out = student(*case.args, **case.kwargs)
        except NotImplementedError:
            raise
        except Exception as exc:
            raise CheckFailed(f"{name} raised {type(exc).__name__}: {exc} (on {case.label})") from exc
        if not isinstance(out, torch.Tensor):
            raise CheckFailed(f"{name} must return a torch.Tensor, got {type(out).__name__} (on {case.label})")
        outputs.append(out)

    ref_out = [reference(*c.args, **c.kwargs) for c in cases]
    bad = [i for i, (o, r) in enumerate(zip(outputs, ref_out)) if not _close(o, r, rtol, atol)]
    if not bad:
        worst = max(_err(o, r) for o, r in zip(outputs, ref_out))
        print(f"✓ {name} matches the reference on {len(cases)} cases "
              f"(largest difference {worst:.1e}; tolerance rtol={rtol:g}, atol={atol:g})")
        return True

    for vname, (variant, hint) in wrong_variants.items():
        with warnings.catch_warnings():  # some variants use deprecated reductions on purpose
            warnings.simplefilter("ignore")
            var_out = [variant(*c.args, **c.kwargs) for c in cases]
        # The variant must explain every case, and differ from the reference somewhere.
        if all(_close(o, v, rtol, atol) for o, v in zip(outputs, var_out)):
            raise CheckFailed(f"{name} is not right yet: {hint}")

    i = bad[0]
    o, r = outputs[i], ref_out[i]
    detail = f"shape {tuple(o.shape)} but expected {tuple(r.shape)}" if o.shape != r.shape else \
        f"got {o.flatten()[:4].tolist()} … expected {r.flatten()[:4].tolist()} … (max difference {_err(o, r):.3g})"
    raise CheckFailed(f"{name} differs from the reference on {cases[i].label}: {detail}")


from .lab1 import KD_LOSS_VARIANTS, check_kd_loss, check_soft_targets  # noqa: E402,F401  (re-exported)
