"""Lab 2's experiments: which objective each method of the lab is, its
weights chosen on validation, the runs, and the tables the notebook shows.

The objectives themselves are :class:`~kdcourse.distill.features.FeatureDistill`,
:class:`~kdcourse.distill.features.CRDDistill` and the student's own FitNets
(reference :class:`kdcourse.distill.fitnets.FitNets`); the settings per
profile are :class:`kdcourse.profiles.Lab2Settings`. :class:`Experiments`
keeps the notebook's cells short: it holds the shared run arguments, the
results by name, and the weights chosen on the validation split.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .. import runs
from ..distill.features import CRDDistill, FeatureDistill, Term
from ..losses import feature, relation
from ..losses.contrastive import info_nce as _info_nce
from ..profiles import REPDISTILLER_WEIGHTS, lab2_settings
from ..train import Objective

#: Lab 2's methods -> the entries of the weights dict each one uses (scaled
#: together when a weight is chosen; "response + feature" reuses FitNets').
LAB2_WEIGHT_KEYS = {"feature (FitNets)": ("hint",), "AT": ("at",), "SP": ("sp",),
                    "RKD": ("rkd_distance", "rkd_angle"), "CRD": ("crd",), "PKT": ("pkt",)}
LAB2_METHODS = ("scratch", "response (KD)", "feature (FitNets)", "response + feature", "AT", "SP", "RKD", "CRD",
                "InfoNCE (in-batch)", "PKT")
#: PKT's loss weight in RepDistiller's CIFAR-100 scripts (``-b 30000``), next to
#: :data:`kdcourse.profiles.REPDISTILLER_WEIGHTS` (the notebook adds it).
PKT_WEIGHT = 30000.0
_EXTRA_WEIGHTS = {"pkt": PKT_WEIGHT}  # used where a weights dict (e.g. the profile's) has no entry for PKT


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT (Passalis & Tefas, ECCV 2018) as RepDistiller computes it: cosine
    kernels (K + 1) / 2 of the (B, D) embeddings, each row normalised to
    p(j | i), mean over the B² entries of p_t log((p_t + eps) / (p_s + eps));
    the teacher a constant. (The default of :func:`lab2_objective`; the lab's
    student writes their own.)"""
    def cond(f):
        u = torch.nn.functional.normalize(f.flatten(1), dim=1)
        k = (u @ u.t() + 1) / 2
        return k / k.sum(dim=1, keepdim=True)

    p_s, p_t = cond(student), cond(teacher.detach())
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def lab_settings(profile) -> dict:
    """Lab 2's knobs for ``profile`` as a dict (see :class:`kdcourse.profiles.Lab2Settings`)."""
    return lab2_settings(profile).as_dict()


def scale_weights(weights: dict, method: str, scale: float) -> dict:
    """A copy of ``weights`` with ``method``'s entries (``LAB2_WEIGHT_KEYS``) multiplied by ``scale``."""
    if method not in LAB2_WEIGHT_KEYS:
        raise ValueError(f"method {method!r} has no loss weight; methods with one: {sorted(LAB2_WEIGHT_KEYS)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number (a multiple of the weight), got {scale!r}")
    out, base = dict(weights), {**_EXTRA_WEIGHTS, **weights}
    for key in LAB2_WEIGHT_KEYS[method]:
        out[key] = float(base[key]) * float(scale)
    return out


