import copy

import pytest
import torch
import torch.nn as nn

from kdcourse import data as D
from kdcourse import models, runs
from kdcourse.train import (Distill, Objective, StepOutput, clear_logit_memo, evaluate, fit, freeze, memo_logits,
                             predict_logits)


@pytest.fixture(scope="module")
def tiny():
    return D.shapes(96, 32, 32, seed=3)


def test_models_shapes_and_features():
    x = torch.randn(2, 3, 32, 32)
    for spec in ({"arch": "resnet", "depth": 8, "width": 4}, {"arch": "cnn", "widths": (4, 8, 16)}):
        m = models.build(spec)
        logits, feats = m(x, return_features=True)
        assert logits.shape == (2, 10)
        assert set(feats) == set(models.FEATURE_NAMES)
        for name, c in m.feature_channels.items():
            assert feats[name].shape[1] == c
    with pytest.raises(ValueError, match="depth"):
        models.ResNet(depth=10)
    with pytest.raises(ValueError, match="arch"):
        models.build({"arch": "vit"})


def test_overfits_one_batch(tiny):
    one = tiny.train.subset(torch.arange(32))
    torch.manual_seed(0)
    model = models.build({"arch": "cnn", "widths": (8, 16, 32)})
    hist = fit(model, one, epochs=60, lr=1e-2, batch_size=32, progress=False, lr_schedule="constant")
    assert evaluate(model, one)["acc"] == 1.0
    assert hist.series("loss")[-1] < 0.1 * hist.series("loss")[0]


def test_same_seed_same_metrics(tiny):
    kw = dict(build={"arch": "cnn", "widths": (4, 8, 8)}, data=tiny, epochs=2, lr=3e-3, progress=False)
    a, b = runs.train_run("a", seed=1, **kw), runs.train_run("b", seed=1, **kw)
    c = runs.train_run("c", seed=2, **kw)
    assert a.test_acc == b.test_acc and a.history.series("loss") == b.history.series("loss")
    assert a.history.series("loss") != c.history.series("loss")


def test_teacher_stays_frozen_and_in_eval(tiny):
    teacher = models.build({"arch": "resnet", "depth": 8, "width": 4})
    teacher.train()  # Distill must put it in eval mode and freeze it
    before = copy.deepcopy(teacher.state_dict())
    student = models.build({"arch": "cnn", "widths": (4, 8, 8)})
    obj = Distill(teacher, T=4, alpha=0.9, cache=False)
    fit(student, tiny.train.with_augment(True), obj, epochs=2, lr=1e-2, progress=False)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats too
    assert not any(p is q for p in obj.parameters() for q in teacher.parameters())


def test_teacher_put_back_in_train_mode_is_caught(tiny):
    teacher = models.build({"arch": "resnet", "depth": 8, "width": 4})
    obj = Distill(teacher, cache=False)
    teacher.train()
    with pytest.raises(RuntimeError, match="eval"):
        fit(models.build({"arch": "cnn", "widths": (4, 4, 4)}), tiny.train, obj, epochs=1, progress=False)


def test_unfrozen_teacher_pitfall_changes_teacher(tiny):
    teacher = models.build({"arch": "resnet", "depth": 8, "width": 4})
    before = [p.detach().clone() for p in teacher.parameters()]
    stats = teacher.stem[1].running_mean.clone()

    def no_detach(s, t, y, T=4.0, alpha=0.9):  # what a student typically writes
        kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.softmax(t / T, -1), reduction="batchmean")
        return alpha * T * T * kl + (1 - alpha) * torch.nn.functional.cross_entropy(s, y)

    fit(models.build({"arch": "cnn", "widths": (4, 4, 4)}), tiny.train, Distill(teacher, loss=no_detach, frozen=False),
        epochs=1, lr=1e-2, progress=False)
    assert any(not torch.equal(b, p) for b, p in zip(before, teacher.parameters()))
    assert not torch.equal(stats, teacher.stem[1].running_mean)  # train mode: BN statistics drift too


