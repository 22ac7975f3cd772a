"""lesson: predictions are recorded (widget and headless), readings compute
their statistics from the numbers given, self-tests judge answers."""
import math
import statistics

import pytest
import torch

from kdcourse import lesson, runs


@pytest.fixture(autouse=True)
def _fresh_predictions():
    lesson.PREDICTIONS.clear()
    yield
    lesson.PREDICTIONS.clear()


def summary(name, values):
    return runs.Summary(name, statistics.fmean(values), statistics.stdev(values), len(values), tuple(values))


# -------------------------------------------------------------- predict

def test_headless_predict_prints_the_question_and_records_no_prediction(capsys):
    p = lesson.predict("Which T wins?", options=["T=1", "T=4"], key="T")
    out = capsys.readouterr().out
    assert "Which T wins?" in out and "(a) T=1" in out and "(b) T=4" in out
    assert lesson.PREDICTIONS == {"T": lesson.NO_PREDICTION} and p.value == lesson.NO_PREDICTION


def test_radio_widget_records_the_choice_and_a_rerun_keeps_it():
    p = lesson.predict("Which T wins?", options=["T=1", "T=4"], key="T")
    p.build_widget()
    assert p.control.value is None
    p.control.value = "T=4"  # fires the observer synchronously
    assert lesson.PREDICTIONS["T"] == "T=4" and "T=4" in p.status.value
    again = lesson.predict("Which T wins?", options=["T=1", "T=4"], key="T")
    again.build_widget()
    assert again.control.value == "T=4" and lesson.PREDICTIONS["T"] == "T=4"


def test_text_widget_records_typing_and_blank_is_no_prediction():
    p = lesson.predict("How many points will KD add?")
    assert p.key == "How many points will KD add?"
    p.build_widget()
    p.control.value = "about 2"
    assert lesson.PREDICTIONS[p.key] == "about 2"
    p.control.value = "   "
    assert lesson.PREDICTIONS[p.key] == lesson.NO_PREDICTION


@pytest.mark.parametrize("kwargs,word", [
    (dict(question=""), "question"),
    (dict(question="q", options=["only one"]), "options"),
    (dict(question="q", options="ab"), "options"),
    (dict(question="q", options=["a", "a"]), "distinct"),
    (dict(question="q", key=""), "key"),
])
def test_predict_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        lesson.predict(**kwargs)


# -------------------------------------------------------------- reading

def test_range_quantile_matches_tukeys_table_and_a_simulation():
    # Studentized range, 95 %, infinite d.o.f. (Harter 1960 / Tukey tables)
    for k, table in ((2, 2.772), (3, 3.314), (4, 3.633), (5, 3.858), (6, 4.030)):
        assert lesson.range_quantile(k) == pytest.approx(table, abs=2e-3)
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(200_000, 5, generator=g, dtype=torch.float64)
    ranges = draws.max(1).values - draws.min(1).values
    assert float((ranges <= lesson.range_quantile(5)).double().mean()) == pytest.approx(0.95, abs=3e-3)


def test_pair_reading_is_welch_t_computed_by_hand():
    a, b = summary("KD", [0.85, 0.848, 0.856]), summary("scratch", [0.83, 0.826, 0.835])
    line = lesson.reading("KD vs scratch", (a, b))
    va, vb = statistics.variance(a.values) / 3, statistics.variance(b.values) / 3
    t = (a.mean - b.mean) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    pooled = 100 * math.sqrt((a.std ** 2 + b.std ** 2) / 2)
    assert f"KD − scratch = {100 * (a.mean - b.mean):+.2f} points" in line
    assert f"pooled std {pooled:.2f} points" in line
    assert f"Welch t = {t:+.1f} ({dof:.1f} d.o.f., n = 3 and 3)" in line
    assert line.endswith("→ clears the noise (KD above scratch)")


