"""Lab 2: the FitNets objective (setup builds the regressors; forward runs the frozen teacher in eval
mode and adds the weighted hints to CE) — its check, the shared FitNets setting and its probe."""
from __future__ import annotations

import copy
from typing import Callable
import torch
import torch.nn as nn
import torch.nn.functional as F
from ... import features as fx
from ...data import Split
from ...losses import feature
from ...models import ResNet, SmallCNN
from ...train import TrainState
from .. import CheckFailed, contract


# --------------------------------------------------------------------------
# Exercise 3: the FitNets objective, and what the optimiser trains
# --------------------------------------------------------------------------

def _extract(model: nn.Module, x: torch.Tensor, names) -> tuple:
    """The probes' own hook extractor (the package's is the reference of
    Exercise 1, which the grading kernel refuses)."""
    modules, feats, handles = dict(model.named_modules()), {}, []
    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o)))
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, feats


def _probe_hint(student, teacher, regressor):
    """The probes' own FitNets hint (the package's is Exercise 2's reference)."""
    s, t = regressor(student), teacher.detach()
    if s.ndim == 4 and s.shape[-2:] != t.shape[-2:]:
        if s.shape[-2] * s.shape[-1] > t.shape[-2] * t.shape[-1]:
            s = F.adaptive_avg_pool2d(s, t.shape[-2:])
        else:
            t = F.adaptive_avg_pool2d(t, s.shape[-2:])
    return F.mse_loss(s, t)


class _OwnHelpers:
    """While a probe runs the student's FitNets class, its module globals
    ``hint_loss`` and ``extract_features`` (the notebook's Exercises 1-2)
    are the probe's own correct copies, so a mistake there costs only those
    exercises' points, not this one's too."""

    def __init__(self, cls):
        fn = getattr(getattr(cls, "forward", None), "__globals__", None)
        self.ns = fn if isinstance(fn, dict) else {}
        self.saved = {}

    _MISSING = object()

    def __enter__(self):
        for name, own in (("hint_loss", _probe_hint), ("extract_features", _extract)):
            self.saved[name] = self.ns.get(name, self._MISSING)
            self.ns[name] = own
        return self

    def __exit__(self, *exc):
        for name, old in self.saved.items():
            if old is self._MISSING:
                self.ns.pop(name, None)
            else:
                self.ns[name] = old


