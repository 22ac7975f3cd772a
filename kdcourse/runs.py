"""Seeded runs and honest summaries (mean +- std over seeds, last epoch).

    runs = repeat("KD T=4", seeds=(0, 1, 2), build=profile.student, data=data,
                  objective=lambda: Distill(teacher, T=4), epochs=20, lr=3e-3)
    summarize(runs)   # Summary(name='KD T=4', mean=0.87, std=0.004, n=3, ...)

Every figure is the test accuracy of the model as it is after its **last**
epoch: no epoch is picked by looking at the test set.

Reading results (what a notebook cell calls instead of formatting numbers):
:func:`fmt_mean_std`, :func:`verdict`, :func:`significance`,
:func:`per_seed`; table rows :func:`result_row` / :func:`result_rows` (a
Summary, a Run or an accuracy, optionally % of a reference, a verdict
against a baseline, per-seed values, seconds), :func:`compare_row`;
:func:`spread_line`, :func:`per_seed_line`, :func:`binomial_std`;
:func:`show_table` / :func:`markdown_table`.

    runs.show_table(runs.result_rows(summaries, reference=teacher_acc, reference_column="% of teacher",
                                     baseline=summaries["scratch"], per_seed=True))
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch.nn as nn

from . import models, runtime
from .data import ImageData, Split
from .train import History, Objective, evaluate, fit


@dataclass
class Run:
    name: str
    seed: int
    test_acc: float  # after the last epoch
    val_acc: float | None
    params: int
    seconds: float
    history: History = field(repr=False)
    model: nn.Module | None = field(default=None, repr=False)


def train_run(
    name: str,
    build: dict | Callable[[], nn.Module],
    data: ImageData,
    objective: Callable[[], Objective] | None = None,
    *,
    epochs: int,
    lr: float,
    seed: int = 0,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    train: Split | None = None,
    keep_model: bool = False,
    progress: bool = True,
    params: Callable | None = None,
    val_each_epoch: bool = True,
) -> Run:
    """Seed, build a fresh model, fit it, and measure it on ``data.test``.

    ``build`` is a model spec (see :func:`kdcourse.models.build`) or a
    zero-argument function returning a model; ``objective`` a zero-argument
    function returning a fresh objective (``None``: cross-entropy).
    ``train`` replaces ``data.train`` (e.g. a transfer set missing a class).
    ``params(model, objective)`` lists what the optimiser trains (see
    :func:`kdcourse.train.fit`). ``val_each_epoch=False`` measures the
    validation split only after the last epoch (``Run.val_acc`` is the same).
    """
    runtime.seed_everything(seed)
    model = models.build(build, data.num_classes) if isinstance(build, dict) else build()
    obj = objective() if objective is not None else None
    t0 = time.perf_counter()
    hist = fit(model, train if train is not None else data.train, obj, epochs=epochs, lr=lr, batch_size=batch_size,
               weight_decay=weight_decay, val=data.val, val_each_epoch=val_each_epoch, seed=seed, progress=progress,
               desc=f"{name} s{seed}",
               **({"params": params} if params is not None else {}))
    seconds = time.perf_counter() - t0
    predict = (lambda m, x: obj.predict(m, x)) if obj is not None else None
    test_acc = evaluate(model, data.test, predict=predict)["acc"]
    return Run(name, seed, test_acc, hist.last("val_acc"), models.count_params(model), seconds, hist,
               model if keep_model else None)


def repeat(name: str, seeds: Sequence[int], **kwargs) -> list[Run]:
    """:func:`train_run` once per seed."""
    return [train_run(name, seed=s, **kwargs) for s in seeds]


def select_on_validation(name: str, candidates: Mapping, *, seed: int, **kwargs) -> tuple:
    """Train one run per candidate and pick the best on the **validation** split.

    ``candidates`` maps a label (e.g. a loss weight) to a zero-argument
    objective factory, as :func:`train_run` takes it; ``kwargs`` go to
    :func:`train_run` (``data`` must have a validation split). Returns
    ``(best_label, {label: Run})``; ties go to the label listed first. The
    test accuracy is measured for every run but plays no part in the choice.
    """
    if not candidates:
        raise ValueError(f"candidates for {name!r} is empty: give at least one label -> objective factory")
    data = kwargs.get("data")
    if data is None or getattr(data, "val", None) is None or len(data.val) == 0:
        raise ValueError(f"select_on_validation({name!r}) needs data with a validation split (data.val); "
                         "choosing on the test split would make its accuracy a biased estimate")
    tried = {label: train_run(f"{name} [{label}]", seed=seed, objective=make, **kwargs) for label, make in candidates.items()}
    best = max(tried, key=lambda label: tried[label].val_acc)  # max keeps the first of equal values
    return best, tried


@dataclass
class Summary:
    name: str
    mean: float
    std: float  # sample standard deviation over seeds (0 for one run)
    n: int
    values: tuple
    params: int | None = None

    def __str__(self) -> str:
        return f"{fmt_mean_std(self)} % (n={self.n})"


def summarize(runs: Sequence[Run], name: str | None = None) -> Summary:
    """Mean and sample std of the runs' test accuracy."""
    if not runs:
        raise ValueError("runs is empty: train at least one run before summarizing")
    vals = tuple(r.test_acc for r in runs)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return Summary(name or runs[0].name, statistics.fmean(vals), std, len(vals), vals, runs[0].params)


