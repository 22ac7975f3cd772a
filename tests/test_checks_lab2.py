"""Lab 2 checks accept the reference (and independent correct versions) and
reject each known-wrong variant with its hint."""
import pytest
import torch
import torch.nn.functional as F

from kdcourse import features as fx
from kdcourse.checks import CheckFailed
from kdcourse.checks import lab2
from kdcourse.losses import feature, relation


def my_extract(model, x, names):
    modules = dict(model.named_modules())
    feats, handles = {}, []

    def make_hook(name):
        def hook(module, inputs, output):
            feats[name] = output
        return hook
    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(make_hook(n)))
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, feats


def test_checks_accept_references(capsys):
    assert lab2.check_feature_extractor(my_extract)
    assert lab2.check_feature_extractor(lambda m, x, names: fx.extract(m, x, names))
    assert lab2.check_hint_loss(feature.hint_loss)
    assert lab2.check_attention_transfer(feature.attention_transfer_loss)
    assert lab2.check_rkd_distance(relation.rkd_distance)
    assert capsys.readouterr().out.count("✓") >= 4


def test_checks_accept_independent_correct_versions():
    def hint(s, t, regressor):  # pool first, then regress (they commute for a 1x1 conv)
        if s.ndim == 4 and t.shape[-1] > s.shape[-1]:
            t = F.avg_pool2d(t, t.shape[-1] // s.shape[-1])
        if s.ndim == 4 and s.shape[-1] > t.shape[-1]:
            s = F.avg_pool2d(s, s.shape[-1] // t.shape[-1])
        return ((regressor(s) - t.detach()) ** 2).mean()

    def at(s, t):
        if s.shape[-1] != t.shape[-1]:
            size = min(s.shape[-1], t.shape[-1])
            s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
        a = lambda f: (lambda m: m / m.norm(dim=1, keepdim=True))(f.pow(2).sum(1).flatten(1))  # noqa: E731
        return ((a(s) - a(t)) ** 2).mean()

    def rkd(s, t):
        def psi(e):
            d = torch.cdist(e, e)
            return d / d[~torch.eye(len(e), dtype=torch.bool)].mean()
        return F.smooth_l1_loss(psi(s), psi(t))

    assert lab2.check_hint_loss(hint)
    assert lab2.check_attention_transfer(at)
    assert lab2.check_rkd_distance(rkd)


@pytest.mark.parametrize("name", sorted(lab2.HINT_VARIANTS))
def test_hint_check_rejects_each_variant(name):
    fn, hint = lab2.HINT_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab2.check_hint_loss(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name", sorted(lab2.AT_VARIANTS))
def test_at_check_rejects_each_variant(name):
    fn, hint = lab2.AT_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab2.check_attention_transfer(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name", sorted(lab2.RKD_VARIANTS))
def test_rkd_check_rejects_each_variant(name):
    fn, hint = lab2.RKD_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab2.check_rkd_distance(fn)
    assert hint in str(err.value)


def test_named_mistakes_in_words():
    with pytest.raises(CheckFailed, match="not normalised"):
        lab2.check_attention_transfer(lab2.AT_VARIANTS["not_normalized"][0])
    with pytest.raises(CheckFailed, match="channel reduction"):
        lab2.check_attention_transfer(lab2.AT_VARIANTS["l2_norm_channels"][0])
    with pytest.raises(CheckFailed, match="largest"):
        lab2.check_rkd_distance(lab2.RKD_VARIANTS["max"][0])


def test_hint_check_names_a_missing_or_ignored_regressor():
    def no_regressor(s, t, regressor):
        return F.mse_loss(*feature.match_spatial(s, t)) if s.ndim == 4 else F.mse_loss(s, t)

    with pytest.raises(CheckFailed, match="regressor is missing"):
        lab2.check_hint_loss(no_regressor)

    def only_when_needed(s, t, regressor):
        if s.shape[1] != t.shape[1]:
            s = regressor(s)
        return feature.hint_loss(s, t)

    with pytest.raises(CheckFailed, match="regressor is not applied"):
        lab2.check_hint_loss(only_when_needed)


def test_hint_check_rejects_gradient_mistakes():
    def detached(s, t, regressor):
        with torch.no_grad():
            out = feature.hint_loss(s, t, regressor)
        return out.requires_grad_(True)

    with pytest.raises(CheckFailed, match="no gradient"):
        lab2.check_hint_loss(detached)

    def teacher_trained(s, t, regressor):
        s2, t2 = feature.match_spatial(regressor(s), t) if s.ndim == 4 else (regressor(s), t)
        return F.mse_loss(s2, t2)

    with pytest.raises(CheckFailed, match="detach"):
        lab2.check_hint_loss(teacher_trained)


@pytest.mark.parametrize("bad,word", [
    ("late", "last"), ("noremove", "handle.remove"), ("nofinally", "finally"), ("input", "output"),
    ("detach", "gradient"), ("getattr", "named_modules"),
])
def test_extractor_check_names_each_mistake(bad, word):
    def body(model, x, names, *, store, remove, guard, lookup):
        modules = dict(model.named_modules())
        feats, handles = {}, []
        try:
            for n in names:
                module = getattr(model, n) if lookup == "getattr" else modules[n]
                handles.append(module.register_forward_hook(store(feats, n)))
            out = model(x)
        finally:
            if guard:
                for h in handles:
                    h.remove()
        if remove and not guard:
            for h in handles:
                h.remove()
        return out, feats

    out_store = lambda feats, n: (lambda m, i, o: feats.__setitem__(n, o))  # noqa: E731
    kw = dict(store=out_store, remove=True, guard=True, lookup="dict")
    if bad == "late":
        box = {}
        kw["store"] = lambda feats, n: (box.__setitem__("n", n), lambda m, i, o: feats.__setitem__(box["n"], o))[1]
        fn = lambda m, x, names: (lambda out: (out[0], {n: out[1][names[-1]] for n in names}))(body(m, x, names, **kw))  # noqa: E731
    else:
        if bad == "noremove":
            kw.update(remove=False, guard=False)
        elif bad == "nofinally":
            kw.update(guard=False)
        elif bad == "input":
            kw["store"] = lambda feats, n: (lambda m, i, o: feats.__setitem__(n, i[0]))
        elif bad == "getattr":
            kw["lookup"] = "getattr"
        fn = lambda m, x, names: body(m, x, names, **kw)  # noqa: E731
        if bad == "detach":
            fn = lambda m, x, names: (lambda r: (r[0], {k: v.detach() for k, v in r[1].items()}))(body(m, x, names, **kw))  # noqa: E731
    with pytest.raises(CheckFailed, match=word):
        lab2.check_feature_extractor(fn)


def test_not_implemented_passes_through():
    def stub(*args):
        raise NotImplementedError()

    for check in (lab2.check_feature_extractor, lab2.check_hint_loss, lab2.check_attention_transfer, lab2.check_rkd_distance):
        with pytest.raises(NotImplementedError):
            check(stub)
