"""Feature/relation/CRD objectives in the one training loop: regressors are
owned and trained, the teacher stays frozen, cached teacher outputs equal live
ones, and the loss is what the docstring says."""
import copy

import pytest
import torch
import torch.nn.functional as F

from kdcourse import data, feature_kd
from kdcourse.distill import features as distill_features
from kdcourse.feature_kd import CRDDistill, FeatureDistill, Term, teacher_outputs
from kdcourse.losses.feature import attention_transfer_loss, hint_loss
from kdcourse.losses.relation import rkd_angle, rkd_distance, similarity_preserving
from kdcourse.losses.response import kd_loss
from kdcourse.models import ResNet, SmallCNN
from kdcourse.train import TrainState, fit


@pytest.fixture(scope="module")
def ds():
    return data.shapes(n_train=64, n_val=32, n_test=32, seed=3)


def models_():
    torch.manual_seed(0)
    return ResNet(8, 4).eval(), SmallCNN((4, 8, 16))


def count_calls(model):
    calls = {"n": 0}
    model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    return calls


def test_regressor_is_owned_trained_and_teacher_untouched(ds):
    feature_kd.clear_teacher_cache()
    teacher, student = models_()
    before = copy.deepcopy(teacher.state_dict())
    obj = FeatureDistill(teacher, [Term("layer2", "layer2", hint_loss, weight=10.0)])
    fit(student, ds.train, obj, epochs=1, batch_size=32, progress=False)
    reg = obj.regressors["0"]
    assert (reg.proj.in_channels, reg.proj.out_channels) == (8, 8)
    assert any(p is reg.proj.weight for p in obj.parameters())
    w0 = reg.proj.weight.detach().clone()
    fit(student, ds.train, obj, epochs=1, batch_size=32, progress=False)  # setup rebuilds; training moves it
    assert not torch.equal(obj.regressors["0"].proj.weight, w0)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_cached_teacher_is_not_run_during_training_but_live_one_is(ds):
    feature_kd.clear_teacher_cache()
    teacher, student = models_()
    calls = count_calls(teacher)
    obj = FeatureDistill(teacher, [Term("layer3", "layer3", attention_transfer_loss, 100.0)])
    obj.setup(student, ds.train)
    n_setup = calls["n"]
    fit(student, ds.train, obj, epochs=2, batch_size=32, progress=False)
    assert calls["n"] == n_setup + 1  # fit's own setup: the probe only; the outputs come from the memo
    live = FeatureDistill(teacher, [Term("layer3", "layer3", attention_transfer_loss, 100.0)])
    fit(student, ds.train.with_augment(True), live, epochs=1, batch_size=32, progress=False)
    assert calls["n"] == n_setup + 1 + 1 + 2  # then: a probe, and one call per batch (2 batches)


def test_cached_features_equal_live_features(ds):
    feature_kd.clear_teacher_cache()
    teacher, student = models_()
    obj = FeatureDistill(teacher, [Term("layer1", "layer1", hint_loss), Term("fc:input", "fc:input", rkd_distance)])
    obj.setup(student, ds.train)
    batch = next(ds.train.batches(16, shuffle=True, generator=torch.Generator().manual_seed(1)))
    logits, feats = obj.teacher_step(batch)
    with torch.no_grad():
        ref_logits, ref = teacher(batch.x, return_features=True)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(feats["layer1"], ref["layer1"], atol=1e-5)  # full resolution: what the live teacher gives
    assert torch.allclose(feats["fc:input"], ref["pool"], atol=1e-5)
    assert teacher_outputs(teacher, ds.train, ["layer1", "fc:input"])[0] is obj._logits  # shared memo


