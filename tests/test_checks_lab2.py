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
        t = t.detach()  # the teacher is a constant
        if s.shape[-1] != t.shape[-1]:
            size = min(s.shape[-1], t.shape[-1])
            s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
        a = lambda f: (lambda m: m / m.norm(dim=1, keepdim=True))(f.pow(2).sum(1).flatten(1))  # noqa: E731
        return ((a(s) - a(t)) ** 2).mean()

    def rkd(s, t):
        def psi(e):
            d = torch.cdist(e, e)
            return d / d[~torch.eye(len(e), dtype=torch.bool)].mean()
        return F.smooth_l1_loss(psi(s), psi(t.detach()))

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


# --------------------------------------------------------------------------
# The checks added with the FitNets objective, SP and InfoNCE exercises
# --------------------------------------------------------------------------

from kdcourse.distill.fitnets import FitNets, fitnets_parameters  # noqa: E402
from kdcourse.losses import contrastive  # noqa: E402


def test_new_checks_accept_references(capsys):
    assert lab2.check_fitnets(FitNets)
    assert lab2.check_fitnets_parameters(fitnets_parameters)
    assert lab2.check_sp_loss(relation.similarity_preserving)
    assert lab2.check_info_nce(contrastive.info_nce)
    assert capsys.readouterr().out.count("✓") == 4


def test_new_checks_accept_independent_correct_versions():
    import copy

    import numpy as np
    import torch.nn as nn

    from kdcourse.train import Objective, StepOutput

    class MyFitNets(Objective):
        """written another way: a private copy of the teacher kept out of the module tree, regressors in a
        ModuleList, channel counts as NumPy integers, pooling before the regressor"""

        def __init__(self, teacher, hints):
            super().__init__()
            object.__setattr__(self, "frozen", copy.deepcopy(teacher).eval())
            self.names, self.weights = list(hints), [hints[n] for n in hints]
            self.regs = nn.ModuleList()

        def setup(self, model, train):
            x = train.images[:2]
            with torch.no_grad():
                _, s = fx.extract(model, x, self.names)
                _, t = fx.extract(self.frozen, x, self.names)
            self.regs = nn.ModuleList(nn.Conv2d(np.int64(s[n].shape[1]), np.int64(t[n].shape[1]), 1) for n in self.names)

        def forward(self, model, batch, state):
            with torch.no_grad():
                _, t = fx.extract(self.frozen, batch.x, self.names)
            logits, s = fx.extract(model, batch.x, self.names)
            loss = F.cross_entropy(logits, batch.labels)
            for n, w, r in zip(self.names, self.weights, self.regs):
                tn = F.adaptive_avg_pool2d(t[n], s[n].shape[-2:])
                loss = loss + w * ((r(s[n]) - tn) ** 2).mean()
            return StepOutput(loss, logits, {"loss": float(loss)})

    def my_params(model, objective):
        return [{"params": [p for p in model.parameters() if p.requires_grad]},
                {"params": [p for r in objective.regressors.values() for p in r.parameters()], "lr": 1e-3}]

    def my_sp(s, t):
        def g(f):
            f = f.reshape(len(f), -1)
            m = f @ f.T
            return m / m.norm(dim=1, keepdim=True)
        return F.mse_loss(g(s), g(t.detach()), reduction="sum") / len(s) ** 2

    def my_nce(s, t, temperature=0.1):
        u = s / s.norm(dim=1, keepdim=True)
        v = t.detach() / t.detach().norm(dim=1, keepdim=True)
        logits = u @ v.T / temperature
        return (torch.logsumexp(logits, 1) - logits.diagonal()).mean()

    assert lab2.check_fitnets(MyFitNets)
    assert lab2.check_fitnets_parameters(my_params)
    assert lab2.check_sp_loss(my_sp)
    assert lab2.check_info_nce(my_nce)


