"""Predict, measure, read: the few helpers every lab's experiments share.

Before an experiment the student writes down what they expect; after it one
computed line reads the result against the seed-to-seed spread the run
measured; each lab ends with the skills it taught, a short self-test the
notebook checks, and open extensions.

    from kdcourse import lesson

    lesson.predict("Which temperature will give the best student?",
                   options=["T = 1", "T = 2-4", "T = 16", "they will all tie"], key="T sweep");
    ...  # the experiment: t_sweep = {T: Summary, ...}
    lesson.reading("T", t_sweep, spread=kd, key="T sweep")
    # range over T: 1.80 points (highest at T=2, lowest at T=16); seed std 0.30 points (3 seeds),
    #   noise alone spans up to 1.16 points over 5 settings (95 %) → the choice of T matters here;
    #   you predicted: 'T = 2-4'
    lesson.reading("KD vs scratch", (kd, scratch))
    # KD − scratch: +2.10 points; pooled std 0.40 points; Welch t = +5.3 (3.9 d.o.f., n = 3 and 3)
    #   → clears the noise (KD above scratch)

    lesson.you_can_now(["compute soft targets at any temperature", ...])
    lesson.self_test([
        lesson.Numeric("q1", "softmax([2, 0]) at T = 2: the first probability?", expected=0.731, tol=0.005,
                       explain="softmax(z / T) = softmax([1, 0]) = e / (e + 1)."),
        lesson.Choice("q2", "On which split is T chosen?", ["train", "validation", "test"], correct="validation",
                      explain="A choice made on the test split makes its accuracy a biased estimate."),
    ], answers)   # answers = {"q1": 0.73, "q2": "validation"}: the student's, in a solution block
    lesson.extensions(["Try a temperature per sample ...", ...])

API
    ``predict(question, options=None, key=None) -> Prediction``
        Shows the question. In a Jupyter kernel with ipywidgets it adds radio
        buttons (``options``) or a text box; whatever the student picks or
        types is recorded at once in ``PREDICTIONS[key]`` (``key`` defaults
        to the question). Until then, and in headless runs (papermill, CI,
        scripts), the record is ``NO_PREDICTION``. Never graded. Re-running
        the cell keeps an earlier answer.
    ``reading(effect, values, spread=None, *, key=None, labels=None, scale=100, unit="points", noise="seed std")``
        One line (a ``str``) comparing an effect with the measured noise.
        ``values`` is either a mapping setting -> result (a sweep; needs
        ``spread``) or a pair ``(a, b)`` of results (a − b). A result is a
        :class:`kdcourse.runs.Summary` (or anything with ``mean``, ``std``,
        ``n``), a :class:`kdcourse.runs.Run` (its ``test_acc``) or a number.
        ``spread`` is a Summary of repeated seeds (its ``std``) or a number:
        the seed-to-seed standard deviation of one run. ``key`` quotes the
        student's prediction at the end; ``labels`` names the two sides of a
        pair (default: their ``name``). Accuracies in [0, 1] print as points
        (``scale=100``); pass ``scale=1, unit="ms"`` for other measures, and
        ``noise=`` to name a spread that is not a seed std (e.g. "binomial
        std of a recall on 800 images"). Returns a :class:`Reading` (a str).
    ``you_can_now(skills)``, ``extensions(items)``: Markdown lists.
    ``self_test(questions, answers) -> {key: True/False/None}``: checks each
        answer (``Numeric``: within ``tol``; ``Choice``: the option's text,
        any case, or its letter a, b, c, ...), prints ✓ or the explanation;
        ``None`` means not answered. It never raises on a wrong answer.

The rules of the readings
    Two results: with seeds on both sides, Welch's t and the course's verdict
    (:func:`kdcourse.runs.verdict`, |t| >= 2); with one run on a side, the
    difference is compared with twice its standard deviation under the
    measured seed spread, sd = spread·sqrt(1/n_a + 1/n_b).
    A sweep: the range (highest − lowest) is compared with the 95 % point of
    the range of k normal draws (the studentized range at infinite degrees
    of freedom: 2.77, 3.31, 3.63, 3.86 standard deviations for k = 2…5;
    Tukey's tables), using the seed std of one point (spread / sqrt(n) for a
    point averaged over n seeds). A spread measured on 2–3 seeds is itself
    uncertain, so "matters here" is an indication, not a proof.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from . import runs

try:  # the verdict rule lives with the other statistics
    from .runs import verdict as _verdict
except ImportError:  # pragma: no cover - older layout
    from .selfdistill import verdict as _verdict

NO_PREDICTION = "no prediction"
PREDICTIONS: dict[str, object] = {}


# --------------------------------------------------------------------------
# Showing things
# --------------------------------------------------------------------------

def _kernel():
    """The running IPython kernel shell, or None (plain Python, tests)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return None
    ip = get_ipython()
    return ip if ip is not None and getattr(ip, "kernel", None) is not None else None


