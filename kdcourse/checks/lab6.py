"""Lab 6 checks: the batch-norm statistics loss, the image prior, the synthesis step.

Each exercise has a *probe*: trusted code that builds seeded inputs (a tiny
float64 ResNet with made-up running statistics, random images), calls the
function and returns plain data — values, the gradient with respect to the
images, and what the call did to the teacher (its buffers, the gradients on
its weights, hooks left behind). A check compares the student's probe with
the reference's (values *and* gradients, so any correct way of writing it
passes), and when they differ, with the probe of each known-wrong variant,
to name the mistake. The grader calls the same probes (``EXERCISES``).

* :func:`check_bn_statistics_loss` — statistics of the BN layer's input, not
  its output; biased variance (divide by N, as batch norm and DeepInversion
  do); L2 norms, not squared; per channel; summed over layers; the
  teacher's buffers untouched; no hooks left on the teacher.
* :func:`check_image_prior` — squared neighbour differences in both
  directions, means, the weights on the right terms.
* :func:`check_synthesis_step` — the teacher arrives in train mode with
  trainable weights (as a freshly built model does): the step must leave its
  running statistics unchanged (eval mode) and put no gradient into its
  weights, zero the gradients, and descend the whole loss.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import models
from ..datafree import reference_step
from ..losses import datafree
from ..train import freeze
from . import CheckFailed, contract

RTOL, ATOL = 1e-6, 1e-9
HIDDEN_SEEDS = (0, 1, 2, 3, 5, 8)


def tiny_teacher(seed: int, train_mode: bool = False) -> nn.Module:
    """A float64 ResNet-8 of width 4 (5 classes) with seeded weights, made-up
    running statistics and BN affine parameters (so that the statistics before
    and after each BN differ)."""
    g = contract.generator(1000 + seed)
    net = models.build({"arch": "resnet", "depth": 8, "width": 4, "stem_stride": 2}, 5).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (2.0 / max(1, p[0].numel())) ** 0.5
                    if p.ndim > 1 else p)
        for _, bn in datafree.batch_norm_layers(net):
            c = bn.num_features
            bn.running_mean.copy_(0.3 * torch.randn(c, generator=g, dtype=torch.float64))
            bn.running_var.copy_(0.25 + 1.5 * torch.rand(c, generator=g, dtype=torch.float64))
            bn.weight.copy_(1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64))
            bn.bias.copy_(0.2 * torch.randn(c, generator=g, dtype=torch.float64))
    net.train(train_mode)
    return net


def _images(seed: int, shape) -> torch.Tensor:
    return torch.randn(*shape, generator=contract.generator(seed), dtype=torch.float64)


def _buffers(model: nn.Module) -> list:
    return [b.detach().clone() for b in model.buffers()]


def _buffer_change(before: list, model: nn.Module) -> float:
    return max((float((a.double() - b.double()).abs().max()) for a, b in zip(before, model.buffers()) if a.numel()),
               default=0.0)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _teacher_grad(model: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)


def _call(name: str, fn: Callable, *args, **kwargs):
    """Call the student's function; turn the in-place error of statistics
    taken on a BN output (which a ReLU(inplace=True) then overwrites) into its hint."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        if "inplace" in str(exc) or "in-place" in str(exc):
            raise CheckFailed(f"{name}: backward failed because a tensor it kept was overwritten in place ({exc}). "
                              "Did you take the batch-norm layer's OUTPUT? A ReLU(inplace=True) overwrites it; "
                              "DeepInversion uses the layer's INPUT (a forward pre-hook).") from exc
        raise


# --------------------------------------------------------------------------
# Exercise 1: the batch-norm statistics loss
# --------------------------------------------------------------------------

