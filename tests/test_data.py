import pickle

import numpy as np
import pytest
import torch

from kdcourse import data as D
from kdcourse import profiles


def test_shapes_deterministic_and_balanced():
    a, ya = D.make_shapes(300, seed=5)
    b, yb = D.make_shapes(300, seed=5)
    c, _ = D.make_shapes(300, seed=6)
    assert a.dtype == np.uint8 and a.shape == (300, 3, 32, 32)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert not np.array_equal(a, c)
    counts = np.bincount(ya, minlength=10)
    assert counts.min() > 10 and len(counts) == 10


def test_splits_are_distinct_and_normalised():
    data = D.shapes(64, 32, 32, seed=0)
    assert len(data.train) == 64 and len(data.val) == 32 and len(data.test) == 32
    assert not torch.equal(data.train.images[:32], data.test.images)
    assert abs(float(data.train.images.mean())) < 1.5
    assert data.classes == D.SHAPE_CLASSES


def test_batches_carry_indices_aligned_under_shuffling():
    data = D.shapes(100, 10, 10)
    seen = []
    for b in data.train.batches(16, shuffle=True, generator=torch.Generator().manual_seed(1)):
        assert torch.equal(b.x, data.train.images[b.index])
        assert torch.equal(b.labels, data.train.labels[b.index])
        seen.append(b.index)
    seen = torch.cat(seen)
    assert sorted(seen.tolist()) == list(range(100)) and seen.tolist() != list(range(100))


def test_augment_changes_pixels_not_labels_and_is_seeded():
    x = torch.randn(8, 3, 32, 32)
    a = D.augment_batch(x, torch.Generator().manual_seed(0))
    b = D.augment_batch(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        next(D.shapes(10, 5, 5).train.batches(0))
    with pytest.raises(ValueError, match="n must"):
        D.make_shapes(0, 1)


def _write_fake_cifar(root, n_train_per_batch=20, n_test=30):
    """Files in CIFAR-10's python on-disk format (what torchvision reads)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n_train_per_batch, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n_train_per_batch).tolist()}, f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                     "labels": rng.integers(0, 10, n_test).tolist()}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(D.CIFAR10_CLASSES)}, f)


def test_cifar10_loads_from_torchvision_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    _write_fake_cifar(tmp_path)
    # Our files have the real format but not the real MD5 sums.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    data = D.cifar10(str(tmp_path), n_val=10)
    assert len(data.train) == 90 and len(data.val) == 10 and len(data.test) == 30
    assert data.classes == D.CIFAR10_CLASSES and data.train.images.dtype == torch.uint8
    b = next(data.train.batches(7))
    assert b.x.dtype == torch.float32 and b.x.shape == (7, 3, 32, 32)


def test_cifar10_missing_gives_clear_message(tmp_path):
    with pytest.raises(D.DatasetUnavailable, match="KDCOURSE_PROFILE=laptop"):
        D.cifar10(str(tmp_path / "nowhere"))


def test_profiles_and_env_override(monkeypatch):
    assert profiles.get_profile().name == "laptop"
    monkeypatch.setenv("KDCOURSE_PROFILE", "smoke")
    assert profiles.get_profile().name == "smoke"
    assert profiles.get_profile("full").dataset == "cifar10"
    with pytest.raises(ValueError, match="profile='huge'"):
        profiles.get_profile("huge")
    with pytest.raises(ValueError, match="unknown override"):
        profiles.get_profile("smoke", epochz=3)
    assert profiles.get_profile("smoke", seeds=(0,)).seeds == (0,)
