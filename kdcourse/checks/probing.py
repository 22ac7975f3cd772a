"""One visible check for any declared exercise: run its probe (the function
the grader runs) on a few seeds for the student's function, the reference
and each known-wrong variant, and decide from that plain data — so the
notebook's check and the grader cannot disagree.

    probe_check(exercise, fn, seeds=(0, 1, 2, 3), hints=None) -> True or raises CheckFailed

``hints(data)`` may name a mistake from the student's data alone (checked
before the comparison). A probe that records ``INPLACE`` (the names of the
inputs changed in place) gets that named first.
"""
from __future__ import annotations

from typing import Callable

from . import CheckFailed, contract

INPLACE = "inputs changed in place"


def _is_inplace_error(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("in-place operation" in text or "modified by an inplace" in text)


def probe_check(ex: contract.Exercise, fn: Callable, seeds=(0, 1, 2, 3), hints: Callable | None = None,
                quiet: bool = False, what: str = "every value they record", raised_first: bool = False) -> bool:
    """Probe ``fn`` on ``seeds``; raise :class:`CheckFailed` naming the
    mistake, or print one ✓ line and return ``True``. ``what``: what the
    probes record, for the ✓ line; ``raised_first``: a probe case where the
    student's function raised and the reference did not is named before
    the comparison."""
    name, student, ref = ex.name, {}, {}
    for s in seeds:
        try:
            student[s] = contract.run_probe(ex, fn, s)
        except (NotImplementedError, CheckFailed):
            raise
        except contract.PlainDataError as exc:
            raise CheckFailed(f"{name}: {exc}") from None
        except Exception as exc:
            if _is_inplace_error(exc):
                raise CheckFailed(f"{name} changes an input in place (an operation ending in _ or `x[...] = `): "
                                  f"compute on a new tensor instead ({exc})") from None
            raise CheckFailed(f"{name} raised {type(exc).__name__}: {exc}") from None
        ref[s] = contract.run_probe(ex, ex.reference, s)
        changed = student[s].get(INPLACE) if isinstance(student[s], dict) else None
        if changed:
            raise CheckFailed(f"{name} changed its input {', '.join(changed)} in place (e.g. `x[:, c] += b`, `x -= ...`):"
                              " the caller's tensor is modified. Work on a copy (x.clone()) or out of place.")
        if hints is not None:
            hint = hints(student[s])
            if hint:
                raise CheckFailed(f"{name} is not right yet: {hint}")
        if raised_first and isinstance(student[s], dict) and "raised" in student[s] and "raised" not in ref[s]:
            raise CheckFailed(f"{name} raised {student[s]['raised']} on {student[s].get('case', f'seed {s}')}")
    verdict = contract.diagnose_data(ex, student, ref, lambda v, s: contract.run_probe(ex, ex.variants[v][0], s))
    if verdict.ok:
        if not quiet:
            print(f"✓ {name} agrees with the reference on {len(seeds)} probes ({what}; "
                  f"rtol={ex.rtol:g}, atol={ex.atol:g})")
        return True
    if verdict.variant:
        raise CheckFailed(verdict.hint)
    s = next(s for s in seeds if ex.differs(student[s], ref[s], s))
    case = student[s].get("case", f"seed {s}") if isinstance(student[s], dict) else f"seed {s}"
    raise CheckFailed(f"{name} differs from the reference on {case}: {ex.differs(student[s], ref[s], s)}")


def number(out, name: str) -> float:
    """A result that must be one number (a Python number or a 0-dim tensor), as a float."""
    import torch

    if isinstance(out, bool) or not (isinstance(out, (int, float)) or (isinstance(out, torch.Tensor) and out.ndim == 0)
                                     or type(out).__module__ == "numpy"):
        raise contract.PlainDataError(f"{name} must return one number (a float), got {type(out).__name__}"
                                      + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else ""))
    return float(out)
