"""Lab 1 checks, third part: measuring a model — its accuracy on a split,
the expected calibration error of its probabilities, the temperature that
calibrates them (chosen on validation), and the bias of
Hinton's missing-class experiment chosen on validation.

Each check runs the exercise's probe (what the grader runs) through
:func:`kdcourse.checks.probing.probe_check`. The references here are private
copies (the grading kernel refuses declared references, and a planted
variant must still run there). :mod:`kdcourse.checks.lab1` declares these
exercises and re-exports the checks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .contract import draw_int
from ..data import Split
from . import contract
from .lab1_training import _tiny_net
from .probing import INPLACE, number, probe_check


def _ex(name: str) -> contract.Exercise:
    from . import lab1

    return next(e for e in lab1.EXERCISES if e.name == name)


# --------------------------------------------------------------------------
# Accuracy of a model on a split
# --------------------------------------------------------------------------

def reference_accuracy(model: nn.Module, split: Split, batch_size: int = 256) -> float:
    """The fraction of ``split`` the model classifies right: eval mode, no
    gradient, every batch counted by its images; the model's mode restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for batch in split.batches(batch_size, device=device):
            correct += int((model(batch.x).argmax(dim=1) == batch.labels).sum())
    model.train(was_training)
    return correct / len(split)


def _acc_variant(eval_mode=True, no_grad=True, per_batch=False, scale=1.0, restore=True, count=False):
    def accuracy(model, split, batch_size=256):
        was = model.training
        if eval_mode:
            model.eval()
        hits, accs = 0, []
        with torch.set_grad_enabled(not no_grad):
            for b in split.batches(batch_size, device=next(model.parameters()).device):
                ok = (model(b.x).argmax(1) == b.labels)
                hits += int(ok.sum())
                accs.append(float(ok.double().mean()))
        if restore:
            model.train(was)
        if count:
            return hits
        return scale * (sum(accs) / len(accs) if per_batch else hits / len(split))
    return accuracy


ACC_TRAIN_MODE = ("the model ran in train mode: its batch-norm layers normalised each batch with the batch's own "
                  "statistics (so the accuracy depends on the batch size) and moved their running averages. "
                  "Call model.eval() before the forward passes.")
ACC_GRAD = ("the forward passes ran with gradients enabled: evaluation needs no graph (it costs memory and time); "
            "wrap the loop in `with torch.no_grad():`.")
ACC_RESTORE = ("the model is left in eval mode: the training loop that called you would go on training with frozen "
               "batch-norm statistics. Note model.training first and restore it (model.train(was_training)).")
ACCURACY_VARIANTS = {
    "train_mode": (_acc_variant(eval_mode=False), ACC_TRAIN_MODE),
    "with_grad": (_acc_variant(no_grad=False), ACC_GRAD),
    "mean_of_batches": (_acc_variant(per_batch=True),
                        "this is the mean of the batches' accuracies: the last batch is smaller, so its images weigh "
                        "more. Count the right answers over all batches and divide by len(split)."),
    "percent": (_acc_variant(scale=100.0), "return a fraction in [0, 1], not a percentage."),
    "not_restored": (_acc_variant(restore=False), ACC_RESTORE),
    "count": (_acc_variant(count=True), "this is the number of right answers; divide by the number of images."),
}


class _Seen:
    def __init__(self, module: nn.Module):
        self.calls = []
        module.register_forward_pre_hook(lambda m, a: self.calls.append((m.training, torch.is_grad_enabled(), len(a[0]))))


def probe_accuracy(fn: Callable, seed: int) -> dict:
    """A tiny float64 conv net with batch-norm (handed over in train mode on
    even seeds, eval mode on odd ones), 9–40 images 3×6×6 of 3–6 classes
    (about 60 % labelled with the net's own eval-mode answer), a batch size
    that leaves a smaller last batch. Records the accuracy and how the model
    was run."""
    g = contract.generator(seed)
    classes, n = draw_int(g, 3, 7), draw_int(g, 9, 41)
    bs = [4, 7, 5, 16][seed % 4]
    if n % bs == 0:
        n += 1
    net = _tiny_net(g, 5, classes)
    x = torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        pred = net.eval()(x).argmax(1)
    keep = torch.rand(n, generator=g) < 0.6
    labels = torch.where(keep, pred, torch.randint(0, classes, (n,), generator=g))
    found = seed % 2 == 0
    net.train(found)
    split = Split(x, labels, tuple(str(c) for c in range(classes)))
    seen, stats = _Seen(net), net[1].running_mean.clone()
    out = fn(net, split, bs)
    return {"case": f"{n} images in batches of {bs}, handed over in {'train' if found else 'eval'} mode",
            "accuracy": number(out, "accuracy"),
            "eval mode in every forward": bool(seen.calls) and not any(t for t, _, _ in seen.calls),
            "no gradient in any forward": not any(gr for _, gr, _ in seen.calls),
            "batch-norm statistics unchanged": bool(torch.equal(stats, net[1].running_mean)),
            "mode restored afterwards": net.training == found}


