"""Lab 6 checks: each accepts the reference and correct code written other
ways, rejects each known-wrong variant with its hint, and the grader's path
(probes -> plain data -> diagnose_data) decides the same."""
import pytest
import torch
import torch.nn.functional as F

from kdcourse.checks import CheckFailed, contract
from kdcourse.checks import lab6 as checks
from kdcourse.datafree import reference_step
from kdcourse.losses import datafree


# ---- correct answers written differently ---------------------------------------
def bn_loss_loop(teacher, images):
    """Forward hooks on inputs via a module list, statistics by explicit sums, norms by sqrt of squares."""
    seen = []
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    handles = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0]))) for m in bns]
    try:
        logits = teacher(images)
    finally:
        for h in handles:
            h.remove()
    total = 0
    for mod, x in seen:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        mean = flat.sum(1) / flat.shape[1]
        var = ((flat - mean[:, None]) ** 2).sum(1) / flat.shape[1]
        total = total + ((mean - mod.running_mean) ** 2).sum().sqrt() + ((var - mod.running_var) ** 2).sum().sqrt()
    return total, logits


def bn_loss_var_mean(teacher, images):
    terms = []
    handles = []
    for m in teacher.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            def hook(mod, inputs):
                var, mean = torch.var_mean(inputs[0], dim=(0, 2, 3), correction=0)
                terms.append(torch.norm(mean - mod.running_mean, 2) + torch.norm(var - mod.running_var, 2))
            handles.append(m.register_forward_pre_hook(hook))
    logits = teacher(images)
    for h in handles:
        h.remove()
    return sum(terms), logits


def prior_other(images, tv_weight, l2_weight):
    dx = torch.diff(images, dim=3)
    dy = torch.diff(images, dim=2)
    return tv_weight * (F.mse_loss(dx, torch.zeros_like(dx)) + (dy * dy).mean()) + l2_weight * (images ** 2).mean()


def step_autograd_grad(teacher, images, targets, optimizer, bn_weight=0.05, tv_weight=1.0, l2_weight=0.01,
                       bn_loss=datafree.bn_statistics_loss, prior=datafree.image_prior):
    """eval() only, gradients w.r.t. the images only (the weights stay trainable but get no grad)."""
    teacher.eval()
    bn, logits = bn_loss(teacher, images)
    loss = F.cross_entropy(logits, targets) + bn_weight * bn + prior(images, tv_weight, l2_weight)
    (g,) = torch.autograd.grad(loss, [images])
    optimizer.zero_grad()
    images.grad = g
    optimizer.step()
    return loss.detach()  # a tensor, not a float: accepted


def test_checks_accept_the_references_and_other_correct_code():
    assert checks.check_bn_statistics_loss(datafree.bn_statistics_loss)
    assert checks.check_bn_statistics_loss(bn_loss_loop)
    assert checks.check_bn_statistics_loss(bn_loss_var_mean)
    assert checks.check_image_prior(datafree.image_prior)
    assert checks.check_image_prior(prior_other)
    assert checks.check_synthesis_step(reference_step)
    assert checks.check_synthesis_step(step_autograd_grad)


def _hint_of(check, fn):
    with pytest.raises(CheckFailed) as info:
        check(fn)
    return str(info.value)


@pytest.mark.parametrize("name", sorted(checks.BN_VARIANTS))
def test_bn_check_names_each_variant(name):
    fn, hint = checks.BN_VARIANTS[name]
    assert hint in _hint_of(checks.check_bn_statistics_loss, fn)


@pytest.mark.parametrize("name", sorted(checks.PRIOR_VARIANTS))
def test_prior_check_names_each_variant(name):
    fn, hint = checks.PRIOR_VARIANTS[name]
    assert hint in _hint_of(checks.check_image_prior, fn)


@pytest.mark.parametrize("name", sorted(checks.STEP_VARIANTS))
def test_step_check_names_each_variant(name):
    fn, hint = checks.STEP_VARIANTS[name]
    assert hint in _hint_of(checks.check_synthesis_step, fn)