def test_cached_teacher_logits_aligned_with_shuffled_batches(tiny):
    teacher = freeze(models.build({"arch": "resnet", "depth": 8, "width": 4}))
    obj = Distill(teacher)
    obj.setup(None, tiny.train)
    assert obj._cached is not None
    live = Distill(teacher, cache=False)
    live.setup(None, tiny.train)
    assert live._cached is None
    for b in tiny.train.batches(10, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert torch.allclose(obj.teacher_logits(b), live.teacher_logits(b), atol=1e-5)


def test_logit_memo_serves_only_the_same_weights_and_images(tiny):
    clear_logit_memo()
    teacher = freeze(models.build({"arch": "resnet", "depth": 8, "width": 4}))
    first = memo_logits(teacher, tiny.train)
    assert torch.equal(first, predict_logits(teacher, tiny.train))
    assert memo_logits(teacher, tiny.train) is first  # reused, not recomputed
    twin = copy.deepcopy(teacher)
    twin_first = memo_logits(twin, tiny.train)  # another module (its attributes may differ): its own entry
    assert twin_first is not first and torch.equal(twin_first, first)
    with torch.no_grad():
        twin.fc.bias[0] += 1.0  # a changed teacher must never get stale logits
    changed = memo_logits(twin, tiny.train)
    assert torch.allclose(changed[:, 0], first[:, 0] + 1.0, atol=1e-5)
    other = memo_logits(teacher, tiny.val)  # another split
    assert other.shape[0] == len(tiny.val) and torch.equal(other, predict_logits(teacher, tiny.val))
    a, b = Distill(teacher), Distill(teacher)
    a.setup(None, tiny.train)
    b.setup(None, tiny.train)
    assert a._cached is b._cached is first
    clear_logit_memo()
    assert memo_logits(teacher, tiny.train) is not first


def test_no_cache_with_augmentation(tiny):
    teacher = freeze(models.build({"arch": "resnet", "depth": 8, "width": 4}))
    obj = Distill(teacher)
    obj.setup(None, tiny.train.with_augment(True))
    assert obj._cached is None
    with pytest.raises(ValueError, match="augment"):
        Distill(teacher, cache=True).setup(None, tiny.train.with_augment(True))


def test_kd_equals_scratch_when_alpha_zero(tiny):
    teacher = freeze(models.build({"arch": "resnet", "depth": 8, "width": 4}))
    kw = dict(build={"arch": "cnn", "widths": (4, 8, 8)}, data=tiny, epochs=2, lr=3e-3, progress=False)
    a = runs.train_run("ce", seed=0, **kw)
    b = runs.train_run("kd0", seed=0, objective=lambda: Distill(teacher, alpha=0.0), **kw)
    assert a.history.series("loss") == pytest.approx(b.history.series("loss"), rel=1e-5)


def test_schedules_are_called_with_progress(tiny):
    seen = []
    teacher = freeze(models.build({"arch": "resnet", "depth": 8, "width": 4}))

    def T(progress):
        seen.append(progress)
        return 1 + 3 * progress

    hist = fit(models.build({"arch": "cnn", "widths": (4, 4, 4)}), tiny.train, Distill(teacher, T=T),
               epochs=2, batch_size=32, progress=False)
    assert seen[0] == 0.0 and 0.5 <= seen[-1] < 1.0 and seen == sorted(seen)
    assert hist[0]["T"] < hist[1]["T"]


def test_nan_loss_stops_with_clear_error(tiny):
    class Bad(Objective):
        def forward(self, model, batch, state):
            out = model(batch.x)
            return StepOutput(out.sum() * float("nan"), out)

    with pytest.raises(FloatingPointError, match="epoch 1, step 1"):
        fit(models.build({"arch": "cnn", "widths": (4, 4, 4)}), tiny.train, Bad(), epochs=1, progress=False)


def test_bad_fit_arguments(tiny):
    m = models.build({"arch": "cnn", "widths": (4, 4, 4)})
    with pytest.raises(ValueError, match="epochs"):
        fit(m, tiny.train, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        fit(m, tiny.train, epochs=1, lr=-1)


def test_objective_parameters_are_trained(tiny):
    class WithParam(Objective):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, model, batch, state):
            logits = model(batch.x) * self.scale
            return StepOutput(nn.functional.cross_entropy(logits, batch.labels), logits)

    obj = WithParam()
    fit(models.build({"arch": "cnn", "widths": (4, 4, 4)}), tiny.train, obj, epochs=1, lr=1e-2, progress=False)
    assert float(obj.scale) != 1.0


def test_predict_logits_in_order(tiny):
    m = models.build({"arch": "cnn", "widths": (4, 4, 4)}).eval()
    with torch.no_grad():
        direct = m(tiny.test.images)
    assert torch.allclose(predict_logits(m, tiny.test, batch_size=7), direct, atol=1e-5)


def test_summaries():
    mk = lambda name, accs: [runs.Run(name, i, a, None, 1, 0.0, None) for i, a in enumerate(accs)]  # noqa: E731
    a, b = runs.summarize(mk("a", [0.9, 0.92, 0.91])), runs.summarize(mk("b", [0.8, 0.82, 0.81]))
    assert a.mean == pytest.approx(0.91) and a.std == pytest.approx(0.01)
    assert runs.gap_in_std(a, b) == pytest.approx(10.0)
    t, dof = runs.welch_t(a, b)
    assert t == pytest.approx(0.1 / (0.01 * (2 / 3) ** 0.5)) and dof == pytest.approx(4.0)
    with pytest.raises(ValueError, match="empty"):
        runs.summarize([])


def test_channels_last_only_where_nothing_else_sees_activations(tiny):
    from kdcourse.feature_kd import FeatureDistill, Term
    from kdcourse.losses import relation
    from kdcourse.train import _use_channels_last

    cpu = torch.device("cpu")
    teacher = freeze(models.build({"arch": "resnet", "depth": 8, "width": 4}))
    cached, live = Distill(teacher), Distill(teacher, cache=False)
    cached.setup(None, tiny.train)
    live.setup(None, tiny.train)
    assert _use_channels_last(Objective(), tiny.train, cpu)
    assert _use_channels_last(cached, tiny.train, cpu)
    assert not _use_channels_last(live, tiny.train, cpu)
    feat_cached = FeatureDistill(teacher, [Term("layer3", "layer3", relation.rkd_distance)])
    feat_live = FeatureDistill(teacher, [Term("layer3", "layer3", relation.rkd_distance)], cache=False)
    student = models.build({"arch": "cnn", "widths": (4, 8, 8)})
    assert not _use_channels_last(feat_cached, tiny.train, cpu)  # before setup: no cache yet
    feat_cached.setup(student, tiny.train)
    feat_live.setup(student, tiny.train)
    assert _use_channels_last(feat_cached, tiny.train, cpu) and not _use_channels_last(feat_live, tiny.train, cpu)

    class Inherits(FeatureDistill):  # a subclass must declare it itself
        pass

    sub = Inherits(teacher, [Term("layer3", "layer3", relation.rkd_distance)])
    sub.setup(student, tiny.train)
    assert not _use_channels_last(sub, tiny.train, cpu)
    assert not _use_channels_last(Objective(), tiny.train, torch.device("cuda"))
    model = models.build({"arch": "cnn", "widths": (4, 8, 8)})
    fit(model, tiny.train, epochs=1, lr=1e-3, progress=False)
    # the trained model is handed back in the usual layout (hooks, exports and .view() see what they expect)
    assert all(p.is_contiguous() for p in model.parameters())


def test_logit_memo_keys_on_any_split_tensors():
    from kdcourse.text import TextSplit

    clear_logit_memo()
    torch.manual_seed(0)
    teacher = freeze(nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(4 * 6, 3)))
    a = TextSplit(torch.randint(1, 20, (10, 6)), torch.zeros(10, dtype=torch.int64))
    b = TextSplit(a.input_ids.flip(0), a.labels)
    la, lb = memo_logits(teacher, a), memo_logits(teacher, b)
    assert torch.equal(la, predict_logits(teacher, a)) and torch.equal(lb, predict_logits(teacher, b))
    assert torch.equal(lb, la.flip(0)) and memo_logits(teacher, a) is la


