"""Lab 4 checks accept the reference (and an independent correct version) and
reject each known-wrong variant with its hint."""
import pytest
import torch
import torch.nn.functional as F

from kdcourse.checks import CheckFailed
from kdcourse.checks import lab4
from kdcourse.losses.mutual import mutual_learning_loss
from kdcourse.selfdistill import born_again
from kdcourse.train import Distill, Objective, freeze


# ---- mutual-learning loss ---------------------------------------------------

def test_mutual_check_accepts_reference(capsys):
    assert lab4.check_mutual_loss(mutual_learning_loss)
    out = capsys.readouterr().out
    assert out.count("✓") == 2 and "gradients match" in out


def test_mutual_check_accepts_an_independent_correct_version():
    def mine(peer_logits, labels, T=1.0, alpha=0.5):
        total = 0.0
        for k, z in enumerate(peer_logits):
            log_p = torch.log_softmax(z / T, dim=1)
            kl = 0.0
            for j, other in enumerate(peer_logits):
                if j != k:
                    q = torch.softmax(other.detach() / T, dim=1)
                    kl = kl + (q * (q.log() - log_p)).sum(1).mean()
            total = total + (1 - alpha) * F.cross_entropy(z, labels) + alpha * T * T * kl / (len(peer_logits) - 1)
        return total

    assert lab4.check_mutual_loss(mine)