def lab2_objective(method: str, teacher: nn.Module, weights: dict, *, crd_k: int = 4096, hint_layer: str = "layer2",
                   hint_loss: Callable = feature.hint_loss, at_loss: Callable = feature.attention_transfer_loss,
                   rkd_distance: Callable = relation.rkd_distance, rkd_angle: Callable = relation.rkd_angle,
                   sp_loss: Callable = relation.similarity_preserving,
                   info_nce: Callable = _info_nce, fitnets: Callable | None = None,
                   nce_temperature: float = 0.1, pkt_loss: Callable = pkt_loss) -> Callable[[], Objective] | None:
    """A zero-argument factory of Lab 2's objective ``method`` (``None`` for
    scratch: plain cross-entropy), with the loss weights in ``weights``.

    The notebook passes the student's own ``hint_loss``, ``at_loss``,
    ``rkd_distance``, ``rkd_angle``, ``sp_loss``, ``info_nce`` and FitNets class
    (``fitnets(teacher, {layer: weight})``, used for "feature (FitNets)");
    the defaults are the package's. Every feature term is added to
    cross-entropy; the response rows use Hinton's KD at T = 4, alpha = 0.9
    (RepDistiller's setting; Lab 1's main setting is T = 2). "InfoNCE
    (in-batch)" is CE + w * info_nce(regressor(student embedding), teacher
    embedding) on the pooled embeddings (a linear regressor to the teacher's
    width), with CRD's weight: the other B - 1 images of the batch are the
    negatives, no memory bank. "PKT" is CE + w * pkt_loss(student embedding,
    teacher embedding) on the pooled embeddings (widths need not match); its
    weight defaults to :data:`PKT_WEIGHT` when ``weights`` has no "pkt".
    """
    if method not in LAB2_METHODS:
        raise ValueError(f"unknown Lab 2 method {method!r}; choose one of {list(LAB2_METHODS)}")
    needs = LAB2_WEIGHT_KEYS.get({"response + feature": "feature (FitNets)", "InfoNCE (in-batch)": "CRD"}.get(method, method), ())
    weights = {**_EXTRA_WEIGHTS, **weights}
    missing = [k for k in needs if k not in weights]
    if missing:
        raise ValueError(f"weights lacks {missing} for {method!r}; start from dict(REPDISTILLER_WEIGHTS)")
    w = {k: float(weights[k]) for k in needs}
    if method == "scratch":
        return None
    if method == "CRD":
        return lambda: CRDDistill(teacher, weight=w["crd"], k=crd_k)
    if method == "feature (FitNets)" and fitnets is not None:
        return lambda: fitnets(teacher, {hint_layer: w["hint"]})

    def in_batch(student, teacher, regressor):  # a linear regressor to the teacher's width, then InfoNCE
        return info_nce(regressor(student), teacher, nce_temperature)

    def terms() -> list:  # fresh Terms for every objective built
        if method in ("feature (FitNets)", "response + feature"):
            return [Term(hint_layer, hint_layer, hint_loss, w["hint"], name="hint")]
        if method == "AT":
            return [Term(f"layer{i}", f"layer{i}", at_loss, w["at"], name="at") for i in (1, 2, 3)]
        if method == "SP":
            return [Term("layer3", "layer3", sp_loss, w["sp"], name="sp")]
        if method == "PKT":
            return [Term("fc:input", "fc:input", pkt_loss, w["pkt"], name="pkt")]
        if method == "InfoNCE (in-batch)":
            return [Term("fc:input", "fc:input", in_batch, w["crd"], name="info_nce")]
        if method == "RKD":  # distance + angle on the pooled embeddings
            return [Term("fc:input", "fc:input", rkd_distance, w["rkd_distance"], name="rkd_d"),
                    Term("fc:input", "fc:input", rkd_angle, w["rkd_angle"], name="rkd_a")]
        return []  # response (KD)

    alpha = 0.9 if method in ("response (KD)", "response + feature") else 0.0
    return lambda: FeatureDistill(teacher, terms(), T=4.0, alpha=alpha)


# --------------------------------------------------------------------------
# The runs of the notebook, and their tables
# --------------------------------------------------------------------------