def _show_markdown(text: str) -> str:
    if _kernel() is not None:
        from IPython.display import Markdown, display

        display(Markdown(text))
    else:
        print(text)
    return text


class Reading(str):
    """A computed reading: a ``str`` that a notebook shows without quotes."""

    def _repr_pretty_(self, p, cycle):
        p.text(str(self))


# --------------------------------------------------------------------------
# Predict
# --------------------------------------------------------------------------

class Prediction:
    """The record of one prediction; ``widget`` is None outside a kernel."""

    def __init__(self, key: str, question: str, options: list | None):
        self.key, self.question, self.options = key, question, options
        self.widget = None
        self.status = None

    @property
    def value(self):
        return PREDICTIONS.get(self.key, NO_PREDICTION)

    def record(self, value) -> None:
        empty = value is None or (isinstance(value, str) and not value.strip())
        PREDICTIONS[self.key] = NO_PREDICTION if empty else value
        if self.status is not None:
            self.status.value = f"recorded: {self.value}"

    def build_widget(self):
        """Radio buttons (options) or a text box; changing it records at once."""
        import ipywidgets as w

        previous = PREDICTIONS.get(self.key, NO_PREDICTION)
        if self.options is not None:
            control = w.RadioButtons(options=self.options, value=previous if previous in self.options else None,
                                     layout=w.Layout(width="max-content"))
        else:
            control = w.Text(value="" if previous == NO_PREDICTION else str(previous),
                             placeholder="your prediction, before you run the next cell", layout=w.Layout(width="36em"))
        self.status = w.HTML(f"recorded: {self.value}")
        control.observe(lambda change: self.record(change["new"]), names="value")
        self.control = control
        self.widget = w.VBox([control, self.status])
        return self.widget

    def _repr_pretty_(self, p, cycle):
        p.text(f"(kept in lesson.PREDICTIONS[{self.key!r}]: {self.value})")