def test_select_on_validation_picks_the_best_validation_run_and_ignores_test(tiny, monkeypatch):
    # real runs: the choice is the argmax of the runs' validation accuracy, which is the model's accuracy on data.val
    kw = dict(build={"arch": "cnn", "widths": (4, 8, 8)}, data=tiny, epochs=1, lr=3e-3, progress=False, keep_model=True)
    teacher = freeze(models.build({"arch": "cnn", "widths": (4, 4, 4)}))
    best, tried = runs.select_on_validation("m", {"ce": None, "kd": lambda: Distill(teacher, T=2.0, alpha=1.0)}, seed=0, **kw)
    assert set(tried) == {"ce", "kd"} and best == max(tried, key=lambda k: tried[k].val_acc)
    for run in tried.values():
        assert run.val_acc == pytest.approx(evaluate(run.model, tiny.val)["acc"])
    assert tried["ce"].test_acc == runs.train_run("again", seed=0, **kw).test_acc  # each candidate is a plain seeded run

    # the rule itself: highest validation accuracy, ties to the first listed, test accuracy plays no part
    fake = {"a": (0.5, 0.99), "b": (0.7, 0.10), "c": (0.7, 0.95), "d": (0.6, 1.0)}

    def fake_run(name, seed, objective, **kwargs):
        val, test = fake[objective]
        return runs.Run(name, seed, test, val, 1, 0.0, None)

    monkeypatch.setattr(runs, "train_run", fake_run)
    best, tried = runs.select_on_validation("m", {k: k for k in fake}, seed=0, data=tiny)
    assert best == "b" and [r.test_acc for r in tried.values()] == [0.99, 0.10, 0.95, 1.0]