def test_teacher_outputs_can_pool_and_huge_caches_fall_back_to_live(ds, monkeypatch):
    feature_kd.clear_teacher_cache()
    teacher, student = models_()
    _, f = teacher_outputs(teacher, ds.train, ["layer1"], {"layer1": (8, 8)})
    assert f["layer1"].shape[-2:] == (8, 8)
    monkeypatch.setattr(distill_features, "CACHE_LIMIT_BYTES", 1.0)
    obj = FeatureDistill(teacher, [Term("layer1", "layer1", hint_loss)])
    with pytest.warns(UserWarning, match="live"):
        obj.setup(student, ds.train)
    assert obj._feats is None


def test_loss_is_ce_plus_weighted_terms_or_kd(ds):
    feature_kd.clear_teacher_cache()
    teacher, student = models_()
    batch = next(ds.train.batches(16))
    state = TrainState()
    obj = FeatureDistill(teacher, [Term("layer3", "layer3", similarity_preserving, 3.0)], alpha=0.0)
    obj.setup(student, ds.train)
    student.eval()  # deterministic batch norm for the comparison
    out = obj(student, batch, state)
    with torch.no_grad():
        t_logits, t = teacher(batch.x, return_features=True)
    s_logits, s = student(batch.x, return_features=True)
    want = (F.cross_entropy(s_logits, batch.labels) + 3.0 * similarity_preserving(s["layer3"], t["layer3"])).detach()
    assert float(out.loss.detach()) == pytest.approx(float(want), rel=1e-5)
    kd = FeatureDistill(teacher, [Term("layer3", "layer3", similarity_preserving, 3.0)], alpha=0.7, T=2.0)
    kd.setup(student, ds.train)
    want_kd = kd_loss(s_logits, t_logits, batch.labels, T=2.0, alpha=0.7) + 3.0 * similarity_preserving(
        s["layer3"], t["layer3"])
    assert float(kd(student, batch, state).loss.detach()) == pytest.approx(float(want_kd), rel=1e-5)


def test_crd_objective_sizes_and_fills_its_banks(ds):
    feature_kd.clear_teacher_cache()
    teacher, student = models_()
    obj = CRDDistill(teacher, dim=8, k=16)
    hist = fit(student, ds.train, obj, epochs=1, batch_size=32, progress=False)
    assert obj.crd.bank_t.shape == (len(ds.train), 8) and obj.crd.k == 16
    assert torch.isfinite(torch.tensor(hist.last("crd")))
    assert any(p is obj.crd.embed_s.linear.weight for p in obj.parameters())


def test_same_seed_same_result(ds):
    results = []
    for _ in range(2):
        feature_kd.clear_teacher_cache()
        teacher, student = models_()
        hist = fit(student, ds.train, FeatureDistill(teacher, [Term("layer2", "layer2", hint_loss, 10.0)]),
                   epochs=1, batch_size=32, progress=False, seed=5)
        results.append(hist.last("loss"))
    assert results[0] == results[1]


def test_objective_errors():
    teacher, _ = models_()
    with pytest.raises(ValueError, match="Term"):
        FeatureDistill(teacher, [])
    with pytest.raises(ValueError, match="callable"):
        FeatureDistill(teacher, [Term("layer1", "layer1", "hint")])
    with pytest.raises(ValueError, match="nn.Module"):
        FeatureDistill(lambda x: x, [Term("layer1", "layer1", hint_loss)])
    ds = data.shapes(n_train=8, n_val=4, n_test=4, seed=1)
    with pytest.raises(ValueError, match="fc:input"):
        CRDDistill(teacher, student_layer="layer3", teacher_layer="layer3").setup(SmallCNN((4, 8, 16)), ds.train)


def test_response_only_equals_distill(ds):
    from kdcourse.train import Distill

    feature_kd.clear_teacher_cache()
    teacher, student = models_()
    batch = next(ds.train.batches(16))
    student.eval()
    obj = FeatureDistill(teacher, [], T=4.0, alpha=0.9)
    obj.setup(student, ds.train)
    ref = Distill(teacher, T=4.0, alpha=0.9)
    ref.setup(student, ds.train)
    a, b = obj(student, batch, TrainState()).loss, ref(student, batch, TrainState()).loss
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-5)


