"""Lab 2 checks: the hook extractor, the FitNets hint loss, attention
transfer and the RKD distance loss — each names the usual mistakes."""
from __future__ import annotations

import contextlib
import io
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import features as fx
from ..losses import feature, relation
from ..models import ResNet, SmallCNN
from . import Case, CheckFailed, diagnose


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
    _quiet(diagnose, "hint_loss", fn, feature.hint_loss, [cases[2]], {**ignored, **HINT_VARIANTS}, rtol=1e-6, atol=1e-9)
    ok = diagnose("hint_loss", fn, feature.hint_loss, cases, HINT_VARIANTS, rtol=1e-6, atol=1e-9)

    # gradients must reach the student and the regressor, not the teacher
    s = _randn(2, 4, 4, 4, seed=11).requires_grad_(True)
    t = _randn(2, 8, 8, 8, seed=12).requires_grad_(True)
    reg = _regressor(4, 8, seed=5)
    out = fn(s, t, reg)
    if out.ndim != 0:
        raise CheckFailed(f"hint_loss must return a scalar, got shape {tuple(out.shape)}")
    out.backward()
    if s.grad is None or reg.proj.weight.grad is None:
        raise CheckFailed("no gradient reaches the student or the regressor — is something detached or under no_grad?")
    if t.grad is not None and t.grad.abs().sum() > 0:
        raise CheckFailed("the loss sends gradients into the teacher's features: use teacher.detach() "
                          "(the teacher is frozen; only the student and the regressor learn)")
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
    ok = diagnose("attention_transfer_loss", fn, feature.attention_transfer_loss, cases, AT_VARIANTS, rtol=1e-6, atol=1e-9)
    s = _randn(2, 4, 4, 4, seed=29).requires_grad_(True)
    out = fn(s, _randn(2, 8, 8, 8, seed=30))
    if out.ndim != 0:
        raise CheckFailed(f"the loss must be a scalar, got shape {tuple(out.shape)}")
    out.backward()
    if s.grad is None or not torch.isfinite(s.grad).all():
        raise CheckFailed("no finite gradient reaches the student's features — is something detached?")
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
    return diagnose("rkd_distance", fn, relation.rkd_distance, cases, RKD_VARIANTS, rtol=1e-6, atol=1e-9)


__all__ = ["check_feature_extractor", "check_hint_loss", "check_attention_transfer", "check_rkd_distance",
           "HINT_VARIANTS", "AT_VARIANTS", "RKD_VARIANTS"]