def test_select_on_validation_errors(tiny):
    no_val = D.ImageData(tiny.name, tiny.train, None, tiny.test, tiny.teacher_train)
    with pytest.raises(ValueError, match="validation split"):
        runs.select_on_validation("m", {"ce": None}, seed=0, data=no_val, build={"arch": "cnn"}, epochs=1, lr=1e-3)
    with pytest.raises(ValueError, match="empty"):
        runs.select_on_validation("m", {}, seed=0, data=tiny, build={"arch": "cnn"}, epochs=1, lr=1e-3)


def test_markdown_table_keeps_columns_the_first_row_lacks():
    text = runs.markdown_table([{"name": "scratch", "acc": 0.5}, {"name": "kd", "acc": 0.61234, "vs scratch": "+11"}])
    assert text.splitlines()[0] == "| name | acc | vs scratch |"
    assert text.splitlines()[2] == "| scratch | 0.5 |  |" and text.splitlines()[3] == "| kd | 0.6123 | +11 |"
    assert runs.markdown_table([{"a": 1, "b": 2}], ["b"]).splitlines()[0] == "| b |"


def test_feature_losses_see_contiguous_features_under_channels_last(tiny):
    # a student's loss that calls .view() must work when fit trains in channels-last layout, and give the
    # same training as the default layout (live teacher: no channels-last) up to float rounding
    from kdcourse.feature_kd import FeatureDistill, Term, clear_teacher_cache

    def flat_mse(s, t):  # .view() fails on a channels-last tensor
        return (s.view(s.size(0), -1).pow(2).mean(1) - t.view(t.size(0), -1).pow(2).mean(1)).pow(2).mean()

    teacher = freeze(models.build({"arch": "resnet", "depth": 8, "width": 4}))
    losses = {}
    for cache in (True, False):
        clear_teacher_cache()
        torch.manual_seed(0)
        student = models.build({"arch": "cnn", "widths": (4, 8, 8)})
        obj = FeatureDistill(teacher, [Term("layer2", "layer2", flat_mse, 5.0)], cache=cache)
        losses[cache] = fit(student, tiny.train, obj, epochs=2, lr=3e-3, batch_size=32, progress=False).series("loss")
        assert all(p.is_contiguous() for p in student.parameters())
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_validation_after_the_last_epoch_only_gives_the_same_run(tiny):
    kw = dict(build={"arch": "cnn", "widths": (4, 8, 8)}, data=tiny, epochs=3, lr=3e-3, progress=False, keep_model=True)
    every, last = runs.train_run("every", seed=1, **kw), runs.train_run("last", seed=1, val_each_epoch=False, **kw)
    assert [r.get("val_acc") is not None for r in every.history] == [True, True, True]
    assert [r.get("val_acc") is not None for r in last.history] == [False, False, True]
    assert last.val_acc == every.val_acc == evaluate(last.model, tiny.val)["acc"]
    assert last.test_acc == every.test_acc and last.history.series("loss") == every.history.series("loss")
    for (name, p), q in zip(every.model.state_dict().items(), last.model.state_dict().values()):
        assert torch.equal(p, q), name