@pytest.mark.parametrize("name", sorted(lab2.FITNETS_VARIANTS))
def test_fitnets_check_rejects_each_variant(name):
    fn, hint = lab2.FITNETS_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab2.check_fitnets(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name", sorted(lab2.FITNETS_PARAMETER_VARIANTS))
def test_fitnets_parameters_check_rejects_each_variant(name):
    fn, hint = lab2.FITNETS_PARAMETER_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab2.check_fitnets_parameters(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name", sorted(lab2.SP_VARIANTS))
def test_sp_check_rejects_each_variant(name):
    fn, hint = lab2.SP_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab2.check_sp_loss(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name", sorted(lab2.INFO_NCE_VARIANTS))
def test_info_nce_check_rejects_each_variant(name):
    fn, hint = lab2.INFO_NCE_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab2.check_info_nce(fn)
    assert hint in str(err.value)


def test_sp_cosine_variant_is_a_different_loss_not_a_rescaling():
    # the oracle: float64 re-derivation of both matrices on one batch; their ratio is not constant
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    gram = relation.similarity_preserving(s, t)
    cos = lab2.SP_VARIANTS["cosine"][0](s, t)
    s2 = s * torch.linspace(0.5, 3, 6, dtype=torch.float64).view(-1, 1)  # rescale samples: cosine ignores it
    assert torch.isclose(lab2.SP_VARIANTS["cosine"][0](s2, t), cos)
    assert not torch.isclose(relation.similarity_preserving(s2, t), gram)


def test_gradient_checks_catch_the_wrong_side_detached():
    # the right value, the student detached and the teacher live: fails on the gradient, not on the value
    def wrong_side(s, t):
        return relation.similarity_preserving(t, s.detach())  # symmetric in value, detaches the student

    with pytest.raises(CheckFailed, match="gradients into the teacher"):
        lab2.check_sp_loss(wrong_side)

    def leaves_autograd(s, t, temperature=0.1):  # value right, gradient through only half of the expression
        u = F.normalize(s, dim=1)
        v = F.normalize(t.detach(), dim=1)
        logits = u @ v.T / temperature
        return torch.logsumexp(logits, 1).mean() - logits.diagonal().detach().mean()

    with pytest.raises(CheckFailed, match="wrong gradient"):
        lab2.check_info_nce(leaves_autograd)

    def rkd_teacher_live(s, t):
        def psi(e):
            d = torch.cdist(e, e)
            return d / d[d > 0].mean()
        return F.smooth_l1_loss(psi(s), psi(t))

    with pytest.raises(CheckFailed, match="teacher.detach"):
        lab2.check_rkd_distance(rkd_teacher_live)


@pytest.mark.parametrize("check,fn", [
    (lab2.check_sp_loss, lambda s, t: relation.similarity_preserving(s.add_(1.0), t)),
    (lab2.check_info_nce, lambda s, t, temperature=0.1: contrastive.info_nce(s, t.mul_(1.0).add_(0.5), temperature)),
    (lab2.check_attention_transfer, lambda s, t: feature.attention_transfer_loss(s.mul_(2.0), t)),
    (lab2.check_rkd_distance, lambda s, t: relation.rkd_distance(s, t.sub_(t.mean(0)))),
    (lab2.check_hint_loss, lambda s, t, regressor: feature.hint_loss(s.mul_(1.5), t, regressor)),
])
def test_in_place_change_of_an_input_is_named(check, fn):
    with pytest.raises(CheckFailed, match="in place"):
        check(fn)


def test_new_checks_pass_not_implemented_through():
    def stub(*args, **kwargs):
        raise NotImplementedError()

    class Stub(FitNets):
        def setup(self, model, train):
            raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        lab2.check_fitnets(Stub)
    for check in (lab2.check_fitnets_parameters, lab2.check_sp_loss, lab2.check_info_nce):
        with pytest.raises(NotImplementedError):
            check(stub)


def test_new_declarations_on_the_grader_path():
    """The four new exercises as the grader sees them: deterministic probes, plain data, the reference
    passes, an independently written answer passes, and every variant is named by its hint."""
    from kdcourse.checks import contract

    exercises = {e.name: e for e in contract.exercises_for(2)}
    for name in ("FitNets", "fitnets_parameters", "rkd_angle", "sp_loss", "info_nce"):
        ex = exercises[name]
        seeds = ex.hidden_seeds
        ref = {s: contract.run_probe(ex, ex.reference, s) for s in seeds}
        assert ref == {s: contract.run_probe(ex, ex.reference, s) for s in seeds}, f"{name}: probe not deterministic"
        for data in ref.values():
            contract.validate(data)
        assert contract.diagnose_data(ex, ref, ref).ok
        for vname, (fn, hint) in ex.variants.items():
            student = {s: contract.run_probe(ex, fn, s) for s in seeds}
            v = contract.diagnose_data(ex, student, ref, lambda n, s: contract.run_probe(ex, ex.variants[n][0], s))
            assert not v.ok and hint in v.hint, (name, vname, v)


def test_fitnets_probe_accepts_an_answer_that_draws_random_numbers_differently():
    from kdcourse.checks import contract
    from kdcourse.distill.fitnets import FitNets as Ref

    class Other(Ref):
        def setup(self, model, train):
            torch.randn(100)  # consumes the global RNG: its regressors start elsewhere
            super().setup(model, train)

    ex = contract.exercise(2, "FitNets")
    for s in ex.hidden_seeds:
        assert ex.differs(contract.run_probe(ex, Other, s), contract.run_probe(ex, ex.reference, s), s) is None


def test_rkd_angle_check_accepts_a_hand_written_safe_norm_and_names_each_variant():
    def mine(s, t):
        def psi(e):
            d = e.unsqueeze(0) - e.unsqueeze(1)
            sq = d.pow(2).sum(-1, keepdim=True)
            u = torch.where(sq > 1e-12, d / sq.clamp_min(1e-12).sqrt(), torch.zeros_like(d))
            return u @ u.transpose(1, 2)
        return F.smooth_l1_loss(psi(s), psi(t.detach()))

    assert lab2.check_rkd_angle(relation.rkd_angle)
    assert lab2.check_rkd_angle(mine)
    for name, (fn, hint) in {**lab2.ANGLE_VARIANTS, **lab2.ANGLE_GRADIENT_VARIANTS}.items():
        with pytest.raises(CheckFailed) as err:
            lab2.check_rkd_angle(fn)
        assert hint in str(err.value), name


def test_f_normalize_angle_has_the_right_value_and_an_exploding_gradient():
    # the oracle: the value equals the reference's, the gradient at two equal samples is ~1e12 (the check's reason)
    fn = lab2.ANGLE_GRADIENT_VARIANTS["normalize"][0]
    s = torch.randn(4, 3, dtype=torch.float64)
    s[1] = s[0]
    t = torch.randn(4, 5, dtype=torch.float64)
    assert torch.isclose(fn(s, t), relation.rkd_angle(s, t))
    s.requires_grad_(True)
    fn(s, t).backward()
    assert float(s.grad.abs().max()) > 1e6


_KERNEL = r'''
import json, sys
from kdcourse import labgen
from kdcourse.checks import contract
from kdcourse.checks import lab2

nb = labgen.read(sys.argv[1])
ns = {}
exec("import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\nfrom kdcourse.train import Objective, StepOutput", ns)
for name, i in labgen.solution_functions(nb).items():
    src = "\n".join(l for l in labgen.source(nb["cells"][i]).split("\n") if not l.startswith("checks."))
    exec(src, ns)
# Exercises 1-2 planted wrong: FitNets must not lose its points for them
ns["hint_loss"] = lab2.HINT_VARIANTS["sum"][0]
ns["extract_features"] = lambda model, x, names: (model(x), {})
refused = contract.refuse_references(contract.exercises_for(2))
names = json.loads(sys.argv[2])
out = {n: {s: contract.run_probe(contract.exercise(2, n), ns[n], s) for s in contract.exercise(2, n).hidden_seeds} for n in names}
print(json.dumps({"refused": refused, "data": out}))
'''


def test_new_probes_run_in_a_kernel_that_refuses_references_and_isolate_earlier_exercises():
    """As in the grading kernel: the notebook's own answers defined, every reference refused, Exercises 1-2
    planted wrong. The probes of the new exercises still run (they use no refused code) and the solution's
    answers still match the reference data computed in this (grader) process."""
    import json
    import os
    import subprocess
    import sys

    from kdcourse.checks import contract

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = ["FitNets", "fitnets_parameters", "rkd_angle", "sp_loss", "info_nce"]
    done = subprocess.run([sys.executable, "-c", _KERNEL, os.path.join(root, "solutions", "02_feature_relation_kd.ipynb"),
                           json.dumps(names)], capture_output=True, text=True, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert any("hint_loss" in r for r in got["refused"]) and any("FeatureExtractor" in r for r in got["refused"])
    for name in names:
        ex = contract.exercise(2, name)
        for s in ex.hidden_seeds:
            data = got["data"][name][str(s)]
            assert "raised" not in data, (name, s, data)
            assert ex.differs(data, contract.run_probe(ex, ex.reference, s), s) is None, (name, s)


# ------------------------------------------------------------ the similarity part: channel statistics, PKT, linear CKA

from kdcourse.checks import contract as _contract  # noqa: E402
from kdcourse.checks.lab2 import similarity as lsim  # noqa: E402

SIMILARITY = ["feature_stats_loss", "pkt_loss", "linear_cka"]
SIM_VARIANTS = [(n, v) for n in SIMILARITY for v in sorted(_contract.exercise(2, n).variants)]


def test_stats_reference_equals_the_package_loss_and_commutes_with_the_regressor():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64), torch.randn(3, 7, 3, 3, generator=g, dtype=torch.float64)
    reg = feature.HintRegressor(4, 7).double()
    ref = lsim.reference_stats_loss(s, t, reg)
    assert torch.allclose(ref, feature.feature_stats_loss(s, t, reg), atol=1e-12)
    by_hand = ((reg(s.mean((2, 3), keepdim=True)).flatten(1) - t.mean((2, 3))) ** 2).mean()  # regressor after the mean
    assert torch.allclose(ref, by_hand, atol=1e-12)


def test_pkt_reference_against_a_float64_loop_and_its_recipe_copy():
    import math

    from kdcourse.recipes import lab2 as recipe

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)

    def cond(f):
        rows = []
        for i in range(5):
            k = [(float(F.cosine_similarity(f[i], f[j], dim=0)) + 1) / 2 for j in range(5)]
            rows.append([v / sum(k) for v in k])
        return rows

    ps, pt = cond(s), cond(t)
    want = sum(pt[i][j] * math.log((pt[i][j] + 1e-7) / (ps[i][j] + 1e-7)) for i in range(5) for j in range(5)) / 25
    assert float(lsim.reference_pkt(s, t)) == pytest.approx(want, abs=1e-12)
    assert float(recipe.pkt_loss(s, t)) == pytest.approx(want, abs=1e-12)
    assert float(lsim.reference_pkt(t, t)) == pytest.approx(0.0, abs=1e-12)


def test_cka_reference_against_the_hsic_form_and_its_invariances():
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randn(30, 11, generator=g, dtype=torch.float64)
    H = torch.eye(30, dtype=torch.float64) - 1 / 30
    K, L = H @ X @ X.t() @ H, H @ Y @ Y.t() @ H  # centred Gram matrices
    hsic = lambda a, b: float((a * b).sum())  # noqa: E731
    assert lsim.reference_cka(X, Y) == pytest.approx(hsic(K, L) / (hsic(K, K) * hsic(L, L)) ** 0.5, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert lsim.reference_cka(X, X @ q * 3 + 5) == pytest.approx(1.0, abs=1e-12)  # rotation, scale, offset
    assert lsim.reference_cka(X.view(30, 3, 2, 1), Y) == pytest.approx(lsim.reference_cka(X, Y), abs=1e-12)


def _stats_other(student, teacher, regressor):
    s = regressor(student).flatten(2).mean(-1)
    t = teacher.flatten(2).mean(-1).detach()
    return ((s - t) ** 2).sum() / s.numel()


def _pkt_other(student, teacher, eps=1e-7):
    def cond(f):
        n = f / f.norm(dim=1, keepdim=True)
        k = 0.5 * (torch.einsum("id,jd->ij", n, n) + 1)
        return k / k.sum(-1, keepdim=True)

    ps, pt = cond(student), cond(teacher).detach()
    return torch.sum(pt * (torch.log(pt + eps) - torch.log(ps + eps))) / pt.numel()


def _cka_gram(X, Y):
    X, Y = X.reshape(len(X), -1).to(torch.float64), Y.reshape(len(Y), -1).to(torch.float64)
    n = len(X)
    H = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return ((K * L).sum() / torch.sqrt((K * K).sum() * (L * L).sum())).item()


@pytest.mark.parametrize("name,fn", [
    ("feature_stats_loss", lsim.reference_stats_loss), ("feature_stats_loss", _stats_other),
    ("pkt_loss", lsim.reference_pkt), ("pkt_loss", _pkt_other),
    ("linear_cka", lsim.reference_cka), ("linear_cka", _cka_gram),
])
def test_similarity_checks_accept_correct_answers_written_other_ways(name, fn, capsys):
    assert _contract.exercise(2, name).check(fn) is True
    assert "✓" in capsys.readouterr().out


@pytest.mark.parametrize("name,variant", SIM_VARIANTS, ids=[f"{n}-{v}" for n, v in SIM_VARIANTS])
def test_similarity_checks_reject_each_variant_with_its_hint(name, variant):
    ex = _contract.exercise(2, name)
    fn, hint = ex.variants[variant]
    with pytest.raises(CheckFailed) as err:
        ex.check(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name,variant", SIM_VARIANTS, ids=[f"{n}-{v}" for n, v in SIM_VARIANTS])
def test_similarity_grader_names_each_variant_on_the_hidden_seeds(name, variant):
    ex = _contract.exercise(2, name)
    seeds = ex.hidden_seeds
    ref = {s: _contract.run_probe(ex, ex.reference, s) for s in seeds}
    assert ref == {s: _contract.run_probe(ex, ex.reference, s) for s in seeds}
    assert _contract.diagnose_data(ex, ref, ref).ok
    fn, hint = ex.variants[variant]
    student = {s: _contract.run_probe(ex, fn, s) for s in seeds}
    v = _contract.diagnose_data(ex, student, ref, lambda n, s: _contract.run_probe(ex, ex.variants[n][0], s))
    assert not v.ok and hint in v.hint


def test_similarity_checks_name_in_place_changes_and_pass_not_implemented():
    def cka_inplace(X, Y):
        X -= X.mean(0, keepdim=True)
        return lsim.reference_cka(X, Y)

    with pytest.raises(CheckFailed, match="changed its input X in place"):
        lab2.check_cka(cka_inplace)

    def stub(*args, **kwargs):
        raise NotImplementedError()

    for check in (lab2.check_stats_loss, lab2.check_pkt, lab2.check_cka):
        with pytest.raises(NotImplementedError):
            check(stub)


def test_pkt_method_trains_the_given_loss_on_the_pooled_embeddings():
    from kdcourse.recipes import lab2 as recipe

    teacher = torch.nn.Linear(2, 2)
    mine = lambda s, t: lsim.reference_pkt(s, t)  # noqa: E731
    obj = recipe.lab2_objective("PKT", teacher, {"pkt": 7.0}, pkt_loss=mine)()
    assert [(t.student, t.teacher, t.weight, t.loss) for t in obj.terms] == [("fc:input", "fc:input", 7.0, mine)]
    assert recipe.lab2_objective("PKT", teacher, {})().terms[0].weight == recipe.PKT_WEIGHT  # the published default
    assert recipe.scale_weights(recipe.REPDISTILLER_WEIGHTS, "PKT", 0.1)["pkt"] == pytest.approx(0.1 * recipe.PKT_WEIGHT)


def test_summary_rows_give_a_welch_t_only_with_a_spread_on_both_sides():
    from kdcourse import runs
    from kdcourse.recipes import lab2 as recipe

    ex = recipe.Experiments(lambda m, w: None, (0, 1), {})
    run = lambda name, seed, acc: runs.Run(name, seed, acc, acc, 0, 0.0, history=None)  # noqa: E731
    ex.results = {"scratch": [run("scratch", 0, 0.5), run("scratch", 1, 0.6)], "PKT": [run("PKT", 0, 0.7)],
                  "SP": [run("SP", 0, 0.6), run("SP", 1, 0.8)]}
    rows = {r["student"]: r for r in ex.summary_rows(["scratch", "PKT", "SP"])}
    assert rows["PKT"]["vs scratch (points)"] == "+15.00 (one seed: see the reading)"
    assert rows["SP"]["vs scratch (points)"].startswith("+15.00 (Welch t ")
