"""Objectives for feature-, relation- and contrastive distillation (Lab 2).

They plug into the one training loop (:func:`kdcourse.train.fit`) like
:class:`~kdcourse.train.Distill`, and add terms computed on *intermediate*
features, read from named modules by forward hooks (:mod:`kdcourse.features`)
— no model is edited, any ``nn.Module`` works::

    obj = FeatureDistill(teacher, [Term("layer2", "layer2", hint_loss, weight=100)], alpha=0.0)
    fit(student, data.train, obj, epochs=10)

    loss = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(p_t || p_s)      (response part; alpha = 0: CE only)
         + sum_terms weight * term.loss(student_feature, teacher_feature[, regressor])

A term whose loss takes a ``regressor`` argument (FitNets' :func:`hint_loss`)
gets a :class:`~kdcourse.losses.feature.HintRegressor` built in ``setup``
from the measured shapes. The objective owns it, so ``fit`` optimises it
with the student.

The teacher is frozen. When the training split is not augmented, the
teacher's logits and the features the terms need are computed once and
looked up by ``batch.index`` (unless they would exceed ``CACHE_LIMIT_BYTES``);
the cache is shared by objectives built on the same teacher and split (so a
seed sweep pays for one teacher pass), and holds exactly what the live
teacher would give.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import features as fx
from .data import Batch, Split
from .losses import feature, relation
from .losses.contrastive import CRDInfoNCE
from .losses.feature import HintRegressor
from .losses.response import kd_loss
from .train import Objective, StepOutput, TrainState, freeze, scheduled

# --------------------------------------------------------------------------
# Lab 2 knobs, keyed by profile name
# --------------------------------------------------------------------------

#: Loss weights from RepDistiller's CIFAR-100 scripts (Tian et al. 2020,
#: ``scripts/run_cifar_distill.sh``: FitNet -b 100, AT -b 1000, SP -b 3000,
#: RKD -b 1 with 25 x distance + 50 x angle inside, CRD -b 0.8). They were
#: tuned for 240 epochs of SGD on CIFAR-100; Lab 2 starts from them and
#: picks, per method, one of ``weight_scales`` x published on the validation
#: split (:func:`kdcourse.runs.select_on_validation`).
REPDISTILLER_WEIGHTS = {"hint": 100.0, "at": 1000.0, "sp": 3000.0, "rkd_distance": 25.0, "rkd_angle": 50.0, "crd": 0.8}

#: Lab 2's methods -> the entries of the weights dict each one uses (scaled
#: together when a weight is chosen; "response + feature" reuses FitNets').
LAB2_WEIGHT_KEYS = {"feature (FitNets)": ("hint",), "AT": ("at",), "SP": ("sp",),
                    "RKD": ("rkd_distance", "rkd_angle"), "CRD": ("crd",)}
LAB2_METHODS = ("scratch", "response (KD)", "feature (FitNets)", "response + feature", "AT", "SP", "RKD", "CRD")

LAB2 = {
    # n_train: the students' transfer set is the first n_train images of
    # data.train (None: all of it); epochs, batch_size: every student run of
    # the lab (laptop: 2,000 images in batches of 32 for 8 epochs = 504 Adam steps);
    # weight_scales: multiples of the published loss weight tried per method
    # on the validation split (one seed); sweep_seeds: how many of
    # profile.seeds a one-seed-per-point sweep uses; crd_k: CRD negatives per
    # anchor (the paper: 16384; each costs a (B, dim) gather per step, so a
    # CPU lab uses fewer); det_*: the toy detector (images, epochs).
    "smoke": dict(n_train=None, epochs=2, batch_size=64, weight_scales=(1.0, 0.01), sweep_seeds=1, crd_k=64,
                  det_train=128, det_test=64, det_epochs=1, det_teacher_epochs=1),
    "laptop": dict(n_train=2000, epochs=8, batch_size=32, weight_scales=(1.0, 0.1, 0.01), sweep_seeds=1, crd_k=512,
                   det_train=1500, det_test=500, det_epochs=10, det_teacher_epochs=10),
    "full": dict(n_train=None, epochs=30, batch_size=64, weight_scales=(1.0, 0.1, 0.01), sweep_seeds=1, crd_k=4096,
                 det_train=8000, det_test=2000, det_epochs=20, det_teacher_epochs=20),
}


def lab_settings(profile) -> dict:
    """Lab 2's knobs for ``profile`` (its ``extra["lab2"]`` dict overrides them)."""
    if profile.name not in LAB2:
        raise ValueError(f"no Lab 2 settings for profile {profile.name!r}; known: {sorted(LAB2)}")
    cfg = dict(LAB2[profile.name], weights=dict(REPDISTILLER_WEIGHTS))
    cfg.update(profile.extra.get("lab2", {}))
    return cfg


