"""The results layer: table rows, spreads and readings built from Runs and
Summaries (runs.py), Lab 1/3/6's tables (recipes), Lab 5's deployment
tables (deploy/tables.py) and plots.twin_series — each against rows or
numbers worked out here by hand or with float64 statistics."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn as nn

from kdcourse import data, plots, runs
from kdcourse.deploy import tables
from kdcourse.deploy.measure import Latency
from kdcourse.recipes import lab1, lab3_report, lab6
from kdcourse.train import History


def run(name, acc, seconds=1.0, seed=0, epochs=()):
    hist = History(dict(row) for row in epochs)
    return runs.Run(name, seed, acc, None, 10, seconds, hist)


@pytest.fixture
def s3():
    return runs.summary_of("KD", (0.80, 0.90, 0.85))  # mean 0.85, sample std 0.05


# ---------------------------------------------------------------- runs.py

def test_result_row_of_a_summary_matches_the_hand_computed_row(s3):
    row = runs.result_row(s3, reference=0.9, reference_column="% of teacher", per_seed=True)
    assert row == {"test acc (%)": "85.00 ± 5.00", "% of teacher": "94.4", "per seed": "80.0, 90.0, 85.0"}
    assert list(row) == ["test acc (%)", "% of teacher", "per seed"]
    assert row["test acc (%)"] == runs.fmt_mean_std(s3)


def test_result_row_verdict_against_a_baseline(s3):
    base = runs.summary_of("scratch", (0.50, 0.51, 0.49))
    # Welch t by hand: (0.85 - 0.50) / sqrt(0.05²/3 + 0.01²/3) = 11.9 -> a gain
    t = (0.85 - 0.50) / math.sqrt(0.05 ** 2 / 3 + 0.01 ** 2 / 3)
    assert t > 2
    assert runs.result_row(s3, baseline=base, baseline_column="vs scratch")["vs scratch"] == "gain above noise"
    assert runs.result_row(base, baseline=base)["vs baseline"] == "baseline"
    close = runs.summary_of("close", (0.50, 0.52, 0.48))
    assert runs.result_row(close, baseline=base)["vs baseline"] == "within seed-to-seed noise"


def test_result_row_of_a_run_and_of_a_float():
    r = run("one", 0.87654, seconds=12.6)
    assert runs.result_row(r, seconds=True) == {"test acc (%)": "87.65", "seconds": "13"}
    assert runs.result_row(0.5, seconds=True, column="acc") == {"acc": "50.00", "seconds": ""}
    assert runs.result_row(0.45, reference=0.9) == {"test acc (%)": "45.00", "% of reference": "50.0"}


def test_result_row_refuses_what_it_cannot_show(s3):
    with pytest.raises(TypeError, match="value"):
        runs.result_row("87 %")
    with pytest.raises(ValueError, match="reference"):
        runs.result_row(s3, reference=0)
    with pytest.raises(TypeError, match="per_seed"):
        runs.result_row(0.5, per_seed=True)
    with pytest.raises(TypeError, match="baseline"):
        runs.result_row(0.5, baseline=s3)


def test_result_rows_puts_the_label_first(s3):
    rows = runs.result_rows({"teacher": 0.9, "KD": s3}, label="", reference=0.9)
    assert rows == [{"": "teacher", "test acc (%)": "90.00", "% of reference": "100.0"},
                    {"": "KD", "test acc (%)": "85.00 ± 5.00", "% of reference": "94.4"}]
    assert runs.markdown_table(rows).splitlines()[0] == "|  | test acc (%) | % of reference |"


def test_binomial_std_against_its_formula():
    assert runs.binomial_std(0.9, 100) == pytest.approx(0.03, rel=1e-12)
    assert runs.binomial_std(1.0, 100) == 0.0
    assert runs.binomial_std(1.0, 100, floor=1e-12) == pytest.approx(1e-7, rel=1e-12)
    with pytest.raises(ValueError, match="n = 0"):
        runs.binomial_std(0.5, 0)


def test_spread_and_per_seed_lines(s3):
    other = runs.summary_of("scratch", (0.50, 0.51, 0.49))
    std_kd = 100 * statistics.stdev((0.80, 0.90, 0.85))
    assert runs.spread_line({"KD": s3, "scratch": other}) == \
        f"seed std per row (points): KD {std_kd:.2f}, scratch 1.00; widest: KD"
    assert runs.per_seed_line(s3) == "KD per seed: 80.0, 90.0, 85.0 (range 10.0 points)"
    assert runs.per_seed_line(s3, "renamed").startswith("renamed per seed: ")
    assert runs.per_seed_values(s3, digits=2) == "80.00, 90.00, 85.00"
    with pytest.raises(ValueError, match="empty"):
        runs.spread_line({})


# ---------------------------------------------------------------- recipes

def test_lab3_compression_table_and_reading(s3):
    scratch = runs.summary_of("scratch", (0.50, 0.51, 0.49))
    sp = {"params": (1_000_000, 50_000), "params_no_embeddings": (800_000, 20_000), "p50_ms": (12.34, 1.06),
          "speedup": 6.0}
    rows = lab3_report.compression_table(sp, "T", "S", 0.9, {"scratch": scratch, "KD": s3})
    assert rows[0] == {"model": "teacher (T)", "params": "1,000,000", "params w/o embeddings": "800,000",
                       "CPU p50 (ms)": "12.3", "test acc (%)": "90.00", "% of teacher": "100",
                       "per seed": "(trained once)"}
    assert rows[2] == {"model": "student (S), KD", "params": "50,000", "params w/o embeddings": "20,000",
                       "CPU p50 (ms)": "1.1", "test acc (%)": "85.00 ± 5.00", "% of teacher": "94.4",
                       "vs scratch": "gain above noise", "per seed": "80.0, 90.0, 85.0"}
    assert rows[1]["vs scratch"] == "baseline"
    text = lab3_report.compression_reading(sp, {"scratch": scratch, "KD": s3}, "KD", 0.9).splitlines()
    gap = (0.85 - 0.50) / math.sqrt((0.05 ** 2 + 0.01 ** 2) / 2)
    assert text[0] == "student vs teacher: 20.0x fewer parameters (40.0x without embeddings), 6.0x faster on this CPU"
    assert text[1] == (f"best KD recipe: KD, 85.00% = 94.4% of the teacher; scratch 50.00% = 55.6%; "
                       f"gap +35.00 points = {gap:.1f} pooled std (n = 3 seeds)")
    assert text[2:] == ["  met: student >= 10x fewer parameters", "  met: student >= 5x faster on this CPU",
                        "  NOT met: best KD recipe >= 95% of the teacher"]
    with pytest.raises(KeyError, match="baseline"):
        lab3_report.compression_table(sp, "T", "S", 0.9, {"KD": s3})


def test_lab3_single_runs_table():
    rows = lab3_report.single_runs_table({"progressive": run("p", 0.8, seconds=41.4)},
                                         {"scratch": [run("s", 0.7), run("s", 0.1)]})
    assert rows == [{"recipe": "progressive", "test acc (%)": "80.00", "seconds": "41"},
                    {"recipe": "scratch (same seed, from the table)", "test acc (%)": "70.00", "seconds": ""}]


def test_lab6_patience_rows():
    real = [run("real", 0.80, epochs=[{"seconds": 1.0}, {"seconds": 2.0}]),
            run("real", 0.90, epochs=[{"seconds": 4.0}])]
    pc = {"runs": {"patient": run("patient", 0.875)}, "epochs": {"patient": 8}, "train_seconds": {"patient": 12.34}}
    rows = lab6.patience_rows(pc, real, epochs=2)
    std = 100 * statistics.stdev((0.80, 0.90))
    assert rows == [{"run": "cached logits, usual schedule (table above, 2 seeds)", "epochs": 2,
                     "train time (s)": "3.5", "test acc (%)": f"85.00 ± {std:.2f}"},
                    {"run": "patient", "epochs": 8, "train time (s)": "12.3", "test acc (%)": "87.50"}]


def test_lab1_teacher_rows_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    train = data.Split(torch.randn(20, 3, 4, 4, generator=g), torch.randint(0, 3, (20,), generator=g), ("a", "b", "c"))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).eval()
    labels = torch.tensor([0, 1, 2, 2])
    test_logits = {"t": torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [3.0, 0, 0], [0, 0, 1.0]])}  # 3 of 4 right
    rows = lab1.teacher_rows({"t": teacher}, test_logits, {"t": 0.0123}, {"t": run("s", 0.6543)}, labels, train)
    with torch.no_grad():
        p = torch.softmax(teacher(train.images).double(), 1)
    bits = float((-(p * p.log2()).sum(1)).mean())
    assert rows == [{"teacher": "t", "teacher test acc (%)": "75.00", "teacher ECE on test (%)": "1.23",
                     "mean entropy of its predictions on the student's images (bits)": f"{bits:.3f}",
                     "student test acc (%)": "65.43"}]
    with pytest.raises(KeyError, match="ECE"):
        lab1.teacher_rows({"t": teacher}, test_logits, {}, {"t": run("s", 0.5)}, labels, train)


# ---------------------------------------------------------------- deploy/tables.py

def lat(p50, p99=None):
    return Latency(p50, p99 if p99 is not None else 2 * p50, p50, p50, 5, 1, 1, 1, 2, samples_ms=(p50,))


def tail(latency):
    return "p99 (ms)", latency.p99_ms


def test_variant_table_against_a_direct_measurement():
    torch.manual_seed(0)
    images = torch.randn(16, 3, 4, 4)
    split = data.Split(images, torch.randint(0, 3, (16,)), ("a", "b", "c"))
    ref = nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).eval()
    noisy = lambda x: ref(x) + 0.3 * torch.randn(x.shape[0], 3)  # noqa: E731
    x1 = images[:1]
    rows = tables.variant_table({"fp32": (ref, ref, ref), "noisy": (noisy, ref, ref)}, split, x1,
                                {"fp32": lat(1.0), "noisy": lat(0.5)}, tail)
    with torch.no_grad():
        acc = 100 * float((ref(images).argmax(1) == split.labels).float().mean())
    n = sum(p.numel() for p in ref.parameters())
    assert rows[0] == {"model": "fp32", "params": f"{n:,}", "MMAC/image": f"{48 * 3 / 1e6:.2f}",
                       "size (MB)": rows[0]["size (MB)"], "p50 (ms)": "1.000", "p99 (ms)": "2.000",
                       "test acc (%)": f"{acc:.2f}", "agrees with fp32 (%)": "100.0"}
    assert float(rows[0]["size (MB)"]) > n * 4 / 1e6 * 0.9
    assert rows[1]["p50 (ms)"] == "0.500" and rows[1]["params"] == f"{n:,}"
    # the unrounded figures behind the strings
    assert rows.measured["fp32"]["accuracy %"] == pytest.approx(acc) and rows.measured["fp32"]["MACs"] == 48 * 3
    assert rows.measured["noisy"]["params"] == n and rows.measured["fp32"]["agreement %"] == 100.0
    # the line reads unrounded figures: sizes 0.0004 and 0.0001 MB print as "0.000" but are 4x apart
    measured = {"a": {"accuracy %": 80.0, "size MB": 0.0004}, "b": {"accuracy %": 81.0, "size MB": 0.0004},
                "c": {"accuracy %": 79.5, "size MB": 0.0001}}
    table = tables.VariantTable([{"model": k} for k in measured], measured)
    line = tables.int8_change_line(table, {"a": lat(3), "b": lat(2), "c": lat(1)}, 200, fp32="a", fp32_runtime="b", int8="c")
    assert line == ("INT8 changes the student's test accuracy by -0.50 points on 200 images (one image = 0.50 points); "
                    "p50 in ONNX Runtime 2.000 ms (fp32) -> 1.000 ms (INT8); file 4.0x smaller")
    with pytest.raises(KeyError, match="no row"):
        tables.int8_change_line(tables.VariantTable([], {}), {}, 10)
    with pytest.raises(TypeError, match="variant_table"):
        tables.int8_change_line([{"model": "a", "test acc (%)": "80.00", "size (MB)": "4.000"}], {}, 10)


def test_target_line_and_network_table():
    assert tables.target_line("m", lat(5.0, 19.0), tail, 20.0).endswith("m p50 5.000 ms, p99 19.000 ms -> met")
    assert tables.target_line("m", lat(5.0, 25.0), tail, 20.0).endswith("-> NOT met")
    rows = tables.network_table({"r": (None, nn.Linear(2, 2), 6, {"int8": 3, "float": 1}), "f": (None, nn.Linear(2, 2), 6, "0/4")},
                                {"r": lat(1.234), "f": lat(2.0)}, {6: 2_500_000_000}, tail)
    assert rows[0] == {"model": "r", "params": "6", "GMAC/image": "2.50", "size (MB)": rows[0]["size (MB)"],
                       "p50 (ms)": "1.23", "p99 (ms)": "2.47", "convs int8/float": "3/1"}
    assert rows[1]["convs int8/float"] == "0/4"


def test_bert_table_agreement_and_logit_difference():
    tokens = torch.randint(0, 5, (4, 3))
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    flip = lambda ids, mask: ref * torch.tensor([[1.0], [1.0], [1.0], [-1.0]])  # noqa: E731  last row: class 0
    rows = tables.bert_table({"same": (lambda ids, mask: ref, nn.Linear(1, 1)), "flip": (flip, nn.Linear(1, 1))},
                             tokens, ref, {"same": lat(1.0), "flip": lat(3.0)}, tail)
    assert rows[0]["agrees with fp32 (%)"] == "100.0" and rows[0]["max |logit diff|"] == "0.000"
    assert rows[1]["agrees with fp32 (%)"] == "75.0" and rows[1]["max |logit diff|"] == "2.000"
    assert rows[1]["p50 (ms)"] == "3.00" and rows[1]["p99 (ms)"] == "6.00"


# ---------------------------------------------------------------- plots

def test_twin_series_plots_both_logged_series():
    hist = History([{"epoch": 1, "T": 8.0, "alpha": 0.9}, {"epoch": 2, "T": 5.0, "alpha": 0.7}])
    fig = plots.twin_series(hist, "T", "alpha", title="schedule")
    left, right = fig.axes
    assert list(left.lines[0].get_ydata()) == [8.0, 5.0] and list(right.lines[0].get_ydata()) == [0.9, 0.7]
    assert left.get_ylabel() == "T" and right.get_ylabel() == "alpha" and left.get_title() == "schedule"
    with pytest.raises(KeyError, match="'beta'"):
        plots.twin_series(hist, "T", "beta")


def test_lab3_accuracy_by_form_against_a_loop_over_reviews():
    from kdcourse.data.reviews import FORMS, TextSplit

    class FirstToken(nn.Module):  # predicts class (first token id) % 2
        def forward(self, input_ids, attention_mask=None):
            return nn.functional.one_hot(input_ids[:, 0] % 2, 2).float()

    ids = torch.tensor([[1, 5], [2, 5], [3, 5], [4, 5], [5, 5]])
    labels = torch.tensor([1, 1, 1, 0, 0])   # right, wrong, right, right, wrong
    forms = (FORMS[0], FORMS[0], FORMS[1], FORMS[1], FORMS[1])
    split = TextSplit(ids, labels, forms=forms)
    acc = lab3_report.accuracy_by_form(FirstToken(), split)
    pred = [int(i) % 2 for i in ids[:, 0]]
    for f in FORMS:
        idx = [i for i, g in enumerate(forms) if g == f]
        if idx:
            assert acc[f] == pytest.approx(sum(pred[i] == int(labels[i]) for i in idx) / len(idx))
        else:
            assert math.isnan(acc[f])
    assert acc[FORMS[0]] == 0.5 and acc[FORMS[1]] == pytest.approx(2 / 3)
    rows = lab3_report.by_form_rows({"m": FirstToken()}, split)
    assert rows[0]["model"] == "m" and rows[0][FORMS[0]] == "50" and rows[0][FORMS[1]] == "67"
    assert list(rows[0]) == ["model", *FORMS]
