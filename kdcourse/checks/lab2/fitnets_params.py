"""Lab 2: what the optimiser trains for FitNets (``fitnets_parameters``), and the known-wrong
FitNets objectives and parameter lists."""
from __future__ import annotations

import contextlib
from typing import Callable
import torch
import torch.nn as nn
import torch.nn.functional as F
from ...losses import feature
from ...train import Objective, StepOutput
from .. import CheckFailed, contract
from .fitnets import (
    FITNETS_VALUE_HINTS, _DETACHED, _DUPLICATE, _NO_REGRESSOR, _ONE_BY_ONE, _REGRESSORS_MISSING, _STUDENT_MISSING,
    _TEACHER_LISTED, _TEACHER_SIDE, _TRAIN_MODE, _WITH_GRAD, _channels, _extract, _probe_hint, fitnets_setting,
)


def _flat_params(got) -> list:
    try:
        items = list(got)
    except TypeError:
        raise CheckFailed(f"fitnets_parameters must return a list of parameters, got {type(got).__name__}") from None
    flat = []
    for item in items:
        if isinstance(item, dict) and "params" in item:  # parameter groups
            flat.extend(list(item["params"]))
        else:
            flat.append(item)
    for p in flat:
        if not isinstance(p, torch.Tensor):
            raise CheckFailed(f"fitnets_parameters must list tensors (nn.Parameter), found a {type(p).__name__}: "
                              f"use model.parameters(), not model.named_parameters() or a module")
    return flat


class _ParamsObjective(nn.Module):
    """What fitnets_parameters receives: an objective shaped like the
    reference FitNets after setup (``teacher`` a submodule, ``regressors``
    an ``nn.ModuleDict`` of 1x1 convs), built with the probes' own code
    (the reference's setup calls code the grading kernel refuses)."""

    def __init__(self, teacher, student, hints):
        super().__init__()
        self.teacher, self.hints = teacher, dict(hints)
        s_ch, t_ch = _channels(student, list(hints)), _channels(teacher, list(hints))
        self.regressors = nn.ModuleDict({n: nn.Conv2d(s_ch[n], t_ch[n], 1) for n in hints})


def run_fitnets_parameters(fn: Callable, seed: int, freeze_stem: bool = False) -> dict:
    """Call ``fn(student, objective)`` on an objective shaped like the
    reference's after setup (teacher parameters left trainable, as a loaded
    teacher would be); return the objects and the listed parameters."""
    teacher, student, split, _ = fitnets_setting(seed)
    for p in teacher.parameters():
        p.requires_grad_(True)
    if freeze_stem:
        for p in student.stem.parameters():
            p.requires_grad_(False)
    obj = _ParamsObjective(teacher, student, {"layer1": 1.0, "layer2": 1.0})
    return dict(student=student, teacher=teacher, obj=obj, listed=_flat_params(fn(student, obj)))


def check_fitnets_parameters(fn: Callable) -> bool:
    """``fn(model, objective)`` must list every trainable parameter of the
    student and of the objective's regressors — not the teacher's — once."""
    for freeze_stem in (False, True):
        try:
            r = run_fitnets_parameters(fn, 0, freeze_stem)
        except (NotImplementedError, CheckFailed):
            raise
        except Exception as exc:
            raise CheckFailed(f"fitnets_parameters raised {type(exc).__name__}: {exc}") from exc
        ids = [id(p) for p in r["listed"]]
        if len(ids) != len(set(ids)):
            raise CheckFailed(_DUPLICATE)
        teacher_ids = {id(p) for p in r["teacher"].parameters()}
        if teacher_ids & set(ids):
            raise CheckFailed(_TEACHER_LISTED)
        reg_ids = {id(p) for p in r["obj"].regressors.parameters()}
        if not reg_ids <= set(ids):
            raise CheckFailed(_REGRESSORS_MISSING)
        missing = [n for n, p in r["student"].named_parameters() if p.requires_grad and id(p) not in set(ids)]
        if missing:
            raise CheckFailed(f"{_STUDENT_MISSING} (e.g. {missing[:3]})")
        unknown = set(ids) - reg_ids - {id(p) for p in r["student"].parameters()}
        if unknown:
            raise CheckFailed("the list holds parameters that belong neither to the student nor to the regressors")
    print("✓ fitnets_parameters lists the student's trainable parameters and every regressor's, once each, and none "
          "of the teacher's")
    return True