def gap_in_std(better: Summary, worse: Summary) -> float:
    """(mean difference) / (pooled sample std). ``inf`` when both stds are 0
    and the means differ; 0 when nothing differs."""
    diff = better.mean - worse.mean
    pooled = math.sqrt((better.std ** 2 + worse.std ** 2) / 2)
    if pooled == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / pooled


def welch_t(a: Summary, b: Summary) -> tuple[float, float]:
    """Welch's t statistic for mean(a) - mean(b) and its degrees of freedom."""
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    if va + vb == 0:
        return (0.0 if a.mean == b.mean else math.copysign(math.inf, a.mean - b.mean)), float(a.n + b.n - 2)
    t = (a.mean - b.mean) / math.sqrt(va + vb)
    denom = (va ** 2 / (a.n - 1) if a.n > 1 else 0) + (vb ** 2 / (b.n - 1) if b.n > 1 else 0)
    dof = (va + vb) ** 2 / denom if denom else float(a.n + b.n - 2)
    return t, dof


# --------------------------------------------------------------------------
# Reading results: summaries of values, verdicts, table rows
# --------------------------------------------------------------------------

def fmt_mean_std(summary: "Summary", scale: float = 100.0, digits: int = 2) -> str:
    """``"87.25 ± 0.41"``: a summary's mean and std (accuracies in points by default)."""
    return f"{scale * summary.mean:.{digits}f} ± {scale * summary.std:.{digits}f}"


def summary_of(name: str, values: Sequence[float], params: int | None = None) -> Summary:
    """A :class:`~kdcourse.Summary` (mean, sample std) of accuracies."""
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError(f"{name}: no values to summarise")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Summary(name, statistics.fmean(values), std, len(values), values, params)


def verdict(better: Summary, worse: Summary) -> str:
    """Say whether ``better`` differs from ``worse`` beyond the seed noise:
    "gain above noise", "loss above noise" or "within seed-to-seed noise".

    The rule is |Welch t| >= 2 (:func:`kdcourse.welch_t`). With 3 seeds
    a side that is lenient — the 5 % two-sided threshold is about 2.8 to 4.3
    depending on the degrees of freedom — so "within noise" means these
    runs cannot tell the two apart, and "above noise" is a first
    indication, not a proof. A summary
    of one run has no spread of its own: it is compared with twice the
    other side's standard deviation, and the reading says "one run".
    """
    if better.n < 2:
        spread = 2 * worse.std
        if spread == 0:
            return "one run, no spread to compare with"
        inside = abs(better.mean - worse.mean) < spread
        return "one run: within 2 std of the baseline" if inside else \
            ("one run: more than 2 std above the baseline" if better.mean > worse.mean else "one run: more than 2 std below the baseline")
    t, _ = welch_t(better, worse)
    if abs(t) < 2:
        return "within seed-to-seed noise"
    return "gain above noise" if t > 0 else "loss above noise"


def significance(better: Summary, worse: Summary) -> str:
    """One line: the difference in points, in pooled standard deviations,
    Welch's t and the :func:`verdict`."""
    diff = 100 * (better.mean - worse.mean)
    gap = gap_in_std(better, worse)
    t, dof = welch_t(better, worse)
    return (f"{better.name} − {worse.name}: {diff:+.2f} points = {gap:+.1f} pooled std, "
            f"Welch t = {t:+.1f} ({dof:.1f} d.o.f., n = {better.n} and {worse.n}) → {verdict(better, worse)}")


def per_seed(better: Summary, worse: Summary) -> str:
    """The differences seed by seed, in points (``values`` in seed order).

    Where both sides start from the same weights and batches (this lab's
    comparisons with scratch), these paired differences are less noisy than
    the difference of the means — with 3 seeds, still only an indication."""
    if better.n != worse.n:
        raise ValueError(f"per_seed needs the same seeds on both sides, got n = {better.n} and {worse.n}")
    diffs = [100 * (a - b) for a, b in zip(better.values, worse.values)]
    return f"{better.name} − {worse.name}, seed by seed: " + ", ".join(f"{d:+.2f}" for d in diffs) + " points"