@pytest.mark.parametrize("name", sorted(lab4.MUTUAL_LOSS_VARIANTS))
def test_mutual_check_rejects_each_value_variant_with_its_hint(name):
    fn, hint = lab4.MUTUAL_LOSS_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab4.check_mutual_loss(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name", sorted(lab4.MUTUAL_GRAD_VARIANTS))
def test_mutual_check_rejects_each_gradient_variant_with_its_hint(name, capsys):
    fn, hint = lab4.MUTUAL_GRAD_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab4.check_mutual_loss(fn)
    assert hint in str(err.value) and "right value but wrong gradients" in str(err.value)
    assert "✓" not in capsys.readouterr().out  # no premature tick when only the values agree


def test_mutual_hints_name_the_mistake_in_words():
    with pytest.raises(CheckFailed, match="detach"):
        lab4.check_mutual_loss(lab4.MUTUAL_GRAD_VARIANTS["not_detached"][0])
    with pytest.raises(CheckFailed, match="wrong way"):
        lab4.check_mutual_loss(lab4.MUTUAL_GRAD_VARIANTS["reversed"][0])
    with pytest.raises(CheckFailed, match="T²"):
        lab4.check_mutual_loss(lab4.MUTUAL_LOSS_VARIANTS["no_T2"][0])


def test_mutual_check_other_failures():
    def stub(peer_logits, labels, T=1.0, alpha=0.5):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        lab4.check_mutual_loss(stub)
    with pytest.raises(CheckFailed, match="differs from the reference"):
        lab4.check_mutual_loss(lambda z, y, T=1.0, alpha=0.5: 1.37 * mutual_learning_loss(z, y, T=T, alpha=alpha))
    with pytest.raises(CheckFailed, match=r"shape \(1,\) but expected \(\)"):
        lab4.check_mutual_loss(lambda z, y, T=1.0, alpha=0.5: mutual_learning_loss(z, y, T=T, alpha=alpha).expand(1))
    with pytest.raises(CheckFailed, match="no gradient"):
        lab4.check_mutual_loss(lambda z, y, T=1.0, alpha=0.5: mutual_learning_loss([a.detach() for a in z], y, T=T, alpha=alpha))
    with pytest.raises(CheckFailed, match="raised TypeError"):
        lab4.check_mutual_loss(lambda z, y: z)


# ---- born-again loop --------------------------------------------------------

def _independent(new_model, train, temperatures, alpha=0.5):
    gens = []
    for i in range(len(temperatures) + 1):
        m = new_model()
        train(m, Objective() if i == 0 else Distill(freeze(gens[i - 1]), T=temperatures[i - 1], alpha=alpha))
        gens.append(m)
    return gens


def test_born_again_check_accepts_reference_and_independent_version(capsys):
    assert lab4.check_born_again(born_again)
    assert lab4.check_born_again(_independent)
    assert capsys.readouterr().out.count("✓") == 2


def _no_first(new_model, train, temperatures, alpha=0.5):
    return born_again(new_model, train, temperatures, alpha)[1:]


def _from_first(new_model, train, temperatures, alpha=0.5):
    gens = [new_model()]
    train(gens[0], Objective())
    for T in temperatures:
        s = new_model()
        train(s, Distill(gens[0], T=T, alpha=alpha))
        gens.append(s)
    return gens


def _trained_further(new_model, train, temperatures, alpha=0.5):
    m = new_model()
    train(m, Objective())
    gens = [m]
    for T in temperatures:
        teacher = new_model()
        teacher.load_state_dict(m.state_dict())
        train(m, Distill(teacher, T=T, alpha=alpha))  # keeps training the same network
        gens.append(m)
    return gens


def _same_T(new_model, train, temperatures, alpha=0.5):
    return born_again(new_model, train, [temperatures[0]] * len(temperatures), alpha)


def _default_T(new_model, train, temperatures, alpha=0.5):
    gens = [new_model()]
    train(gens[0], Objective())
    for _ in temperatures:
        s = new_model()
        train(s, Distill(gens[-1], alpha=alpha))
        gens.append(s)
    return gens


def _ignores_alpha(new_model, train, temperatures, alpha=0.5):
    return born_again(new_model, train, temperatures, 0.9)


def _not_frozen(new_model, train, temperatures, alpha=0.5):
    gens = [new_model()]
    train(gens[0], Objective())
    for T in temperatures:
        s = new_model()
        train(s, Distill(gens[-1], T=T, alpha=alpha, frozen=False))
        gens.append(s)
    return gens


def _labels_only(new_model, train, temperatures, alpha=0.5):
    gens = []
    for _ in range(len(temperatures) + 1):
        m = new_model()
        train(m, Objective())
        gens.append(m)
    return gens


def _own_teacher(new_model, train, temperatures, alpha=0.5):
    gens = [new_model()]
    train(gens[0], Objective())
    for T in temperatures:
        s = new_model()
        train(s, Distill(s, T=T, alpha=alpha))
        gens.append(s)
    return gens


def _reversed(new_model, train, temperatures, alpha=0.5):
    return born_again(new_model, train, temperatures, alpha)[::-1]


def _too_few(new_model, train, temperatures, alpha=0.5):
    return born_again(new_model, train, temperatures[:-1], alpha)


@pytest.mark.parametrize("fn,match", [
    (_no_first, "generation 1 is missing"),
    (_from_first, "learns from generation 1"),
    (_trained_further, "fresh network"),
    (_same_T, "own temperature"),
    (_default_T, "own temperature"),
    (_ignores_alpha, "alpha"),
    (_not_frozen, "not frozen"),
    (_labels_only, "labels only"),
    (_own_teacher, "its own teacher"),
    (_reversed, "training order"),
    (_too_few, "3 temperatures there are 4 generations"),
], ids=lambda v: getattr(v, "__name__", "")[:20])
def test_born_again_check_rejects_each_wrong_loop(fn, match):
    with pytest.raises(CheckFailed, match=match):
        lab4.check_born_again(fn)


def test_born_again_check_passes_not_implemented_and_reports_crashes():
    def stub(new_model, train, temperatures, alpha=0.5):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        lab4.check_born_again(stub)
    with pytest.raises(CheckFailed, match="raised ZeroDivisionError"):
        lab4.check_born_again(lambda new_model, train, temperatures, alpha: 1 / 0)
    with pytest.raises(CheckFailed, match="list of the trained networks"):
        lab4.check_born_again(lambda new_model, train, temperatures, alpha: None)


# ---- the exercises on the contract: deep supervision, T per generation, DML in turn ------------

import math  # noqa: E402

import torch.nn as nn  # noqa: E402

from kdcourse import models, runs  # noqa: E402
from kdcourse.checks import contract  # noqa: E402
from kdcourse.distill.self import ExitDistillation  # noqa: E402
from kdcourse.models.heads import DeepSupervision  # noqa: E402
from kdcourse.recipes import lab4 as recipe  # noqa: E402


def test_lab4_declares_its_exercises_in_notebook_order():
    from kdcourse import labgen
    names = [e.name for e in contract.exercises_for(4)]
    assert names == ["mdd", "born_again", "born_again_tuned", "paired_t", "ensemble_logits", "deep_supervision_loss", "mutual_loss",
                     "mutual_step_in_turn"]
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cells = labgen.solution_functions(labgen.read(os.path.join(root, "solutions", "04_self_distillation.ipynb")))
    assert sorted(cells, key=cells.get) == names
    for e in contract.exercises_for(4):
        for seed in e.hidden_seeds:  # probes are deterministic given the seed
            assert contract.compare(contract.run_probe(e, e.reference, seed), contract.run_probe(e, e.reference, seed)) is None \
                or e.name == "born_again"


def _ds_by_hand(exit_logits, labels, T=3.0, alpha=0.5):
    # an independent correct version: log-probabilities by hand, the exits collected first
    def log_softmax(z):
        return z - torch.logsumexp(z, dim=1, keepdim=True)
    final = exit_logits["final"]
    q = torch.exp(log_softmax(final / T)).detach()
    exits = [z for k, z in exit_logits.items() if k != "final"]
    total = -log_softmax(final).gather(1, labels[:, None]).mean()
    for z in exits:
        ce = -log_softmax(z).gather(1, labels[:, None]).mean()
        kl = (q * (torch.log(q) - log_softmax(z / T))).sum(1).mean()
        total = total + (1 - alpha) * ce + alpha * T ** 2 * kl
    return total


def test_deep_supervision_check_accepts_reference_and_an_independent_version(capsys):
    assert lab4.check_deep_supervision_loss(recipe.deep_supervision_loss)
    assert lab4.check_deep_supervision_loss(_ds_by_hand)
    assert capsys.readouterr().out.count("✓") == 2


@pytest.mark.parametrize("name", sorted(lab4.DS_LOSS_VARIANTS))
def test_deep_supervision_check_rejects_each_variant_with_its_hint(name):
    fn, hint = lab4.DS_LOSS_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab4.check_deep_supervision_loss(fn)
    assert hint in str(err.value)


def test_deep_supervision_value_variants_that_only_change_gradients_are_told_apart():
    # the detach variants have the reference's value: only the gradient comparison names them
    logits, labels, T, alpha = lab4._ds_case(1)
    for name in ("final_not_detached", "exit_detached"):
        a = lab4.DS_LOSS_VARIANTS[name][0](logits, labels, T=T, alpha=alpha)
        assert torch.allclose(a, recipe.deep_supervision_loss(logits, labels, T=T, alpha=alpha))


def test_deep_supervision_check_names_an_in_place_change():
    def pops(exit_logits, labels, T=3.0, alpha=0.5):
        final = exit_logits.pop("final")
        return recipe.deep_supervision_loss({**exit_logits, "final": final}, labels, T=T, alpha=alpha)

    def divides_in_place(exit_logits, labels, T=3.0, alpha=0.5):
        out = recipe.deep_supervision_loss(exit_logits, labels, T=T, alpha=alpha)
        with torch.no_grad():
            exit_logits["final"].div_(T)
        return out

    for fn in (pops, divides_in_place):
        with pytest.raises(CheckFailed, match="in place"):
            lab4.check_deep_supervision_loss(fn)


def test_deep_supervision_check_reports_a_crash_and_passes_not_implemented():
    with pytest.raises(CheckFailed, match="raised KeyError"):
        lab4.check_deep_supervision_loss(lambda exit_logits, labels, T=3.0, alpha=0.5: exit_logits["head"])

    def stub(exit_logits, labels, T=3.0, alpha=0.5):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        lab4.check_deep_supervision_loss(stub)


def test_reference_deep_supervision_loss_equals_the_package_objective():
    torch.manual_seed(0)
    model = DeepSupervision(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)), exits=("1", "2"),
                            example_input=(1, 3, 8, 8))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    batch = type("B", (), {"x": x, "labels": y})()
    from kdcourse.train import TrainState
    ref = ExitDistillation(T=2.0, alpha=0.3)(model, batch, TrainState()).loss
    mine = recipe.ExitLoss(T=2.0, alpha=0.3)(model, batch, TrainState()).loss
    assert torch.allclose(ref, mine, rtol=1e-6)


