"""Lab 1's second-part checks (gradients by hand, the distillation step, the
ensemble teacher, the choice on validation): references against independent
oracles; each check accepts correct code written other ways, rejects each
known-wrong variant with its hint, names in-place changes; the grader's
plain-data path agrees."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcourse import data, models, profiles, runs
from kdcourse.checks import CheckFailed, contract
from kdcourse.checks import lab1 as checks
from kdcourse.checks import lab1_eval as le
from kdcourse.checks import lab1_training as lt
from kdcourse.recipes import lab1 as recipe
from kdcourse.train import Distill, TrainState, clear_logit_memo

NEW = ["ce_grad", "kd_grad", "distill_step", "ensemble_logits", "pick_on_validation",
       "accuracy", "expected_calibration_error", "calibration_temperature", "choose_bias"]


def ex(name):
    return contract.exercise(1, name)


# ------------------------------------------------------------ references vs oracles

def test_ce_grad_reference_is_autograd_of_summed_cross_entropy():
    g = torch.Generator().manual_seed(0)
    for shape in [(7,), (5, 4), (1, 10)]:
        z = (torch.randn(*shape, generator=g, dtype=torch.float64) * 5).requires_grad_(True)
        y = torch.randint(0, shape[-1], shape[:-1], generator=g)
        loss = F.cross_entropy(z.reshape(-1, shape[-1]), y.reshape(-1), reduction="sum")
        (auto,) = torch.autograd.grad(loss, z)
        assert torch.allclose(lt.reference_ce_grad(z.detach(), y), auto, atol=1e-12)


def test_kd_grad_reference_is_autograd_of_the_kl():
    g = torch.Generator().manual_seed(1)
    for shape, T in [((6,), 4.0), ((3, 5), 0.5), ((4, 2), 16.0)]:
        s = torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
        p_t = torch.softmax(t / T, -1)
        kl = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum()
        (auto,) = torch.autograd.grad(kl, s)
        assert torch.allclose(lt.reference_kd_grad(s.detach(), t, T), auto, atol=1e-12)


def test_ensemble_reference_modes_mean_what_they_say():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 4, 6, generator=g, dtype=torch.float64) * 4
    assert torch.allclose(lt.reference_ensemble_logits(list(z), "logits"), z.mean(0))
    for T in (1.0, 3.0):
        out = lt.reference_ensemble_logits(z, "probs", T=T)
        assert torch.allclose(torch.softmax(out / T, -1), torch.softmax(z / T, -1).mean(0), atol=1e-12)
    huge = torch.tensor([[[3000.0, 0.0]], [[0.0, 3000.0]]], dtype=torch.float64)
    assert torch.isfinite(lt.reference_ensemble_logits(huge, "probs")).all()
    with pytest.raises(ValueError, match="mode"):
        lt.reference_ensemble_logits(z, "median")


def test_reference_step_equals_distill_forward():
    g = torch.Generator().manual_seed(3)
    student, teacher = lt._tiny_net(g, 4, 5), lt._tiny_net(g, 6, 5)
    x = torch.randn(6, 3, 6, 6, generator=g, dtype=torch.float64)
    batch = lt.Batch(x, torch.randint(0, 5, (6,), generator=g), torch.arange(6))
    from kdcourse.losses import kd_loss

    loss, logits = recipe.distill_step(student, teacher, batch, 3.0, 0.7, kd_loss)
    out = Distill(teacher, T=3.0, alpha=0.7, cache=False)(student, batch, TrainState())
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)


def test_step_objective_trains_exactly_like_distill():
    prof = profiles.get_profile("smoke")
    ds = data.load(prof)
    teacher = models.build(prof.teacher, ds.num_classes)
    common = dict(build=prof.student, data=ds, epochs=1, lr=prof.lr, progress=False)
    clear_logit_memo()
    a = runs.train_run("distill", objective=lambda: Distill(teacher, T=2.0, alpha=0.9), **common)
    b = runs.train_run("step", objective=lambda: recipe.StepObjective(recipe.distill_step, teacher, T=2.0, alpha=0.9),
                       **common)
    assert a.test_acc == b.test_acc and a.history.series("loss") == b.history.series("loss")


def test_served_teacher_runs_the_real_network_off_the_batch():
    g = torch.Generator().manual_seed(4)
    teacher = lt._tiny_net(g, 6, 3)
    served = recipe._ServedTeacher(teacher)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    served.cached = torch.full((10, 3), 7.0, dtype=torch.float64)
    served.batch = lt.Batch(x, torch.zeros(2, dtype=torch.long), torch.tensor([1, 2]))
    assert torch.equal(served(x), torch.full((2, 3), 7.0, dtype=torch.float64))
    with torch.no_grad():
        assert torch.allclose(served(x.clone()), teacher.eval()(x))


def test_step_objective_rejects_a_step_returning_one_thing():
    obj = recipe.StepObjective(lambda *a: 1.0, lt._tiny_net(torch.Generator().manual_seed(0), 2, 2))
    with pytest.raises(TypeError, match=r"\(loss, student_logits\)"):
        obj(lt._tiny_net(torch.Generator().manual_seed(1), 2, 2), lt.Batch(torch.zeros(1, 3, 4, 4, dtype=torch.float64),
                                                                            torch.zeros(1, dtype=torch.long),
                                                                            torch.zeros(1, dtype=torch.long)),
            TrainState())
    with pytest.raises(ValueError, match="step"):
        recipe.StepObjective(None, torch.nn.Linear(1, 1))


def test_ensemble_module_uses_the_combine_function():
    members = [torch.nn.Linear(3, 2).double() for _ in range(3)]
    ens = recipe.Ensemble(members, lt.reference_ensemble_logits, mode="probs", T=2.0)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(ens(x), lt.reference_ensemble_logits([m(x) for m in members], "probs", 2.0))


# ------------------------------------------------------------ checks accept

def _ce_manual(logits, labels):
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    p = e / e.sum(-1, keepdim=True)
    return p - torch.eye(logits.shape[-1], dtype=logits.dtype)[labels]


def _kd_manual(student_logits, teacher_logits, T):
    out = []
    for s, t in zip(student_logits.reshape(-1, student_logits.shape[-1]), teacher_logits.reshape(-1, teacher_logits.shape[-1])):
        out.append((F.softmax(s / T, 0) - F.softmax(t / T, 0)) / T)
    return torch.stack(out).reshape(student_logits.shape)


def _step_detach(student, teacher, batch, T, alpha, loss):
    teacher.train(False)
    s = student(batch.x)
    t = teacher(batch.x).detach()
    return loss(s, t, batch.labels, T, alpha), s


def _step_freeze(student, teacher, batch, T, alpha, loss):
    from kdcourse.train import freeze

    with torch.no_grad():
        t = freeze(teacher)(batch.x)
    s = student(batch.x)
    return loss(student_logits=s, teacher_logits=t, labels=batch.labels, T=T, alpha=alpha), s


def _ens_loop(member_logits, mode="logits", T=1.0):
    zs = [z for z in member_logits]
    if mode == "logits":
        return sum(zs) / len(zs)
    log_p = torch.stack([torch.log_softmax(z / T, dim=-1) for z in zs])
    return T * (torch.logsumexp(log_p, 0) - math.log(len(zs)))


def _pick_loop(results):
    best, best_acc = None, -1.0
    for setting, run in results.items():
        if run.val_acc > best_acc:
            best, best_acc = setting, run.val_acc
    return np.int64(best) if isinstance(best, int) else best


@pytest.mark.parametrize("name,fn", [
    ("ce_grad", lt.reference_ce_grad), ("ce_grad", _ce_manual),
    ("kd_grad", lt.reference_kd_grad), ("kd_grad", _kd_manual),
    ("distill_step", recipe.distill_step), ("distill_step", _step_detach), ("distill_step", _step_freeze),
    ("ensemble_logits", lt.reference_ensemble_logits), ("ensemble_logits", _ens_loop),
    ("pick_on_validation", lt.reference_pick_on_validation), ("pick_on_validation", _pick_loop),
])
def test_checks_accept_correct_answers_written_other_ways(name, fn, capsys):
    assert ex(name).check(fn) is True
    assert "✓" in capsys.readouterr().out


# ------------------------------------------------------------ checks reject

VARIANTS = [(name, v) for name in NEW for v in sorted(ex(name).variants)]


@pytest.mark.parametrize("name,variant", VARIANTS, ids=[f"{n}-{v}" for n, v in VARIANTS])
def test_each_check_rejects_each_variant_with_its_hint(name, variant):
    fn, hint = ex(name).variants[variant]
    with pytest.raises(CheckFailed) as err:
        ex(name).check(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name,variant", VARIANTS, ids=[f"{n}-{v}" for n, v in VARIANTS])
def test_grader_names_each_variant_on_the_hidden_seeds(name, variant):
    e = ex(name)
    seeds = e.hidden_seeds
    ref = {s: contract.run_probe(e, e.reference, s) for s in seeds}
    assert contract.diagnose_data(e, ref, ref, lambda v, s: contract.run_probe(e, e.variants[v][0], s)).ok
    fn, hint = e.variants[variant]
    student = {s: contract.run_probe(e, fn, s) for s in seeds}
    verdict = contract.diagnose_data(e, student, ref, lambda v, s: contract.run_probe(e, e.variants[v][0], s))
    assert not verdict.ok and hint in verdict.hint


def test_step_check_names_each_mistake_from_what_the_teacher_saw():
    def no_eval(student, teacher, batch, T, alpha, loss):  # a different mistake around it: still named by the mode
        with torch.no_grad():
            t = teacher(batch.x)
        s = student(batch.x)
        return loss(s, t, batch.labels, T=T, alpha=alpha) * 1.5, s

    with pytest.raises(CheckFailed, match="train mode"):
        checks.check_distill_step(no_eval)

    def other_images(student, teacher, batch, T, alpha, loss):
        teacher.eval()
        with torch.no_grad():
            t = teacher(batch.x.flip(0))
        s = student(batch.x)
        return loss(s, t, batch.labels, T=T, alpha=alpha), s

    with pytest.raises(CheckFailed, match="different images"):
        checks.check_distill_step(other_images)

    def never_calls(student, teacher, batch, T, alpha, loss):
        s = student(batch.x)
        return loss(s, s.detach(), batch.labels, T=T, alpha=alpha), s

    with pytest.raises(CheckFailed, match="never called"):
        checks.check_distill_step(never_calls)


def test_checks_name_in_place_changes():
    def ce_inplace(logits, labels):
        logits -= logits.max(-1, keepdim=True).values
        return lt.reference_ce_grad(logits, labels)

    def kd_inplace(s, t, T):
        t /= T
        return (torch.softmax(s / T, -1) - torch.softmax(t, -1)) / T

    def step_inplace(student, teacher, batch, T, alpha, loss):
        batch.x.mul_(2.0)
        return recipe.distill_step(student, teacher, batch, T, alpha, loss)

    def ens_inplace(member_logits, mode="logits", T=1.0):
        z = member_logits if isinstance(member_logits, torch.Tensor) else torch.stack(list(member_logits))
        z.div_(T)
        return lt.reference_ensemble_logits(z, mode, T)

    for check, fn, word in [(checks.check_ce_grad, ce_inplace, "logits"), (checks.check_kd_grad, kd_inplace, "teacher_logits"),
                            (checks.check_distill_step, step_inplace, "batch.x"),
                            (checks.check_ensemble_logits, ens_inplace, "in place")]:
        with pytest.raises(CheckFailed, match="in place") as err:
            check(fn)
        assert word in str(err.value)


def test_gradient_checks_refuse_autograd():
    def with_autograd(logits, labels):
        z = logits.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(z, labels, reduction="sum"), z)[0]

    with pytest.raises(CheckFailed, match="by hand"):
        checks.check_ce_grad(with_autograd)


def test_checks_pass_not_implemented_and_report_crashes():
    def stub(*args, **kwargs):
        raise NotImplementedError()

    for name in NEW:
        with pytest.raises(NotImplementedError):
            ex(name).check(stub)
    with pytest.raises(CheckFailed, match="raised TypeError"):
        checks.check_ce_grad(lambda logits: logits)
    with pytest.raises(CheckFailed, match=r"pair \(loss, student_logits\)"):
        checks.check_distill_step(lambda student, teacher, batch, T, alpha, loss: student(batch.x))


def test_unknown_mistakes_are_reported_with_the_case():
    with pytest.raises(CheckFailed, match="differs from the reference on"):
        checks.check_kd_grad(lambda s, t, T: lt.reference_kd_grad(s, t, T) * 1.37)


def test_every_new_exercise_is_declared_once_with_refused_references():
    names = [e.name for e in contract.exercises_for(1)]
    assert names == ["soft_targets", "kd_loss"] + NEW
    for name in NEW:
        assert ex(name).reference in ex(name).refused_functions()


# ------------------------------------------------------------ the first two exercises' checks, upgraded

def test_soft_targets_and_kd_loss_checks_name_in_place_changes():
    def soft_inplace(logits, T):
        logits /= T
        return torch.softmax(logits, -1)

    def kd_inplace(s, t, y, T=4.0, alpha=0.9):
        t /= T
        return alpha * T * T * F.kl_div(F.log_softmax(s / T, -1), F.softmax(t, -1), reduction="batchmean") + \
            (1 - alpha) * F.cross_entropy(s, y)

    with pytest.raises(CheckFailed, match="changed its input logits in place"):
        checks.check_soft_targets(soft_inplace)
    with pytest.raises(CheckFailed, match="changed its input teacher_logits in place"):
        checks.check_kd_loss(kd_inplace)


def test_soft_targets_check_feeds_every_promised_shape():
    # right on (N, C), wrong on (C,) and (A, B, C): dim=1 is not the last dimension
    with pytest.raises(CheckFailed):
        checks.check_soft_targets(lambda logits, T: torch.softmax(logits / T, dim=1))


def test_kd_loss_check_compares_the_gradient_not_only_the_value(capsys):
    fn, hint = checks.KD_LOSS_VARIANTS["student_detached"]
    with pytest.raises(CheckFailed) as err:
        checks.check_kd_loss(fn)
    assert hint in str(err.value) and "✓" not in capsys.readouterr().out  # no ✓ line before the failure


# ------------------------------------------------------------ recipes.lab1 table helpers

class _Fixed(torch.nn.Module):
    """Logits looked up by image (the images' first pixel holds their row)."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


def test_missing_class_bias_is_chosen_on_validation_only(monkeypatch):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(5)
    n, c, missing = 60, 3, 2

    def split(offset):
        labels = torch.randint(0, c, (n,), generator=g)
        images = torch.zeros(n, 3, 2, 2)
        images[:, 0, 0, 0] = torch.arange(n) + offset
        return SimpleNamespace(labels=labels, images=images, batches=None)

    val, test = split(0), split(n)
    table = torch.randn(2 * n, c, generator=g)
    model = _Fixed(table)
    ds = SimpleNamespace(val=val, test=test, classes=("a", "b", "c"))
    grid = torch.linspace(0, 4, 17)

    def acc(logits, labels, b):
        z = logits.clone()
        z[:, missing] += b
        return float((z.argmax(1) == labels).float().mean())

    best_val = float(max(grid, key=lambda b: acc(table[:n], val.labels, float(b))))
    monkeypatch.setattr(recipe, "predict_logits", lambda m, split: m(split.images).detach())
    (row,) = recipe.missing_class_rows({"m": model}, ds, missing, grid=grid)
    assert row["bias (chosen on val)"] == round(best_val, 2)
    assert row["test acc after bias (%)"] == round(100 * acc(table[n:], test.labels, best_val), 2)


def test_comparison_rows_give_percent_of_teacher():
    s = runs.Summary("s", 0.8, 0.01, 3, (0.79, 0.8, 0.81))
    rows = recipe.comparison_rows("resnet", 0.9, 1000, 100, {"student": s})
    assert rows[1]["% of teacher"] == f"{100 * 0.8 / 0.9:.1f}" and rows[1]["compression"] == "10.0x"
    assert rows[1]["test acc (%)"] == "80.00 ± 1.00"


# ------------------------------------------------------------ the third part: accuracy, ECE, the missing class's bias

def test_accuracy_reference_equals_the_package_evaluate_and_restores_the_mode():
    g = torch.Generator().manual_seed(7)
    net = lt._tiny_net(g, 5, 4)
    x = torch.randn(23, 3, 6, 6, generator=g, dtype=torch.float64)
    split = data.Split(x, torch.randint(0, 4, (23,), generator=g), ("a", "b", "c", "d"))
    from kdcourse.train import evaluate

    net.train()
    got = le.reference_accuracy(net, split, batch_size=5)
    assert net.training and isinstance(got, float)
    assert got == pytest.approx(evaluate(net, split)["acc"], abs=1e-6)  # evaluate averages in float32


def test_ece_reference_against_a_float64_rederivation_and_known_cases():
    g = torch.Generator().manual_seed(8)
    p = torch.softmax(torch.randn(300, 5, generator=g, dtype=torch.float64) * 3, 1)
    y = torch.randint(0, 5, (300,), generator=g)
    conf, pred = p.max(1)
    total = 0.0
    for m in range(15):  # bin m holds (m/15, (m+1)/15]
        idx = [i for i in range(300) if m / 15 < float(conf[i]) <= (m + 1) / 15]
        if idx:
            total += len(idx) / 300 * abs(sum(float(conf[i]) for i in idx) / len(idx)
                                          - sum(float(pred[i] == y[i]) for i in idx) / len(idx))
    assert le.reference_ece(p, y, 15) == pytest.approx(total, abs=1e-12)
    one_hot = F.one_hot(y, 5).double()
    assert le.reference_ece(one_hot, y) == 0.0  # always right with confidence 1
    assert le.reference_ece(one_hot, (y + 1) % 5) == pytest.approx(1.0)  # always wrong with confidence 1


def test_choose_bias_reference_against_brute_force():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(80, 4, generator=g, dtype=torch.float64)
    y = z.argmax(1)
    z[:, 2] -= 3
    grid = torch.linspace(0, 6, 25, dtype=torch.float64)
    accs = [float(((z + b * F.one_hot(torch.tensor(2), 4)).argmax(1) == y).double().mean()) for b in grid]
    assert le.reference_choose_bias(z, y, 2, grid) == float(grid[accs.index(max(accs))])


def _accuracy_inference(model, split, batch_size=256):
    mode = model.training
    model.train(False)
    with torch.inference_mode():
        logits = torch.cat([model(b.x) for b in split.batches(batch_size)])
    model.train(mode)
    return np.float64((logits.argmax(-1) == split.labels).double().mean().item())


def _ece_bucketize(probs, labels, n_bins=10):
    conf, pred = probs.max(1)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype)
    idx = torch.bucketize(conf, edges[1:-1])  # (lo, hi]
    n = torch.zeros(n_bins, dtype=probs.dtype).scatter_add(0, idx, torch.ones_like(conf))
    c = torch.zeros(n_bins, dtype=probs.dtype).scatter_add(0, idx, conf)
    a = torch.zeros(n_bins, dtype=probs.dtype).scatter_add(0, idx, (pred == labels).to(probs.dtype))
    nz = n > 0
    return torch.sum(n[nz] / len(conf) * (c[nz] / n[nz] - a[nz] / n[nz]).abs())