def test_pair_reading_within_noise_and_below():
    a, b = summary("A", [0.80, 0.84, 0.82]), summary("B", [0.81, 0.85, 0.83])
    assert lesson.reading("A vs B", (a, b)).endswith("→ within noise")
    low = summary("low", [0.70, 0.71, 0.705])
    assert lesson.reading("low vs B", (low, b)).endswith("→ clears the noise (low below B)")


def test_pair_reading_of_single_runs_uses_the_spread():
    spread = summary("KD", [0.85, 0.848, 0.856])
    sd = spread.std * math.sqrt(2)
    big = lesson.reading("unfrozen", (0.80, 0.85), spread=spread, labels=("unfrozen", "frozen"))
    assert f"2 sd of this difference = {200 * sd:.2f} points" in big and big.endswith("(unfrozen below frozen)")
    assert "clears the noise" in big
    small = lesson.reading("unfrozen", (0.851, 0.85), spread=spread, labels=("unfrozen", "frozen"))
    assert small.endswith("→ within noise")
    assert "cannot tell" in lesson.reading("x", (0.8, 0.7))
    named = lesson.reading("recall", (0.9, 0.5), spread=0.02, labels=("a", "b"), noise="binomial std")
    assert "binomial std 2.00 points" in named and "2 sd of this difference = 5.66 points" in named


def test_pair_reading_takes_runs():
    spread = summary("KD", [0.85, 0.848, 0.856])
    r1 = runs.Run("one", 0, 0.80, None, 10, 1.0, history=None)
    r2 = runs.Run("two", 0, 0.86, None, 10, 1.0, history=None)
    assert "one − two = -6.00 points" in lesson.reading("runs", (r1, r2), spread=spread)


def test_sweep_reading_compares_the_range_with_the_noise_range():
    spread = summary("KD", [0.85, 0.848, 0.856])
    sweep = {1: 0.84, 2: 0.851, 4: 0.846, 8: 0.842, 16: 0.833}
    line = lesson.reading("T", sweep, spread=spread)
    limit = 100 * spread.std * lesson.range_quantile(5)
    assert "range over T: 1.80 points (highest at T=2, lowest at T=16)" in line
    assert f"seed std {100 * spread.std:.2f} points (3 seeds)" in line
    assert f"up to {limit:.2f} points over 5 settings" in line
    assert line.endswith("→ the choice of T matters here")
    named = lesson.reading("T (validation)", {"small": 0.8, "large": 0.9}, spread=spread, noise="val std")
    assert "highest at large, lowest at small" in named and "val std" in named
    assert "highest at T=2" in lesson.reading("T (validation)", {1: 0.8, 2: 0.9}, spread=spread)
    flat = {1: 0.850, 2: 0.852, 4: 0.849}
    assert lesson.reading("T", flat, spread=spread).endswith("→ within noise")
    # points averaged over n seeds have a std / sqrt(n) of noise
    means = {k: runs.Summary(str(k), v, 0.004, 4, ()) for k, v in flat.items()}
    assert f"up to {100 * spread.std / 2 * lesson.range_quantile(3):.2f}" in lesson.reading("T", means, spread=spread)


def test_sweep_reading_without_spread_says_so():
    assert "cannot tell" in lesson.reading("T", {1: 0.8, 2: 0.9}, spread=0.0)
    with pytest.raises(ValueError, match="spread="):
        lesson.reading("T", {1: 0.8, 2: 0.9})


def test_reading_quotes_the_prediction_and_shows_without_quotes():
    lesson.PREDICTIONS["T"] = "T=4"
    line = lesson.reading("T", {1: 0.8, 2: 0.9}, spread=0.01, key="T")
    assert line.endswith("; you predicted: 'T=4'") and isinstance(line, str)
    assert lesson.reading("T", {1: 0.8, 2: 0.9}, spread=0.01, key="other").endswith("you made no prediction")
    from IPython.lib.pretty import pretty

    assert pretty(line) == str(line)


