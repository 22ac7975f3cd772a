"""Lab 4's data, its temperature sweep, and how it reports: how small a
difference its seeds can show (the minimal detectable difference) and the
side-by-side table of both label columns. Re-exported by
:mod:`kdcourse.recipes.lab4`, where the lab calls them (``sd.mdd_line``)."""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F

from .. import data as data_module
from .. import runs
from ..data import ImageData
from ..train import Distill, memo_logits


LAPTOP_N_TRAIN = 8000


def lab_data(profile) -> ImageData:
    """The data of lab 4. Offline profiles generate only the students'
    splits (laptop: ``LAPTOP_N_TRAIN`` training images); no network here
    needs the teachers' larger set, which takes most of the generation
    time. The validation and test images are those
    of :func:`kdcourse.data.load`, the training images are drawn from the
    same distribution but are not the same images as in labs 1 and 2."""
    if profile.dataset == "shapes":
        n_train = min(profile.n_train, LAPTOP_N_TRAIN) if profile.name == "laptop" else profile.n_train
        return data_module.shapes(n_train, profile.n_val, profile.n_test)
    return data_module.load(profile)


def temperature_sweep(teacher: nn.Module, build, data: ImageData, temperatures: Sequence[float], *, alpha: float,
                      epochs: int, lr: float, seed: int = 0, batch_size: int = 128, progress: bool = True) -> list[dict]:
    """Distil one fresh network from ``teacher`` at each temperature (one
    seed, ``seed + 1``, so the students do not start from the teacher's
    initial weights). Returns rows with the teacher's mean soft-target
    entropy on the training images at that T (bits), and the student's
    validation and test accuracy after the last epoch."""
    train_logits = memo_logits(teacher, data.train)  # the Distill runs below reuse this teacher pass
    rows = []
    for T in temperatures:
        p = F.softmax(train_logits / float(T), dim=1)
        entropy = float(-(p * p.clamp_min(1e-12).log2()).sum(1).mean())
        run = runs.train_run(f"T={T:g}", build, data, objective=lambda T=T: Distill(teacher, T=T, alpha=alpha),
                             epochs=epochs, lr=lr, seed=seed + 1, batch_size=batch_size, progress=progress,
                             val_each_epoch=False)
        rows.append({"T": float(T), "entropy_bits": entropy, "val_acc": run.val_acc, "test_acc": run.test_acc, "run": run})
    return rows


# --------------------------------------------------------------------------
# How small a difference these seeds can show
# --------------------------------------------------------------------------

# Two-sided 5 % critical values of Student's t, t_{0.975}(dof) (any table, e.g.
# NIST/SEMATECH e-Handbook of Statistical Methods, section 1.4.2.10 "Critical
# values of the Student's t distribution"); tested against a numerical
# inversion of the t distribution in tests/test_checks_lab4.py.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 14: 2.145, 16: 2.120, 18: 2.101, 20: 2.086, 30: 2.042, 60: 2.000}


def t_critical(dof: int) -> float:
    """t_{0.975}(dof), the two-sided 5 % critical value (the nearest tabulated
    dof at or below ``dof``; 1.96 beyond 60)."""
    if not isinstance(dof, int) or dof < 1:
        raise ValueError(f"dof must be an int >= 1 (degrees of freedom), got {dof!r}")
    if dof > 60:
        return 1.96
    return T_975[max(d for d in T_975 if d <= dof)]


def minimal_detectable_difference(spread, n: int, t: float | None = None) -> float:
    """The smallest difference of means (in the units of ``spread``) between two
    methods run on ``n`` seeds each, both with seed-to-seed std ``spread``,
    that a two-sample test at threshold ``t`` calls real::

        MDD = t · s · sqrt(2 / n)

    ``t=None`` takes the two-sided 5 % critical value t_{0.975}(2n − 2); the
    lab's readings use the lenient rule |Welch t| >= 2 (``t=2``). A true
    difference equal to the MDD is detected only about half the time (50 %
    power); for 80 % power add t_{0.8} to t (about +0.9 at these dofs)."""
    s = float(getattr(spread, "std", spread))
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"n must be an int >= 2 (seeds per method), got {n!r}")
    if s < 0 or s != s:
        raise ValueError(f"spread must be a standard deviation >= 0, got {s!r}")
    t = t_critical(2 * n - 2) if t is None else float(t)
    return t * s * math.sqrt(2.0 / n)


def mdd_line(spread, n: int, scale: float = 100.0) -> str:
    """One line: the MDD at the lab's rule (t = 2) and at the 5 % level."""
    s = float(getattr(spread, "std", spread))
    rule, five = minimal_detectable_difference(s, n, t=2.0), minimal_detectable_difference(s, n)
    return (f"seed std {scale * s:.2f} points over n = {n} seeds → minimal detectable difference "
            f"MDD = t·s·√(2/n) = {scale * rule:.2f} points at the lab's rule |t| ≥ 2, "
            f"{scale * five:.2f} points at the 5 % level (t = {t_critical(2 * n - 2):.3f}, {2 * n - 2} d.o.f.)")


def side_by_side(rows_by_column: dict) -> list[dict]:
    """One table from several columns' :func:`~kdcourse.runs.compare_row` lists
    (e.g. clean and noisy labels): a row per method, each column's accuracy,
    difference to its scratch row and reading; "not run" where a column lacks
    the method."""
    methods = list(dict.fromkeys(r["method"] for rows in rows_by_column.values() for r in rows))
    table = []
    for method in methods:
        row = {"method": method, "at inference": ""}
        for column, rows in rows_by_column.items():
            r = next((r for r in rows if r["method"] == method), None)
            row["at inference"] = row["at inference"] or (r["at inference"] if r else "")
            row[f"{column}: test acc (%)"] = r["test acc (%)"] if r else "not run"
            row[f"{column}: Δ (points)"] = r["Δ vs scratch (points)"] if r else ""
            row[f"{column}: reading"] = r["reading"] if r else ""
        table.append(row)
    return table
