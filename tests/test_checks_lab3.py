"""Lab 3 checks accept the reference (and independent correct versions) and
reject each known-wrong variant with its hint."""
import pytest
import torch
import torch.nn.functional as F

from kdcourse.checks import CheckFailed
from kdcourse.checks import lab3
from kdcourse.losses import transformer as tl


def test_checks_accept_the_reference(capsys):
    assert lab3.check_layer_map(tl.uniform_layer_map)
    assert lab3.check_hidden_loss(tl.hidden_state_loss)
    assert lab3.check_attention_loss(tl.attention_kl)
    assert capsys.readouterr().out.count("✓") == 3


def test_checks_accept_independent_correct_versions():
    def my_map(n_s, n_t):
        out, i = [], 1
        while i <= n_s:
            out.append(int(i * n_t / n_s + 1e-9))
            i += 1
        return out

    def my_hidden(s_hs, t_hs, layer_map, projection, mask):
        sel = mask.bool()
        losses = [F.mse_loss(projection(s_hs[i])[sel], t_hs[t][sel]) for i, t in zip(range(1, len(s_hs)), layer_map)]
        return torch.stack(losses).mean()

    def my_attention(s, t, mask):
        rows = mask.bool()[:, None, :].expand(-1, s.shape[1], -1)  # (B, H, S) real query rows
        s_rows, t_rows = s[rows], t[rows]  # (N, S)
        return F.kl_div(s_rows.clamp_min(1e-12).log(), t_rows, reduction="batchmean")

    assert lab3.check_layer_map(my_map)
    assert lab3.check_hidden_loss(my_hidden)
    assert lab3.check_attention_loss(my_attention)


