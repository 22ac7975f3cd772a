"""Lab 3's result tables and readings, so the notebook keeps the experiment
and the reading, not the formatting.

    runs.show_table(compression_table(sp, teacher_spec.describe(), student_spec.describe(), t_acc, summaries))
    print(compression_reading(sp, summaries, best_name, t_acc))

``sp`` is what :func:`kdcourse.recipes.lab3.size_and_speed` returns;
``summaries`` maps a recipe's name to its :class:`~kdcourse.runs.Summary`.
:func:`accuracy_by_form` splits an accuracy by the kind of review
(:data:`kdcourse.data.reviews.FORMS`: a single clause, "but", "although", ...).
"""
from __future__ import annotations

from typing import Mapping

import torch

from .. import runs
from ..data import reviews as text
from ..train import predict_logits

GOALS = (("student >= 10x fewer parameters", "size"), ("student >= 5x faster on this CPU", "speed"),
         ("best KD recipe >= 95% of the teacher", "accuracy"))


def compression_table(sp: dict, teacher_name: str, student_name: str, teacher_acc: float,
                      summaries: Mapping[str, runs.Summary], baseline: str = "scratch") -> list[dict]:
    """The teacher row, then one row per student recipe: parameters (with and
    without embeddings), CPU p50, test accuracy (mean ± std), % of the
    teacher, the verdict against ``summaries[baseline]`` and the per-seed values."""
    if baseline not in summaries:
        raise KeyError(f"compression_table: no {baseline!r} in summaries ({', '.join(summaries)}); "
                       "train the baseline first or name another one with baseline=")
    (p_t, p_s), (pe_t, pe_s), (lat_t, lat_s) = sp["params"], sp["params_no_embeddings"], sp["p50_ms"]
    rows = [{"model": f"teacher ({teacher_name})", "params": f"{p_t:,}", "params w/o embeddings": f"{pe_t:,}",
             "CPU p50 (ms)": f"{lat_t:.1f}", "test acc (%)": f"{100 * teacher_acc:.2f}", "% of teacher": "100",
             "per seed": "(trained once)"}]
    for name, s in summaries.items():
        rows.append({"model": f"student ({student_name}), {name}", "params": f"{p_s:,}",
                     "params w/o embeddings": f"{pe_s:,}", "CPU p50 (ms)": f"{lat_s:.1f}",
                     **runs.result_row(s, reference=teacher_acc, reference_column="% of teacher",
                                       baseline=summaries[baseline], baseline_column=f"vs {baseline}", per_seed=True)})
    return rows


def compression_reading(sp: dict, summaries: Mapping[str, runs.Summary], best_name: str, teacher_acc: float,
                        baseline: str = "scratch") -> str:
    """Size and speed ratios, the best recipe against the teacher and the
    baseline, and whether each of the handout's goals (:data:`GOALS`) is met."""
    (p_t, p_s), (pe_t, pe_s) = sp["params"], sp["params_no_embeddings"]
    best, base = summaries[best_name], summaries[baseline]
    size_ratio, speedup = p_t / p_s, sp["speedup"]
    met = {"size": size_ratio >= 10, "speed": speedup >= 5, "accuracy": best.mean >= 0.95 * teacher_acc}
    lines = [f"student vs teacher: {size_ratio:.1f}x fewer parameters ({pe_t / pe_s:.1f}x without embeddings), "
             f"{speedup:.1f}x faster on this CPU",
             f"best KD recipe: {best_name}, {100 * best.mean:.2f}% = {100 * best.mean / teacher_acc:.1f}% of the teacher; "
             f"{baseline} {100 * base.mean:.2f}% = {100 * base.mean / teacher_acc:.1f}%; "
             f"gap {100 * (best.mean - base.mean):+.2f} points = {runs.gap_in_std(best, base):.1f} pooled std "
             f"(n = {best.n} seeds)"]
    lines += [f"  {'met' if met[key] else 'NOT met'}: {goal}" for goal, key in GOALS]
    return "\n".join(lines)


def single_runs_table(extra: Mapping[str, runs.Run], results: Mapping[str, list]) -> list[dict]:
    """One-seed recipes (``name -> Run``: test accuracy and seconds), then the
    first seed of each table row (``name -> [Run, ...]``) for comparison."""
    return (runs.result_rows(extra, label="recipe", seconds=True)
            + runs.result_rows({f"{k} (same seed, from the table)": v[0].test_acc for k, v in results.items()},
                               label="recipe", seconds=True))


def accuracy_by_form(model, split) -> dict:
    """``{form: accuracy}`` of ``model`` on the reviews of ``split`` of each
    form in :data:`kdcourse.data.reviews.FORMS` (``nan`` for a form ``split`` lacks)."""
    pred = predict_logits(model, split).argmax(1)
    out = {}
    for f in text.FORMS:
        m = torch.tensor([g == f for g in split.forms])
        out[f] = float((pred[m] == split.labels[m]).float().mean()) if m.any() else float("nan")
    return out


def by_form_rows(models: Mapping, split) -> list[dict]:
    """One row per ``name -> model``: its :func:`accuracy_by_form` in whole points."""
    return [{"model": name, **{f: f"{100 * a:.0f}" for f, a in accuracy_by_form(model, split).items()}}
            for name, model in models.items()]
