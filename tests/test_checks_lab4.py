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
