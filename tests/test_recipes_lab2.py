"""Lab 2's recipe: the new methods' objectives (the student's FitNets class, SP and in-batch InfoNCE) and the
Experiments bookkeeping (weights chosen on validation only, summaries, clean stops for runs never made)."""
import pytest
import torch
import torch.nn.functional as F

from kdcourse import data, runs
from kdcourse.distill.fitnets import FitNets
from kdcourse.models import ResNet, SmallCNN
from kdcourse.profiles import REPDISTILLER_WEIGHTS
from kdcourse.recipes import lab2 as recipe
from kdcourse.train import TrainState


@pytest.fixture(scope="module")
def ds():
    return data.shapes(n_train=48, n_val=32, n_test=32, seed=5)


def _models():
    torch.manual_seed(0)
    return ResNet(8, 4).eval(), SmallCNN((4, 8, 16))


def test_in_batch_info_nce_objective_is_ce_plus_weighted_info_nce(ds):
    teacher, student = _models()
    w = dict(REPDISTILLER_WEIGHTS, crd=0.7)
    obj = recipe.lab2_objective("InfoNCE (in-batch)", teacher, w)()
    obj.setup(student, ds.train)
    batch = next(ds.train.batches(12))
    student.eval()
    out = obj(student, batch, TrainState())
    with torch.no_grad():
        _, t = teacher(batch.x, return_features=True)
    logits, s = student(batch.x, return_features=True)
    reg = obj.regressors["0"]  # the linear regressor the Term got (student width -> teacher width)
    u, v = F.normalize(reg(s["pool"]), dim=1), F.normalize(t["pool"], dim=1)
    sim = u @ v.t() / 0.1  # by hand: -log softmax of the positive, averaged over anchors
    nce = (torch.logsumexp(sim, 1) - sim.diagonal()).mean()
    expected = F.cross_entropy(logits, batch.labels) + 0.7 * nce
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


def test_the_students_functions_and_class_are_the_ones_used(ds):
    teacher, _ = _models()
    w = dict(REPDISTILLER_WEIGHTS, hint=3.0)
    obj = recipe.lab2_objective("feature (FitNets)", teacher, w, fitnets=FitNets)()
    assert isinstance(obj, FitNets) and obj.hints == {"layer2": 3.0}
    mine = lambda s, t: (s.flatten(1).mean() - t.flatten(1).mean()) ** 2  # noqa: E731
    assert recipe.lab2_objective("SP", teacher, w, sp_loss=mine)().terms[0].loss is mine
    with pytest.raises(ValueError, match="lacks"):
        recipe.lab2_objective("InfoNCE (in-batch)", teacher, {"hint": 1.0})


def test_experiments_choose_on_validation_and_stop_cleanly(ds):
    teacher, _ = _models()
    common = dict(build={"arch": "cnn", "widths": (4, 8, 8), "convs": 1}, data=ds, epochs=1, lr=3e-3, batch_size=16,
                  progress=False)
    objective = lambda method, weights: recipe.lab2_objective(method, teacher, weights)  # noqa: E731
    ex = recipe.Experiments(objective, (0, 1), common)
    with pytest.raises(NotImplementedError, match="no runs of 'scratch'"):
        ex.summary("scratch")
    with pytest.raises(NotImplementedError, match="no weight chosen"):
        ex.with_chosen("SP")
    ex.results["scratch"] = runs.repeat("scratch", (0, 1), **common)
    rows = ex.choose_weights(["SP"], dict(REPDISTILLER_WEIGHTS), (1.0, 0.01))
    tried = ex.tried["SP"]
    best = max(tried, key=lambda sc: tried[sc].val_acc)  # the validation split decides, never the test split
    assert ex.W["sp"] == pytest.approx(REPDISTILLER_WEIGHTS["sp"] * best)
    assert rows[0]["chosen weight"] == recipe.weight_text(ex.W, "SP")
    sp = ex.with_chosen("SP")
    assert sp[0] is tried[best] and [r.seed for r in sp] == [0, 1]
    summary = ex.summary("SP")
    assert summary.name == "SP" and summary.n == 2
    row = ex.summary_rows(["scratch", "SP", "never run"])
    assert [r["student"] for r in row] == ["scratch", "SP"] and "vs scratch (points)" in row[1]
    assert ex.below(["SP"]) == (["SP"] if summary.mean < ex.summary("scratch").mean else [])
    assert ex.val_spread() == pytest.approx(float(torch.tensor([r.val_acc for r in ex.results["scratch"]]).std()))