class Experiments:
    """Lab 2's runs: ``results[name]`` (a list of :class:`~kdcourse.runs.Run`,
    one per seed), the weights chosen on validation (``W``) and the runs that
    chose them.

    Args:
        objective: ``objective(method, weights)`` -> a zero-argument objective
            factory (``None``: cross-entropy), e.g. :func:`lab2_objective`
            with the student's functions bound.
        seeds: the profile's seeds (mean +- std over them).
        common: what every run shares (``build``, ``data``, ``train``,
            ``epochs``, ``lr``, ``batch_size``; see :func:`kdcourse.runs.train_run`).
        params: ``{method: params(model, objective)}`` for methods whose
            optimiser list the student wrote (FitNets).
    """

    def __init__(self, objective: Callable, seeds: Sequence[int], common: dict, params: Mapping | None = None):
        self.objective, self.seeds, self.common = objective, tuple(seeds), dict(common)
        self.params = dict(params or {})
        self.results: dict[str, list] = {}
        self.chosen: dict[str, runs.Run] = {}
        self.tried: dict[str, dict] = {}  # method -> {scale: Run} of the weight choice
        self.W: dict = {}

    def _kw(self, method: str, kwargs: dict) -> dict:
        base = {**self.common, **kwargs}
        if method in self.params and "params" not in base:
            base["params"] = self.params[method]
        return base

    def repeat(self, name: str, method: str | None = None, weights: dict | None = None, seeds=None, **kwargs) -> list:
        """Train ``method`` (default: ``name``) at ``weights`` (default: the
        chosen ones) on every seed, store and return the runs."""
        method = method or name
        make = self.objective(method, weights if weights is not None else self.W)
        out = runs.repeat(name, seeds if seeds is not None else self.seeds, objective=make, **self._kw(method, kwargs))
        self.results[name] = out
        return out

    def choose_weights(self, methods: Sequence[str], published: dict, scales: Sequence[float], keep=("AT",),
                       **kwargs) -> list[dict]:
        """For each method, one run (the first seed) per ``scale x published``
        weight; the highest **validation** accuracy wins (the test split
        plays no part). Sets ``W``; returns the table rows. The models of
        the methods in ``keep`` are kept (the attention maps need AT's)."""
        self.W, rows = dict(published), []
        seed = self.seeds[0]
        for method in methods:
            candidates = {sc: self.objective(method, scale_weights(published, method, sc)) for sc in scales}
            kw = {**self._kw(method, kwargs), **({"keep_model": True} if method in keep else {})}
            best, tried = runs.select_on_validation(method, candidates, seed=seed, **kw)
            self.tried[method] = tried
            self.W.update({k: published[k] * best for k in LAB2_WEIGHT_KEYS[method]})
            self.chosen[method] = tried[best]
            row = {"method": method, "published weight": weight_text(published, method)}
            row.update({f"val acc at x{sc:g} (%)": f"{100 * run.val_acc:.2f}" for sc, run in tried.items()})
            row["chosen weight"] = weight_text(self.W, method)
            rows.append(row)
        return rows

    def with_chosen(self, method: str, **kwargs) -> list:
        """The weight-choice run as the first seed, then the other seeds at the chosen weight."""
        if method not in self.chosen:
            raise NotImplementedError(f"no weight chosen for {method!r} yet: complete the exercises and run section 5 first")
        rest = runs.repeat(method, self.seeds[1:], objective=self.objective(method, self.W), **self._kw(method, kwargs))
        self.results[method] = [self.chosen[method]] + rest
        return self.results[method]

    def val_spread(self, name: str = "scratch") -> float:
        """Seed-to-seed std of ``name``'s validation accuracy (what one
        weight-choice run's validation accuracy varies by)."""
        vals = [r.val_acc for r in self.results[name]]
        return statistics.stdev(vals) if len(vals) > 1 else 0.0

    def summary(self, name: str) -> runs.Summary:
        """Mean +- std over the seeds of ``results[name]`` (``NotImplementedError`` when it was
        never run: an untouched exercise upstream stops here cleanly)."""
        if name not in self.results:
            raise NotImplementedError(f"no runs of {name!r} yet: complete the exercises and run the cells above first")
        return runs.summarize(self.results[name], name=name)

    def summary_rows(self, names: Sequence[str], reference: str = "scratch") -> list[dict]:
        """Mean +- std over seeds, and the difference with ``reference`` (Welch t)."""
        base = self.summary(reference) if reference in self.results else None
        rows = []
        for name in names:
            if name not in self.results:
                continue
            s = self.summary(name)
            row = {"student": name, "test acc (%)": f"{100 * s.mean:.2f} ± {100 * s.std:.2f}", "seeds": s.n}
            if base is not None and name != reference:
                diff = f"{100 * (s.mean - base.mean):+.2f}"
                if s.n >= 2 and base.n >= 2:  # a Welch t needs a spread on both sides
                    row[f"vs {reference} (points)"] = f"{diff} (Welch t {runs.welch_t(s, base)[0]:.1f})"
                else:
                    row[f"vs {reference} (points)"] = f"{diff} (one seed: see the reading)"
            rows.append(row)
        return rows

    def below(self, names: Sequence[str], reference: str = "scratch") -> list[str]:
        """The methods among ``names`` whose mean test accuracy is below ``reference``'s."""
        ref = self.summary(reference).mean
        return [n for n in names if n in self.results and self.summary(n).mean < ref]


def weight_text(weights: dict, method: str) -> str:
    """``"25 + 50"``: the loss weights of ``method``."""
    return " + ".join(f"{weights[k]:g}" for k in LAB2_WEIGHT_KEYS[{"InfoNCE (in-batch)": "CRD"}.get(method, method)])


#: CIFAR-100 top-1 (%), resnet32x4 -> resnet8x4, Tian et al. (ICLR 2020), Table 1
PUBLISHED_ACC = {"teacher": 79.42, "scratch": 72.50, "response (KD)": 73.33, "feature (FitNets)": 73.50, "AT": 73.44,
                 "SP": 72.94, "RKD": 71.90, "PKT": 73.64, "CRD": 75.51}


def published_rows(ex: Experiments, names: Sequence[str], published: dict, teacher_info: dict) -> list[dict]:
    """This run's rows next to the published weights and accuracies."""
    rows = ex.summary_rows(names)
    for row in rows:
        method = row["student"]
        row["weight: published / chosen"] = (f"{weight_text(published, method)} / {weight_text(ex.W, method)}"
                                             if method in LAB2_WEIGHT_KEYS or method == "InfoNCE (in-batch)" else "")
        row["published, CIFAR-100 (%)"] = f"{PUBLISHED_ACC[method]:.2f}" if method in PUBLISHED_ACC else "—"
    rows.insert(0, {"student": f"teacher ({teacher_info['arch']})", "test acc (%)": f"{100 * teacher_info['test_acc']:.2f}",
                    "seeds": 1, "published, CIFAR-100 (%)": f"{PUBLISHED_ACC['teacher']:.2f}"})
    return rows