def fitnets_setting(seed: int = 0, n: int = 6):
    """A small teacher (ResNet-8, width 8, full resolution: layer1-3 at 16, 8
    and 4 px with 8, 16, 32 channels), a student (SmallCNN (4, 6, 8): 8, 4,
    2 px with 4, 6, 8 channels), a split of ``n`` 16x16 images and its first
    batch, in float32 (a regressor built with nn.Conv2d defaults matches).
    Every hinted layer needs a regressor and pooling."""
    torch.manual_seed(seed)
    teacher = ResNet(8, 8, num_classes=4, stem_stride=1)
    with torch.no_grad():  # non-trivial running statistics: train and eval mode give different features
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    teacher.eval()
    student = SmallCNN((4, 6, 8), num_classes=4)
    g = contract.generator(seed + 100)
    x = torch.randn(n, 3, 16, 16, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    split = Split(x, labels, ("a", "b", "c", "d"))
    batch = next(split.batches(n))
    return teacher, student, split, batch


class _TeacherCalls:
    """Records (training, grad enabled) for every forward of a module of the
    teacher's type — copies of the teacher included."""

    def __init__(self, teacher_type):
        self.teacher_type, self.calls = teacher_type, []

    def __enter__(self):
        def hook(module, inputs):
            if type(module) is self.teacher_type:
                self.calls.append((module.training, torch.is_grad_enabled()))
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _regressors_of(objective: nn.Module, teacher: nn.Module, student: nn.Module) -> list[nn.Conv2d]:
    skip = {id(m) for m in teacher.modules()} | {id(m) for m in student.modules()}
    found, seen = [], set()
    for m in objective.modules():
        if isinstance(m, nn.Conv2d) and id(m) not in skip and id(m) not in seen:
            seen.add(id(m))
            found.append(m)
    # a copy of the teacher held by the objective is not a regressor
    for sub in objective.modules():
        if type(sub) is type(teacher) and sub is not teacher:
            inner = {id(m) for m in sub.modules()}
            found = [m for m in found if id(m) not in inner]
    return found


def _fitnets_reference_loss(student, teacher, regs: dict, batch, hints, variant: str = "reference"):
    names = list(hints)
    logits, s = fx.extract(student, batch.x, names)
    with torch.no_grad():
        _, t = fx.extract(teacher.eval(), batch.x, names)
    ce = F.cross_entropy(logits, batch.labels)
    terms = []
    for n, w in hints.items():
        r_s = regs[n](s[n])
        if variant == "max_pool":
            h = F.mse_loss(r_s, F.adaptive_max_pool2d(t[n], r_s.shape[-2:]))
        elif variant == "upsample":
            h = F.mse_loss(F.interpolate(r_s, size=t[n].shape[-2:], mode="nearest"), t[n])
        else:
            h = feature.hint_loss(s[n], t[n], regs[n])
        terms.append((w, h))
    if variant == "no_ce":
        return sum(w * h for w, h in terms), logits
    if variant == "unweighted":
        return ce + sum(h for _, h in terms), logits
    if variant == "ce_only":
        return ce + 0 * sum(h for _, h in terms), logits
    if variant == "averaged":
        return ce + sum(w * h for w, h in terms) / len(terms), logits
    return ce + sum(w * h for w, h in terms), logits


FITNETS_VALUE_HINTS = {
    "no_ce": "the loss lacks the cross-entropy term: FitNets here is CE(student_logits, labels) + sum of w * hint.",
    "unweighted": "the hints are not multiplied by their weights (hints[name]).",
    "ce_only": "the loss is the cross-entropy alone: add w * hint_loss(...) for every hinted layer.",
    "averaged": "the weighted hints are averaged over layers; the objective sums them (each has its own weight).",
    "max_pool": "the teacher map is max-pooled; use average pooling (your hint_loss does it).",
    "upsample": "the student map is upsampled to the teacher's size; average-pool the larger (teacher) map down "
                "instead (your hint_loss does it).",
}


def _stepoutput(out, name: str):
    for attr in ("loss", "logits", "parts"):
        if not hasattr(out, attr):
            raise CheckFailed(f"{name}.forward must return StepOutput(loss, logits, parts) "
                              f"(from kdcourse.train), got {type(out).__name__}")
    if not isinstance(out.loss, torch.Tensor) or out.loss.ndim != 0:
        raise CheckFailed(f"StepOutput.loss must be a scalar tensor, got {type(out.loss).__name__}")
    if not isinstance(out.parts, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in out.parts.values()):
        raise CheckFailed("StepOutput.parts must be a dict of plain numbers for the history, e.g. "
                          "{'ce': ce.item(), 'hint layer2': hint.item()} (use .item(), not tensors)")


def run_fitnets(cls: Callable, seed: int, hints: dict, teacher_requires_grad: bool = True) -> dict:
    """Build ``cls(teacher, hints)`` on :func:`fitnets_setting`, call
    ``setup`` and one ``forward`` as ``fit`` does, and return what a check
    needs (objects, not plain data)."""
    teacher, student, split, batch = fitnets_setting(seed)
    for p in teacher.parameters():
        p.requires_grad_(teacher_requires_grad)
    t_state = copy.deepcopy(teacher.state_dict())
    obj = cls(teacher, dict(hints))
    if not isinstance(obj, nn.Module) or not callable(getattr(obj, "setup", None)):
        raise CheckFailed(f"FitNets must be an Objective (class FitNets(Objective)), got {type(obj).__name__}")
    obj.setup(student, split)
    regs = _regressors_of(obj, teacher, student)
    obj.train()  # as fit() does before every epoch: every submodule switches to train mode
    student.train()
    ref_student = copy.deepcopy(student)
    ref_regs = [copy.deepcopy(r) for r in regs]
    with _TeacherCalls(type(teacher)) as calls:
        out = obj(student, batch, TrainState())
    return dict(obj=obj, out=out, regs=regs, ref_regs=ref_regs, student=student, ref_student=ref_student,
                teacher=teacher, t_state=t_state, calls=calls.calls, batch=batch, hints=dict(hints))


_NO_REGRESSOR = ("the objective has no regressor: in setup, build one nn.Conv2d(C_s, C_t, kernel_size=1) per hinted "
                 "layer and store it on the objective (e.g. self.regressors = nn.ModuleDict(...)), so it is a "
                 "submodule the optimiser can find")
_TEACHER_SIDE = ("the hint is regressed instead of the guided layer. FitNets maps the student: nn.Conv2d(C_s, C_t, 1) "
                 "applied to the student's feature.")
_ONE_BY_ONE = "FitNets here uses a 1x1 convolution (a linear map per position)"
_TRAIN_MODE = ("the teacher ran in train mode: fit() calls objective.train() every epoch, which switches a teacher "
               "stored on the objective to train mode too (its batch-norm then normalises with batch statistics and "
               "its running statistics drift). Call self.teacher.eval() in forward.")
_WITH_GRAD = ("the teacher's features are computed with gradients enabled: run the teacher under "
              "`with torch.no_grad():` — it is frozen, and building its graph costs memory and time at every step")
_DETACHED = "part of the loss is detached or computed outside autograd (.detach(), .item(), .data)"
_DUPLICATE = ("a parameter is listed twice: the optimiser would update it twice per step (PyTorch warns about "
              "duplicate parameters); list the student's and the regressors' once each")
_TEACHER_LISTED = ("the teacher's parameters are in the list: objective.parameters() includes every submodule of the "
                   "objective, the teacher too, and a loaded teacher's parameters may require gradients. List the "
                   "student's and the regressors' parameters only.")
_REGRESSORS_MISSING = ("the regressors' parameters are missing from the list: the optimiser would leave each 1x1 "
                       "regressor at its random initialisation, so the student would chase a random projection of "
                       "the teacher. Add objective.regressors.parameters().")
_STUDENT_MISSING = "some of the student's trainable parameters are missing: list model.parameters()"


def _match_regressors(r: dict, s_ch: dict, t_ch: dict) -> dict:
    """{layer: index into r['regs']} or raise a named mistake."""
    regs, hints = r["regs"], r["hints"]
    if not regs:
        raise CheckFailed(_NO_REGRESSOR)
    used, out = set(), {}
    for n in hints:
        cs, ct = s_ch[n], t_ch[n]
        for i, m in enumerate(regs):
            if i not in used and m.in_channels == cs and m.out_channels == ct:
                if tuple(m.kernel_size) != (1, 1):
                    raise CheckFailed(f"the regressor for {n!r} has kernel size {tuple(m.kernel_size)}: {_ONE_BY_ONE}")
                used.add(i)
                out[n] = i
                break
        else:
            if any(m.in_channels == ct and m.out_channels == cs for m in regs):
                raise CheckFailed(f"the regressor for {n!r} maps the teacher's {ct} channels to the student's {cs}: "
                                  f"{_TEACHER_SIDE} Here C_s = {cs}, C_t = {ct}.")
            raise CheckFailed(f"no regressor nn.Conv2d({cs}, {ct}, 1) for layer {n!r} (student {cs} channels, teacher "
                              f"{ct}); measure both channel counts in setup (one batch through extract_features) — "
                              f"found {[f'Conv2d({m.in_channels}, {m.out_channels})' for m in regs]}")
    if len(regs) != len(hints):
        raise CheckFailed(f"{len(regs)} regressors for {len(hints)} hinted layers: build exactly one per layer in "
                          f"setup (setup runs once; a regressor created in forward starts random at every step)")
    return out


def _channels(model, names):
    x = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        was = model.training
        model.eval()
        f, modules = {}, dict(model.named_modules())  # hooks of its own: fx.extract refuses in the grading kernel
        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: f.__setitem__(n, o)) for n in names]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        model.train(was)
    return {n: f[n].shape[1] for n in names}