def _bias_vectorised(logits, labels, cls, grid):
    grid = torch.as_tensor(grid, dtype=logits.dtype)
    shifted = logits.unsqueeze(0) + grid.view(-1, 1, 1) * F.one_hot(torch.tensor(cls), logits.shape[1]).to(logits.dtype)
    accs = (shifted.argmax(-1) == labels).double().mean(1)
    return grid[int(torch.argmax(accs))]  # a 0-dim tensor: the first maximum


@pytest.mark.parametrize("name,fn", [
    ("accuracy", le.reference_accuracy), ("accuracy", _accuracy_inference),
    ("expected_calibration_error", le.reference_ece), ("expected_calibration_error", _ece_bucketize),
    ("choose_bias", le.reference_choose_bias), ("choose_bias", _bias_vectorised),
])
def test_measuring_checks_accept_correct_answers_written_other_ways(name, fn, capsys):
    assert ex(name).check(fn) is True
    assert "✓" in capsys.readouterr().out


def test_measuring_checks_name_in_place_changes_and_bad_returns():
    def bias_inplace(logits, labels, cls, grid):
        best, best_acc, total = None, -1.0, 0.0
        for b in grid:
            logits[:, cls] += float(b) - total  # shifts the caller's tensor
            total = float(b)
            acc = float((logits.argmax(1) == labels).double().mean())
            if acc > best_acc:
                best, best_acc = float(b), acc
        return best

    with pytest.raises(CheckFailed, match="changed its input logits in place"):
        checks.check_choose_bias(bias_inplace)
    with pytest.raises(CheckFailed, match="one number"):
        checks.check_accuracy(lambda model, split, batch_size=256: [0.5])
    with pytest.raises(CheckFailed, match="one number"):
        checks.check_ece(lambda probs, labels, n_bins=10: probs.max(1).values)


