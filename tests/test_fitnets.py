"""The FitNets objective written out (kdcourse.distill.fitnets) and fit(params=...)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from kdcourse import features as fx
from kdcourse.checks.lab2 import fitnets_setting
from kdcourse.distill.fitnets import FitNets, fitnets_parameters
from kdcourse.train import TrainState, fit


def test_loss_is_ce_plus_weighted_hints_re_derived_in_float64():
    teacher, student, split, batch = fitnets_setting(3)
    obj = FitNets(teacher, {"layer1": 0.5, "layer3": 2.0})
    obj.setup(student, split)
    obj.train()
    student.train()
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double().eval()
    regs = {k: copy.deepcopy(m).double() for k, m in obj.regressors.items()}
    out = obj(student, batch, TrainState())
    x = batch.x.double()
    logits, s = fx.extract(s64, x, ["layer1", "layer3"])
    with torch.no_grad():
        _, t = fx.extract(t64, x, ["layer1", "layer3"])
    expected = F.cross_entropy(logits, batch.labels)
    for name, w in (("layer1", 0.5), ("layer3", 2.0)):
        r = regs[name](s[name])  # (B, C_t, H_s, W_s); the teacher map is twice as large: mean of 2x2 blocks
        tb = t[name].unflatten(2, (-1, 2)).unflatten(4, (-1, 2)).mean(dim=(3, 5))
        expected = expected + w * ((r - tb) ** 2).mean()
    assert torch.isclose(out.loss.double(), expected, rtol=1e-5)
    assert not teacher.training  # obj.train() switched it; forward put it back


def test_fit_trains_exactly_the_listed_parameters():
    runs = {}
    for label, params in (("listed", fitnets_parameters), ("student only", lambda m, o: list(m.parameters()))):
        teacher, student, split, _ = fitnets_setting(0)
        t_before = copy.deepcopy(teacher.state_dict())
        obj = FitNets(teacher, {"layer2": 1.0})
        torch.manual_seed(1)
        fit(student, split, obj, epochs=2, batch_size=3, params=params, progress=False)
        runs[label] = obj
        assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items())  # the teacher never moves
    # both regressors start from the same seeded initialisation; only the listed one learns
    torch.manual_seed(1)
    w_listed, w_not = runs["listed"].regressors["layer2"].weight, runs["student only"].regressors["layer2"].weight
    assert not torch.equal(w_listed, w_not)
    teacher, student, split, _ = fitnets_setting(0)
    fresh = FitNets(teacher, {"layer2": 1.0})
    torch.manual_seed(1)
    fresh.setup(student, split)
    assert torch.equal(fresh.regressors["layer2"].weight, w_not)  # never updated: still its initial value


def test_fit_params_errors_and_groups():
    teacher, student, split, _ = fitnets_setting(0)
    with pytest.raises(ValueError, match="empty"):
        fit(student, split, FitNets(teacher, {"layer2": 1.0}), epochs=1, params=lambda m, o: [], progress=False)
    groups = lambda m, o: [{"params": list(m.parameters())}, {"params": list(o.regressors.parameters()), "lr": 1e-2}]  # noqa: E731
    fit(student, split, FitNets(teacher, {"layer2": 1.0}), epochs=1, batch_size=3, params=groups, progress=False)


@pytest.mark.parametrize("hints", [{}, {"layer2": -1.0}, {"layer2": float("nan")}, ["layer2"]])
def test_bad_hints_name_the_argument(hints):
    teacher, *_ = fitnets_setting(0)
    with pytest.raises(ValueError, match="hint|weight"):
        FitNets(teacher, hints)