def _fitnets_variants() -> tuple[dict, dict]:
    """Known-wrong FitNets objectives and parameter lists, ``{name: (fn, hint)}``
    (the hint is the start of the message the check gives)."""
    from ...distill.fitnets import regressor_key

    class _Forward(Objective):
        """setup and forward with switches for the usual mistakes, on the probes' own hooks and hint (variants
        run in the grading kernel too, where the package's references refuse, its FitNets class included)"""
        eval_teacher, no_grad, detach_student, combine = True, True, False, "sum"

        def __init__(self, teacher, hints):
            super().__init__()
            self.teacher, self.hints, self.regressors = teacher, dict(hints), nn.ModuleDict()

        def setup(self, model, train):
            x = next(train.batches(2)).x
            with torch.no_grad():
                _, s = _extract(model, x, list(self.hints))
                _, t = _extract(self.teacher.eval(), x, list(self.hints))
            self.regressors = nn.ModuleDict({regressor_key(n): nn.Conv2d(s[n].shape[1], t[n].shape[1], 1)
                                             for n in self.hints})

        def forward(self, model, batch, state):
            names = list(self.hints)
            if self.eval_teacher:
                self.teacher.eval()
            with torch.no_grad() if self.no_grad else contextlib.nullcontext():
                _, t = _extract(self.teacher, batch.x, names)
            logits, s = _extract(model, batch.x, names)
            ce = F.cross_entropy(logits, batch.labels)
            hints = [(w, self.hint(s[n].detach() if self.detach_student else s[n], t[n], n)) for n, w in self.hints.items()]
            loss = {"sum": lambda: ce + sum(w * h for w, h in hints), "no_ce": lambda: sum(w * h for w, h in hints),
                    "unweighted": lambda: ce + sum(h for _, h in hints)}[self.combine]()
            return StepOutput(loss, logits, {"ce": ce.item()})

        def hint(self, s, t, n):
            return _probe_hint(s, t, self.regressors[regressor_key(n)])

    def variant(**attrs):
        return type("FitNetsVariant", (_Forward,), attrs)

    class _TeacherSide(_Forward):
        def setup(self, model, train):
            super().setup(model, train)
            self.regressors = nn.ModuleDict({k: nn.Conv2d(m.out_channels, m.in_channels, 1)
                                             for k, m in self.regressors.items()})

        def hint(self, s, t, n):
            return F.mse_loss(*feature.match_spatial(s, self.regressors[regressor_key(n)](t)))

    class _InForward(_Forward):
        def setup(self, model, train):
            self.regressors = nn.ModuleDict()

        def hint(self, s, t, n):
            return _probe_hint(s, t, nn.Conv2d(s.shape[1], t.shape[1], 1))

    class _Kernel3(_Forward):
        def setup(self, model, train):
            super().setup(model, train)
            self.regressors = nn.ModuleDict({k: nn.Conv2d(m.in_channels, m.out_channels, 3, padding=1)
                                             for k, m in self.regressors.items()})

    class _MaxPool(_Forward):
        def hint(self, s, t, n):
            r = self.regressors[regressor_key(n)](s)
            return F.mse_loss(r, F.adaptive_max_pool2d(t, r.shape[-2:]))

    class _Upsample(_Forward):
        def hint(self, s, t, n):
            r = self.regressors[regressor_key(n)](s)
            return F.mse_loss(F.interpolate(r, size=t.shape[-2:], mode="nearest"), t)

    objectives = {
        "teacher_train_mode": (variant(eval_teacher=False), _TRAIN_MODE),
        "teacher_with_grad": (variant(no_grad=False), _WITH_GRAD),
        "regressor_teacher_side": (_TeacherSide, _TEACHER_SIDE),
        "regressor_in_forward": (_InForward, _NO_REGRESSOR),
        "kernel_3x3": (_Kernel3, _ONE_BY_ONE),
        **{k: (cls, FITNETS_VALUE_HINTS[k]) for k, cls in (("no_ce", variant(combine="no_ce")),
                                                           ("unweighted", variant(combine="unweighted")),
                                                           ("max_pool", _MaxPool), ("upsample", _Upsample))},
        "student_detached": (variant(detach_student=True), _DETACHED),
    }
    params = {
        "student_only": (lambda model, objective: list(model.parameters()), _REGRESSORS_MISSING),
        "with_teacher": (lambda model, objective: [p for p in list(model.parameters()) + list(objective.parameters())
                                                   if p.requires_grad], _TEACHER_LISTED),
        "duplicates": (lambda model, objective: list(model.parameters()) + 2 * list(objective.regressors.parameters()),
                       _DUPLICATE),
        "regressors_only": (lambda model, objective: list(objective.regressors.parameters()), _STUDENT_MISSING),
    }
    return objectives, params


FITNETS_VARIANTS, FITNETS_PARAMETER_VARIANTS = _fitnets_variants()


def probe_fitnets_parameters(fn: Callable, seed: int) -> dict:
    """``fn(model, objective)`` on the reference objective (two hinted layers;
    a loaded teacher's parameters still require gradients; on odd seeds the
    student's stem is frozen): which parameters the list holds."""
    try:
        r = run_fitnets_parameters(fn, seed, freeze_stem=bool(seed % 2))
    except CheckFailed as exc:  # not a list of tensors
        return {"raised": "CheckFailed", "message": str(exc)[:200]}
    except NotImplementedError:
        raise
    except Exception as exc:
        if contract.is_refusal(exc):
            raise
        return {"raised": type(exc).__name__}
    ids = [id(p) for p in r["listed"]]
    student = {id(p): n for n, p in r["student"].named_parameters()}
    regs = {id(p): n for n, p in r["obj"].regressors.named_parameters()}
    teacher = {id(p) for p in r["teacher"].parameters()}
    return {"duplicates": len(ids) - len(set(ids)),
            "teacher": sum(i in teacher for i in set(ids)),
            "student": sorted(student[i] for i in set(ids) if i in student
                              if r["student"].get_parameter(student[i]).requires_grad),
            "regressors": sorted(regs[i] for i in set(ids) if i in regs),
            "other": sum(i not in student and i not in regs and i not in teacher for i in set(ids))}


def _fitnets_reference(name: str = "FitNets"):
    from ...distill import fitnets

    return getattr(fitnets, name)