def test_statistics_of_the_bn_output_as_a_student_writes_them_get_the_in_place_hint():
    def after_bn(teacher, images):  # no clone: ReLU(inplace=True) overwrites the output the variance needs
        terms = []
        hs = [m.register_forward_hook(lambda mod, i, o: terms.append(
            (o.mean((0, 2, 3)) - mod.running_mean).norm() + (o.var((0, 2, 3), unbiased=False) - mod.running_var).norm()))
            for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        logits = teacher(images)
        for h in hs:
            h.remove()
        return sum(terms), logits
    hint = _hint_of(checks.check_bn_statistics_loss, after_bn)
    assert "OUTPUT" in hint and "INPUT" in hint


def test_hooks_left_behind_and_teacher_rules_are_named():
    def leaky(teacher, images):
        terms = []
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.register_forward_pre_hook(lambda mod, inp: terms.append(
                    (inp[0].mean((0, 2, 3)) - mod.running_mean).norm()
                    + (inp[0].var((0, 2, 3), unbiased=False) - mod.running_var).norm()))
        logits = teacher(images)
        return sum(terms), logits
    assert "handle.remove()" in _hint_of(checks.check_bn_statistics_loss, leaky)

    def train_mode_step(teacher, images, targets, optimizer, bn_weight=0.05, tv_weight=1.0, l2_weight=0.01,
                        bn_loss=None, prior=None):
        teacher.requires_grad_(False)  # frozen weights, but left in train mode
        bn, logits = bn_loss(teacher, images)
        loss = F.cross_entropy(logits, targets) + bn_weight * bn + prior(images, tv_weight, l2_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()
    assert checks.TRAIN_MODE_HINT in _hint_of(checks.check_synthesis_step, train_mode_step)


def test_a_step_without_the_loss_arguments_uses_its_own_losses():
    def own(teacher, images, targets, optimizer, bn_weight=0.05, tv_weight=1.0, l2_weight=0.01):
        return reference_step(teacher, images, targets, optimizer, bn_weight=bn_weight, tv_weight=tv_weight,
                              l2_weight=l2_weight, bn_loss=checks.BN_LOSS, prior=checks.PRIOR)
    assert checks.check_synthesis_step(own)


def test_probe_teacher_differs_before_and_after_bn():
    # the variant "after BN" must be distinguishable: statistics of inputs and outputs differ
    t = checks.tiny_teacher(0)
    t.eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = checks.BN_LOSS(t, x)[0]
    b = checks.BN_VARIANTS["after_bn"][0](t, x)[0]
    assert abs(float(a) - float(b)) > 1e-3


def test_declarations_and_the_grader_path():
    exercises = contract.exercises_for(6)
    assert [e.name for e in exercises] == ["bn_statistics_loss", "image_prior", "synthesis_step"]
    assert contract.exercises_for("06_transfer_sets") == exercises
    for ex in exercises:
        assert len(ex.hidden_seeds) >= 3
        refused = ex.refused_functions()
        assert ex.reference in refused
        seeds = ex.hidden_seeds[:3]
        ref = {s: contract.run_probe(ex, ex.reference, s) for s in seeds}
        again = {s: contract.run_probe(ex, ex.reference, s) for s in seeds}
        assert ref == again, f"{ex.name}: probe is not deterministic"
        for data in ref.values():
            contract.validate(data)
        assert contract.diagnose_data(ex, ref, ref).ok
        # every variant, probed as the grader does, is named by its hint
        for vname, (fn, hint) in ex.variants.items():
            student = {s: contract.run_probe(ex, fn, s) for s in seeds}
            v = contract.diagnose_data(ex, student, ref, lambda n, s: contract.run_probe(ex, ex.variants[n][0], s))
            assert not v.ok and v.variant == vname and hint in v.hint, (ex.name, vname, v)


def test_step_probe_does_not_call_refused_functions():
    """Inside the grading kernel the references refuse to run; the step's probe
    hands the step its own losses, so a correct step still passes there."""
    ex = contract.exercise(6, "synthesis_step")
    refused = {f for e in contract.exercises_for(6) for f in e.refused_functions()}
    calls = []
    originals = {}
    import kdcourse.losses.datafree as mod
    for f in refused:
        if getattr(f, "__module__", "") == mod.__name__:
            originals[f.__name__] = f
            setattr(mod, f.__name__, lambda *a, _n=f.__name__, **k: calls.append(_n))
    try:
        data = contract.run_probe(ex, checks.STEP_VARIANTS["no_prior"][0], 0)
    finally:
        for name, f in originals.items():
            setattr(mod, name, f)
    assert not calls and data["losses"]
