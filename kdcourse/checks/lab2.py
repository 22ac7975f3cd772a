"""Lab 2 checks: the hook extractor, the FitNets hint loss, the FitNets
objective and its parameter list, attention transfer, the RKD distance loss,
the similarity-preserving loss and in-batch InfoNCE — each names the usual
mistakes, compares gradients with the reference's (not only values) and
names an in-place change of an input as such."""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import features as fx
from ..data import Split
from ..losses import feature, relation
from ..models import ResNet, SmallCNN
from ..train import Objective, StepOutput, TrainState
from . import Case, CheckFailed, contract, diagnose


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, relu: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)
    return x.clamp_min(0) if relu else x


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------
# Exercise 1: features by forward hooks
# --------------------------------------------------------------------------

class _Boom(nn.Module):
    """A model whose forward fails after its first stage ran (hooks fired)."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        self.layer2(self.layer1(x))
        raise RuntimeError("forward failed on purpose (the check tests clean-up)")


def check_feature_extractor(fn: Callable) -> bool:
    """``fn(model, x, names)`` must return ``(model(x), {name: output of the
    module called name})`` using forward hooks, and leave no hook behind."""
    torch.manual_seed(0)
    models_ = [("SmallCNN", SmallCNN((4, 8, 16)).eval()), ("ResNet-8", ResNet(8, 4).eval())]
    x = torch.randn(3, 3, 32, 32, generator=_gen(1))
    for label, model in models_:
        names = ["layer1", "layer2", "layer3"]
        with torch.no_grad():
            ref_logits, ref = model(x, return_features=True)
        try:
            out = fn(model, x, names)
        except NotImplementedError:
            raise
        except Exception as exc:
            raise CheckFailed(f"extract_features raised {type(exc).__name__}: {exc} (on {label}, names={names})") from exc
        if fx.hook_count(model):
            raise CheckFailed("hooks are left on the model after the call: keep the handles that "
                              "register_forward_hook returns and call handle.remove() on each (in a `finally:` block)")
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise CheckFailed("extract_features must return a pair (model output, dict name -> tensor)")
        logits, feats = out
        if not torch.allclose(logits, ref_logits, atol=1e-6):
            raise CheckFailed("the first element must be the model's output model(x) (the logits)")
        if sorted(feats) != sorted(names):
            raise CheckFailed(f"the dict must have exactly the requested names as keys: got {sorted(feats)}, expected {names}")
        last = feats.get(names[-1])
        if isinstance(last, torch.Tensor) and all(isinstance(feats[n], torch.Tensor) and feats[n].shape == last.shape
                                                  and torch.equal(feats[n], last) for n in names[:-1]):
            raise CheckFailed("every name holds the same tensor: the hooks share one variable. A function defined in "
                              "a loop sees the loop variable's *last* value — build each hook in a helper function "
                              "that takes the name as an argument (or bind it: lambda m, i, o, name=name: ...)")
        for n in names:
            f = feats[n]
            if not isinstance(f, torch.Tensor):
                raise CheckFailed(f"features[{n!r}] must be a tensor, got {type(f).__name__}")
            if f.shape != ref[n].shape:
                raise CheckFailed(f"features[{n!r}] has shape {tuple(f.shape)}, expected {tuple(ref[n].shape)} — "
                                  f"a forward hook is called as hook(module, inputs, output): store `output`, not the inputs")
            if not torch.allclose(f, ref[n], atol=1e-6):
                raise CheckFailed(f"features[{n!r}] differs from the module's output (max difference "
                                  f"{(f - ref[n]).abs().max():.3g}); store the hook's `output` argument")
    # dotted names reach nested modules
    model = ResNet(8, 4).eval()
    with torch.no_grad():
        ref = fx.extract(model, x, ["layer2.0.conv1"])[1]["layer2.0.conv1"]
        try:
            got = fn(model, x, ["layer2.0.conv1"])[1]["layer2.0.conv1"]
        except (AttributeError, KeyError) as exc:
            raise CheckFailed("nested names such as 'layer2.0.conv1' must work: look modules up in "
                              "dict(model.named_modules()) instead of getattr(model, name)") from exc
    if not torch.allclose(got, ref, atol=1e-6):
        raise CheckFailed("features['layer2.0.conv1'] differs from that module's output")
    # gradients must flow through the student's features
    model = SmallCNN((4, 8, 16)).train()
    _, feats = fn(model, x, ["layer2"])
    if fx.hook_count(model):
        raise CheckFailed("hooks are left on the model after the call: remove every handle")
    if not feats["layer2"].requires_grad:
        raise CheckFailed("the features carry no gradient: do not detach them (or run under torch.no_grad) — "
                          "a feature loss must train the student's layers through them")
    # hooks removed even when the forward pass fails
    boom = _Boom()
    try:
        fn(boom, x, ["layer1"])
    except NotImplementedError:
        raise
    except Exception:
        pass
    if fx.hook_count(boom):
        raise CheckFailed("after a forward pass that raised, the hooks were still registered: remove them in a "
                          "`finally:` block (or use a context manager) so an error cannot leave them behind")
    print("✓ extract_features returns the outputs of the named modules (ResNet, SmallCNN, nested names), "
          "keeps gradients and removes its hooks, also after an error")
    return True


# --------------------------------------------------------------------------
# Exercise 2: FitNets hint loss
# --------------------------------------------------------------------------

def _regressor(cs: int, ct: int, kind: str = "conv", seed: int = 0) -> feature.HintRegressor:
    torch.manual_seed(seed)
    return feature.HintRegressor(cs, ct, kind=kind).double()


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _pool_t(s, t):
    return s, (F.adaptive_avg_pool2d(t, s.shape[-2:]) if s.ndim == 4 and t.shape[-2:] != s.shape[-2:] else t)


def _hint_variant(body):
    def loss(student, teacher, regressor):
        s = regressor(student)
        return body(s, teacher)
    return loss


HINT_VARIANTS = {
    "normalized": (_hint_variant(lambda s, t: F.mse_loss(*_pool_t(F.normalize(s, dim=1), F.normalize(t, dim=1)))),
                   "both features are L2-normalised over channels first (as a reference chapter does): that is not "
                   "the FitNets hint loss. Compare r(student) and the teacher's raw features with a plain MSE."),
    "sum": (_hint_variant(lambda s, t: (lambda a, b: (a - b).pow(2).sum())(*_pool_t(s, t))),
            "the squared errors are summed; use the mean over every element (F.mse_loss) so the loss does not grow "
            "with batch size and feature-map size."),
    "per_sample_sum": (_hint_variant(lambda s, t: (lambda a, b: (a - b).pow(2).flatten(1).sum(1).mean())(*_pool_t(s, t))),
                       "you sum over channels and positions and average over the batch (the paper's ||.||^2 per "
                       "sample): this course uses the mean over every element (F.mse_loss) — a constant factor, "
                       "but it changes what a loss weight means."),
    "half": (_hint_variant(lambda s, t: 0.5 * F.mse_loss(*_pool_t(s, t))),
             "off by the factor 1/2: use F.mse_loss (the paper's 1/2 is folded into the loss weight here)."),
    "upsample_nearest": (_hint_variant(lambda s, t: F.mse_loss(F.interpolate(s, size=t.shape[-2:], mode="nearest"), t)
                                       if s.ndim == 4 else F.mse_loss(s, t)),
                         "the student map is upsampled to the teacher's size; average-pool the larger (teacher) map "
                         "down to the student's H x W instead (F.adaptive_avg_pool2d)."),
    "upsample_bilinear": (_hint_variant(lambda s, t: F.mse_loss(F.interpolate(s, size=t.shape[-2:], mode="bilinear",
                                                                               align_corners=False), t)
                                        if s.ndim == 4 else F.mse_loss(s, t)),
                          "the student map is upsampled to the teacher's size; average-pool the larger (teacher) map "
                          "down to the student's H x W instead (F.adaptive_avg_pool2d)."),
    "max_pool": (_hint_variant(lambda s, t: F.mse_loss(s, F.adaptive_max_pool2d(t, s.shape[-2:]))
                               if s.ndim == 4 and s.shape[-2:] != t.shape[-2:] else F.mse_loss(s, t)),
                 "the teacher map is max-pooled; use average pooling (F.adaptive_avg_pool2d), which keeps the mean "
                 "activation of each block."),
    "channel_means": (_hint_variant(lambda s, t: F.mse_loss(s.mean(dim=(2, 3)), t.mean(dim=(2, 3))) if s.ndim == 4
                                    else F.mse_loss(s, t)),
                      "only the channel means are matched (the handout's statistics loss); FitNets matches the "
                      "feature at every position."),
}


def _ignored_regressor(student, teacher, regressor):
    return F.mse_loss(*_pool_t(student, teacher)) if student.shape[1] == teacher.shape[1] else \
        torch.tensor(float("nan"), dtype=student.dtype)


def check_hint_loss(fn: Callable) -> bool:
    """``fn(student, teacher, regressor)`` must equal
    mean((regressor(student) - avgpool(teacher))^2), the larger map pooled."""
    # 1. is the regressor used at all? (channels differ: it must be)
    s, t = _randn(4, 8, 8, 8, seed=1, relu=True), _randn(4, 16, 16, 16, seed=2, relu=True)
    counting = _Counting(_regressor(8, 16))
    try:
        fn(s, t, counting)
    except NotImplementedError:
        raise
    except Exception as exc:
        if counting.calls == 0:
            raise CheckFailed(f"the regressor is missing: student (8 channels) and teacher (16 channels) cannot be "
                              f"compared directly ({type(exc).__name__}: {exc}). Apply regressor(student) first — "
                              f"it maps C_s to C_t and is trained with the student.") from exc
        raise CheckFailed(f"hint_loss raised {type(exc).__name__}: {exc} (student {tuple(s.shape)}, teacher {tuple(t.shape)})") from exc
    if counting.calls == 0:
        raise CheckFailed("the regressor is never called: apply regressor(student) before comparing with the teacher")

    cases = [
        Case((_randn(4, 8, 8, 8, seed=3, relu=True), _randn(4, 16, 16, 16, seed=4, relu=True), _regressor(8, 16, seed=1)),
             {}, "student (4, 8, 8, 8), teacher (4, 16, 16, 16): channels and size differ"),
        Case((_randn(2, 6, 4, 4, seed=5), _randn(2, 12, 4, 4, seed=6), _regressor(6, 12, seed=2)),
             {}, "student (2, 6, 4, 4), teacher (2, 12, 4, 4): only channels differ"),
        Case((_randn(3, 8, 4, 4, seed=7, relu=True), _randn(3, 8, 8, 8, seed=8, relu=True), _regressor(8, 8, seed=3)),
             {}, "student (3, 8, 4, 4), teacher (3, 8, 8, 8): equal channels, still a regressor"),
        Case((_randn(5, 10, seed=9), _randn(5, 20, seed=10), _regressor(10, 20, "linear", seed=4)),
             {}, "vectors: student (5, 10), teacher (5, 20), linear regressor"),
    ]
    # with equal channels a forgotten regressor still runs: say so
    ignored = {"ignored": (_ignored_regressor, "the regressor is not applied (channels happen to match here): "
                                               "FitNets always compares regressor(student) with the teacher.")}
    check_inputs_untouched("hint_loss", fn, cases[0].args, ("student", "teacher", "regressor"))
    _quiet(diagnose, "hint_loss", fn, feature.hint_loss, [cases[2]], {**ignored, **HINT_VARIANTS}, rtol=1e-6, atol=1e-9)
    ok = diagnose("hint_loss", fn, feature.hint_loss, cases, HINT_VARIANTS, rtol=1e-6, atol=1e-9)

    # gradients must reach the student and the regressor exactly as in the reference, none the teacher
    for c in (Case((_randn(2, 4, 4, 4, seed=11), _randn(2, 8, 8, 8, seed=12), _regressor(4, 8, seed=5)), {},
                   "student (2, 4, 4, 4), teacher (2, 8, 8, 8)"),
              Case((_randn(3, 6, seed=13), _randn(3, 9, seed=14), _regressor(6, 9, "linear", seed=6)), {},
                   "vectors (3, 6) and (3, 9)")):
        check_gradients("hint_loss", fn, feature.hint_loss, c.args, label=c.label)
    return ok


# --------------------------------------------------------------------------
# Exercise 3: attention transfer
# --------------------------------------------------------------------------

def _at_variant(amap, reduce=lambda d: d.pow(2).mean(), pool_features: bool = True):
    def loss(student, teacher):
        s, t = student, teacher
        if pool_features:
            s, t = feature.match_spatial(s, t)
            return reduce(amap(s) - amap(t))
        a_s, a_t = amap(s), amap(t)
        return reduce(a_s - a_t)
    return loss


def _map_norm(f):  # the handout's map: L2 norm over channels
    return F.normalize(f.norm(p=2, dim=1).flatten(1), dim=1)


def _pooled_map_variant(student, teacher):
    def raw(f):
        return f.pow(2).mean(1, keepdim=True)
    a_s, a_t = raw(student), raw(teacher)
    if a_s.shape[-2:] != a_t.shape[-2:]:
        if a_s.shape[-1] > a_t.shape[-1]:
            a_s = F.adaptive_avg_pool2d(a_s, a_t.shape[-2:])
        else:
            a_t = F.adaptive_avg_pool2d(a_t, a_s.shape[-2:])
    return (F.normalize(a_s.flatten(1), dim=1) - F.normalize(a_t.flatten(1), dim=1)).pow(2).mean()


def _upsampled_at(student, teacher):
    s, t = student, teacher
    if s.shape[-1] < t.shape[-1]:
        s = F.interpolate(s, size=t.shape[-2:], mode="nearest")
    elif t.shape[-1] < s.shape[-1]:
        t = F.interpolate(t, size=s.shape[-2:], mode="nearest")
    amap = lambda f: F.normalize(f.pow(2).mean(1).flatten(1), dim=1)  # noqa: E731
    return (amap(s) - amap(t)).pow(2).mean()


AT_VARIANTS = {
    "not_normalized": (_at_variant(lambda f: f.pow(2).mean(1).flatten(1)),
                       "the attention maps are not normalised: divide each flattened map by its L2 norm "
                       "(F.normalize(a, dim=1)), so only *where* the network looks is compared, not how strongly."),
    "l2_norm_channels": (_at_variant(_map_norm),
                         "wrong channel reduction: this is the L2 norm over channels (sqrt of the sum of squares, as "
                         "the handout computes it). Zagoruyko & Komodakis use the mean (or sum) of the *squared* "
                         "activations, without the square root: a = mean_c A_c^2."),
    "abs": (_at_variant(lambda f: F.normalize(f.abs().mean(1).flatten(1), dim=1)),
            "wrong channel reduction: mean of |A| (p = 1); the paper's map uses squared activations (p = 2)."),
    "max_channels": (_at_variant(lambda f: F.normalize(f.pow(2).amax(1).flatten(1), dim=1)),
                     "wrong channel reduction: max over channels; use the mean of the squared activations."),
    "normalize_batch": (_at_variant(lambda f: F.normalize(f.pow(2).mean(1).flatten(1), dim=0)),
                        "the maps are normalised over the batch (dim 0); normalise each sample's map over its "
                        "H*W positions (dim=1 after flattening)."),
    "sum": (_at_variant(lambda f: F.normalize(f.pow(2).mean(1).flatten(1), dim=1), lambda d: d.pow(2).sum()),
            "the squared differences are summed; take the mean over batch and positions ((a_s - a_t).pow(2).mean())."),
    "per_sample": (_at_variant(lambda f: F.normalize(f.pow(2).mean(1).flatten(1), dim=1), lambda d: d.pow(2).sum(1).mean()),
                   "you sum over positions and average over the batch; the course (and the authors' code) averages "
                   "over positions too: (a_s - a_t).pow(2).mean()."),
    "unsquared": (_at_variant(lambda f: F.normalize(f.pow(2).mean(1).flatten(1), dim=1), lambda d: d.norm(dim=1).mean()),
                  "this is the unsquared distance ||a_s - a_t||_2 (the paper's eq. 2 with p = 2); the course follows "
                  "the authors' code: squared differences, averaged: (a_s - a_t).pow(2).mean()."),
    "pooled_map": (_pooled_map_variant,
                   "you pool the attention *map*; the course pools the larger *feature map* to the smaller size "
                   "first (F.adaptive_avg_pool2d), then computes both maps (as RepDistiller does)."),
    "upsample": (_upsampled_at,
                 "the smaller map is upsampled; average-pool the larger feature map down instead (F.adaptive_avg_pool2d)."),
}


def check_attention_transfer(fn: Callable) -> bool:
    """``fn(student, teacher)`` must equal mean((a_s - a_t)^2) with
    a = normalize(vec(mean_c A^2)), the larger feature map average-pooled."""
    cases = [
        Case((_randn(4, 8, 8, 8, seed=21), _randn(4, 16, 8, 8, seed=22)), {}, "same size, channels 8 vs 16"),
        Case((_randn(3, 4, 4, 4, seed=23, relu=True), _randn(3, 16, 8, 8, seed=24, relu=True)), {},
             "student (3, 4, 4, 4), teacher (3, 16, 8, 8) (teacher pooled)"),
        Case((_randn(2, 6, 8, 8, seed=25, relu=True), _randn(2, 6, 4, 4, seed=26, relu=True)), {},
             "student (2, 6, 8, 8) larger than teacher (2, 6, 4, 4)"),
        Case((_randn(5, 3, 5, 5, seed=27) * 10, _randn(5, 7, 5, 5, seed=28) * 0.1), {}, "very different scales"),
    ]
    check_inputs_untouched("at_loss", fn, cases[1].args, ("student", "teacher"))
    ok = diagnose("attention_transfer_loss", fn, feature.attention_transfer_loss, cases, AT_VARIANTS, rtol=1e-6, atol=1e-9)
    for c in cases[1:3]:
        check_gradients("at_loss", fn, feature.attention_transfer_loss, c.args, label=c.label)
    return ok


# --------------------------------------------------------------------------
# Exercise 4: RKD distance-wise loss
# --------------------------------------------------------------------------

def _rkd_with(norm, dist=relation.pairwise_distances, crit=F.smooth_l1_loss):
    def loss(student, teacher):
        return crit(norm(dist(student.flatten(1))), norm(dist(teacher.flatten(1))))
    return loss


def _mean_nz(d):
    return d / d[d > 0].mean()


RKD_VARIANTS = {
    "max": (_rkd_with(lambda d: d / d.max()),
            "the distances are divided by the largest one (as a reference chapter does); RKD divides by the mean of "
            "the non-zero distances, so one outlier pair cannot shrink all the others."),
    "mean_all": (_rkd_with(lambda d: d / d.mean()),
                 "the mean includes the B zero distances on the diagonal; average only the non-zero (off-diagonal) "
                 "distances: d[d > 0].mean()."),
    "unnormalized": (_rkd_with(lambda d: d),
                     "the distances are not normalised: divide each side by its own mean non-zero distance, so the "
                     "student matches the teacher's geometry, not its scale."),
    "squared": (_rkd_with(_mean_nz, dist=lambda e: relation.pairwise_distances(e).pow(2)),
                "these are squared distances; RKD uses Euclidean distances ||x_i - x_j||_2."),
    "mse": (_rkd_with(_mean_nz, crit=F.mse_loss),
            "the comparison uses MSE; RKD uses the Huber loss (F.smooth_l1_loss), robust to a few large differences."),
    "l1": (_rkd_with(_mean_nz, crit=F.l1_loss),
           "the comparison uses L1; RKD uses the Huber loss (F.smooth_l1_loss)."),
    "teacher_scale": (lambda s, t: F.smooth_l1_loss(relation.pairwise_distances(s.flatten(1)) / relation.pairwise_distances(t.flatten(1))[relation.pairwise_distances(t.flatten(1)) > 0].mean(),
                                                    _mean_nz(relation.pairwise_distances(t.flatten(1)))),
                      "the student's distances are divided by the *teacher's* mean distance; normalise each side by "
                      "its own mean (the student and teacher live in spaces of different scale)."),
}


def check_rkd_distance(fn: Callable) -> bool:
    """``fn(student, teacher)`` (B, D) embeddings must equal
    smooth_l1(d_s / mean(d_s > 0), d_t / mean(d_t > 0))."""
    outlier = _randn(6, 4, seed=41)
    outlier[0] = outlier[0] * 30
    cases = [
        Case((_randn(8, 5, seed=42), _randn(8, 12, seed=43) * 3), {}, "B=8, widths 5 vs 12"),
        Case((_randn(6, 4, seed=44) * 0.1, outlier), {}, "a teacher batch with one far outlier"),
        Case((_randn(5, 3, seed=45) * 10, _randn(5, 3, seed=46) + 4), {}, "different scales and offsets"),
    ]
    check_inputs_untouched("rkd_distance", fn, cases[0].args, ("student", "teacher"))
    ok = diagnose("rkd_distance", fn, relation.rkd_distance, cases, RKD_VARIANTS, rtol=1e-6, atol=1e-9)
    for c in cases[:2]:
        check_gradients("rkd_distance", fn, relation.rkd_distance, c.args, label=c.label)
    return ok


# --------------------------------------------------------------------------
# Shared by every Lab 2 check: inputs left alone, gradients like the reference's
# --------------------------------------------------------------------------

def _clone_args(args):
    return tuple(copy.deepcopy(a) if isinstance(a, nn.Module) else
                 (a.detach().clone() if isinstance(a, torch.Tensor) else a) for a in args)


def check_inputs_untouched(name: str, fn: Callable, args: tuple, arg_names: Sequence[str]) -> None:
    """Call ``fn(*args)`` on copies and raise if it changed an input tensor
    (or a module's weights) in place — named as such, not as a wrong value."""
    before = _clone_args(args)
    given = _clone_args(args)
    try:
        fn(*given)
    except NotImplementedError:
        raise
    except Exception as exc:
        raise CheckFailed(f"{name} raised {type(exc).__name__}: {exc} (inputs of shapes "
                          f"{[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]})") from exc
    for a0, a1, label in zip(before, given, arg_names):
        if isinstance(a0, torch.Tensor) and not torch.equal(a0, a1.detach()):
            raise CheckFailed(f"{name} changed its input `{label}` in place (largest change "
                              f"{float((a0 - a1.detach()).abs().max()):.3g}): an in-place operation (x.relu_(), "
                              f"x.pow_(2), x += ..., x[...] = ..., x.data = ...) overwrote the caller's tensor — the "
                              f"training loop and the other loss terms read it afterwards. Compute on new tensors "
                              f"(x.relu(), x.pow(2), x = x + ...).")
        if isinstance(a0, nn.Module):
            for (k, v0), v1 in zip(a0.state_dict().items(), a1.state_dict().values()):
                if not torch.equal(v0, v1):
                    raise CheckFailed(f"{name} changed `{label}.{k}` in place: a loss must not modify the "
                                      f"module's weights (only the optimiser does)")


def check_gradients(name: str, fn: Callable, reference: Callable, args: tuple, student: int = 0, teacher: int = 1,
                    rtol: float = 1e-5, atol: float = 1e-9, label: str = "") -> None:
    """The gradient of ``fn(*args)`` w.r.t. the student input (and any module
    argument's parameters) must equal the reference's; none may reach the
    teacher input. A loss that detaches the wrong side, or leaves autograd
    (``.item()``, ``.numpy()``, ``.data``), fails here even with the right value."""
    def run(f):
        a = list(_clone_args(args))
        a[student] = a[student].requires_grad_(True)
        a[teacher] = a[teacher].requires_grad_(True)
        return f(*a), a

    out, a = run(fn)
    ref, r = run(reference)
    where = f" (on {label})" if label else ""
    if not isinstance(out, torch.Tensor) or out.ndim != 0:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckFailed(f"{name} must return a scalar tensor (a 0-d loss), got {shape}{where}")
    if not out.requires_grad:
        raise CheckFailed(f"{name}'s result carries no gradient{where}: the student's side is detached, computed "
                          f"under torch.no_grad(), or rebuilt from numbers (.item(), .numpy(), torch.tensor(...)) — "
                          f"detach the teacher only")
    mods = [i for i, x in enumerate(a) if isinstance(x, nn.Module)]
    out.backward()
    ref.backward()
    t_grad = a[teacher].grad
    if t_grad is not None and float(t_grad.abs().max()) > 0:
        raise CheckFailed(f"{name} sends gradients into the teacher's features{where}: use teacher.detach() — the "
                          f"teacher is frozen; only the student (and a regressor) learn")
    s_grad, s_ref = a[student].grad, r[student].grad
    if s_grad is None or (float(s_grad.abs().max()) == 0 and float(s_ref.abs().max()) > 0):
        raise CheckFailed(f"no gradient reaches the student's features{where}: did you detach the student's side "
                          f"(or the wrong side)? Only the teacher is a constant.")
    if not torch.allclose(s_grad.double(), s_ref.double(), rtol=rtol, atol=atol):
        raise CheckFailed(f"{name} has the right value but the wrong gradient with respect to the student's "
                          f"features{where} (largest difference {float((s_grad - s_ref).abs().max()):.3g}): part of "
                          f"the student's computation is detached or done outside autograd (.detach(), .item(), "
                          f".data, a NumPy detour)")
    for i in mods:
        for (pname, p), q in zip(a[i].named_parameters(), r[i].parameters()):
            if q.grad is None:
                continue
            if p.grad is None or float(p.grad.abs().max()) == 0 and float(q.grad.abs().max()) > 0:
                raise CheckFailed(f"no gradient reaches the regressor ({pname}){where}: it must be applied to the "
                                  f"student's features inside the graph, so the optimiser can train it")
            if not torch.allclose(p.grad.double(), q.grad.double(), rtol=rtol, atol=atol):
                raise CheckFailed(f"{name}: the regressor's gradient ({pname}) differs from the reference's{where} "
                                  f"(largest difference {float((p.grad - q.grad).abs().max()):.3g})")


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
    g = _gen(seed + 100)
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
    from ..distill.fitnets import regressor_key

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


# --------------------------------------------------------------------------
# Exercise 6: similarity-preserving loss (Tung & Mori)
# --------------------------------------------------------------------------

def _sp_with(gram, reduce=lambda d, b: d.pow(2).sum() / b ** 2):
    def loss(student, teacher):
        s, t = student.flatten(1), teacher.detach().flatten(1)
        return reduce(gram(t) - gram(s), s.shape[0])
    return loss


def _row_gram(q):
    return F.normalize(q @ q.t(), dim=1)


SP_VARIANTS = {
    "cosine": (_sp_with(lambda q: F.normalize(q, dim=1) @ F.normalize(q, dim=1).t()),
               "this is the cosine-similarity matrix (rows of F normalised *before* the product, as a reference "
               "chapter does). Tung & Mori form G = F F^T first and then divide each *row of G* by its L2 norm."),
    "unnormalized": (_sp_with(lambda q: q @ q.t()),
                     "the Gram matrix is not normalised: divide each row of G = F F^T by its L2 norm "
                     "(F.normalize(G, dim=1)), so the two networks' feature scales drop out."),
    "sum": (_sp_with(_row_gram, lambda d, b: d.pow(2).sum()),
            "the squared differences are summed without dividing by B^2: the paper's loss is ||G_t - G_s||_F^2 / B^2."),
    "per_b": (_sp_with(_row_gram, lambda d, b: d.pow(2).sum() / b),
              "divided by B instead of B^2: the paper's loss is ||G_t - G_s||_F^2 / B^2."),
    "frobenius": (_sp_with(_row_gram, lambda d, b: d.norm() / b ** 2),
                  "the Frobenius norm is not squared: use ||G_t - G_s||_F^2 / B^2 (sum of squared entries)."),
    "l1": (_sp_with(_row_gram, lambda d, b: d.abs().sum() / b ** 2),
           "absolute differences: SP uses squared differences, ||G_t - G_s||_F^2 / B^2."),
    "per_channel": (lambda s, t: _sp_with(_row_gram)(s.flatten(2).mean(-1) if s.ndim == 4 else s,
                                                     t.flatten(2).mean(-1) if t.ndim == 4 else t),
                    "the feature maps are pooled to channel means first: SP flattens each sample's whole map "
                    "(C * H * W values) before G = F F^T."),
}


def check_sp_loss(fn: Callable) -> bool:
    """``fn(student, teacher)``, (B, ...) each, must equal Tung & Mori's SP loss."""
    cases = [
        Case((_randn(6, 4, 4, 4, seed=51, relu=True), _randn(6, 16, 2, 2, seed=52, relu=True)), {},
             "student (6, 4, 4, 4), teacher (6, 16, 2, 2) feature maps"),
        Case((_randn(5, 7, seed=53), _randn(5, 20, seed=54) * 5), {}, "embeddings (5, 7) and (5, 20)"),
        Case((_randn(4, 3, 2, 2, seed=55) * 0.1, _randn(4, 9, seed=56) + 2), {}, "a (4, 3, 2, 2) map and a (4, 9) vector"),
        Case((_randn(2, 5, seed=57), _randn(2, 5, seed=58)), {}, "B = 2"),
    ]
    check_inputs_untouched("sp_loss", fn, cases[0].args, ("student", "teacher"))
    ok = diagnose("sp_loss", fn, relation.similarity_preserving, cases, SP_VARIANTS, rtol=1e-6, atol=1e-9)
    for c in cases[:3]:
        check_gradients("sp_loss", fn, relation.similarity_preserving, c.args, label=c.label)
    return ok


# --------------------------------------------------------------------------
# Exercise 7: in-batch InfoNCE
# --------------------------------------------------------------------------

def _nce_with(logits_of, reduce=F.cross_entropy):
    def loss(student, teacher, temperature=0.1):
        lg = logits_of(student, teacher.detach(), temperature)
        return reduce(lg, torch.arange(len(lg)))
    return loss


def _cos(s, t):
    return F.normalize(s, dim=1) @ F.normalize(t, dim=1).t()


INFO_NCE_VARIANTS = {
    "not_normalized": (_nce_with(lambda s, t, tau: s @ t.t() / tau),
                       "the embeddings are not L2-normalised: use cosine similarities "
                       "(F.normalize(student, dim=1) @ F.normalize(teacher, dim=1).T)."),
    "times_tau": (_nce_with(lambda s, t, tau: _cos(s, t) * tau),
                  "the similarities are multiplied by the temperature; divide by it (logits = cos / tau)."),
    "no_tau": (_nce_with(lambda s, t, tau: _cos(s, t)),
               "the temperature is not used: divide the cosine similarities by tau."),
    "symmetric": (lambda s, t, temperature=0.1: 0.5 * (F.cross_entropy(_cos(s, t.detach()) / temperature, torch.arange(len(s)))
                                                 + F.cross_entropy(_cos(s, t.detach()).t() / temperature, torch.arange(len(s)))),
                  "you average both directions (CLIP-style); here each *student* embedding is the anchor and the "
                  "batch's teacher embeddings are the candidates: CE(logits[i, :], i) only."),
    "teacher_anchor": (_nce_with(lambda s, t, tau: _cos(s, t).t() / tau),
                       "the matrix is transposed (teacher embeddings as anchors): row i must hold the student's "
                       "embedding i against every teacher embedding j, logits = u @ v.T / tau."),
    "sum": (_nce_with(lambda s, t, tau: _cos(s, t) / tau, lambda lg, y: F.cross_entropy(lg, y, reduction="sum")),
            "the per-anchor losses are summed; average them over the batch (the default of F.cross_entropy)."),
    "positive_only": (lambda s, t, temperature=0.1: -(F.normalize(s, dim=1) * F.normalize(t.detach(), dim=1)).sum(1).mean() / temperature,
                      "only the positive pair is scored: InfoNCE is a softmax over the batch, so the other B - 1 "
                      "teacher embeddings act as negatives (F.cross_entropy(logits, arange(B)))."),
    "mse_labels": (_nce_with(lambda s, t, tau: _cos(s, t) / tau,
                             lambda lg, y: F.binary_cross_entropy_with_logits(lg, F.one_hot(y, len(lg)).to(lg.dtype))),
                   "a binary (sigmoid) loss per pair: InfoNCE takes a softmax over each row (F.cross_entropy)."),
}


def check_info_nce(fn: Callable) -> bool:
    """``fn(student, teacher, temperature)`` for (B, D) embeddings must equal
    the in-batch InfoNCE loss with the student as anchor."""
    cases = [
        Case((_randn(8, 5, seed=61), _randn(8, 5, seed=62), 0.1), {}, "B = 8, D = 5, temperature 0.1"),
        Case((_randn(4, 16, seed=63) * 3, _randn(4, 16, seed=64) * 0.2, 0.07), {}, "B = 4, D = 16, different scales, 0.07"),
        Case((_randn(16, 3, seed=65), _randn(16, 3, seed=66), 0.5), {}, "B = 16, D = 3, temperature 0.5"),
    ]
    # the student's own embedding correlated with its positive, so the right pairing matters
    s = _randn(6, 8, seed=67)
    cases.append(Case((s, s + 0.3 * _randn(6, 8, seed=68), 0.2), {}, "positives close to their anchors, 0.2"))
    check_inputs_untouched("info_nce", fn, cases[0].args, ("student", "teacher", "temperature"))
    ok = diagnose("info_nce", fn, _reference_info_nce, cases, INFO_NCE_VARIANTS, rtol=1e-6, atol=1e-9)
    for c in cases[:2]:
        check_gradients("info_nce", fn, _reference_info_nce, c.args, label=c.label)
    return ok


def _reference_info_nce(student, teacher, temperature=0.1):
    from ..losses.contrastive import info_nce

    return info_nce(student, teacher, temperature=temperature)


__all__ = ["check_feature_extractor", "check_hint_loss", "check_attention_transfer", "check_rkd_distance",
           "check_fitnets", "check_fitnets_parameters", "check_sp_loss", "check_info_nce", "check_rkd_angle",
           "ANGLE_VARIANTS", "ANGLE_GRADIENT_VARIANTS",
           "FITNETS_VARIANTS", "FITNETS_PARAMETER_VARIANTS", "self_test_questions",
           "HINT_VARIANTS", "AT_VARIANTS", "RKD_VARIANTS", "SP_VARIANTS", "INFO_NCE_VARIANTS"]


# --------------------------------------------------------------------------
# The end-of-lab self-test (checked in the notebook, never graded)
# --------------------------------------------------------------------------

def self_test_questions(cfg: dict, fitnets, scratch) -> list:
    """Lab 2's self-test: three questions on the mechanics, two read from this
    run (``cfg``: the lab's settings; ``fitnets``, ``scratch``: Summaries)."""
    from .. import lesson

    gain = round(100 * (fitnets.mean - scratch.mean), 1)
    return [
        lesson.Choice("optimiser", "Which parameters must the optimiser get when you train with FitNets?",
                      ["the student's only", "the student's and the regressors'",
                       "the student's, the regressors' and the teacher's"], "the student's and the regressors'",
                      "the regressors are trained with the student (left out, they stay random); the teacher is "
                      "frozen — Exercise 4."),
        lesson.Numeric("regressor_weights", "A student layer with 32 channels is hinted by a teacher layer with 128 "
                       "channels. How many numbers (weights and biases) does the 1x1 regressor learn?",
                       32 * 128 + 128, 0.0, "nn.Conv2d(32, 128, 1) has 128 x 32 x 1 x 1 weights and 128 biases."),
        lesson.Choice("sp_rescale", "Multiply one sample's student features by 3. Which loss changes?",
                      ["the cosine-matrix loss only", "SP (row-normalised Gram) only", "both", "neither"],
                      "SP (row-normalised Gram) only",
                      "cosines ignore each sample's length; in G = F F^T the sample's column is scaled in every other "
                      "row, and row-normalising those rows does not undo it (the cell after Exercise 8 computes it)."),
        lesson.Numeric("negatives", "With this lab's batches, how many negatives does in-batch InfoNCE score each "
                       "anchor against?", cfg["batch_size"] - 1, 0.0,
                       f"the other images of the batch: batch size {cfg['batch_size']} minus the positive."),
        lesson.Numeric("fitnets_gain", "By how many points (mean over seeds) did FitNets beat scratch in your section 6 "
                       "table? (negative if it fell below)", gain, 0.11,
                       f"read the 'vs scratch' column of the FitNets row: {gain:+.1f} in this run."),
    ]

# --------------------------------------------------------------------------
# Declarations (kdcourse.checks.contract): what the grader probes
# --------------------------------------------------------------------------

def _extract_hooks_left(model, x, names):
    modules, feats = dict(model.named_modules()), {}
    for n in names:
        modules[n].register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o))
    return model(x), feats