def predict(question: str, options: Sequence[str] | None = None, key: str | None = None) -> Prediction:
    """Ask for a prediction before an experiment; see the module docstring."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    if options is not None:
        if isinstance(options, str) or not isinstance(options, Sequence) or len(options) < 2:
            raise ValueError(f"options must be a list of at least two choices (or None for a text box), got {options!r}")
        options = [str(o) for o in options]
        if len(set(options)) != len(options):
            raise ValueError(f"options must be distinct, got {options!r}")
    if key is not None and (not isinstance(key, str) or not key):
        raise ValueError(f"key must be a non-empty string (or None to use the question), got {key!r}")
    pred = Prediction(key or question.strip(), question.strip(), options)
    PREDICTIONS.setdefault(pred.key, NO_PREDICTION)
    choices = "" if options is None else "\n" + "\n".join(f"  ({chr(97 + i)}) {o}" for i, o in enumerate(options))
    shell = _kernel()
    if shell is None:
        print(f"Predict: {pred.question}{choices}\n(prediction: {pred.value})")
        return pred
    from IPython.display import Markdown, display

    display(Markdown(f"**Predict, before you run the next cell:** {pred.question}"))
    try:
        display(pred.build_widget())
    except ImportError:  # pragma: no cover - ipywidgets is a dependency
        print(f"{choices}\n(set lesson.PREDICTIONS[{pred.key!r}] = your answer)")
    return pred


# --------------------------------------------------------------------------
# Read
# --------------------------------------------------------------------------

@dataclass
class _Result:
    mean: float
    std: float
    n: int


def _result(x, what: str) -> _Result:
    if all(hasattr(x, a) for a in ("mean", "std", "n")):
        return _Result(float(x.mean), float(x.std), int(x.n))
    if hasattr(x, "test_acc"):
        return _Result(float(x.test_acc), 0.0, 1)
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a runs.Summary, a runs.Run or a number, got {type(x).__name__}") from None
    return _Result(v, 0.0, 1)


def _spread(spread) -> tuple[float, int]:
    """(seed std of one run, number of seeds it came from; 0 if unknown)."""
    if spread is None:
        return 0.0, 0
    if all(hasattr(spread, a) for a in ("std", "n")):
        return float(spread.std), int(spread.n)
    try:
        value = float(spread)
    except (TypeError, ValueError):
        raise ValueError(f"spread must be a runs.Summary of repeated seeds or a number (a std), got {spread!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"spread must be a finite std >= 0, got {value!r}")
    return value, 0


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@functools.lru_cache(maxsize=None)
def range_quantile(k: int, q: float = 0.95) -> float:
    """The ``q`` quantile of the range of ``k`` independent standard normal
    draws (the studentized range at infinite degrees of freedom), in
    standard deviations: P(R <= w) = k ∫ φ(x) [Φ(x + w) − Φ(x)]^(k−1) dx."""
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int >= 2 (the number of settings), got {k!r}")
    xs = [-8 + 16 * i / 1600 for i in range(1601)]

    def cdf(w):
        return k * sum(_phi(x) * (_Phi(x + w) - _Phi(x)) ** (k - 1) for x in xs) * (16 / 1600)

    lo, hi = 0.0, 12.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def _noise_word(verdict_text: str) -> str:
    """The course verdict (runs.verdict) as the reading's verdict word."""
    if "no spread" in verdict_text:
        return "cannot tell (no seed spread measured)"
    return "within noise" if "within" in verdict_text else "clears the noise"


def _fmt_setting(effect: str, setting) -> str:
    """``T=2`` for a number (the effect's name up to a parenthesis), the setting itself otherwise."""
    name = effect.split(" (")[0]
    return f"{name}={setting:g}" if isinstance(setting, (int, float)) and not isinstance(setting, bool) else str(setting)


def _quote_prediction(key: str | None) -> str:
    if key is None:
        return ""
    return f"; you predicted: {PREDICTIONS.get(key, NO_PREDICTION)!r}" if PREDICTIONS.get(key, NO_PREDICTION) != NO_PREDICTION \
        else "; you made no prediction"


def _sweep(effect: str, values: Mapping, spread, scale: float, unit: str, noise: str) -> str:
    if len(values) < 2:
        raise ValueError(f"values for a sweep over {effect} needs at least two settings, got {len(values)}")
    if spread is None:
        raise ValueError(f"reading a sweep over {effect} needs spread= (a runs.Summary of repeated seeds, or a std)")
    res = {k: _result(v, f"values[{k!r}]") for k, v in values.items()}
    sigma, n_seeds = _spread(spread)
    hi = max(res, key=lambda k: res[k].mean)
    lo = min(res, key=lambda k: res[k].mean)
    width = scale * (res[hi].mean - res[lo].mean)
    head = (f"range over {effect}: {width:.2f} {unit} (highest at {_fmt_setting(effect, hi)}, "
            f"lowest at {_fmt_setting(effect, lo)})")
    seeds = f" ({n_seeds} seeds)" if n_seeds else ""
    if sigma == 0:
        return head + f"; {noise} 0{seeds} → cannot tell (no spread measured)"
    point_sd = sigma / math.sqrt(min(r.n for r in res.values()))
    limit = range_quantile(len(res)) * point_sd * scale
    word = f"the choice of {effect} matters here" if width > limit else "within noise"
    return (head + f"; {noise} {scale * sigma:.2f} {unit}{seeds}, noise alone spans up to {limit:.2f} {unit} "
            f"over {len(res)} settings (95 %) → {word}")