def compare_row(summary: Summary, baseline: Summary, method: str | None = None, inference: str = "1 network",
                anchor: str = "") -> dict:
    """A row of the lab's summary table: ``summary`` against ``baseline``."""
    same = summary is baseline
    return {
        "method": method or summary.name,
        "at inference": inference,
        "test acc (%)": fmt_mean_std(summary),
        "seeds": summary.n,
        "Δ vs scratch (points)": "" if same else f"{100 * (summary.mean - baseline.mean):+.2f}",
        "Welch t": "" if same or summary.n < 2 else f"{welch_t(summary, baseline)[0]:+.1f}",
        "reading": "baseline" if same else verdict(summary, baseline),
        "published anchor": anchor,
    }


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table from dicts (floats shown with 4 significant digits).

    Columns: ``columns``, or every key of every row in order of first
    appearance (a row without a key leaves its cell empty)."""
    if not rows:
        return ""
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def show_table(rows: Sequence[dict], columns: Sequence[str] | None = None):
    """Display a table in a notebook (Markdown), or print it elsewhere."""
    text = markdown_table(rows, columns)
    try:
        from IPython.display import Markdown, display

        display(Markdown(text))
    except ImportError:  # pragma: no cover - IPython is a dependency
        print(text)
    return text


# --------------------------------------------------------------------------
# Result rows: one table row per Run / Summary / accuracy, for any lab
# --------------------------------------------------------------------------

def per_seed_values(summary: Summary, digits: int = 1, scale: float = 100.0) -> str:
    """``"87.1, 86.4, 88.0"``: a summary's values in seed order (points by default)."""
    return ", ".join(f"{scale * v:.{digits}f}" for v in summary.values)


def binomial_std(p: float, n: int, floor: float = 0.0) -> float:
    """Standard deviation of an accuracy (or recall) ``p`` measured on ``n``
    examples, ``sqrt(max(p (1 - p), floor) / n)``; ``floor > 0`` keeps it
    from being 0 when ``p`` is 0 or 1."""
    if n < 1:
        raise ValueError(f"binomial_std: n = {n}; give the number of examples the accuracy was measured on (>= 1)")
    return math.sqrt(max(p * (1 - p), floor) / n)


def result_row(value, *, column: str = "test acc (%)", reference: float | None = None,
               reference_column: str = "% of reference", baseline: Summary | None = None,
               baseline_column: str = "vs baseline", per_seed: bool = False, seconds: bool = False) -> dict:
    """The measured columns of one table row, to merge after a row's own
    label columns: ``{"model": name, **result_row(summary, ...)}``.

    ``value`` is a :class:`Summary` (``column`` shows :func:`fmt_mean_std`),
    a :class:`Run` or a plain accuracy, a fraction (``column`` shows points,
    2 decimals). Optional columns, in this order:

    * ``reference`` (a fraction, e.g. the teacher's accuracy): the mean as a
      percentage of it, 1 decimal, under ``reference_column``;
    * ``baseline`` (a Summary): ``"baseline"`` for the baseline itself, else
      :func:`verdict` against it, under ``baseline_column``;
    * ``per_seed``: :func:`per_seed_values` of a Summary, ``"per seed"``;
    * ``seconds``: a Run's training time, 0 decimals (empty for anything else).
    """
    if isinstance(value, Summary):
        mean, shown = value.mean, fmt_mean_std(value)
    elif isinstance(value, Run):
        mean, shown = value.test_acc, f"{100 * value.test_acc:.2f}"
    elif isinstance(value, (int, float)):
        mean, shown = float(value), f"{100 * value:.2f}"
    else:
        raise TypeError(f"result_row: value is a {type(value).__name__}; give a Summary, a Run or an accuracy (a float)")
    row = {column: shown}
    if reference is not None:
        if reference == 0:
            raise ValueError("result_row: reference is 0; give the reference accuracy as a fraction > 0")
        row[reference_column] = f"{100 * mean / reference:.1f}"
    if baseline is not None:
        if not isinstance(value, Summary):
            raise TypeError("result_row: a verdict against baseline needs a Summary as value")
        row[baseline_column] = "baseline" if value is baseline else verdict(value, baseline)
    if per_seed:
        if not isinstance(value, Summary):
            raise TypeError("result_row: per_seed needs a Summary as value")
        row["per seed"] = per_seed_values(value)
    if seconds:
        row["seconds"] = f"{value.seconds:.0f}" if isinstance(value, Run) else ""
    return row


def result_rows(results: Mapping, label: str = "model", **options) -> list[dict]:
    """One row per ``name -> value`` of ``results``: ``{label: name, **result_row(value, **options)}``.

        runs.show_table(runs.result_rows(summaries, reference=teacher_acc, reference_column="% of teacher"))
    """
    return [{label: name, **result_row(value, **options)} for name, value in results.items()]


def spread_line(summaries: Mapping[str, Summary]) -> str:
    """``"seed std per row (points): a 0.31, b 0.12; widest: a"``."""
    if not summaries:
        raise ValueError("spread_line: summaries is empty; give at least one name -> Summary")
    std = {k: 100 * s.std for k, s in summaries.items()}
    widest = max(std, key=std.get)
    return "seed std per row (points): " + ", ".join(f"{k} {v:.2f}" for k, v in std.items()) + f"; widest: {widest}"


def per_seed_line(summary: Summary, name: str | None = None) -> str:
    """``"KD per seed: 87.1, 86.4, 88.0 (range 1.6 points)"``."""
    return (f"{name or summary.name} per seed: {per_seed_values(summary)} "
            f"(range {100 * (max(summary.values) - min(summary.values)):.1f} points)")