def check_fitnets(cls: Callable) -> bool:
    """``cls(teacher, hints)`` must be an objective that builds one 1x1
    regressor per hinted layer in ``setup`` and returns CE + sum w * hint in
    ``forward``, with the teacher in eval mode under ``torch.no_grad()``."""
    for seed, hints in ((0, {"layer2": 3.0}), (1, {"layer1": 0.5, "layer3": 2.0})):
        where = f"hints={hints}"
        try:
            r = run_fitnets(cls, seed, hints)
        except (NotImplementedError, CheckFailed):
            raise
        except Exception as exc:
            raise CheckFailed(f"FitNets raised {type(exc).__name__}: {exc} (setup and one forward, {where})") from exc
        _stepoutput(r["out"], "FitNets")
        names = list(hints)
        s_ch, t_ch = _channels(r["ref_student"], names), _channels(r["teacher"], names)
        which = _match_regressors(r, s_ch, t_ch)
        if not r["calls"]:
            raise CheckFailed("the teacher never ran in forward: the hints need its features of this batch "
                              "(extract_features(self.teacher, batch.x, names))")
        if any(training for training, _ in r["calls"]):
            raise CheckFailed(_TRAIN_MODE)
        if any(grad for _, grad in r["calls"]):
            raise CheckFailed(_WITH_GRAD)
        if any(not torch.equal(v, r["teacher"].state_dict()[k]) for k, v in r["t_state"].items()):
            raise CheckFailed("the teacher's state changed during the step (batch-norm statistics or weights): keep "
                              "it in eval mode and never optimise it")
        regs = {n: r["ref_regs"][i] for n, i in which.items()}
        ref_loss, ref_logits = _fitnets_reference_loss(r["ref_student"], r["teacher"], regs, r["batch"], hints)
        out = r["out"]
        if not isinstance(out.logits, torch.Tensor) or out.logits.shape != ref_logits.shape or \
                not torch.allclose(out.logits.detach(), ref_logits.detach(), rtol=1e-5, atol=1e-7):
            raise CheckFailed("StepOutput.logits must be the student's logits for batch.x (shape (B, classes)); "
                              "the loop measures training accuracy with them")
        if not torch.allclose(out.loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-7):
            for vname, hint in FITNETS_VALUE_HINTS.items():
                v_student = copy.deepcopy(r["ref_student"])
                v_regs = {n: copy.deepcopy(m) for n, m in regs.items()}
                v, _ = _fitnets_reference_loss(v_student, r["teacher"], v_regs, r["batch"], hints, vname)
                if torch.allclose(out.loss.detach(), v.detach(), rtol=1e-5, atol=1e-7):
                    raise CheckFailed(f"FitNets is not right yet ({where}): {hint}")
            raise CheckFailed(f"the loss differs from CE + sum of w * hint_loss ({where}): got {float(out.loss):.6g}, "
                              f"expected {float(ref_loss):.6g}")
        if not out.loss.requires_grad:
            raise CheckFailed("the loss carries no gradient: is the student's forward under torch.no_grad()?")
        out.loss.backward()
        ref_loss.backward()
        for (pname, p), q in zip(r["student"].named_parameters(), r["ref_student"].parameters()):
            if q.grad is None:
                continue
            if p.grad is None or not torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7):
                raise CheckFailed(f"the gradient of the student's {pname} differs from the reference's although the "
                                  f"loss value matches ({where}): {_DETACHED}")
        for n, i in which.items():
            p, q = r["regs"][i].weight, regs[n].weight
            if p.grad is None or float(p.grad.abs().max()) == 0:
                raise CheckFailed(f"no gradient reaches the regressor of {n!r}: apply it to the student's feature "
                                  f"inside the loss (hint_loss(s, t, regressor)), so the optimiser can train it")
            if not torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7):
                raise CheckFailed(f"the regressor of {n!r} gets a different gradient from the reference's ({where})")
    print("✓ FitNets builds one 1x1 regressor per hinted layer, runs the teacher in eval mode without gradients, and "
          "its loss CE + sum w * hint matches the reference in value and gradients (1 and 2 hinted layers)")
    return True