def _extract_with(store=lambda i, o: o, bind_late=False, lookup=None, cleanup="finally"):
    def extract(model, x, names):
        modules, feats, handles = dict(model.named_modules()), {}, []
        get = (lambda n: lookup(model, n)) if lookup else modules.__getitem__
        if cleanup == "finally":
            try:
                for n in names:
                    hook = (lambda m, i, o: feats.__setitem__(n, store(i, o))) if bind_late else \
                        (lambda m, i, o, n=n: feats.__setitem__(n, store(i, o)))
                    handles.append(get(n).register_forward_hook(hook))
                out = model(x)
            finally:
                for h in handles:
                    h.remove()
            if bind_late:  # every hook wrote under the last name: all names hold the last output
                feats = {n: feats[names[-1]] for n in names}
            return out, feats
        for n in names:
            handles.append(get(n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, store(i, o))))
        out = model(x)
        for h in handles:
            h.remove()
        return out, feats
    return extract


EXTRACT_VARIANTS = {
    "hooks_left": (_extract_hooks_left,
                   "hooks are left on the model after the call: keep the handles that register_forward_hook returns "
                   "and call handle.remove() on each (in a `finally:` block)"),
    "late_binding": (_extract_with(bind_late=True),
                     "every name holds the same tensor: the hooks share one variable. A function defined in a loop "
                     "sees the loop variable's *last* value — build each hook in a helper function that takes the "
                     "name as an argument (or bind it: lambda m, i, o, name=name: ...)"),
    "inputs": (_extract_with(store=lambda i, o: i[0]),
               "the features are the modules' *inputs*: a forward hook is called as hook(module, inputs, output); "
               "store `output`"),
    "getattr": (_extract_with(lookup=getattr),
                "nested names such as 'layer2.0.conv1' must work: look modules up in dict(model.named_modules()) "
                "instead of getattr(model, name)"),
    "detached": (_extract_with(store=lambda i, o: o.detach()),
                 "the features carry no gradient: do not detach them (or run under torch.no_grad) — a feature loss "
                 "must train the student's layers through them"),
    "no_finally": (_extract_with(cleanup="after"),
                   "after a forward pass that raised, the hooks were still registered: remove them in a `finally:` "
                   "block (or use a context manager) so an error cannot leave them behind"),
}