def _tuned_sorted(new_model, train, val_acc, candidates, generations=3, alpha=0.5):
    # correct, written another way: candidates visited in sorted order, all networks made first
    gens, chosen = [new_model()], []
    train(gens[0], Objective())
    for _ in range(generations - 1):
        temps = sorted(candidates)
        nets = [new_model() for _ in temps]
        for T, net in zip(temps, nets):
            train(net, Distill(gens[-1], T=T, alpha=alpha))
        scores = [val_acc(n) for n in nets]
        i = max(range(len(nets)), key=scores.__getitem__)
        gens.append(nets[i])
        chosen.append(temps[i])
    return tuple(gens), tuple(chosen)


def test_born_again_tuned_check_accepts_reference_and_an_independent_version(capsys):
    assert lab4.check_born_again_tuned(recipe.born_again_tuned)
    assert lab4.check_born_again_tuned(_tuned_sorted)
    assert capsys.readouterr().out.count("✓") == 2


@pytest.mark.parametrize("name", sorted(lab4.TUNED_VARIANTS))
def test_born_again_tuned_check_rejects_each_variant_with_its_hint(name):
    fn, hint = lab4.TUNED_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab4.check_born_again_tuned(fn)
    assert hint in str(err.value)


def test_born_again_tuned_check_reports_a_wrong_return():
    with pytest.raises(CheckFailed, match="not a pair"):
        lab4.check_born_again_tuned(lambda new_model, train, val_acc, candidates, generations=3, alpha=0.5:
                                    recipe.born_again_tuned(new_model, train, val_acc, candidates, generations, alpha)[0])