@pytest.mark.parametrize("name", sorted(lab3.LAYER_MAP_VARIANTS))
def test_layer_map_check_rejects_each_variant(name):
    fn, hint = lab3.LAYER_MAP_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab3.check_layer_map(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name", sorted(lab3.HIDDEN_LOSS_VARIANTS))
def test_hidden_loss_check_rejects_each_variant(name):
    fn, hint = lab3.HIDDEN_LOSS_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab3.check_hidden_loss(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name", sorted(lab3.ATTENTION_VARIANTS))
def test_attention_check_rejects_each_variant(name):
    fn, hint = lab3.ATTENTION_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab3.check_attention_loss(fn)
    assert hint in str(err.value)


def test_hints_name_the_mistakes_in_words():
    with pytest.raises(CheckFailed, match="zip"):
        lab3.check_layer_map(lambda s, t: list(range(1, s + 1)))
    with pytest.raises(CheckFailed, match=r"hidden_states\[0\] is the embedding output"):
        lab3.check_hidden_loss(lab3.HIDDEN_LOSS_VARIANTS["teacher_off_by_one"][0])
    with pytest.raises(CheckFailed, match="padded"):
        lab3.check_attention_loss(lab3.ATTENTION_VARIANTS["mask_ignored"][0])


def test_missing_projection_is_named():
    def no_proj(s_hs, t_hs, layer_map, projection, mask):
        return sum(tl.masked_mse(s_hs[i], t_hs[t], mask) for i, t in enumerate(layer_map, 1)) / len(layer_map)

    with pytest.raises(CheckFailed, match="projection"):
        lab3.check_hidden_loss(no_proj)


def test_projection_must_receive_gradients():
    def detached(s_hs, t_hs, layer_map, projection, mask):
        with torch.no_grad():
            ref = tl.hidden_state_loss(s_hs, t_hs, layer_map, projection, mask)
        return ref + 0 * sum(h.sum() for h in s_hs)

    with pytest.raises(CheckFailed, match="gradient"):
        lab3.check_hidden_loss(detached)


def test_nan_gradient_at_padded_keys_is_named():
    def where_masked(s, t, mask):
        kl = torch.where(t > 0, t * (t.log() - s.log()), torch.zeros_like(t))  # finite value, NaN gradient
        rows = mask.to(s.dtype)[:, None, :, None]
        return (kl * rows).sum() / (s.shape[1] * mask.sum())

    with pytest.raises(CheckFailed, match="gradient is NaN"):
        lab3.check_attention_loss(where_masked)


def test_bad_return_types_and_stubs():
    with pytest.raises(CheckFailed, match="list of ints"):
        lab3.check_layer_map(lambda s, t: [float(x) for x in tl.uniform_layer_map(s, t)])

    def stub(*args):
        raise NotImplementedError()

    for check in (lab3.check_layer_map, lab3.check_hidden_loss, lab3.check_attention_loss):
        with pytest.raises(NotImplementedError):
            check(stub)
    with pytest.raises(CheckFailed, match="differs from the reference"):
        lab3.check_attention_loss(lambda s, t, m: tl.attention_kl(s, t, m) * 1.5)


# --------------------------------------------------------------------------
# DistilBERT's triple loss and the two-stage recipe (kdcourse.checks.lab3_recipe)
# --------------------------------------------------------------------------

from kdcourse.checks import contract  # noqa: E402
from kdcourse.recipes import lab3_controls  # noqa: E402


def _exercise(name):
    return contract.exercise(3, name)


def _my_distilbert(s_logits, t_logits, labels, s_hidden, t_hidden, mask, T=2.0, alpha_ce=5.0, alpha_mlm=2.0,
                   alpha_cos=1.0):
    """Written another way: a loop over the masked tokens, torch.distributions for the KL."""
    kls, ces = [], []
    for b, s in (labels != -100).nonzero().tolist():
        p_t = torch.distributions.Categorical(logits=t_logits[b, s].detach() / T)
        p_s = torch.distributions.Categorical(logits=s_logits[b, s] / T)
        kls.append(torch.distributions.kl_divergence(p_t, p_s))
        ces.append(-torch.log_softmax(s_logits[b, s], -1)[labels[b, s]])
    ce = torch.stack(kls).mean() * T ** 2 if kls else s_logits.sum() * 0
    mlm = torch.stack(ces).mean() if ces else s_logits.sum() * 0
    real = mask.bool()
    cos = (1 - F.cosine_similarity(s_hidden[real], t_hidden[real], dim=-1)).mean()
    return alpha_ce * ce + alpha_mlm * mlm + alpha_cos * cos


def _my_two_stage(teacher, student, train, targets, layer_map, T, alpha):
    """Written another way: both objectives built first, defaults spelled out."""
    from kdcourse.distill.transformer import LayerDistill

    general = LayerDistill(teacher, student, layer_map=lambda n_s, n_t: layer_map, w_embedding=1.0, w_hidden=1.0,
                           w_attention=1.0, w_prediction=0, targets=targets["general"], T=5.0)
    task = LayerDistill(teacher, student, layer_map=layer_map, targets=targets["train"], T=T, alpha=alpha,
                        projections=general.projections)
    for split, objective in (("general", general), ("train", task)):
        train(student, split, objective)
    return student


def test_new_lab3_checks_accept_reference_and_other_correct_versions(capsys):
    assert lab3.check_distilbert_loss(tl.distilbert_loss)
    assert lab3.check_distilbert_loss(_my_distilbert)
    assert lab3.check_two_stage(lab3_controls.two_stage_kd)
    assert lab3.check_two_stage(_my_two_stage)
    assert capsys.readouterr().out.count("✓") == 4


@pytest.mark.parametrize("name", sorted(lab3.DISTILBERT_VARIANTS))
def test_distilbert_check_names_each_variant(name):
    fn, hint = lab3.DISTILBERT_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab3.check_distilbert_loss(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name", sorted(lab3.TWO_STAGE_VARIANTS))
def test_two_stage_check_names_each_variant(name):
    fn, hint = lab3.TWO_STAGE_VARIANTS[name]
    with pytest.raises(CheckFailed) as err:
        lab3.check_two_stage(fn)
    assert hint in str(err.value)


@pytest.mark.parametrize("name,variant", [("distilbert_loss", v) for v in sorted(lab3.DISTILBERT_VARIANTS)]
                         + [("two_stage_kd", v) for v in sorted(lab3.TWO_STAGE_VARIANTS)])
def test_grader_names_each_variant_from_plain_data(name, variant):
    ex = _exercise(name)
    seeds = ex.hidden_seeds
    student = {s: contract.run_probe(ex, ex.variants[variant][0], s) for s in seeds}
    for data in student.values():
        contract.validate(data)  # what the sandboxed kernel sends is plain data
    ref = {s: contract.run_probe(ex, ex.reference, s) for s in seeds}
    verdict = contract.diagnose_data(ex, student, ref, lambda v, s: contract.run_probe(ex, ex.variants[v][0], s))
    assert not verdict.ok and verdict.variant == variant


@pytest.mark.parametrize("name", ["distilbert_loss", "two_stage_kd"])
def test_new_probes_are_deterministic_and_reference_passes_hidden_seeds(name):
    ex = _exercise(name)
    for s in ex.hidden_seeds:
        a, b = contract.run_probe(ex, ex.reference, s), contract.run_probe(ex, ex.reference, s)
        assert contract.compare(a, b, 0, 0) is None
    assert contract.diagnose_data(ex, {s: contract.run_probe(ex, _my_distilbert if name == "distilbert_loss"
                                                             else _my_two_stage, s) for s in ex.hidden_seeds},
                                  {s: contract.run_probe(ex, ex.reference, s) for s in ex.hidden_seeds}).ok


def test_distilbert_gradient_checked_not_only_the_value():
    # the same value with the student's hidden states detached in the cosine term
    fn = lab3.DISTILBERT_VARIANTS["cos_detached"][0]
    args = contract.run_probe(_exercise("distilbert_loss"), fn, 0)
    ref = contract.run_probe(_exercise("distilbert_loss"), tl.distilbert_loss, 0)
    assert contract.compare(args["loss"], ref["loss"]) is None  # the value agrees ...
    assert contract.compare(args["grads"], ref["grads"]) is not None  # ... the gradient does not


def test_inplace_change_of_an_input_is_named():
    def scales_teacher_in_place(s, t, labels, sh, th, mask, T=2.0, **kw):
        t /= T
        return tl.distilbert_loss(s, t * T, labels, sh, th, mask, T=T, **kw)

    def scales_student_in_place(s, t, labels, sh, th, mask, T=2.0, **kw):
        s /= T
        return tl.distilbert_loss(s * T, t, labels, sh, th, mask, T=T, **kw)

    for fn in (scales_teacher_in_place, scales_student_in_place):
        with pytest.raises(CheckFailed, match="in place"):
            lab3.check_distilbert_loss(fn)


def test_two_stage_stub_and_wrong_return():
    def stub(*args):
        raise NotImplementedError()

    with pytest.raises(NotImplementedError):
        lab3.check_two_stage(stub)
    with pytest.raises(CheckFailed):
        lab3.check_two_stage(lambda teacher, student, train, targets, layer_map, T, alpha:
                             lab3_controls.two_stage_kd(teacher, student, train, targets, layer_map, T, alpha) and None)


# --------------------------------------------------------------------------
# BERT's masking
# --------------------------------------------------------------------------

from kdcourse.checks import lab3_masking  # noqa: E402


def _masking_by_loop(input_ids, vocab_size, generator, prob=0.15, mask_id=4, n_special=5):
    """Token by token, the draws in another order: a different masking, the same rules."""
    masked, labels = input_ids.clone(), torch.full_like(input_ids, -100)
    for b in range(input_ids.shape[0]):
        for i in range(input_ids.shape[1]):
            tok = int(input_ids[b, i])
            u = torch.rand(2, generator=generator)
            if tok < n_special or float(u[0]) >= prob:
                continue
            labels[b, i] = tok
            if u[1] < 0.8:
                masked[b, i] = mask_id
            elif u[1] < 0.9:
                masked[b, i] = int(torch.randint(n_special, vocab_size, (1,), generator=generator))
    return masked, labels


def _masking_package(input_ids, vocab_size, generator, prob=0.15, mask_id=4, n_special=5):
    from kdcourse.data.reviews import mask_tokens
    return mask_tokens(input_ids, vocab_size, generator, prob, mask_id, n_special)


@pytest.mark.parametrize("fn", [lab3_masking.reference_mask_tokens, _masking_package, _masking_by_loop])
def test_mask_tokens_check_accepts_correct_ways(fn, capsys):
    assert lab3.check_mask_tokens(fn)
    assert "✓" in capsys.readouterr().out


def test_mask_tokens_reference_follows_the_rules():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (200, 100), generator=g)
    ids[:, 0], ids[:, 60:] = 2, 0
    before = ids.clone()
    masked, labels = lab3_masking.reference_mask_tokens(ids, 50, torch.Generator().manual_seed(1))
    assert torch.equal(ids, before)
    picked = labels != -100
    assert not picked[:, 0].any() and not picked[:, 60:].any()
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(masked[~picked], ids[~picked])
    share = float(picked[:, 1:60].float().mean())
    assert abs(share - 0.15) < 0.01  # 11,800 words: std 0.0033
    assert abs(float((masked[picked] == 4).float().mean()) - 0.8) < 0.03
    again = lab3_masking.reference_mask_tokens(ids, 50, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)


@pytest.mark.parametrize("name", sorted(lab3_masking.MASKING_VARIANTS))
def test_mask_tokens_check_rejects_each_variant_with_its_hint(name):
    fn, hint = lab3_masking.MASKING_VARIANTS[name]
    with pytest.raises(CheckFailed) as exc:
        lab3.check_mask_tokens(fn)
    assert hint in str(exc.value)


def test_mask_tokens_check_names_an_exception():
    with pytest.raises(CheckFailed, match="ZeroDivisionError"):
        lab3.check_mask_tokens(lambda input_ids, vocab_size, generator, **kw: 1 / 0)


def test_distilbert_probe_builds_its_inputs_for_every_seed():
    # the probe once drew a vocabulary of exactly the 5 specials, so torch.randint(5, 5) raised inside the
    # kernel and a correct answer lost the exercise (seed 963647836); every seed must give the reference's data
    from kdcourse.checks import lab3_recipe

    for seed in (963647836, *range(300)):
        assert lab3_recipe.probe_distilbert_loss(tl.distilbert_loss, seed), seed