def scale_weights(weights: dict, method: str, scale: float) -> dict:
    """A copy of ``weights`` with ``method``'s entries (``LAB2_WEIGHT_KEYS``) multiplied by ``scale``."""
    if method not in LAB2_WEIGHT_KEYS:
        raise ValueError(f"method {method!r} has no loss weight; methods with one: {sorted(LAB2_WEIGHT_KEYS)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number (a multiple of the weight), got {scale!r}")
    out = dict(weights)
    for key in LAB2_WEIGHT_KEYS[method]:
        out[key] = float(weights[key]) * float(scale)
    return out


def lab2_objective(method: str, teacher: nn.Module, weights: dict, *, crd_k: int = 4096, hint_layer: str = "layer2",
                   hint_loss: Callable = feature.hint_loss, at_loss: Callable = feature.attention_transfer_loss,
                   rkd_distance: Callable = relation.rkd_distance) -> Callable[[], Objective] | None:
    """A zero-argument factory of Lab 2's objective ``method`` (``None`` for
    scratch: plain cross-entropy), with the loss weights in ``weights``.

    The notebook passes the student's own ``hint_loss``, ``at_loss`` and
    ``rkd_distance``; the defaults are the package's. Every feature term is
    added to cross-entropy; the response rows use Hinton's KD at T = 4,
    alpha = 0.9 (RepDistiller's setting).
    """
    if method not in LAB2_METHODS:
        raise ValueError(f"unknown Lab 2 method {method!r}; choose one of {list(LAB2_METHODS)}")
    needs = LAB2_WEIGHT_KEYS.get("feature (FitNets)" if method == "response + feature" else method, ())
    missing = [k for k in needs if k not in weights]
    if missing:
        raise ValueError(f"weights lacks {missing} for {method!r}; start from dict(REPDISTILLER_WEIGHTS)")
    w = {k: float(weights[k]) for k in needs}
    if method == "scratch":
        return None
    if method == "CRD":
        return lambda: CRDDistill(teacher, weight=w["crd"], k=crd_k)

    def terms() -> list:  # fresh Terms for every objective built
        if method in ("feature (FitNets)", "response + feature"):
            return [Term(hint_layer, hint_layer, hint_loss, w["hint"], name="hint")]
        if method == "AT":
            return [Term(f"layer{i}", f"layer{i}", at_loss, w["at"], name="at") for i in (1, 2, 3)]
        if method == "SP":
            return [Term("layer3", "layer3", relation.similarity_preserving, w["sp"], name="sp")]
        if method == "RKD":  # distance + angle on the pooled embeddings
            return [Term("fc:input", "fc:input", rkd_distance, w["rkd_distance"], name="rkd_d"),
                    Term("fc:input", "fc:input", relation.rkd_angle, w["rkd_angle"], name="rkd_a")]
        return []  # response (KD)

    alpha = 0.9 if method in ("response (KD)", "response + feature") else 0.0
    return lambda: FeatureDistill(teacher, terms(), T=4.0, alpha=alpha)