def _pair(effect: str, values, spread, scale: float, unit: str, labels, noise: str) -> str:
    a, b = values
    if labels is not None and (isinstance(labels, str) or len(labels) != 2):
        raise ValueError(f"labels must be a pair of names for the two results, got {labels!r}")
    names = list(labels) if labels is not None else [getattr(x, "name", None) for x in (a, b)]
    ra, rb = _result(a, "values[0]"), _result(b, "values[1]")
    left, right = (names[0] or "first", names[1] or "second")
    diff = scale * (ra.mean - rb.mean)
    head = f"{effect}: {left} − {right} = {diff:+.2f} {unit}"
    direction = f" ({left} {'above' if diff > 0 else 'below'} {right})"
    if ra.n >= 2 and rb.n >= 2:
        sa = runs.Summary(left, ra.mean, ra.std, ra.n, ())
        sb = runs.Summary(right, rb.mean, rb.std, rb.n, ())
        t, dof = runs.welch_t(sa, sb)
        pooled = scale * math.sqrt((ra.std ** 2 + rb.std ** 2) / 2)
        word = _noise_word(_verdict(sa, sb))
        return (head + f"; pooled std {pooled:.2f} {unit}; Welch t = {t:+.1f} ({dof:.1f} d.o.f., n = {ra.n} and {rb.n})"
                f" → {word}" + (direction if word == "clears the noise" else ""))
    sigma, n_seeds = _spread(spread)
    if sigma == 0:
        sigma = max(ra.std if ra.n >= 2 else 0.0, rb.std if rb.n >= 2 else 0.0)
        n_seeds = max(ra.n if ra.n >= 2 else 0, rb.n if rb.n >= 2 else 0)
    if sigma == 0:
        return head + f" (n = {ra.n} and {rb.n}) → cannot tell (no spread measured; pass spread=)"
    band = 2 * sigma * math.sqrt(1 / ra.n + 1 / rb.n) * scale
    seeds = f" ({n_seeds} seeds)" if n_seeds else ""
    word = "clears the noise" if abs(diff) > band else "within noise"
    return (head + f" (n = {ra.n} and {rb.n}); {noise} {scale * sigma:.2f} {unit}{seeds}, "
            f"2 sd of this difference = {band:.2f} {unit} → {word}" + (direction if word == "clears the noise" else ""))


def reading(effect: str, values, spread=None, *, key: str | None = None, labels=None, scale: float = 100.0,
            unit: str = "points", noise: str = "seed std") -> Reading:
    """One computed line: an effect read against the measured seed spread
    (see the module docstring for the forms and the rules)."""
    if not isinstance(effect, str) or not effect:
        raise ValueError(f"effect must be a short non-empty name (e.g. 'T'), got {effect!r}")
    if isinstance(values, Mapping):
        line = _sweep(effect, values, spread, scale, unit, noise)
    elif isinstance(values, (tuple, list)) and len(values) == 2:
        line = _pair(effect, values, spread, scale, unit, labels, noise)
    else:
        raise ValueError("values must be a mapping setting -> result (a sweep) or a pair (a, b) of results, "
                         f"got {type(values).__name__}")
    return Reading(line + _quote_prediction(key))


# The end of a lab (you_can_now, extensions, the self-test): kdcourse.lab_end, re-exported here
from .lab_end import Choice, Numeric, extensions, self_test, you_can_now  # noqa: E402,F401