_NESTED = {"ResNet": ["layer2.0.conv1", "layer1.0", "layer3.0.bn2"], "SmallCNN": []}


def probe_extract_features(fn: Callable, seed: int) -> dict:
    """A seeded SmallCNN or ResNet-8, 1-3 images, a random choice and order
    of stage names (nested names on the ResNet): the logits, each feature,
    the gradient of the features w.r.t. the input, hooks left behind, and
    hooks left after a forward pass that raises."""
    g = contract.generator(seed)
    torch.manual_seed(seed)
    model = (ResNet(8, 4) if seed % 2 else SmallCNN((4, 8, 16))).double().eval()
    kind = type(model).__name__
    pool = ["layer1", "layer2", "layer3"] + _NESTED.get(kind, [])
    k = 1 + int(torch.randint(0, len(pool), (1,), generator=g))
    names = [pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()]
    x = torch.randn(1 + seed % 3, 3, 16, 16, generator=g, dtype=torch.float64).requires_grad_(True)
    out, raised = contract.attempt(fn, model, x, names)
    data = {"hooks_left": fx.hook_count(model)}
    if raised:
        data["call"] = raised
    else:
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict)):
            raise contract.PlainDataError("extract_features must return a pair (model output, dict name -> tensor)")
        logits, feats = out
        data["logits"] = contract.plain(logits)
        data["features"] = {str(n): contract.plain(v) for n, v in feats.items()}
        wanted = [v for n, v in sorted(feats.items()) if isinstance(v, torch.Tensor)]
        if wanted and all(v.requires_grad for v in wanted):
            total = sum((v * torch.randn(v.shape, generator=contract.generator(seed + i), dtype=v.dtype)).sum()
                        for i, v in enumerate(wanted))
            data["grad_input"] = contract.plain(torch.autograd.grad(total, x, allow_unused=True)[0]
                                                if total.requires_grad else None)
        else:
            data["grad_input"] = "no graph"
    boom = _Boom()
    contract.attempt(fn, boom, x.detach().float(), ["layer1"])
    data["hooks_left_after_error"] = fx.hook_count(boom)
    return data