def _bn_variant(stats=datafree.channel_statistics, norm=torch.linalg.vector_norm, after=False, use_mean=True,
                use_var=True, combine=lambda terms: torch.stack(terms).sum(), sqrt=False, detach=False):
    """A BN-statistics loss built from its pieces (the wrong variants, and the
    step probe's own copy of the right one; it does not refuse train mode)."""
    def loss(teacher, images):
        terms = []

        def term(module, x):
            mean, var = stats(x.detach() if detach else x)
            rv = module.running_var
            if sqrt:
                var, rv = var.sqrt(), rv.sqrt()
            parts = ([norm(mean - module.running_mean)] if use_mean else []) + ([norm(var - rv)] if use_var else [])
            terms.append(sum(parts))

        layers = [m for _, m in datafree.batch_norm_layers(teacher)]
        if after:
            handles = [m.register_forward_hook(lambda mod, inp, out: term(mod, out.clone())) for m in layers]
        else:
            handles = [m.register_forward_pre_hook(lambda mod, inp: term(mod, inp[0])) for m in layers]
        try:
            logits = teacher(images)
        finally:
            for h in handles:
                h.remove()
        return combine(terms), logits
    return loss


def _unbiased(x):
    dims = [0] + list(range(2, x.ndim))
    return x.mean(dims), x.var(dims, unbiased=True)


def _global(x):
    return x.mean(), x.var(unbiased=False)


BN_LOSS = _bn_variant()
BN_VARIANTS = {
    "after_bn": (_bn_variant(after=True),
                 "the statistics are of the batch-norm layer's OUTPUT; DeepInversion matches the statistics of its "
                 "INPUT against running_mean/running_var — use register_forward_pre_hook (or the hook's `input[0]`)."),
    "unbiased": (_bn_variant(stats=_unbiased),
                 "the variance is the unbiased one (divides by N-1; torch.var's default); batch norm normalises with the "
                 "biased variance (divide by N), and DeepInversion's code uses var(unbiased=False)."),
    "squared": (_bn_variant(norm=lambda v: v.pow(2).sum()),
                "the distances are squared; the loss uses the L2 norm itself: ||mean - running_mean||_2 (not its square)."),
    "no_var": (_bn_variant(use_var=False), "only the means are matched; add ||var - running_var||_2 for every layer."),
    "no_mean": (_bn_variant(use_mean=False), "only the variances are matched; add ||mean - running_mean||_2 for every layer."),
    "std": (_bn_variant(sqrt=True), "standard deviations are compared; compare the variance with running_var."),
    "global": (_bn_variant(stats=_global),
               "one mean and variance over the whole tensor; batch norm keeps one per CHANNEL — reduce over the batch "
               "and spatial dims (0, 2, 3) only."),
    "mean_over_layers": (_bn_variant(combine=lambda terms: torch.stack(terms).mean()),
                         "the layers' terms are averaged; DeepInversion SUMS them over the batch-norm layers."),
    "detached": (_bn_variant(detach=True),
                 "no gradient reaches the images: the statistics are detached (or computed under torch.no_grad()); "
                 "the synthesis needs d loss / d images."),
}


def probe_bn_statistics_loss(fn: Callable, seed: int = 0) -> dict:
    """``fn(teacher, images) -> (loss, logits)`` on a seeded tiny teacher (in
    eval mode) and images of several shapes (non-square ones too): the loss,
    the logits, d loss / d images, and what the call did to the teacher
    (buffer change, hooks left)."""
    shapes = [(3, 3, 8, 8), (2, 3, 12, 8), (4, 3, 8, 12), (2, 3, 16, 16), (5, 3, 4, 4)]
    teacher = freeze(tiny_teacher(seed))
    images = _images(seed + 1, shapes[seed % len(shapes)]).requires_grad_(True)
    before = _buffers(teacher)
    out = _call("bn_statistics_loss", fn, teacher, images)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(o, torch.Tensor) for o in out)):
        raise CheckFailed(f"bn_statistics_loss must return a pair (loss, logits) of tensors, got {type(out).__name__}")
    loss, logits = out
    data = {"loss": contract.scalar(loss, "bn_statistics_loss"), "logits": contract.plain(logits)}
    data["grad"] = _call("bn_statistics_loss", contract.grad, loss, [images], seed)
    data.update(buffer_change=_buffer_change(before, teacher), hooks_left=_hooks(teacher))
    return data


