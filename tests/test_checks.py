"""Each check accepts the reference and rejects each known-wrong variant with
the right hint."""
import pytest
import torch
import torch.nn.functional as F

from kdcourse import checks
from kdcourse.losses import kd_loss, soft_targets


def test_checks_accept_reference(capsys):
    assert checks.check_soft_targets(soft_targets)
    assert checks.check_kd_loss(kd_loss)
    assert "✓" in capsys.readouterr().out


def test_checks_accept_an_independent_correct_version():
    def my_kd(s, t, y, T=4.0, alpha=0.9):
        p_t = torch.softmax(t / T, dim=1)
        log_p_s = torch.log_softmax(s / T, dim=1)
        kl = (p_t * (torch.log(p_t) - log_p_s)).sum(1).mean()
        return alpha * T ** 2 * kl + (1 - alpha) * F.cross_entropy(s, y)

    assert checks.check_kd_loss(my_kd)


@pytest.mark.parametrize("name", sorted(checks.KD_LOSS_VARIANTS))
def test_kd_check_rejects_each_wrong_variant_with_its_hint(name):
    fn, hint = checks.KD_LOSS_VARIANTS[name]
    with pytest.raises(checks.CheckFailed) as err:
        checks.check_kd_loss(fn)
    assert hint in str(err.value)


def test_kd_hints_name_the_mistake_in_words():
    fn, _ = checks.KD_LOSS_VARIANTS["no_T2"]
    with pytest.raises(checks.CheckFailed, match="T²"):
        checks.check_kd_loss(fn)
    fn, _ = checks.KD_LOSS_VARIANTS["mean"]
    with pytest.raises(checks.CheckFailed, match="batchmean"):
        checks.check_kd_loss(fn)
    fn, _ = checks.KD_LOSS_VARIANTS["softmax_input"]
    with pytest.raises(checks.CheckFailed, match="log"):
        checks.check_kd_loss(fn)


def test_kd_check_rejects_a_loss_with_no_gradient():
    def detached(s, t, y, T=4.0, alpha=0.9):
        return kd_loss(s.detach(), t, y, T=T, alpha=alpha).requires_grad_(True)

    with pytest.raises(checks.CheckFailed, match="gradient"):
        checks.check_kd_loss(detached)


def test_kd_check_reports_unknown_mistakes_with_numbers():
    with pytest.raises(checks.CheckFailed, match="differs from the reference"):
        checks.check_kd_loss(lambda s, t, y, T=4.0, alpha=0.9: kd_loss(s, t, y, T=T, alpha=alpha) * 1.37)


def test_kd_check_reports_crashes_and_passes_not_implemented():
    def stub(s, t, y, T=4.0, alpha=0.9):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        checks.check_kd_loss(stub)
    with pytest.raises(checks.CheckFailed, match="raised TypeError"):
        checks.check_kd_loss(lambda s, t, y: s)


@pytest.mark.parametrize("variant,word", [
    (lambda z, T: F.softmax(z, -1), "ignored"),
    (lambda z, T: F.softmax(z * T, -1), "divided"),
    (lambda z, T: F.log_softmax(z / T, -1), "log-softmax"),
    (lambda z, T: F.softmax(z / T, 0), "dim"),
    (lambda z, T: torch.exp(z / T) / torch.exp(z / T).sum(-1, keepdim=True), "overflow"),
])
def test_soft_targets_check_rejects_variants(variant, word):
    with pytest.raises(checks.CheckFailed, match=word):
        checks.check_soft_targets(variant)
