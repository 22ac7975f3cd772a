"""FitNets written out plainly: the reference of Lab 2's objective exercise.

Romero et al. (*FitNets: Hints for Thin Deep Nets*, ICLR 2015) train in two
stages: first the student's lower part, up to the guided layer, learns to
predict the teacher's hint layer through a convolutional regressor; then the
whole student is trained with KD. This module is the **one-stage** variant
that RepDistiller (Tian et al. 2020) benchmarks and Lab 2 uses: the hint
term is simply added to cross-entropy from the first step, with a 1x1
convolution as the regressor::

    loss = CE(student_logits, labels) + sum_layer  w_layer * hint_loss(s_layer, t_layer, regressor_layer)

    obj = FitNets(teacher, {"layer2": 10.0})          # one hint, or several with their weights
    fit(student, train, obj, params=fitnets_parameters, epochs=8)

The regressors are built in ``setup`` from the channel counts measured on two
training images; they are submodules of the objective, and
:func:`fitnets_parameters` lists them for the optimiser next to the
student's parameters. The teacher is kept in eval mode and run under
``torch.no_grad()`` (``fit`` calls ``objective.train()`` every epoch, which
would switch a registered teacher to train mode).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import features as fx
from ..data import Batch, Split
from ..losses.feature import hint_loss as _hint_loss
from ..train import Objective, StepOutput, TrainState


def regressor_key(name: str) -> str:
    """The ``nn.ModuleDict`` key of layer ``name`` (keys may not contain dots)."""
    return name.replace(".", "_")


def _check_hints(hints) -> dict:
    if not isinstance(hints, Mapping) or not hints:
        raise ValueError(f"hints must be a non-empty dict {{layer name: weight}}, e.g. {{'layer2': 10.0}}; got {hints!r}")
    out = {}
    for name, w in hints.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"hint layer names must be module names (str), got {name!r}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)) or float(w) < 0:
            raise ValueError(f"the weight of hint {name!r} must be a finite number >= 0, got {w!r}")
        out[name] = float(w)
    return out


class FitNets(Objective):
    """CE + sum of weighted FitNets hints, one 1x1 regressor per hinted layer.

    Args:
        teacher: the trained teacher (an ``nn.Module``); kept in eval mode,
            run without gradients.
        hints: ``{layer name: weight}``, the same module name in student and
            teacher (e.g. ``{"layer2": 10.0}``; several layers give the
            handout's weighted multi-layer hint).
        hint_loss: ``hint_loss(student (B, C_s, H_s, W_s), teacher (B, C_t, H_t, W_t), regressor)``;
            default :func:`kdcourse.losses.feature.hint_loss`.

    ``setup(model, train)`` builds ``self.regressors[regressor_key(name)] =
    nn.Conv2d(C_s, C_t, 1)``; ``forward(model, batch, state)`` returns
    ``StepOutput(loss (scalar), logits (B, classes), {"ce": ..., "hint <name>": ...})``.

    Source: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015
        (arXiv:1412.6550).
    """

    def __init__(self, teacher: nn.Module, hints: Mapping[str, float], hint_loss: Callable = _hint_loss):
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be an nn.Module (its features are read by hooks), got {type(teacher).__name__}")
        self.teacher = teacher  # a submodule: its (frozen) parameters are NOT in fitnets_parameters
        self.hints = _check_hints(hints)
        self.hint_loss = hint_loss
        self.regressors = nn.ModuleDict()

    def setup(self, model: nn.Module, train: Split) -> None:
        dev = next(model.parameters()).device
        x = next(train.subset(torch.arange(min(2, len(train)))).with_augment(False).batches(2, device=dev)).x
        names = list(self.hints)
        was = model.training
        model.eval()
        with torch.no_grad():
            _, s = fx.extract(model, x, names)
            _, t = fx.extract(self.teacher.eval(), x, names)
        model.train(was)
        self.regressors = nn.ModuleDict({
            regressor_key(n): nn.Conv2d(s[n].shape[1], t[n].shape[1], kernel_size=1).to(dev) for n in names})

    def forward(self, model: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        if len(self.regressors) != len(self.hints):
            raise RuntimeError("FitNets.setup(model, train) must run first (fit() calls it)")
        names = list(self.hints)
        self.teacher.eval()  # fit() switched every submodule to train mode
        with torch.no_grad():
            _, t_feats = fx.extract(self.teacher, batch.x, names)
        logits, s_feats = fx.extract(model, batch.x, names)
        ce = F.cross_entropy(logits, batch.labels)
        loss, parts = ce, {"ce": ce.item()}
        for name, w in self.hints.items():
            hint = self.hint_loss(s_feats[name].contiguous(), t_feats[name].contiguous(),
                                  self.regressors[regressor_key(name)])
            loss = loss + w * hint
            parts[f"hint {name}"] = hint.item()
        return StepOutput(loss, logits, parts)


def fitnets_parameters(model: nn.Module, objective: FitNets) -> list:
    """What the optimiser trains: the student's parameters and the
    regressors' (not the teacher's, even when they require gradients)."""
    return [p for p in model.parameters() if p.requires_grad] + list(objective.regressors.parameters())