# --------------------------------------------------------------------------
# Exercise 2: the image prior
# --------------------------------------------------------------------------

def _dxdy(x):
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def _tv(x):
    return sum(d.pow(2).mean() for d in _dxdy(x))


def _prior_variant(tv=_tv, l2=lambda x: x.pow(2).mean(), swap=False):
    def prior(images, tv_weight, l2_weight):
        a, b = (l2_weight, tv_weight) if swap else (tv_weight, l2_weight)
        return a * tv(images) + b * l2(images)
    return prior


PRIOR = _prior_variant()
PRIOR_VARIANTS = {
    "tv_abs": (_prior_variant(tv=lambda x: sum(d.abs().mean() for d in _dxdy(x))),
               "the total variation uses absolute differences; this course's prior SQUARES the neighbour differences."),
    "tv_sum": (_prior_variant(tv=lambda x: sum(d.pow(2).sum() for d in _dxdy(x))),
               "the squared differences are summed; take their MEAN (over each direction's differences)."),
    "tv_horizontal": (_prior_variant(tv=lambda x: _dxdy(x)[0].pow(2).mean()),
                      "only horizontal neighbours are compared; add the vertical ones (differences along dim -2)."),
    "tv_vertical": (_prior_variant(tv=lambda x: _dxdy(x)[1].pow(2).mean()),
                    "only vertical neighbours are compared; add the horizontal ones (differences along dim -1)."),
    "tv_halved": (_prior_variant(tv=lambda x: _tv(x) / 2),
                  "the two directions are averaged; ADD the horizontal and the vertical mean squared differences."),
    "tv_wrap": (_prior_variant(tv=lambda x: (x - x.roll(1, -1)).pow(2).mean() + (x - x.roll(1, -2)).pow(2).mean()),
                "the differences wrap around the image edge (torch.roll); compare neighbours inside the image only "
                "(x[..., 1:] - x[..., :-1])."),
    "l2_norm": (_prior_variant(l2=lambda x: x.pow(2).sum().sqrt()),
                "the L2 term is the norm of all pixels; use the MEAN squared pixel value, images.pow(2).mean()."),
    "l2_sum": (_prior_variant(l2=lambda x: x.pow(2).sum()), "the L2 term sums the squared pixels; use their mean."),
    "swapped": (_prior_variant(swap=True), "the weights are swapped: tv_weight multiplies the total variation, "
                                            "l2_weight the mean squared pixel."),
}


def probe_image_prior(fn: Callable, seed: int = 0) -> dict:
    """``fn(images, tv_weight, l2_weight)`` on seeded images of a few shapes
    (non-square ones too) and weights (each term alone, and both): the values
    and their gradients."""
    shapes = [(2, 3, 8, 8), (3, 3, 6, 10), (1, 3, 12, 5), (2, 1, 7, 9)]
    weights = [(1.0, 0.0), (0.0, 1.0), (0.7, 0.03), (2.0, 0.5)]
    cases = []
    for k, (tv_w, l2_w) in enumerate(weights):
        images = _images(100 * seed + k, shapes[(seed + k) % len(shapes)]).requires_grad_(True)
        value = fn(images, tv_w, l2_w)
        cases.append({"value": contract.scalar(value, "image_prior"), "grad": contract.grad(value, [images], seed)})
    return {"cases": cases}


# --------------------------------------------------------------------------
# Exercise 3: the synthesis step
# --------------------------------------------------------------------------

def _step_variant(freeze_mode=True, freeze_grad=True, zero_grad=True, ce=True, bn=True, use_prior=True, sign=1.0):
    def step(teacher, images, targets, optimizer, bn_weight=0.1, tv_weight=1.0, l2_weight=0.01,
             bn_loss=BN_LOSS, prior=PRIOR):
        if freeze_mode:
            teacher.eval()
        if freeze_grad:
            teacher.requires_grad_(False)
        b, logits = bn_loss(teacher, images)
        loss = (F.cross_entropy(logits, targets) if ce else 0) + (bn_weight * b if bn else 0) \
            + (prior(images, tv_weight, l2_weight) if use_prior else 0)
        if zero_grad:
            optimizer.zero_grad()
        (sign * loss).backward()
        optimizer.step()
        return loss.item()
    return step