# --------------------------------------------------------------------------
# Teacher outputs, computed once per (teacher, split, layers)
# --------------------------------------------------------------------------

CACHE_LIMIT_BYTES = 2e9  # above this, "auto" runs the teacher live instead of caching its features
_MEMO: "OrderedDict[tuple, tuple]" = OrderedDict()
_MEMO_SIZE = 16  # cached (teacher, split, layer) entries


def clear_teacher_cache() -> None:
    """Forget every cached teacher output (entries are also evicted LRU)."""
    _MEMO.clear()


def _memo_key(teacher, split, name, size):
    return (id(teacher), id(split.images), len(split), name, size)


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, split: Split, names: Sequence[str], sizes: dict | None = None,
                    batch_size: int = 256) -> tuple[torch.Tensor, dict]:
    """Logits (N, C) and ``{name: (N, ...)}`` features of ``teacher`` on every
    sample of ``split`` (in order, eval mode). A 4-D feature is average-pooled
    to ``sizes[name] = (H, W)`` when given and smaller than its own size.

    Memoised per (teacher, split, layer, size): the layers not cached yet are
    computed together in one pass over the split, so objectives built on the
    same teacher and split (a seed sweep, several methods) share the work.
    """
    sizes = {k: tuple(v) for k, v in (sizes or {}).items()}
    wanted = [("__logits__", None)] + [(n, sizes.get(n)) for n in dict.fromkeys(names)]
    missing = [(n, sz) for n, sz in wanted if _memo_key(teacher, split, n, sz) not in _MEMO]
    if missing:
        was_training = teacher.training
        teacher.eval()
        dev = next(teacher.parameters()).device
        layer_names = [n for n, _ in missing if n != "__logits__"]
        acc = {m: [] for m in missing}
        for b in split.batches(batch_size, device=dev):
            out, f = fx.extract(teacher, b.x, layer_names, detach=True) if layer_names else (teacher(b.x), {})
            for n, sz in missing:
                v = out if n == "__logits__" else f[n]
                if v.ndim == 4 and sz is not None and v.shape[-2] * v.shape[-1] > sz[0] * sz[1]:
                    v = F.adaptive_avg_pool2d(v, sz)
                acc[(n, sz)].append(v.float().cpu())
        teacher.train(was_training)
        for (n, sz), chunks in acc.items():
            # the key holds ids: keep the objects alive with the entry so no id is reused while it exists
            _MEMO[_memo_key(teacher, split, n, sz)] = (teacher, split.images, torch.cat(chunks))
    for n, sz in wanted:
        _MEMO.move_to_end(_memo_key(teacher, split, n, sz))
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    get = lambda n, sz: _MEMO[_memo_key(teacher, split, n, sz)][2]  # noqa: E731
    return get("__logits__", None), {n: get(n, sz) for n, sz in wanted[1:]}


# --------------------------------------------------------------------------
# Terms and the objective
# --------------------------------------------------------------------------