def _turn_other_way(peers, optimizers, x, labels, loss_fn, T=1.0, alpha=0.5):
    # correct, written another way: every peer's targets under no_grad first, the learner recomputed
    for k, opt in enumerate(optimizers):
        with torch.no_grad():
            logits = [p(x) for p in peers]
        logits[k] = peers[k](x)
        opt.zero_grad(set_to_none=False)
        loss_fn(logits, labels, T=T, alpha=alpha).backward()
        opt.step()


def test_mutual_step_check_accepts_reference_and_an_independent_version(capsys):
    assert lab4.check_mutual_step_in_turn(recipe.mutual_step_in_turn)
    assert lab4.check_mutual_step_in_turn(_turn_other_way)
    assert capsys.readouterr().out.count("✓") == 2


@pytest.mark.parametrize("name", sorted(lab4.TURN_VARIANTS))
def test_mutual_step_check_rejects_each_variant_with_its_hint(name):
    fn, hint = lab4.TURN_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab4.check_mutual_step_in_turn(fn)
    assert hint in str(err.value)


def test_mutual_step_in_turn_matches_a_hand_derivation():
    # two linear peers, plain SGD: peer 1 steps on its own loss, then peer 2 against the *updated* peer 1
    torch.manual_seed(3)
    a, b = nn.Linear(3, 4).double(), nn.Linear(3, 4).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 4, (5,))
    lr, T, alpha = 0.7, 2.0, 0.4

    def own_loss(z, other):
        q = F.softmax(other / T, 1)
        kl = (q * (q.log() - F.log_softmax(z / T, 1))).sum(1).mean()
        return (1 - alpha) * F.cross_entropy(z, y) + alpha * T * T * kl

    wa = [p.detach().clone() for p in a.parameters()]
    wb = [p.detach().clone() for p in b.parameters()]
    fa = lambda w: x @ w[0].T + w[1]  # noqa: E731
    wa_req = [w.clone().requires_grad_(True) for w in wa]
    ga = torch.autograd.grad(own_loss(fa(wa_req), fa(wb)), wa_req)
    wa_new = [w - lr * g for w, g in zip(wa, ga)]
    wb_req = [w.clone().requires_grad_(True) for w in wb]
    gb = torch.autograd.grad(own_loss(fa(wb_req), fa(wa_new)), wb_req)
    wb_new = [w - lr * g for w, g in zip(wb, gb)]

    opts = [torch.optim.SGD(a.parameters(), lr=lr), torch.optim.SGD(b.parameters(), lr=lr)]
    recipe.mutual_step_in_turn([a, b], opts, x, y, mutual_learning_loss, T=T, alpha=alpha)
    for p, w in zip(list(a.parameters()) + list(b.parameters()), wa_new + wb_new):
        assert torch.allclose(p.detach(), w, atol=1e-12)


