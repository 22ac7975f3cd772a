"""Lab 6's package side: the synthesis loop and its disk cache, the transfer-set
builders and the patient-and-consistent runs (smoke-sized)."""
import os
import warnings

import pytest
import torch

from kdcourse import data, datafree, models, profiles
from kdcourse.recipes import lab6
from kdcourse.train import Distill, fit, freeze


@pytest.fixture(scope="module")
def smoke():
    profile = profiles.get_profile("smoke")
    ds = data.shapes(96, 32, 64, n_teacher_train=96)
    torch.manual_seed(0)
    teacher = models.build(profile.teacher, ds.num_classes)
    # a teacher with real running statistics: a few train-mode passes over the data
    teacher.train()
    with torch.no_grad():
        for b in ds.train.batches(32):
            teacher(b.x)
    return profile, ds, freeze(teacher)


TINY = datafree.SynthesisSettings(n_images=12, batch_size=6, steps=3, jitter=1)


def test_synthesize_is_balanced_deterministic_and_leaves_the_teacher_alone(smoke):
    _, ds, teacher = smoke
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x1, y1, losses = datafree.synthesize(teacher, ds.num_classes, TINY, progress=False)
    x2, y2, _ = datafree.synthesize(teacher, ds.num_classes, TINY, progress=False)
    assert x1.shape == (12, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.bincount(y1, minlength=10).max() - torch.bincount(y1, minlength=10).min() <= 1
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert float(x1.min()) >= -2.0 - 1e-6 and float(x1.max()) <= 2.0 + 1e-6  # clamped to valid pixels
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_synthesis_lowers_the_loss_it_optimises(smoke):
    _, ds, teacher = smoke
    s = datafree.SynthesisSettings(n_images=10, batch_size=10, steps=1, jitter=0, seed=3)
    x0, y, _ = datafree.synthesize(teacher, ds.num_classes, s, progress=False)
    x1, y1, _ = datafree.synthesize(teacher, ds.num_classes, s.replace(steps=30), progress=False)
    assert torch.equal(y, y1)
    kw = dict(bn_weight=s.bn_weight, tv_weight=s.tv_weight, l2_weight=s.l2_weight)
    from kdcourse.losses.datafree import synthesis_loss
    assert float(synthesis_loss(teacher, x1, y, **kw)) < 0.8 * float(synthesis_loss(teacher, x0, y, **kw))


def test_jitter_is_undone_exactly():
    x = torch.randn(2, 3, 5, 6)
    opt = torch.optim.Adam([x.requires_grad_(True)], lr=0.1)
    x.grad = torch.randn_like(x)
    opt.step()
    state = {k: v.clone() for k, v in opt.state[x].items()}
    before = x.detach().clone()
    for dx, dy, flip in ((2, -1, True), (-1, 2, False), (0, 0, True)):
        datafree._jitter(x, opt, dx, dy, flip)
        datafree._jitter(x, opt, dx, dy, flip, undo=True)
        assert torch.equal(x.detach(), before)
        assert all(torch.equal(state[k], v) for k, v in opt.state[x].items())
    datafree._jitter(x, opt, 1, 0, False)
    assert torch.equal(x.detach()[..., 1:], before[..., :-1])
    assert torch.equal(opt.state[x]["exp_avg"][..., 1:], state["exp_avg"][..., :-1])


def test_cache_hit_key_and_corrupt_file(smoke, tmp_path):
    _, ds, teacher = smoke
    d = str(tmp_path)
    a, info = datafree.synthesized_set(teacher, ds, TINY, directory=d, progress=False)
    assert not info["from_cache"] and os.path.exists(info["cache_path"])
    assert not [f for f in os.listdir(d) if f.startswith(".tmp")], "atomic write left a temporary file"
    b, info2 = datafree.synthesized_set(teacher, ds, TINY, directory=d, progress=False)
    assert info2["from_cache"] and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert b.classes == ds.classes and b.mean == ds.train.mean

    # the key follows the settings, the teacher's weights and the step's code
    step_key = datafree.cache_key(teacher, TINY, datafree.reference_step, ds.train)
    assert datafree.cache_key(teacher, TINY.replace(steps=4), datafree.reference_step, ds.train) != step_key
    other = freeze(models.build(profiles.get_profile("smoke").teacher, ds.num_classes))
    assert datafree.cache_key(other, TINY, datafree.reference_step, ds.train) != step_key

    def my_step(teacher, images, targets, optimizer, **kw):
        return datafree.reference_step(teacher, images, targets, optimizer, **kw)

    def my_step_edited(teacher, images, targets, optimizer, **kw):
        return 2 * datafree.reference_step(teacher, images, targets, optimizer, **kw)

    k1 = datafree.cache_key(teacher, TINY, my_step, ds.train)
    assert k1 == datafree.cache_key(teacher, TINY, my_step, ds.train)
    assert k1 != datafree.cache_key(teacher, TINY, my_step_edited, ds.train) != step_key

    # a truncated file is reported, removed and rebuilt
    path = info["cache_path"]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.warns(UserWarning, match="unusable"):
        c, info3 = datafree.synthesized_set(teacher, ds, TINY, directory=d, progress=False)
    assert not info3["from_cache"] and torch.equal(c.images, a.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert datafree.synthesized_set(teacher, ds, TINY, directory=d, progress=False)[1]["from_cache"]


def test_settings_are_validated_and_profiles_have_them():
    with pytest.raises(ValueError, match="steps"):
        datafree.SynthesisSettings(steps=0)
    with pytest.raises(ValueError, match="bn_weight"):
        datafree.SynthesisSettings(bn_weight=-1)
    for name in ("smoke", "laptop", "full"):
        p = profiles.get_profile(name)
        s, lab = datafree.settings_for(p), lab6.settings_for(p)
        assert s.n_images >= lab.n_transfer
    with pytest.raises(ValueError, match="step must be a function"):
        datafree.synthesize(None, 10, TINY, step="nope")


def test_transfer_set_builders(smoke):
    _, ds, teacher = smoke
    real = ds.train.subset(torch.arange(20))
    inv = lab6.colour_inverted(real)
    assert torch.allclose(lab6.colour_inverted(inv).images, real.images, atol=1e-5)
    lo, hi = lab6.pixel_range(real)
    pix = real.images * 0.25 + 0.5
    assert torch.allclose(inv.images * 0.25 + 0.5, 1 - pix, atol=1e-5)

    sh = lab6.shuffled_patches(real, patch=8, seed=1)
    def tiles(x):
        return x.reshape(20, 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(20, 16, -1)
    a, b = tiles(real.images), tiles(sh.images)
    for i in range(20):  # the same patches, in another order
        assert torch.equal(a[i][torch.argsort(a[i].sum(1))].sum(1), b[i][torch.argsort(b[i].sum(1))].sum(1))
    assert not torch.equal(sh.images, real.images)
    with pytest.raises(ValueError, match="patch"):
        lab6.shuffled_patches(real, patch=5)

    noise = lab6.gaussian_noise(real, 30, seed=0)
    assert noise.images.shape == (30, 3, 32, 32)
    assert bool((noise.images >= lo).all()) and bool((noise.images <= hi).all())

    synth, _ = datafree.synthesized_set(teacher, ds, TINY, progress=False)
    sets = lab6.transfer_sets(ds, teacher, 12, synthesized=synth)
    assert list(sets) == [lab6.REAL, lab6.UNLABELLED, lab6.NOISE, lab6.INVERTED, lab6.SHUFFLED, lab6.SYNTHESIZED]
    assert all(len(ts.split) == 12 for ts in sets.values())
    assert sets[lab6.REAL].alpha == 0.9 and all(ts.alpha == 1.0 for n, ts in sets.items() if n != lab6.REAL)
    assert torch.equal(sets[lab6.UNLABELLED].split.images, sets[lab6.REAL].split.images)
    with pytest.raises(ValueError, match="n_images"):
        lab6.transfer_sets(ds, teacher, 13, synthesized=synth)
    with pytest.raises(ValueError, match="n must be"):
        lab6.transfer_sets(ds, teacher, 0)


def test_cached_logits_refuse_augmented_data(smoke):
    _, ds, teacher = smoke
    student = models.build(profiles.get_profile("smoke").student, ds.num_classes)
    with pytest.raises(ValueError, match="augment"):
        fit(student, ds.train.with_augment(True), Distill(teacher, cache=True), epochs=1, progress=False)


def test_patient_and_consistent_runs_and_accounts_for_time(smoke):
    profile, ds, teacher = smoke
    train = ds.train.subset(torch.arange(40))
    out = lab6.patient_and_consistent(teacher, ds, train, build=profile.student, epochs=1, patience=2, lr=3e-3,
                                      T=4.0, alpha=0.9, progress=False)
    assert out["epochs"]["patient"] == out["epochs"]["cached, equal steps"] == 2
    assert out["epochs"]["cached, equal wall-clock"] >= 2
    assert set(out["epoch_seconds"]) == {"cached logits", "live teacher + augmentation", "teacher forward"}
    assert all(v > 0 for v in out["epoch_seconds"].values())
    assert all(0 <= r.test_acc <= 1 for r in out["runs"].values())
    with pytest.raises(ValueError, match="patience"):
        lab6.patient_and_consistent(teacher, ds, train, build=profile.student, epochs=1, patience=0, lr=3e-3,
                                    T=4.0, alpha=0.9, progress=False)