@dataclass
class Term:
    """One feature term: ``weight * loss(student[student_layer], teacher[teacher_layer])``.

    Args:
        student, teacher: module names (append ``":input"`` for a module's
            input, e.g. ``"fc:input"`` = the pooled embedding).
        loss: ``loss(s, t)``, or ``loss(s, t, regressor)`` — then a
            :class:`HintRegressor` (1x1 conv for maps, linear for vectors) is
            built from the measured channel counts and trained.
        weight: a number or a schedule ``f(progress)``.
        name: label in the training history (default: the loss's name).
    """

    student: str
    teacher: str
    loss: Callable
    weight: float | Callable = 1.0
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or getattr(self.loss, "__name__", "feature")

    @property
    def takes_regressor(self) -> bool:
        try:
            return "regressor" in inspect.signature(self.loss).parameters
        except (TypeError, ValueError):
            return False


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def _probe(model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> dict:
    """Shapes of the named features for a tiny batch (eval mode, restored)."""
    if not names:
        return {}
    was = model.training
    model.eval()
    _, f = fx.extract(model, x, list(dict.fromkeys(names)), detach=True)
    model.train(was)
    return {n: tuple(v.shape[1:]) for n, v in f.items()}


class _TeacherTaps(Objective):
    """Shared machinery: a frozen teacher, its cached (or live) logits and
    features, the student's features by hooks, and the response term."""

    def __init__(self, teacher: nn.Module, teacher_layers: Sequence[str], T=4.0, alpha=0.0, cache="auto"):
        super().__init__()
        if cache not in ("auto", True, False):
            raise ValueError(f"cache must be 'auto', True or False, got {cache!r}")
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be an nn.Module (features are read by hooks), got {type(teacher).__name__}")
        object.__setattr__(self, "teacher", freeze(teacher))  # not a submodule: never optimised
        self.teacher_layers = list(dict.fromkeys(teacher_layers))
        self.T, self.alpha, self.cache = T, alpha, cache
        self._logits = None
        self._feats = None

    def _setup_teacher(self, model: nn.Module, train: Split, student_layers: Sequence[str]) -> tuple[dict, dict]:
        if self.cache is True and train.augment:
            raise ValueError("cache=True needs a split without augmentation (augment=False)")
        x = next(train.subset(torch.arange(min(2, len(train)))).with_augment(False).batches(2, device=_device(model))).x
        s_shapes = _probe(model, x, student_layers)
        t_shapes = _probe(self.teacher, x.to(_device(self.teacher)), self.teacher_layers)
        self._logits = self._feats = None
        if self.cache is True or (self.cache == "auto" and not train.augment):
            n_bytes = 4 * len(train) * sum(math.prod(t_shapes[n]) for n in self.teacher_layers)
            if n_bytes > CACHE_LIMIT_BYTES and self.cache == "auto":
                warnings.warn(f"teacher features for {len(train)} samples would take {n_bytes / 1e9:.1f} GB; "
                              f"running the teacher live instead (pass cache=True to force the cache)", stacklevel=3)
            else:
                self._logits, self._feats = teacher_outputs(self.teacher, train, self.teacher_layers)
        return s_shapes, t_shapes

    def _pairs_teacher(self) -> list[str]:  # teacher layer of each student layer, in order
        raise NotImplementedError

    def teacher_step(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        if self._feats is not None:
            dev = batch.x.device
            return self._logits[batch.index].to(dev), {n: v[batch.index].to(dev) for n, v in self._feats.items()}
        if self.teacher.training:
            raise RuntimeError("the teacher is in train mode; distillation needs teacher.eval() (kdcourse.train.freeze)")
        with torch.no_grad():
            return fx.extract(self.teacher, batch.x, self.teacher_layers, detach=True)

    def response(self, s_logits, t_logits, labels, state: TrainState) -> tuple[torch.Tensor, dict]:
        alpha, T = scheduled(self.alpha, state), scheduled(self.T, state)
        if alpha == 0:
            ce = F.cross_entropy(s_logits, labels)
            return ce, {"ce": ce.item()}
        loss = kd_loss(s_logits, t_logits, labels, T=T, alpha=alpha)
        return loss, {"response": loss.item(), "T": T, "alpha": alpha}


class FeatureDistill(_TeacherTaps):
    """Cross-entropy (or Hinton's KD, when ``alpha > 0``) plus feature terms.

    Args:
        teacher: frozen teacher (``nn.Module``).
        terms: :class:`Term` s (or ``(student_layer, teacher_layer, loss, weight)`` tuples).
        T, alpha: the response part, as in :class:`~kdcourse.train.Distill`;
            ``alpha=0`` (default) keeps only cross-entropy with the labels
            (the setting of the published feature-KD tables).
        cache: ``"auto"`` caches teacher outputs when the split is not augmented.

    Attributes after ``setup``: ``regressors`` (``nn.ModuleDict`` "0", "1", ...
    for terms that take one).
    """

    # fit may train in channels-last layout when the teacher is cached: the losses get contiguous tensors
    channels_last_ok = property(lambda self: self._feats is not None)

    def __init__(self, teacher: nn.Module, terms: Sequence[Term | tuple], T=4.0, alpha=0.0, cache="auto"):
        terms = [t if isinstance(t, Term) else Term(*t) for t in terms]
        if not terms and alpha == 0:
            raise ValueError("terms is empty and alpha=0: that is plain cross-entropy; pass a Term or use alpha > 0")
        for t in terms:
            if not callable(t.loss):
                raise ValueError(f"Term.loss must be callable, got {type(t.loss).__name__}")
        super().__init__(teacher, [t.teacher for t in terms], T=T, alpha=alpha, cache=cache)
        self.terms = terms
        self.regressors = nn.ModuleDict()

    def _pairs_teacher(self):
        return [t.teacher for t in self.terms]

    @property
    def student_layers(self) -> list[str]:
        return list(dict.fromkeys(t.student for t in self.terms))

    def setup(self, model: nn.Module, train: Split) -> None:
        s_shapes, t_shapes = self._setup_teacher(model, train, [t.student for t in self.terms])
        self.regressors = nn.ModuleDict()
        for i, term in enumerate(self.terms):
            if term.takes_regressor:
                s, t = s_shapes[term.student], t_shapes[term.teacher]
                kind = "conv" if len(s) == 3 else "linear"
                self.regressors[str(i)] = HintRegressor(s[0], t[0], kind=kind).to(_device(model))

    def forward(self, model: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        t_logits, t_feats = self.teacher_step(batch)
        names = self.student_layers
        s_logits, s_feats = fx.extract(model, batch.x, names) if names else (model(batch.x), {})
        loss, parts = self.response(s_logits, t_logits, batch.labels, state)
        for i, term in enumerate(self.terms):
            # contiguous: fit may train in channels-last layout, and a loss calling .view() expects the usual one
            s, t = s_feats[term.student].contiguous(), t_feats[term.teacher].contiguous()
            value = term.loss(s, t, regressor=self.regressors[str(i)]) if str(i) in self.regressors else term.loss(s, t)
            w = scheduled(term.weight, state)
            loss = loss + w * value
            parts[term.label] = parts.get(term.label, 0.0) + value.item()
        return StepOutput(loss, s_logits, parts)


class CRDDistill(_TeacherTaps):
    """Cross-entropy (or KD) plus the simplified CRD term
    (:class:`~kdcourse.losses.contrastive.CRDInfoNCE`) on one pair of
    embeddings, with memory banks indexed by ``batch.index``.

    Args:
        teacher: frozen teacher.
        student_layer, teacher_layer: default ``"fc:input"`` (the pooled
            embeddings before the classifiers).
        weight: weight of the CRD term (RepDistiller's script: 0.8).
        dim, k, temperature, momentum: see :class:`CRDInfoNCE`.
        T, alpha, cache: as in :class:`FeatureDistill`.

    In ``setup`` the banks are sized to the training split and, when teacher
    outputs are cached, the teacher bank starts from real teacher embeddings.
    """

    # fit may train in channels-last layout when the teacher is cached: the losses get contiguous tensors
    channels_last_ok = property(lambda self: self._feats is not None)

    def __init__(self, teacher: nn.Module, student_layer: str = "fc:input", teacher_layer: str = "fc:input",
                 weight=0.8, dim: int = 128, k: int = 4096, temperature: float = 0.07, momentum: float = 0.5,
                 T=4.0, alpha=0.0, cache="auto"):
        super().__init__(teacher, [teacher_layer], T=T, alpha=alpha, cache=cache)
        self.student_layer, self.teacher_layer, self.weight = student_layer, teacher_layer, weight
        self.crd_kwargs = dict(dim=dim, k=k, temperature=temperature, momentum=momentum)
        self.crd: CRDInfoNCE | None = None

    def _pairs_teacher(self):
        return [self.teacher_layer]

    def setup(self, model: nn.Module, train: Split) -> None:
        s_shapes, t_shapes = self._setup_teacher(model, train, [self.student_layer])
        s, t = s_shapes[self.student_layer], t_shapes[self.teacher_layer]
        if len(s) != 1 or len(t) != 1:
            raise ValueError(f"CRD needs (B, D) embeddings; {self.student_layer!r} gives {s} and "
                             f"{self.teacher_layer!r} gives {t} per sample — use 'fc:input' (pooled features)")
        self.crd = CRDInfoNCE(s[0], t[0], len(train), **self.crd_kwargs).to(_device(model))
        if self._feats is not None:
            self.crd.fill(self._feats[self.teacher_layer])

    def forward(self, model: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        if self.crd is None:
            raise RuntimeError("CRDDistill.setup(model, train) must run first (fit() calls it)")
        t_logits, t_feats = self.teacher_step(batch)
        s_logits, s_feats = fx.extract(model, batch.x, [self.student_layer])
        loss, parts = self.response(s_logits, t_logits, batch.labels, state)
        value = self.crd(s_feats[self.student_layer].contiguous(), t_feats[self.teacher_layer].contiguous(), batch.index)
        loss = loss + scheduled(self.weight, state) * value
        parts["crd"] = value.item()
        return StepOutput(loss, s_logits, parts)


# --------------------------------------------------------------------------
# A toy dense detector, to run the detection-distillation losses end to end
# --------------------------------------------------------------------------
#
# Images of 1-2 objects (square / disk / bar) on a noisy background; a grid of
# G x G anchors (one per cell of the last feature map); the anchor whose cell
# holds an object's centre is positive for it. A detector predicts per anchor
# C + 1 class logits (0 = background) and 4 box values
# (dx, dy = centre offset within the cell in [0, 1], log(w / cell), log(h / cell)).

TOY_CLASSES = ("square", "disk", "bar")


@dataclass
class ToyDetection:
    """A toy detection split: ``split`` (images; ``labels`` = class of the
    first object, unused by the losses), per-anchor targets ``cls`` (N, A)
    with 0 = background and ``box`` (N, A, 4), and ``grid`` (G, A = G * G)."""

    split: Split
    cls: torch.Tensor
    box: torch.Tensor
    grid: int
    classes: tuple = TOY_CLASSES


def toy_detection_data(n: int, seed: int, image_size: int = 32, grid: int = 4) -> ToyDetection:
    """``n`` images with 1-2 objects each, deterministic for ``seed`` (no download)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    s, cell = image_size, image_size // grid
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    img = torch.rand(n, 3, 1, 1, generator=g) * 0.5 + 0.05 * torch.randn(n, 3, s, s, generator=g)
    cls = torch.zeros(n, grid * grid, dtype=torch.long)
    box = torch.zeros(n, grid * grid, 4)
    first = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        cells = torch.randperm(grid * grid, generator=g)[: 1 + int(torch.rand(1, generator=g) < 0.5)]
        for j, a in enumerate(cells.tolist()):
            k = int(torch.randint(0, len(TOY_CLASSES), (1,), generator=g))
            cx = (a % grid + torch.rand(1, generator=g).item()) * cell
            cy = (a // grid + torch.rand(1, generator=g).item()) * cell
            r = 3.0 + 4.0 * torch.rand(1, generator=g).item()
            w, h = (2 * r, 2 * r) if k < 2 else (2.6 * r, 0.9 * r)
            if k == 1:
                m = ((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r
            else:
                m = ((xx - cx).abs() <= w / 2) & ((yy - cy).abs() <= h / 2)
            colour = 0.5 + 0.5 * torch.rand(3, 1, generator=g)
            img[i][:, m] = colour
            cls[i, a] = k + 1
            box[i, a] = torch.tensor([cx / cell - a % grid, cy / cell - a // grid,
                                      torch.log(torch.tensor(w / cell)), torch.log(torch.tensor(h / cell))])
            if j == 0:
                first[i] = k
    x = (img.clamp(0, 1) - 0.5) / 0.25
    return ToyDetection(Split(x.contiguous(), first, TOY_CLASSES), cls, box, grid)


class ToyDetector(nn.Module):
    """A small dense detector: stride-2 stem, ``p3`` (8x8) and ``p4`` (4x4)
    levels, and a 1x1 head on ``p4``. ``forward(x)`` returns
    ``(cls_logits (B, A, C + 1), box (B, A, 4))``."""

    def __init__(self, widths=(16, 32), num_classes: int = len(TOY_CLASSES)):
        super().__init__()
        c3, c4 = (int(w) for w in widths)

        def block(ci, co):
            return nn.Sequential(nn.Conv2d(ci, co, 3, 2, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(),
                                 nn.Conv2d(co, co, 3, 1, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU())
        self.stem = nn.Sequential(nn.Conv2d(3, c3, 3, 2, 1, bias=False), nn.BatchNorm2d(c3), nn.ReLU())
        self.p3 = block(c3, c3)
        self.p4 = block(c3, c4)
        self.cls_head = nn.Conv2d(c4, num_classes + 1, 1)
        self.box_head = nn.Conv2d(c4, 4, 1)

    def forward(self, x):
        f = self.p4(self.p3(self.stem(x)))
        cls = self.cls_head(f).flatten(2).transpose(1, 2)
        box = self.box_head(f).flatten(2).transpose(1, 2)
        return cls, box


class DetectionObjective(Objective):
    """Task loss of the toy detector, plus (with a ``teacher``) the three
    detection-distillation terms of :mod:`kdcourse.losses.detection`.

        task  = CE(object anchors) + CE(background anchors) + smooth-L1 on the true boxes
        distil = w_cls * classification_kd(softmax, T)     object anchors + background anchors
                                                            (``balance=False``: one mean over all anchors)
               + w_box * masked_box_regression(mask = teacher says "object" with p > 0.5)
               + w_feat * multiscale_feature_loss(levels, adapters)      1x1 adapters where channels differ

    Targets are looked up by ``batch.index`` in ``data`` (a :class:`ToyDetection`).
    """

    def __init__(self, data: ToyDetection, teacher: nn.Module | None = None, T: float = 2.0, w_cls: float = 1.0,
                 w_box: float = 1.0, w_feat: float = 1.0, levels: Sequence[str] = ("p3", "p4"), balance: bool = True):
        super().__init__()
        self.data, self.T, self.w_cls, self.w_box, self.w_feat = data, T, w_cls, w_box, w_feat
        self.balance = balance
        self.levels = list(levels)
        object.__setattr__(self, "teacher", freeze(teacher) if teacher is not None else None)
        self.adapters = nn.ModuleDict()

    def setup(self, model: nn.Module, train: Split) -> None:
        from .losses.detection import FeatureAdapters

        if len(train) != len(self.data.split):
            raise ValueError("train must be the ToyDetection split these targets belong to (data.split)")
        if self.teacher is not None and self.w_feat:
            x = train.images[:2].to(_device(model))
            s = _probe(model, x, self.levels)
            t = _probe(self.teacher, x.to(_device(self.teacher)), self.levels)
            self.adapters = FeatureAdapters({k: v[0] for k, v in s.items()}, {k: v[0] for k, v in t.items()}).to(_device(model))

    def predict(self, model, x):
        return model(x)[0].flatten(0, 1)  # (B * A, C + 1): not used for accuracy (fit gets val=None)

    def forward(self, model: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        from .losses.detection import classification_kd, masked_box_regression, multiscale_feature_loss

        dev = batch.x.device
        cls_t, box_t = self.data.cls[batch.index].to(dev), self.data.box[batch.index].to(dev)
        if self.teacher is not None and self.w_feat:
            (cls, box), s_feats = fx.extract(model, batch.x, self.levels)
        else:
            (cls, box), s_feats = model(batch.x), {}
        pos = cls_t > 0
        ce_all = F.cross_entropy(cls.flatten(0, 1), cls_t.flatten(), reduction="none").view_as(cls_t)
        ce = ce_all[pos].mean() + ce_all[~pos].mean()  # objects and background weighted equally
        reg = masked_box_regression(box, box_t, pos.float())
        loss = ce + reg
        parts = {"ce": ce.item(), "box": reg.item()}
        if self.teacher is not None:
            with torch.no_grad():
                (t_cls, t_box), t_feats = fx.extract(self.teacher, batch.x, self.levels, detach=True)
            mask = (1 - t_cls.softmax(-1)[..., 0]) > 0.5
            if self.balance:  # object and background anchors weighted equally, like the task loss
                kd_cls = classification_kd(cls, t_cls, T=self.T, kind="softmax", mask=pos) + \
                    classification_kd(cls, t_cls, T=self.T, kind="softmax", mask=~pos)
            else:  # plain mean over anchors: ~90% of them are background here
                kd_cls = classification_kd(cls, t_cls, T=self.T, kind="softmax")
            kd_box = masked_box_regression(box, t_box, mask.float())
            loss = loss + self.w_cls * kd_cls + self.w_box * kd_box
            parts.update(kd_cls=kd_cls.item(), kd_box=kd_box.item())
            if self.w_feat:
                kd_feat = multiscale_feature_loss(s_feats, t_feats, self.adapters)
                loss = loss + self.w_feat * kd_feat
                parts["kd_feat"] = kd_feat.item()
        return StepOutput(loss, None, parts)


def box_iou_cells(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boxes in the per-cell encoding (dx, dy, log w, log h) of the
    same cell (the cell offset cancels): (..., 4) -> (...)."""
    def corners(b):
        w, h = b[..., 2].exp(), b[..., 3].exp()
        return b[..., 0] - w / 2, b[..., 1] - h / 2, b[..., 0] + w / 2, b[..., 1] + h / 2
    px0, py0, px1, py1 = corners(pred)
    tx0, ty0, tx1, ty1 = corners(target)
    iw = (torch.minimum(px1, tx1) - torch.maximum(px0, tx0)).clamp_min(0)
    ih = (torch.minimum(py1, ty1) - torch.maximum(py0, ty0)).clamp_min(0)
    inter = iw * ih
    union = (px1 - px0) * (py1 - py0) + (tx1 - tx0) * (ty1 - ty0) - inter
    return inter / union.clamp_min(1e-12)


@torch.no_grad()
def detection_scores(model: nn.Module, data: ToyDetection, batch_size: int = 256) -> dict:
    """``recall@0.5``: objects whose anchor predicts the right class with IoU >= 0.5;
    ``class_acc`` on object anchors; ``mean_iou`` on object anchors; ``false_pos``:
    background anchors predicted as an object."""
    was = model.training
    model.eval()
    dev = _device(model)
    cls, box = [], []
    for b in data.split.batches(batch_size, device=dev):
        c, bx = model(b.x)
        cls.append(c.cpu())
        box.append(bx.cpu())
    model.train(was)
    cls, box = torch.cat(cls), torch.cat(box)
    pos = data.cls > 0
    pred = cls.argmax(-1)
    iou = box_iou_cells(box[pos], data.box[pos])
    right = pred[pos] == data.cls[pos]
    return {"recall@0.5": float((right & (iou >= 0.5)).float().mean()), "class_acc": float(right.float().mean()),
            "mean_iou": float(iou.mean()), "false_pos": float((pred[~pos] > 0).float().mean())}