# ---- minimal detectable difference ------------------------------------------------------------

def _t_cdf(t, dof, steps=20000):
    # Student's t CDF by Simpson's rule on the density (an independent oracle for the table)
    c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
    pdf = lambda u: c * (1 + u * u / dof) ** (-(dof + 1) / 2)  # noqa: E731
    h = t / steps
    s = pdf(0) + pdf(t) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
    return 0.5 + s * h / 3


@pytest.mark.parametrize("dof", sorted(recipe.T_975))
def test_t_table_is_the_975_quantile(dof):
    assert abs(_t_cdf(recipe.t_critical(dof), dof) - 0.975) < 2e-4


def test_mdd_is_where_welch_t_reaches_the_threshold():
    s, n = 0.012, 3
    for t in (2.0, None):
        mdd = recipe.minimal_detectable_difference(s, n, t=t)
        a = runs.Summary("a", 0.8 + mdd, s, n, ())
        b = runs.Summary("b", 0.8, s, n, ())
        assert runs.welch_t(a, b)[0] == pytest.approx(2.0 if t else recipe.t_critical(2 * n - 2), rel=1e-9)
    assert "1.96 points at the lab's rule" in recipe.mdd_line(0.012, 3) and "(t = 2.776, 4 d.o.f.)" in recipe.mdd_line(0.012, 3)


def test_mdd_rejects_bad_input():
    with pytest.raises(ValueError, match="n must be"):
        recipe.minimal_detectable_difference(0.01, 1)
    with pytest.raises(ValueError, match="spread"):
        recipe.minimal_detectable_difference(-0.01, 3)
    with pytest.raises(ValueError, match="dof"):
        recipe.t_critical(0)


def test_side_by_side_marks_what_a_column_did_not_run():
    s = runs.summary_of("x", [0.5, 0.52])
    t = recipe.side_by_side({"clean": [runs.compare_row(s, s, "scratch"), runs.compare_row(s, s, "only clean")],
                             "noisy": [runs.compare_row(s, s, "scratch")]})
    assert [r["method"] for r in t] == ["scratch", "only clean"]
    assert t[1]["noisy: test acc (%)"] == "not run" and t[0]["noisy: reading"] == "baseline"


# ---- the runners the notebook calls with the student's functions ------------------------------

from kdcourse import data as D  # noqa: E402

SPEC = {"arch": "cnn", "widths": (4, 8, 8)}


@pytest.fixture(scope="module")
def tiny():
    return D.shapes(96, 32, 48, seed=5)


def test_run_born_again_tuned_reuses_generation_1_and_chooses_on_validation(tiny):
    kw = dict(epochs=1, lr=1e-2, progress=False)
    scratch = runs.train_run("scratch", SPEC, tiny, seed=0, keep_model=True, **kw)
    seen = []

    def loop(new_model, train, val_acc, candidates, generations=3, alpha=0.5):
        out = recipe.born_again_tuned(new_model, train, val_acc, candidates, generations, alpha)
        seen.append(val_acc(out[0][0]))
        return out

    temps, rows = recipe.run_born_again_tuned(SPEC, tiny, candidates=(1.0, 4.0), generations=3, alpha=0.5, seed=0,
                                              loop=loop, reuse=scratch, **kw)
    assert len(temps) == 2 and [r["generation"] for r in rows] == [2, 2, 3, 3]
    assert seen[0] == pytest.approx(scratch.val_acc)  # generation 1 is the scratch run, copied
    for g, T in zip((2, 3), temps):  # the kept T has the best validation accuracy of its generation
        best = max((r for r in rows if r["generation"] == g), key=lambda r: r["val_acc"])
        assert best["T"] == T
    assert all(0 <= r["entropy_bits"] <= 3.33 for r in rows)