def hint_layer_rows(ex: Experiments, teacher: nn.Module, student: nn.Module, x: torch.Tensor, fitnets: Callable,
                    feature_stats: Callable = feature.feature_stats_loss, seeds=None) -> tuple[list[dict], dict]:
    """The hint-layer sweep (one seed per point unless ``seeds``): the
    student's FitNets at ``layer1`` and ``layer3`` (``layer2`` is the main
    run's first seed), the handout's weighted multi-layer hint
    (lambda = (0.5, 1, 0.5) x the chosen weight: the middle layer highest),
    and the handout's channel-means statistics loss at ``layer2``. Returns
    the rows and ``{label: [Run]}``."""
    from .. import features as fx

    seeds = tuple(seeds if seeds is not None else ex.seeds[:1])
    if "feature (FitNets)" not in ex.results:
        raise NotImplementedError("no FitNets runs yet: complete Exercises 3-4 and run section 6 first")
    w = ex.W["hint"]
    names = ["layer1", "layer2", "layer3"]
    t_shapes = {k: tuple(v.shape[1:]) for k, v in fx.extract(teacher, x, names)[1].items()}
    s_shapes = {k: tuple(v.shape[1:]) for k, v in fx.extract(student, x, names)[1].items()}
    plan = {"layer1": {"layer1": w}, "layer3": {"layer3": w},
            "layer1 + layer2 + layer3, λ = (0.5, 1, 0.5) × w": {"layer1": 0.5 * w, "layer2": w, "layer3": 0.5 * w}}
    got = {"layer2": [r for r in ex.results["feature (FitNets)"] if r.seed in seeds]}
    kw = ex._kw("feature (FitNets)", {})
    for label, hints in plan.items():
        got[label] = runs.repeat(f"hint {label}", seeds, objective=lambda hints=hints: fitnets(teacher, hints), **kw)
    got["layer2, channel means only (handout)"] = runs.repeat("stats layer2", seeds, objective=lambda: FeatureDistill(
        teacher, [Term("layer2", "layer2", feature_stats, weight=w, name="stats")]), **ex.common)
    rows = []
    for label in ("layer1", "layer2", "layer3", "layer1 + layer2 + layer3, λ = (0.5, 1, 0.5) × w",
                  "layer2, channel means only (handout)"):
        layer = label.split(",")[0] if label.startswith("layer") and label[6:7] in ("", ",") else None
        shape = f"{t_shapes[layer]} / {s_shapes[layer]}" if layer in t_shapes else "—"
        s = runs.summarize(got[label])
        rows.append({"hint": label, "teacher / student shape": shape, "test acc (%)": f"{100 * s.mean:.2f}", "seeds": s.n})
    return rows, got


def layer1_maps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """AT maps of ``layer1`` as (B, side, side) images (eval mode, no gradients)."""
    from .. import features as fx
    from ..losses.feature import attention_map

    model.eval()
    with torch.no_grad():
        _, f = fx.extract(model, x, ["layer1"])
    a = attention_map(f["layer1"])
    side = int(math.isqrt(a.shape[1]))
    return a.view(-1, side, side).cpu()


def attention_panels(panels: Mapping[str, torch.Tensor], images: torch.Tensor, titles: Sequence[str], mean, std):
    """A grid: the images on top, one row of maps per entry of ``panels``
    (each (n, side, side)), with a colour bar. Returns ``(figure, {label:
    mean cosine similarity with the "teacher" row})``."""
    import matplotlib.pyplot as plt

    n = len(titles)
    fig, axes = plt.subplots(len(panels) + 1, n, figsize=(1.9 * n + 0.6, 1.9 * (len(panels) + 1)), squeeze=False)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    im = None
    for j in range(n):
        axes[0, j].imshow((images[j].cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        axes[0, j].set_title(titles[j], fontsize=9)
        for i, (label, maps) in enumerate(panels.items(), start=1):
            im = axes[i, j].imshow(maps[j].numpy(), cmap="magma", vmin=0)
            if j == 0:
                axes[i, j].set_ylabel(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes[1:, :].ravel().tolist(), shrink=0.8, label="attention (unit-norm map)")
    t = panels["teacher"].flatten(1)
    agreement = {k: float((v.flatten(1) * t).sum(1).mean()) for k, v in panels.items() if k != "teacher"}
    return fig, agreement