TRAIN_MODE_HINT = ("the teacher was left in train mode: its batch-norm running statistics changed during the step "
                   "(they must be exactly as before). Call teacher.eval() (or kdcourse.train.freeze(teacher)) first.")
GRAD_HINT = ("gradients reached the teacher's weights (p.grad is set on its parameters): freeze them with "
             "teacher.requires_grad_(False) (or kdcourse.train.freeze), or take torch.autograd.grad w.r.t. the images only.")
STEP_VARIANTS = {
    "train_mode": (_step_variant(freeze_mode=False), TRAIN_MODE_HINT),
    "grads_into_teacher": (_step_variant(freeze_grad=False), GRAD_HINT),
    "no_zero_grad": (_step_variant(zero_grad=False),
                     "the gradients accumulate from step to step: call optimizer.zero_grad() before backward()."),
    "ascent": (_step_variant(sign=-1.0), "the loss is maximised; minimise it (loss.backward(), not (-loss).backward())."),
    "no_ce": (_step_variant(ce=False), "the cross-entropy towards the target classes is missing: the images would not "
                                       "be pushed towards any class."),
    "no_bn": (_step_variant(bn=False), "the batch-norm statistics term is missing: add bn_weight * bn_statistics_loss."),
    "no_prior": (_step_variant(use_prior=False), "the image prior is missing: add prior(images, tv_weight, l2_weight)."),
}


def _call_step(fn, *args, **kwargs):
    """Call the step with the probe's own (right) losses; a step that does not
    take ``bn_loss``/``prior`` is called without them (it uses its own)."""
    try:
        return _call("synthesis_step", fn, *args, **kwargs, bn_loss=BN_LOSS, prior=PRIOR)
    except TypeError as exc:
        if "bn_loss" not in str(exc) and "prior" not in str(exc):
            raise
        return _call("synthesis_step", fn, *args, **kwargs)


def probe_synthesis_step(fn: Callable, seed: int = 0) -> dict:
    """Two steps of ``fn`` with plain SGD (so the images' change is exactly
    ``-lr * gradient``) on a tiny teacher that arrives in train mode with
    trainable weights: the losses, the images after each step, the change in
    the teacher's buffers and weights and the gradient on its weights."""
    teacher = tiny_teacher(seed, train_mode=True)
    teacher.requires_grad_(True)
    before = _buffers(teacher)
    weights_before = [p.detach().clone() for p in teacher.parameters()]
    images = _images(seed + 7, (4, 3, 8, 8)).requires_grad_(True)
    targets = torch.randint(0, 5, (4,), generator=contract.generator(seed + 9))
    opt = torch.optim.SGD([images], lr=0.5)
    weights = dict(bn_weight=[0.1, 0.5, 0.02][seed % 3], tv_weight=[1.0, 0.3, 2.0][seed % 3],
                   l2_weight=[0.01, 0.1, 0.0][seed % 3])
    losses, snaps = [], []
    for _ in range(2):
        loss = _call_step(fn, teacher, images, targets, opt, **weights)
        losses.append(float(loss))
        snaps.append(contract.plain(images))
    moved = max(float((a - p.detach()).abs().max()) for a, p in zip(weights_before, teacher.parameters()))
    return {"losses": losses, "images": snaps, "buffer_change": _buffer_change(before, teacher),
            "teacher_grad": _teacher_grad(teacher), "teacher_weights_moved": moved}


# --------------------------------------------------------------------------
# Comparing probes, and the declarations the grader reads
# --------------------------------------------------------------------------

_FAULTS = (
    ("buffer_change", TRAIN_MODE_HINT),
    ("teacher_grad", GRAD_HINT),
    ("teacher_weights_moved", GRAD_HINT),
    ("hooks_left", "hooks are still registered on the teacher after the call: keep the handles that "
                   "register_forward_pre_hook returns and call handle.remove() (in a finally block)."),
)