# -- the FitNets objective, its parameter list, SP and in-batch InfoNCE --------

_FITNETS_HINTS = ({"layer2": 3.0}, {"layer1": 0.5, "layer3": 2.0}, {"layer3": 10.0}, {"layer1": 1.0, "layer2": 1.0, "layer3": 1.0})


def probe_fitnets(cls: Callable, seed: int) -> dict:
    """``cls(teacher, hints)`` with 1 to 3 hinted layers (the teacher's maps
    twice the student's size, channels differ): the regressors it built
    (in, out, kernel), how the teacher ran (train mode? gradients enabled?)
    and whether its state changed, and — with every regressor re-initialised
    from the seed, so answers that draw random numbers differently compare
    equal — the loss, the logits and the gradients of every student parameter
    and every regressor."""
    hints = _FITNETS_HINTS[seed % len(_FITNETS_HINTS)]
    teacher, student, split, batch = fitnets_setting(seed)
    for p in teacher.parameters():
        p.requires_grad_(True)
    t_state = copy.deepcopy(teacher.state_dict())
    helpers = _OwnHelpers(cls)
    with helpers:
        obj, raised = contract.attempt(cls, teacher, dict(hints))
        if not raised:
            _, raised = contract.attempt(obj.setup, student, split)
    if raised:
        return {"stage": "init or setup", **raised}
    names = list(hints)
    s_ch, t_ch = _channels(student, names), _channels(teacher, names)
    regs = _regressors_of(obj, teacher, student) if isinstance(obj, nn.Module) else []
    data = {"regressors": sorted([m.in_channels, m.out_channels, list(m.kernel_size)] for m in regs)}
    g = contract.generator(seed + 11)
    matched, used = {}, set()
    for n in names:
        for i, m in enumerate(regs):
            if i not in used and (m.in_channels, m.out_channels) == (s_ch[n], t_ch[n]):
                used.add(i)
                matched[n] = m
                break
    # every regressor from the seed, the matched ones in the order of the hints first
    order = [matched[n] for n in names if n in matched] + [r for r in regs if all(r is not v for v in matched.values())]
    with torch.no_grad():
        for m in order:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    obj.train()
    student.train()
    with _TeacherCalls(type(teacher)) as calls, helpers:
        out, raised = contract.attempt(obj, student, batch, TrainState())
    data["teacher_train_mode"] = any(t for t, _ in calls.calls)
    data["teacher_grad_enabled"] = any(gr for _, gr in calls.calls)
    data["teacher_ran"] = bool(calls.calls)
    data["teacher_state_changed"] = any(not torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())
    if raised:
        return {**data, "stage": "forward", **raised}
    loss, logits = getattr(out, "loss", None), getattr(out, "logits", None)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        return {**data, "stage": "forward", "raised": "not a StepOutput with a scalar loss"}
    data["loss"] = contract.scalar(loss, "FitNets loss")
    data["logits"] = contract.plain(logits) if isinstance(logits, torch.Tensor) else None
    params = [p for _, p in student.named_parameters()] + [p for n in names if n in matched for p in (matched[n].weight,)]
    keys = [f"student.{k}" for k, _ in student.named_parameters()] + [f"regressor.{n}" for n in names if n in matched]
    gs = contract.grad(loss, params, seed)
    data["grads"] = gs if isinstance(gs, str) else dict(zip(keys, gs))
    return data