def _acc_hints(data: dict) -> str | None:
    if not data["eval mode in every forward"] or not data["batch-norm statistics unchanged"]:
        return ACC_TRAIN_MODE
    if not data["no gradient in any forward"]:
        return ACC_GRAD
    if not data["mode restored afterwards"]:
        return ACC_RESTORE
    return None


def check_accuracy(fn: Callable) -> bool:
    """``fn(model, split, batch_size)`` → the fraction of right answers, the
    model run in eval mode without gradient and left in the mode it came in."""
    return probe_check(_ex("accuracy"), fn, hints=_acc_hints)


# --------------------------------------------------------------------------
# Expected calibration error
# --------------------------------------------------------------------------

def reference_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """ECE = sum_b (n_b / N) |accuracy_b − mean confidence_b| over ``n_bins``
    equal-width bins (lo, hi] of the confidence max_c probs (Guo et al. 2017)."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).to(probs.dtype)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += float(in_bin.double().mean()) * abs(float(conf[in_bin].mean() - correct[in_bin].mean()))
    return ece


def _ece_variant(conf_of=None, weight="fraction", signed=False, closed="right"):
    def ece(probs, labels, n_bins=10):
        conf, pred = probs.max(1)
        if conf_of is not None:
            conf = conf_of(probs, labels)
        right = (pred == labels).double()
        edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype)
        gaps, sizes = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (conf > lo) & (conf <= hi) if closed == "right" else (conf >= lo) & (conf < hi)
            if m.any():
                gap = float(conf[m].mean() - right[m].mean())
                gaps.append(gap if signed else abs(gap))
                sizes.append(int(m.sum()))
        if weight == "none":
            return sum(gaps) / len(gaps)
        total = 1 if weight == "count" else len(conf)
        return sum(s * gp for s, gp in zip(sizes, gaps)) / total
    return ece


ECE_VARIANTS = {
    "unweighted": (_ece_variant(weight="none"),
                   "each bin counts the same: weight a bin's |accuracy − confidence| by the fraction of the samples in "
                   "it (n_b / N), or a nearly empty bin weighs as much as a full one."),
    "signed": (_ece_variant(signed=True),
               "the gaps are signed, so over- and under-confident bins cancel: take |accuracy_b − confidence_b|."),
    "true_class": (_ece_variant(conf_of=lambda p, y: p.gather(1, y.unsqueeze(1)).squeeze(1)),
                   "the confidence is the probability of the true class; it is the probability of the PREDICTED class "
                   "(probs.max(dim=1)), compared with whether that prediction is right."),
    "half_open": (_ece_variant(closed="left"),
                  "the bins are [lo, hi): a confidence of exactly 1.0 falls in no bin and is dropped. Use (lo, hi], "
                  "so the last bin ends at 1 included."),
    "counts": (_ece_variant(weight="count"),
               "the bins are weighted by their counts n_b without dividing by N: the result grows with the number of "
               "samples. Weight by n_b / N."),
}


def probe_ece(fn: Callable, seed: int) -> dict:
    """20–200 samples of 2–10 classes, probabilities from logits at several
    scales (some rows exactly one-hot on every other seed), labels right
    about 70 % of the time; n_bins 5, 10 (the default), 15 or 20."""
    g = contract.generator(seed)
    n, c = draw_int(g, 20, 201), draw_int(g, 2, 11)
    probs = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * [1.0, 3.0, 6.0][seed % 3], dim=1)
    if seed % 2 == 0:
        hot = torch.randperm(n, generator=g)[: n // 5]
        probs[hot] = torch.nn.functional.one_hot(probs[hot].argmax(1), c).double()
    pred = probs.argmax(1)
    labels = torch.where(torch.rand(n, generator=g) < 0.7, pred, torch.randint(0, c, (n,), generator=g))
    bins = [None, 5, 15, 20][seed % 4]
    before = probs.clone()
    out = fn(probs, labels) if bins is None else fn(probs, labels, n_bins=bins)
    return {"case": f"{n} samples, {c} classes, n_bins={bins or 10}", "ece": number(out, "expected_calibration_error"),
            INPLACE: [] if torch.equal(before, probs) else ["probs"]}


def check_ece(fn: Callable) -> bool:
    """``fn(probs, labels, n_bins=10)`` → the expected calibration error (a float in [0, 1])."""
    return probe_check(_ex("expected_calibration_error"), fn)


# --------------------------------------------------------------------------
# Temperature scaling: the T that calibrates, chosen on validation
# --------------------------------------------------------------------------

def reference_calibration_temperature(logits: torch.Tensor, labels: torch.Tensor, grid) -> float:
    """The T of ``grid`` (first on a tie) minimising the mean cross-entropy of
    ``logits / T`` on ``labels`` (Guo et al. 2017's temperature scaling)."""
    nll = [float(torch.nn.functional.cross_entropy(logits / float(T), labels)) for T in grid]
    return float(list(grid)[nll.index(min(nll))])


def _temp_variant(score=None, pick=min, scale=lambda z, T: z / T, ties="first"):
    def calibration_temperature(logits, labels, grid):
        values = [float(score(scale(logits, float(T)), labels)) if score else
                  float(torch.nn.functional.cross_entropy(scale(logits, float(T)), labels)) for T in grid]
        best = pick(values)
        i = values.index(best) if ties == "first" else len(values) - 1 - values[::-1].index(best)
        return float(list(grid)[i])
    return calibration_temperature


TEMPERATURE_VARIANTS = {
    "accuracy": (_temp_variant(score=lambda z, y: (z.argmax(1) == y).double().mean(), pick=max),
                 "the temperature is chosen by accuracy, which T cannot change (dividing all logits by T keeps the "
                 "arg-max): choose it by the cross-entropy (negative log-likelihood) of logits / T."),
    "maximised": (_temp_variant(pick=max), "this is the temperature with the HIGHEST cross-entropy; take the lowest."),
    "times_T": (_temp_variant(scale=lambda z, T: z * T), "the logits are multiplied by T; temperature scaling divides them."),
    "ece": (_temp_variant(score=lambda z, y: _ece_variant()(torch.softmax(z, 1), y)),  # a private copy of the ECE
            "the temperature is chosen by the binned ECE, which jumps as samples cross bin edges; Guo et al. fit T by "
            "the cross-entropy (NLL) of logits / T."),
}


def probe_calibration_temperature(fn: Callable, seed: int) -> dict:
    """60–300 validation samples of 3–10 classes whose logits are
    over-confident (scaled by 2–6) or under-confident (by 0.3); a grid of
    temperatures 0.25 … 8 (a list or a 1-D tensor); the T returned."""
    g = contract.generator(seed)
    n, c = draw_int(g, 60, 301), draw_int(g, 3, 11)
    true = torch.randn(n, c, generator=g, dtype=torch.float64) * 1.5
    labels = torch.distributions.Categorical(logits=true).sample()
    factor = [4.0, 0.3, 2.0, 6.0][seed % 4]
    logits = true * factor
    grid = torch.linspace(0.25, 8.0, draw_int(g, 12, 40), dtype=torch.float64)
    grid = grid.tolist() if seed % 2 else grid
    before = logits.clone()
    out = fn(logits, labels, grid)
    return {"case": f"{n} samples, {c} classes, logits x{factor:g}, {len(grid)} temperatures",
            "T": number(out, "calibration_temperature"), INPLACE: [] if torch.equal(before, logits) else ["logits"]}


def check_calibration_temperature(fn: Callable) -> bool:
    """``fn(logits, labels, grid)`` → the T of ``grid`` minimising cross-entropy(logits / T, labels)."""
    return probe_check(_ex("calibration_temperature"), fn)


# --------------------------------------------------------------------------
# The missing class's bias, chosen on validation
# --------------------------------------------------------------------------

def reference_choose_bias(logits: torch.Tensor, labels: torch.Tensor, cls: int, grid) -> float:
    """The value b of ``grid`` (first on a tie) for which adding b to column
    ``cls`` of ``logits`` gives the highest accuracy on ``labels``."""
    best, best_acc = None, -1.0
    for b in grid:
        z = logits.clone()
        z[:, cls] += float(b)
        acc = float((z.argmax(1) == labels).double().mean())
        if acc > best_acc:
            best, best_acc = float(b), acc
    return best


def _bias_variant(score="accuracy", columns="one", sign=1.0, ties="first", returns="bias"):
    def choose_bias(logits, labels, cls, grid):
        scores = []
        for b in grid:
            z = logits.clone()
            if columns == "one":
                z[:, cls] = z[:, cls] + sign * float(b)
            else:
                z = z + float(b)
            pred = z.argmax(1)
            scores.append(float((pred == labels).double().mean()) if score == "accuracy"
                          else float((pred[labels == cls] == cls).double().mean()))
        best = max(scores)
        i = scores.index(best) if ties == "first" else len(scores) - 1 - scores[::-1].index(best)
        return float(list(grid)[i]) if returns == "bias" else best
    return choose_bias


BIAS_VARIANTS = {
    "recall": (_bias_variant(score="recall"),
               "this maximises the recall of the missing class: a large enough bias makes that class win on every "
               "image (recall 100 %, accuracy ruined). Choose the bias by the accuracy over all validation images."),
    "every_column": (_bias_variant(columns="all"),
                     "the bias is added to every logit, which changes no arg-max: add it to column cls only."),
    "subtracted": (_bias_variant(sign=-1.0), "the bias is subtracted: add it to the missing class's logit."),
    "last_of_ties": (_bias_variant(ties="last"),
                     "on a tie, return the first (smallest) bias of the grid: the least change that reaches the best "
                     "accuracy (use a strict >)."),
    "returns_accuracy": (_bias_variant(returns="accuracy"), "return the bias, not the accuracy it reaches."),
}


def probe_choose_bias(fn: Callable, seed: int) -> dict:
    """40–160 samples of 3–6 classes whose class ``cls`` logit is pushed down
    by 1–6 (a class the model never saw), a grid of 9–41 biases (a list or a
    1-D tensor); the bias returned."""
    g = contract.generator(seed)
    n, c = draw_int(g, 40, 161), draw_int(g, 3, 7)
    cls = draw_int(g, 0, c)
    true = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    labels = torch.where(torch.rand(n, generator=g) < 0.8, true.argmax(1), torch.randint(0, c, (n,), generator=g))
    logits = true + 0.5 * torch.randn(n, c, generator=g, dtype=torch.float64)
    logits[:, cls] -= float(torch.rand(1, generator=g)) * 5 + 1
    k = draw_int(g, 9, 42)
    grid = torch.linspace(0, 10, k, dtype=torch.float64)
    grid = grid.tolist() if seed % 2 else grid
    before = logits.clone()
    out = fn(logits, labels, cls, grid)
    return {"case": f"{n} samples, {c} classes, missing class {cls}, {k} biases",
            "bias": number(out, "choose_bias"), INPLACE: [] if torch.equal(before, logits) else ["logits"]}


def check_choose_bias(fn: Callable) -> bool:
    """``fn(logits, labels, cls, grid)`` → the bias of ``grid`` maximising accuracy (first on a tie)."""
    return probe_check(_ex("choose_bias"), fn, seeds=(0, 1, 2, 3, 4, 5))


def declarations() -> list:
    E = contract.Exercise
    return [
        E(name="accuracy", points=1.0, check=check_accuracy, probe=probe_accuracy, reference=reference_accuracy,
          variants=ACCURACY_VARIANTS, hidden_seeds=(0, 1, 2, 3, 4, 5), refuse=(reference_accuracy,)),
        E(name="expected_calibration_error", points=1.0, check=check_ece, probe=probe_ece, reference=reference_ece,
          variants=ECE_VARIANTS, hidden_seeds=tuple(range(8)), rtol=1e-6, atol=1e-9, refuse=(reference_ece,)),
        E(name="calibration_temperature", points=1.0, check=check_calibration_temperature,
          probe=probe_calibration_temperature, reference=reference_calibration_temperature,
          variants=TEMPERATURE_VARIANTS, hidden_seeds=tuple(range(6)), refuse=(reference_calibration_temperature,)),
        E(name="choose_bias", points=1.0, check=check_choose_bias, probe=probe_choose_bias,
          reference=reference_choose_bias, variants=BIAS_VARIANTS, hidden_seeds=tuple(range(8)),
          refuse=(reference_choose_bias,)),
    ]