def compare_probes(student: dict, other: dict, seed: int = 0, rtol: float = RTOL, atol: float = ATOL) -> str | None:
    """``None`` when two probes agree. What a call did to the teacher is
    compared first: a fault (running statistics moved, gradients in its
    weights, hooks left) that both show counts as agreement — the fault
    explains the rest — and a fault on one side only is the difference.
    Otherwise values and gradients are compared within tolerance."""
    for field, hint in _FAULTS:
        if field not in other and field not in student:
            continue
        fs, fo = float(student.get(field) or 0) > 0, float(other.get(field) or 0) > 0
        if fs and fo:
            return None
        if fs != fo:
            return f"{field}: {student.get(field)!r} vs {other.get(field)!r} ({hint})"
    return contract.compare(student, other, rtol, atol)


def _fault_hint(name: str, data: dict) -> str | None:
    for field, hint in _FAULTS:
        if float(data.get(field) or 0) > 0:
            return f"{name} is not right yet: {hint}"
    return None


def _check(exercise, fn, seeds=(0, 1)) -> bool:
    """The visible check: the student's probe data against the reference's
    and the variants', decided exactly as the grader decides."""
    student, reference = {}, {}
    for seed in seeds:
        student[seed] = contract.run_probe(exercise, fn, seed)
        hint = _fault_hint(exercise.name, student[seed])
        if hint is not None:
            raise CheckFailed(hint)
        reference[seed] = contract.run_probe(exercise, exercise.reference, seed)
    variants = lambda name, seed: contract.run_probe(exercise, exercise.variants[name][0], seed)  # noqa: E731
    v = contract.diagnose_data(exercise, student, reference, variants)
    if not v.ok:
        raise CheckFailed(v.hint.replace("on a hidden test", "on a check input"))
    print(f"✓ {exercise.name} matches the reference (values and gradients) on {len(seeds)} seeded cases "
          f"(tolerance rtol={exercise.rtol:g}, atol={exercise.atol:g})")
    return True


def check_bn_statistics_loss(fn: Callable) -> bool:
    """``fn(teacher, images) -> (loss, logits)``: DeepInversion's statistics loss."""
    return _check(contract.exercise(6, "bn_statistics_loss"), fn)


def check_image_prior(fn: Callable) -> bool:
    """``fn(images, tv_weight, l2_weight)``: the squared-difference TV + mean L2 prior."""
    return _check(contract.exercise(6, "image_prior"), fn)


def check_synthesis_step(fn: Callable) -> bool:
    """``fn(teacher, images, targets, optimizer, bn_weight=, tv_weight=, l2_weight=, bn_loss=, prior=)``."""
    return _check(contract.exercise(6, "synthesis_step"), fn)


EXERCISES = [
    contract.Exercise(name="bn_statistics_loss", points=1.0, check=check_bn_statistics_loss,
                      probe=probe_bn_statistics_loss, reference=datafree.bn_statistics_loss, variants=BN_VARIANTS,
                      hidden_seeds=HIDDEN_SEEDS, rtol=RTOL, atol=ATOL, compare=compare_probes,
                      refuse=(datafree.bn_statistics_loss, datafree.synthesis_loss)),
    contract.Exercise(name="image_prior", points=1.0, check=check_image_prior, probe=probe_image_prior,
                      reference=datafree.image_prior, variants=PRIOR_VARIANTS, hidden_seeds=HIDDEN_SEEDS,
                      rtol=RTOL, atol=ATOL, refuse=(datafree.image_prior, datafree.total_variation)),
    contract.Exercise(name="synthesis_step", points=1.0, check=check_synthesis_step, probe=probe_synthesis_step,
                      reference=reference_step, variants=STEP_VARIANTS, hidden_seeds=HIDDEN_SEEDS,
                      rtol=RTOL, atol=ATOL, compare=compare_probes, refuse=(reference_step,)),
]
