"""Objectives for feature-, relation- and contrastive distillation (Lab 2).

* :class:`FeatureDistill` — FitNets (Romero et al., ICLR 2015, arXiv:1412.6550),
  attention transfer (Zagoruyko & Komodakis, ICLR 2017, arXiv:1612.03928),
  similarity preserving (Tung & Mori, ICCV 2019, arXiv:1907.09682) and RKD
  (Park et al., CVPR 2019, arXiv:1904.05068): any sum of feature terms.
* :class:`CRDDistill` — contrastive representation distillation (Tian et al.,
  ICLR 2020, arXiv:1910.10699), simplified (see :mod:`kdcourse.losses.contrastive`).

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
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import features as fx
from .. import runtime
from ..data import Batch, Split
from ..losses.contrastive import CRDInfoNCE
from ..losses.feature import HintRegressor
from ..losses.response import kd_loss
from ..teacher_cache import teacher_outputs
from ..train import Objective, StepOutput, TrainState, freeze, scheduled

CACHE_LIMIT_BYTES = 2e9  # above this, "auto" runs the teacher live instead of caching its features


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
        x = next(train.subset(torch.arange(min(2, len(train)))).with_augment(False).batches(2, device=runtime.device_of(model))).x
        s_shapes = _probe(model, x, student_layers)
        t_shapes = _probe(self.teacher, x.to(runtime.device_of(self.teacher)), self.teacher_layers)
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

    Source: feature hints: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets",
        ICLR 2015 (arXiv:1412.6550).; the KD term: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
        Network", NIPS 2014 Deep Learning Workshop (arXiv:1503.02531, 2015).; each loss names its own paper
        (attention transfer, RKD, SP, ...).
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
                self.regressors[str(i)] = HintRegressor(s[0], t[0], kind=kind).to(runtime.device_of(model))

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

    Source: Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020 (arXiv:1910.10699).;
        the KD term: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep
        Learning Workshop (arXiv:1503.02531, 2015).
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
        self.crd = CRDInfoNCE(s[0], t[0], len(train), **self.crd_kwargs).to(runtime.device_of(model))
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