def test_scale_weights_scales_only_the_methods_entries():
    pub = dict(feature_kd.REPDISTILLER_WEIGHTS)
    rkd = feature_kd.scale_weights(pub, "RKD", 0.1)
    assert rkd["rkd_distance"] == pytest.approx(2.5) and rkd["rkd_angle"] == pytest.approx(5.0)
    assert {k: v for k, v in rkd.items() if not k.startswith("rkd")} == {k: v for k, v in pub.items() if not k.startswith("rkd")}
    assert pub == feature_kd.REPDISTILLER_WEIGHTS  # the input is not modified
    assert feature_kd.scale_weights(pub, "AT", 0.01)["at"] == pytest.approx(10.0)
    assert set(feature_kd.LAB2_WEIGHT_KEYS) <= set(feature_kd.LAB2_METHODS)
    with pytest.raises(ValueError, match="method 'scratch' has no loss weight"):
        feature_kd.scale_weights(pub, "scratch", 0.1)
    for bad in (0, -1.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="scale must be a positive"):
            feature_kd.scale_weights(pub, "AT", bad)


def test_lab2_objective_builds_each_method_with_its_weights(ds):
    # oracle: the loss of each built objective equals CE (or KD) + weight x the package's term, computed by hand
    feature_kd.clear_teacher_cache()
    teacher, student = models_()
    w = dict(feature_kd.REPDISTILLER_WEIGHTS, hint=3.0, at=7.0, sp=11.0, rkd_distance=0.5, rkd_angle=0.25)
    batch = next(ds.train.batches(16))
    student.eval()
    with torch.no_grad():
        t_logits, t = teacher(batch.x, return_features=True)
    s_logits, s = student(batch.x, return_features=True)
    ce = F.cross_entropy(s_logits, batch.labels)
    kd = kd_loss(s_logits, t_logits, batch.labels, T=4.0, alpha=0.9)
    at = sum(attention_transfer_loss(s[f"layer{i}"], t[f"layer{i}"]) for i in (1, 2, 3))
    rkd = 0.5 * rkd_distance(s["pool"], t["pool"]) + 0.25 * rkd_angle(s["pool"], t["pool"])  # pool = input of fc
    want = {"response (KD)": kd, "AT": ce + 7.0 * at, "SP": ce + 11.0 * similarity_preserving(s["layer3"], t["layer3"]),
            "RKD": ce + rkd}
    for method, expected in want.items():
        obj = feature_kd.lab2_objective(method, teacher, w)()
        obj.setup(student, ds.train)
        assert float(obj(student, batch, TrainState()).loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5), method
    for method, alpha in (("feature (FitNets)", 0.0), ("response + feature", 0.9)):
        obj = feature_kd.lab2_objective(method, teacher, w, hint_layer="layer1")()
        assert obj.alpha == alpha and [(t.student, t.weight) for t in obj.terms] == [("layer1", 3.0)]
    crd = feature_kd.lab2_objective("CRD", teacher, dict(w, crd=0.3), crd_k=8)()
    assert isinstance(crd, CRDDistill) and crd.weight == 0.3
    assert feature_kd.lab2_objective("scratch", teacher, w) is None
    mine = lambda s, t: (s - t).abs().mean()  # noqa: E731  the student's own loss is the one used
    assert feature_kd.lab2_objective("AT", teacher, w, at_loss=mine)().terms[0].loss is mine


def test_lab2_objective_errors():
    teacher, _ = models_()
    with pytest.raises(ValueError, match="unknown Lab 2 method 'FitNets'"):
        feature_kd.lab2_objective("FitNets", teacher, feature_kd.REPDISTILLER_WEIGHTS)
    with pytest.raises(ValueError, match=r"lacks \['hint'\] for 'response \+ feature'"):
        feature_kd.lab2_objective("response + feature", teacher, {"at": 1.0})