def test_run_mutual_in_turn_trains_every_seed_and_starts_peer_1_like_scratch(tiny):
    res = recipe.run_mutual_in_turn(SPEC, tiny, seeds=(0, 1), peers=2, epochs=1, lr=1e-2)
    assert len(res.peer_acc) == 2 and all(len(a) == 2 for a in res.peer_acc)
    assert res.mean_peer().n == 2 and 0 <= res.ensemble().mean <= 1
    # with a step that changes nothing, peer 1 keeps the initial weights of the seed's scratch network
    from kdcourse import runtime
    idle = recipe.run_mutual_in_turn(SPEC, tiny, seeds=(1,), peers=2, epochs=1, lr=1e-2, step=lambda *a, **k: None)
    runtime.seed_everything(1)
    first = models.build(SPEC, tiny.num_classes)
    for k, v in first.state_dict().items():
        assert torch.equal(v, idle.runs[0].model[0].state_dict()[k].cpu())
    with pytest.raises(ValueError, match="peers must be"):
        recipe.run_mutual_in_turn(SPEC, tiny, seeds=(0,), peers=1, epochs=1, lr=1e-2)


def test_run_deep_supervision_with_the_reference_loss_equals_exit_distillation(tiny):
    kw = dict(seeds=(0,), epochs=1, lr=1e-2, T=2.0, alpha=0.5, progress=False)
    a = recipe.run_deep_supervision(SPEC, tiny, **kw)
    b = recipe.run_deep_supervision(SPEC, tiny, loss=recipe.deep_supervision_loss, **kw)
    assert a.acc["final"] == pytest.approx(b.acc["final"], abs=1.5 / len(tiny.test))


# --------------------------------------------------------------------------
# The minimal detectable difference and the ensemble's averages
# --------------------------------------------------------------------------

from kdcourse.checks import lab4_ensemble  # noqa: E402


def _mdd_statistics(values, t=2.0):
    import statistics
    return t * statistics.stdev(values) * math.sqrt(2 / len(values))


def _mdd_numpy(values, t=2.0):
    import numpy as np
    return np.float64(t * np.std(np.asarray(values), ddof=1) * np.sqrt(2.0 / len(values)))  # a NumPy number


def _mdd_loop(values, t=2.0):
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return torch.tensor(t * (var * 2 / n) ** 0.5)  # a 0-dim tensor


@pytest.mark.parametrize("fn", [_mdd_statistics, _mdd_numpy, _mdd_loop, lab4_ensemble.reference_mdd])
def test_mdd_check_accepts_correct_ways(fn, capsys):
    assert lab4.check_mdd(fn)
    assert "✓" in capsys.readouterr().out


def test_mdd_reference_matches_the_package_and_a_float64_oracle():
    from kdcourse.recipes import lab4 as sd
    values = [0.71, 0.74, 0.69, 0.73]
    mean = sum(values) / 4
    oracle = 2.0 * math.sqrt(sum((v - mean) ** 2 for v in values) / 3) * math.sqrt(2 / 4)
    assert lab4_ensemble.reference_mdd(values) == pytest.approx(oracle, rel=1e-12)
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert sd.minimal_detectable_difference(s, 4, t=2.0) == pytest.approx(oracle, rel=1e-12)


@pytest.mark.parametrize("name", sorted(lab4_ensemble.MDD_VARIANTS))
def test_mdd_check_rejects_each_variant_with_its_hint(name):
    fn, hint = lab4_ensemble.MDD_VARIANTS[name]
    with pytest.raises(CheckFailed) as exc:
        lab4.check_mdd(fn)
    assert hint in str(exc.value)


def _ensemble_loop(member_logits, mode="logits", T=1.0):
    if mode == "logits":
        return sum(member_logits) / len(member_logits)
    log_p = [F.log_softmax(z / T, dim=1) for z in member_logits]
    top = torch.stack(log_p).max(0).values  # a manual log-sum-exp
    return T * (top + torch.log(sum(torch.exp(a - top) for a in log_p) / len(log_p)))


def _ensemble_shifted(member_logits, mode="logits", T=1.0):
    """Right up to a constant per row (no - log K): the same probabilities."""
    z = torch.stack(member_logits)
    if mode == "logits":
        return z.mean(0) + 3.0
    return T * torch.logsumexp(F.log_softmax(z / T, -1), dim=0)


@pytest.mark.parametrize("fn", [_ensemble_loop, _ensemble_shifted, lab4_ensemble.reference_ensemble_logits])
def test_ensemble_check_accepts_correct_ways(fn, capsys):
    assert lab4.check_ensemble_logits(fn)
    assert "✓" in capsys.readouterr().out