def test_missing_class_rows_use_the_given_bias_chooser(monkeypatch):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(6)
    n = 40
    labels = torch.randint(0, 3, (2 * n,), generator=g)
    images = torch.zeros(2 * n, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(2 * n).float()
    split = lambda sl: SimpleNamespace(labels=labels[sl], images=images[sl])  # noqa: E731
    ds = SimpleNamespace(val=split(slice(0, n)), test=split(slice(n, 2 * n)), classes=("a", "b", "c"))
    table = torch.randn(2 * n, 3, generator=g)
    monkeypatch.setattr(recipe, "predict_logits", lambda m, s: m(s.images).detach())
    seen = []

    def chooser(logits, lab, cls, grid):
        seen.append((logits.shape, cls))
        return le.reference_choose_bias(logits, lab, cls, grid)

    (mine,) = recipe.missing_class_rows({"m": _Fixed(table)}, ds, 1, choose_bias=chooser)
    (default,) = recipe.missing_class_rows({"m": _Fixed(table)}, ds, 1)
    assert seen == [((n, 3), 1)] and mine == default


def test_calibration_temperature_reference_against_a_fine_float64_search():
    g = torch.Generator().manual_seed(10)
    true = torch.randn(400, 6, generator=g, dtype=torch.float64)
    y = torch.distributions.Categorical(logits=true).sample()
    grid = torch.linspace(0.5, 8, 61, dtype=torch.float64)
    got = le.reference_calibration_temperature(true * 3, y, grid)  # logits three times too confident
    nll = [float(-(torch.log_softmax(true * 3 / T, 1).gather(1, y[:, None])).mean()) for T in grid]
    assert got == float(grid[nll.index(min(nll))]) and 2.0 < got < 4.5


def _temperature_vectorised(logits, labels, grid):
    grid = torch.as_tensor(grid, dtype=logits.dtype)
    nll = torch.stack([-torch.log_softmax(logits / T, -1)[torch.arange(len(labels)), labels].mean() for T in grid])
    return grid[int(torch.argmin(nll))].item()


@pytest.mark.parametrize("fn", [le.reference_calibration_temperature, _temperature_vectorised])
def test_calibration_temperature_check_accepts_correct_answers(fn, capsys):
    assert checks.check_calibration_temperature(fn) is True and "✓" in capsys.readouterr().out