def _loss_data(name, out, grads_of: dict, seed: int) -> dict:
    data = {"loss": contract.scalar(out, name)}
    items = list(grads_of.items())
    gs = contract.grad(out, [t for _, t in items], seed) if out.requires_grad else "no graph"
    data["grads"] = gs if isinstance(gs, str) else {k: g for (k, _), g in zip(items, gs)}
    return data


def probe_hint_loss(fn: Callable, seed: int) -> dict:
    """Conv maps with the teacher larger, the student larger, equal sizes,
    equal channels (a regressor still applies), and vectors with a linear
    regressor: the loss, whether the regressor was called, and the gradients
    w.r.t. the student's features, the regressor's weights and the
    teacher's features (which must be zero: the teacher is detached)."""
    g = contract.generator(seed)
    case = seed % 5
    b = 1 + int(torch.randint(0, 4, (1,), generator=g))
    cs = 2 + int(torch.randint(0, 6, (1,), generator=g))
    ct = cs if case == 2 else cs + 1 + int(torch.randint(0, 8, (1,), generator=g))
    h = [4, 4, 3, 0, 8][case]
    if case == 3:
        s_shape, t_shape, kind = (b, cs), (b, ct), "linear"
    else:
        th = {0: 2 * h, 1: h, 2: 2 * h, 4: h // 2}[case]
        s_shape, t_shape, kind = (b, cs, h, h), (b, ct, th, th), "conv"
    s = torch.randn(*s_shape, generator=g, dtype=torch.float64).clamp_min(0).requires_grad_(True)
    t = (torch.randn(*t_shape, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    torch.manual_seed(seed)
    reg = _Counting(feature.HintRegressor(cs, ct, kind=kind).double())
    out, raised = contract.attempt(fn, s, t, reg)
    if raised:
        return {**raised, "regressor_calls": reg.calls}
    data = _loss_data("hint_loss", out, {"student": s, "teacher": t, **dict(reg.inner.named_parameters())}, seed)
    data["regressor_calls"] = min(reg.calls, 1)
    return data


def _pool_larger(s, t):
    if s.ndim == 4 and s.shape[-2:] != t.shape[-2:]:
        if s.shape[-2] * s.shape[-1] > t.shape[-2] * t.shape[-1]:
            return F.adaptive_avg_pool2d(s, t.shape[-2:]), t
        return s, F.adaptive_avg_pool2d(t, s.shape[-2:])
    return s, t


def _as_exercise_variant(f):
    """A HINT_VARIANTS entry with the teacher detached and a student map larger
    than the teacher's pooled first (a 1x1 regressor commutes with pooling),
    as the exercise's answer does."""
    def loss(student, teacher, regressor):
        t = teacher.detach()
        if student.ndim == 4 and student.shape[-2] * student.shape[-1] > t.shape[-2] * t.shape[-1]:
            student = F.adaptive_avg_pool2d(student, t.shape[-2:])
        return f(student, t, regressor)
    return loss


def _no_regressor(student, teacher, regressor):
    return F.mse_loss(*_pool_larger(student, teacher.detach()))


def _teacher_not_detached(student, teacher, regressor):
    return F.mse_loss(*_pool_larger(regressor(student), teacher))


HINT_EXERCISE_VARIANTS = {
    "no_regressor": (_no_regressor, "the regressor is never applied: FitNets compares regressor(student) with the "
                                    "teacher (it maps C_s to C_t and is trained with the student)."),
    "teacher_not_detached": (_teacher_not_detached,
                             "the loss sends gradients into the teacher's features: use teacher.detach() (the teacher "
                             "is frozen; only the student and the regressor learn)"),
    **{k: (_as_exercise_variant(f), h) for k, (f, h) in HINT_VARIANTS.items()},
}


def _pair_probe(name: str, cases, seed: int, fn: Callable) -> dict:
    g = contract.generator(seed)
    make_s, make_t = cases[seed % len(cases)]
    s = make_s(g).requires_grad_(True)
    t = make_t(g).requires_grad_(True)
    out, raised = contract.attempt(fn, s, t)
    if raised:
        return raised
    return _loss_data(name, out, {"student": s, "teacher": t}, seed)


def _r(*shape, scale=1.0, relu=False, offset=0.0):
    def make(g):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset
        return x.clamp_min(0) if relu else x
    return make


_AT_CASES = [
    (_r(4, 8, 8, 8), _r(4, 16, 8, 8)),                                  # same size, channels differ
    (_r(3, 4, 4, 4, relu=True), _r(3, 16, 8, 8, relu=True)),            # teacher larger
    (_r(2, 6, 8, 8, relu=True), _r(2, 6, 4, 4, relu=True)),             # student larger
    (_r(5, 3, 5, 5, scale=10), _r(5, 7, 5, 5, scale=0.1)),              # very different scales
    (_r(2, 5, 8, 6), _r(2, 9, 4, 3)),                                   # not square, student larger
    (_r(1, 3, 2, 2), _r(1, 4, 4, 4)),                                   # one sample, tiny maps
]

_RKD_CASES = [
    (_r(8, 5), _r(8, 12, scale=3)),
    (_r(6, 4, scale=0.1), _r(6, 4, offset=4.0)),
    (_r(5, 3, scale=10), _r(5, 3, offset=4.0)),
    (_r(2, 7), _r(2, 3)),                                               # the smallest batch
    (_r(10, 16), _r(10, 2, scale=30)),
]


def probe_at_loss(fn: Callable, seed: int) -> dict:
    """Equal sizes, a larger teacher, a larger student, non-square maps, very
    different scales: the loss and its gradients w.r.t. the student's and
    the teacher's features."""
    return _pair_probe("at_loss", _AT_CASES, seed, fn)


def probe_rkd_distance(fn: Callable, seed: int) -> dict:
    """(B, D) embeddings of different widths, scales and offsets, B from 2 to
    10: the loss and its gradients w.r.t. both embeddings."""
    return _pair_probe("rkd_distance", _RKD_CASES, seed, fn)


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


_SP_CASES = [
    (_r(6, 4, 4, 4, relu=True), _r(6, 16, 2, 2, relu=True)),           # maps of different shapes
    (_r(5, 7), _r(5, 20, scale=5)),                                     # embeddings
    (_r(4, 3, 2, 2, scale=0.1), _r(4, 9, offset=2.0)),                  # a map and a vector
    (_r(2, 5), _r(2, 5)),                                               # B = 2
    (_r(8, 6, 3, 3), _r(8, 12, 3, 3, scale=3)),
]


def probe_sp_loss(fn: Callable, seed: int) -> dict:
    """Feature maps (B, C, H, W), embeddings (B, D) and one of each, B from 2
    to 8: the loss and its gradients w.r.t. both inputs."""
    return _pair_probe("sp_loss", _SP_CASES, seed, fn)


def probe_info_nce(fn: Callable, seed: int) -> dict:
    """(B, D) student and teacher embeddings (B from 2 to 16, scales and
    temperatures 0.05-0.5, positives near their anchors on odd seeds): the
    loss and its gradients w.r.t. both inputs."""
    g = contract.generator(seed)
    b = 2 + int(torch.randint(0, 15, (1,), generator=g))
    d = 2 + int(torch.randint(0, 15, (1,), generator=g))
    tau = [0.1, 0.07, 0.5, 0.2, 0.05][seed % 5]
    s = torch.randn(b, d, generator=g, dtype=torch.float64) * (0.2 + 3 * torch.rand(1, generator=g, dtype=torch.float64))
    t = s.detach() + 0.3 * torch.randn(b, d, generator=g, dtype=torch.float64) if seed % 2 else \
        torch.randn(b, d, generator=g, dtype=torch.float64)
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    out, raised = contract.attempt(fn, s, t, tau)
    if raised:
        return raised
    return _loss_data("info_nce", out, {"student": s, "teacher": t}, seed)



# --------------------------------------------------------------------------
# Exercise: RKD angle-wise loss, with a safe norm
# --------------------------------------------------------------------------

def _angles_with(unit):
    def psi(e):
        d = e.unsqueeze(0) - e.unsqueeze(1)  # d[j, i] = x_i - x_j
        u = unit(d)
        return u @ u.transpose(1, 2)
    return psi


def _plain_unit(d):
    return d / d.norm(dim=-1, keepdim=True)


def _angle_variant(psi, crit=F.smooth_l1_loss):
    def loss(student, teacher):
        return crit(psi(student.flatten(1)), psi(teacher.detach().flatten(1)))
    return loss


def _chapter_gram(student, teacher):
    g = lambda e: F.normalize(e, dim=1) @ F.normalize(e, dim=1).t()  # noqa: E731
    return F.mse_loss(g(student.flatten(1)), g(teacher.detach().flatten(1)))


_SAFE = _angles_with(relation.safe_unit)

ANGLE_VARIANTS = {
    "plain_norm": (_angle_variant(_angles_with(_plain_unit)),
                   "d / d.norm() is 0/0 = NaN where two samples are equal (their difference vector is zero): use a "
                   "safe norm — exactly 0, with zero gradient, where ||d||^2 <= 1e-12."),
    "gram": (_chapter_gram,
             "this is a Gram-matrix loss of normalised embeddings (a reference chapter's 'angle-wise' loss); the RKD "
             "angle is over triplets: cos of the angle at x_j between x_i - x_j and x_k - x_j."),
    "no_unit": (_angle_variant(_angles_with(lambda d: d)),
                "the difference vectors are not normalised: the angle needs unit vectors e_ij = (x_i - x_j) / ||x_i - x_j||."),
    "mse": (_angle_variant(_SAFE, F.mse_loss),
            "the comparison uses MSE; RKD uses the Huber loss (F.smooth_l1_loss)."),
    "sum": (_angle_variant(_SAFE, lambda a, b: F.smooth_l1_loss(a, b, reduction="sum")),
            "the Huber terms are summed; average them over all B^3 triplets (F.smooth_l1_loss's default)."),
}

_NORMALIZE_HINT = ("F.normalize divides by max(||d||, 1e-12): at two equal samples the value is right (0) but the "
                   "gradient is about 1e12 and training blows up. Use a safe norm: exactly 0, with zero gradient, where "
                   "||d||^2 <= 1e-12 (torch.where(sq > 1e-12, d / sq.clamp_min(1e-12).sqrt(), 0)).")
ANGLE_GRADIENT_VARIANTS = {"normalize": (_angle_variant(_angles_with(lambda d: F.normalize(d, dim=-1))), _NORMALIZE_HINT)}


def _with_duplicates(b, d, seed, scale=1.0):
    x = _randn(b, d, seed=seed) * scale
    x[1] = x[0]  # two equal samples: a zero difference vector
    return x


def check_rkd_angle(fn: Callable) -> bool:
    """``fn(student, teacher)`` (B, D) embeddings must equal RKD's angle loss
    (Huber over every triplet's cosine at its middle vertex), with a safe norm."""
    cases = [
        Case((_randn(6, 4, seed=71), _randn(6, 9, seed=72) * 3), {}, "B=6, widths 4 vs 9"),
        Case((_with_duplicates(5, 3, 73), _randn(5, 7, seed=74)), {}, "two equal student samples"),
        Case((_randn(4, 5, seed=75) * 10 + 2, _with_duplicates(4, 5, 76, 0.1)), {}, "scales, an offset, equal teacher samples"),
        Case((_randn(3, 2, seed=77), _randn(3, 2, seed=78)), {}, "B=3, the smallest batch"),
    ]
    check_inputs_untouched("rkd_angle", fn, cases[0].args, ("student", "teacher"))
    ok = diagnose("rkd_angle", fn, relation.rkd_angle, cases, ANGLE_VARIANTS, rtol=1e-6, atol=1e-9)
    s = cases[1].args[0].clone().requires_grad_(True)
    out = fn(s, cases[1].args[1])
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.backward()
        if s.grad is not None and (not torch.isfinite(s.grad).all() or float(s.grad.abs().max()) > 1e6):
            raise CheckFailed(f"rkd_angle is not right yet: {_NORMALIZE_HINT}")
    for c in cases[:3]:
        check_gradients("rkd_angle", fn, relation.rkd_angle, c.args, label=c.label)
    return ok


_ANGLE_CASES = [
    (_r(6, 4), _r(6, 9, scale=3)),
    (lambda g: (lambda x: torch.cat([x[:1], x], 0))(_r(4, 3)(g)), _r(5, 7)),        # two equal student samples
    (_r(4, 5, scale=10, offset=2.0), lambda g: (lambda x: torch.cat([x, x[-1:]], 0))(_r(3, 5, scale=0.1)(g))),
    (_r(3, 2), _r(3, 2)),
    (_r(8, 6), _r(8, 16, scale=0.5)),
]


def probe_rkd_angle(fn: Callable, seed: int) -> dict:
    """(B, D) embeddings, B from 3 to 8, with two equal student (or teacher)
    samples on some seeds: the loss and its gradients w.r.t. both inputs
    (an unsafe norm shows as NaN or ~1e12 there)."""
    return _pair_probe("rkd_angle", _ANGLE_CASES, seed, fn)


def _fitnets_reference(name: str = "FitNets"):
    from ..distill import fitnets

    return getattr(fitnets, name)


EXERCISES = [
    contract.Exercise(name="extract_features", points=1.0, check=check_feature_extractor, probe=probe_extract_features,
                      reference=fx.extract, variants=EXTRACT_VARIANTS, hidden_seeds=(0, 1, 2, 3), rtol=1e-6,
                      atol=1e-9, refuse=(fx.FeatureExtractor.__call__, fx.FeatureExtractor.collect)),
    contract.Exercise(name="hint_loss", points=1.0, check=check_hint_loss, probe=probe_hint_loss,
                      reference=feature.hint_loss, variants=HINT_EXERCISE_VARIANTS, hidden_seeds=(0, 1, 2, 3, 4),
                      rtol=1e-6, atol=1e-9),
    contract.Exercise(name="at_loss", points=1.0, check=check_attention_transfer, probe=probe_at_loss,
                      reference=feature.attention_transfer_loss, variants=AT_VARIANTS, hidden_seeds=tuple(range(6)),
                      rtol=1e-6, atol=1e-9),
    contract.Exercise(name="rkd_distance", points=1.0, check=check_rkd_distance, probe=probe_rkd_distance,
                      reference=relation.rkd_distance, variants=RKD_VARIANTS, hidden_seeds=tuple(range(5)),
                      rtol=1e-6, atol=1e-9),
    contract.Exercise(name="FitNets", points=2.0, check=check_fitnets, probe=probe_fitnets,
                      reference=_fitnets_reference(), variants=FITNETS_VARIANTS, hidden_seeds=(0, 1, 2, 3),
                      rtol=1e-5, atol=1e-7),
    contract.Exercise(name="fitnets_parameters", points=1.0, check=check_fitnets_parameters,
                      probe=probe_fitnets_parameters, reference=_fitnets_reference("fitnets_parameters"),
                      variants=FITNETS_PARAMETER_VARIANTS, hidden_seeds=(0, 1)),
    contract.Exercise(name="rkd_angle", points=1.0, check=check_rkd_angle, probe=probe_rkd_angle,
                      reference=relation.rkd_angle, variants={**ANGLE_VARIANTS, **ANGLE_GRADIENT_VARIANTS},
                      hidden_seeds=tuple(range(5)), rtol=1e-6, atol=1e-9),
    contract.Exercise(name="sp_loss", points=1.0, check=check_sp_loss, probe=probe_sp_loss,
                      reference=relation.similarity_preserving, variants=SP_VARIANTS, hidden_seeds=tuple(range(5)),
                      rtol=1e-6, atol=1e-9),
    contract.Exercise(name="info_nce", points=1.0, check=check_info_nce, probe=probe_info_nce,
                      reference=_reference_info_nce, variants=INFO_NCE_VARIANTS, hidden_seeds=tuple(range(5)),
                      rtol=1e-6, atol=1e-9),
]

# The similarity part (the handout's channel statistics, PKT, linear CKA): checks in lab2_similarity.
from .lab2_similarity import (  # noqa: E402
    CKA_VARIANTS, PKT_VARIANTS, STATS_VARIANTS, check_cka, check_pkt, check_stats_loss,
    declarations as _similarity_declarations,
)

EXERCISES += _similarity_declarations()