def test_ensemble_reference_matches_the_package_and_a_float64_oracle():
    from kdcourse.losses.mutual import average_logits, average_probs_as_logits
    g = torch.Generator().manual_seed(3)
    members = [torch.randn(4, 6, generator=g, dtype=torch.float64) * 3 for _ in range(3)]
    for T in (1.0, 2.5):
        mean_p = sum(torch.softmax(z / T, -1) for z in members) / 3  # the arithmetic mean, directly
        got = lab4_ensemble.reference_ensemble_logits(members, mode="probs", T=T)
        assert torch.allclose(torch.softmax(got / T, -1), mean_p, rtol=1e-12, atol=1e-15)
        assert torch.allclose(got, average_probs_as_logits(members, T=T), rtol=1e-12, atol=1e-12)
    assert torch.equal(lab4_ensemble.reference_ensemble_logits(members), average_logits(members))


@pytest.mark.parametrize("name", sorted(lab4_ensemble.ENSEMBLE_VARIANTS))
def test_ensemble_check_rejects_each_variant_with_its_hint(name):
    fn, hint = lab4_ensemble.ENSEMBLE_VARIANTS[name]
    with pytest.raises(CheckFailed) as exc:
        lab4.check_ensemble_logits(fn)
    assert hint in str(exc.value)


def test_ensemble_check_names_an_in_place_change():
    def in_place(member_logits, mode="logits", T=1.0):
        for z in member_logits:
            z.data /= T
        return lab4_ensemble.reference_ensemble_logits([z * T for z in member_logits], mode=mode, T=T)

    with pytest.raises(CheckFailed, match="in place"):
        lab4.check_ensemble_logits(in_place)


def test_averaged_ensemble_as_a_model_and_a_teacher():
    from kdcourse.models.heads import EnsembleTeacher
    from kdcourse.recipes import lab4 as sd
    torch.manual_seed(0)
    members = [nn.Linear(5, 3).double() for _ in range(3)]
    x = torch.randn(4, 5, dtype=torch.float64)
    for mode in ("logits", "probs"):
        ours = sd.Averaged(members, lab4_ensemble.reference_ensemble_logits, mode=mode, T=2.0)
        assert torch.allclose(ours(x), EnsembleTeacher(members, mode=mode, T=2.0)(x), atol=1e-12)
    obj = sd.ensemble_distill(members, mode="probs", T=2.0, average=lab4_ensemble.reference_ensemble_logits)
    assert isinstance(obj.teacher, sd.Averaged)
    with pytest.raises(ValueError, match="mode"):
        sd.Averaged(members, lab4_ensemble.reference_ensemble_logits, mode="median")


def _paired_numpy(a, b):
    import numpy as np
    d = np.asarray(a) - np.asarray(b)
    sd = d.std(ddof=1)
    if sd == 0:
        return np.sign(d.mean()) * np.inf if d.mean() else 0.0
    return d.mean() / sd * np.sqrt(len(d))  # a NumPy number


@pytest.mark.parametrize("fn", [_paired_numpy, lab4_ensemble.reference_paired_t])
def test_paired_t_accepts_correct_ways(fn, capsys):
    assert lab4.check_paired_t(fn)
    assert "✓" in capsys.readouterr().out


def test_paired_t_reference_against_an_oracle():
    a, b = [0.70, 0.74, 0.71], [0.69, 0.72, 0.71]
    d = [0.01, 0.02, 0.0]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert lab4_ensemble.reference_paired_t(a, b) == pytest.approx(mean / (sd / math.sqrt(3)), rel=1e-9)
    assert lab4_ensemble.reference_paired_t([0.5, 0.75], [0.25, 0.5]) == math.inf
    assert lab4_ensemble.reference_paired_t([0.5, 0.75], [0.5, 0.75]) == 0.0


@pytest.mark.parametrize("name", sorted(lab4_ensemble.PAIRED_VARIANTS))
def test_paired_t_rejects_each_variant_with_its_hint(name):
    fn, hint = lab4_ensemble.PAIRED_VARIANTS[name]
    with pytest.raises(CheckFailed) as exc:
        lab4.check_paired_t(fn)
    assert hint in str(exc.value)