def test_noise_word_covers_every_verdict():
    one = runs.Summary("one", 0.8, 0.0, 1, (0.8,))
    many = summary("many", [0.80, 0.81, 0.82])
    flat = runs.Summary("flat", 0.8, 0.0, 3, (0.8, 0.8, 0.8))
    texts = {lesson._verdict(a, b) for a, b in [(one, many), (one, flat), (many, flat),
                                                  (summary("m2", [0.6, 0.61, 0.62]), many),
                                                  (summary("m3", [0.80, 0.82, 0.81]), many)]}
    assert len(texts) >= 4
    words = {lesson._noise_word(t) for t in texts}
    assert words <= {"within noise", "clears the noise", "cannot tell (no seed spread measured)"} and len(words) == 3


@pytest.mark.parametrize("args,kwargs,word", [
    (("", (0.1, 0.2)), {}, "effect"),
    (("T", [0.1, 0.2, 0.3]), {}, "mapping"),
    (("T", {1: 0.1}), {"spread": 0.1}, "at least two"),
    (("T", {1: "x", 2: 0.2}), {"spread": 0.1}, "values"),
    (("T", {1: 0.1, 2: 0.2}), {"spread": -1.0}, "spread"),
    (("T", (0.1, 0.2)), {"labels": "ab"}, "labels"),
])
def test_reading_rejects_bad_arguments(args, kwargs, word):
    with pytest.raises(ValueError, match=word):
        lesson.reading(*args, **kwargs)


# -------------------------------------------------------------- end of a lab

QUESTIONS = [
    lesson.Numeric("p", "softmax([2, 0]) at T=2, first entry?", expected=math.e / (math.e + 1), tol=0.005,
                   explain="softmax([1, 0]) = e / (e + 1)."),
    lesson.Choice("split", "Where is T chosen?", ["train", "validation", "test"], correct="validation",
                  explain="the test split must not take part in a choice."),
]


def test_self_test_judges_numbers_letters_and_text(capsys):
    import numpy as np

    assert lesson.self_test(QUESTIONS, {"p": np.float32(0.731), "split": "b"}) == {"p": True, "split": True}
    assert lesson.self_test(QUESTIONS, {"p": torch.tensor(0.73), "split": "  Validation "}) == {"p": True, "split": True}
    out = capsys.readouterr().out
    assert "2 of 2 right" in out and "✗" not in out


def test_self_test_explains_a_wrong_answer_and_marks_missing_ones(capsys):
    res = lesson.self_test(QUESTIONS, {"p": 0.5})
    out = capsys.readouterr().out
    assert res == {"p": False, "split": None}
    assert "✗ 0.5 is not right. softmax([1, 0]) = e / (e + 1)." in out and "not answered" in out
    assert lesson.self_test(QUESTIONS, {"p": "zero", "split": "test"}) == {"p": False, "split": False}
    assert lesson.self_test(QUESTIONS, {"p": float("nan"), "split": 2}) == {"p": False, "split": False}


def test_self_test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="keys no question uses"):
        lesson.self_test(QUESTIONS, {"q9": 1})
    with pytest.raises(ValueError, match="questions"):
        lesson.self_test([], {})
    with pytest.raises(ValueError, match="answers"):
        lesson.self_test(QUESTIONS, [1, 2])
    with pytest.raises(ValueError, match="not one of the options"):
        lesson.Choice("c", "?", ["a", "b"], correct="c", explain="")


def test_you_can_now_and_extensions_print_markdown_lists(capsys):
    text = lesson.you_can_now(["write a KD loss", "read a sweep against the seed std"])
    assert text.startswith("### You can now") and "- write a KD loss" in text
    ext = lesson.extensions([("A temperature per sample.", "Try it."), "Augment with a live teacher."])
    assert "1. **A temperature per sample.** Try it." in ext and "2. Augment" in ext
    assert "You can now" in capsys.readouterr().out
    with pytest.raises(ValueError, match="skills"):
        lesson.you_can_now("one string")
    with pytest.raises(ValueError, match="extensions"):
        lesson.extensions(["ok", ""])
