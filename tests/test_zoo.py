import os
import warnings

import pytest
import torch

from kdcourse import data as D
from kdcourse import profiles, zoo


@pytest.fixture(scope="module")
def smoke():
    p = profiles.get_profile("smoke", teacher_epochs=1, n_train=64, n_val=32, n_test=32)
    return p, D.load(p)


def test_teacher_trained_once_then_loaded(smoke, tmp_path):
    p, data = smoke
    m1, info1 = zoo.teacher(p, data, directory=str(tmp_path), progress=False)
    assert not info1["from_cache"] and os.path.exists(info1["cache_path"])
    m2, info2 = zoo.teacher(p, data, directory=str(tmp_path), progress=False)
    assert info2["from_cache"]
    assert not m2.training and all(not q.requires_grad for q in m2.parameters())
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_key_depends_on_recipe_and_data(smoke):
    p, data = smoke
    r = zoo.recipe(p)
    assert zoo.cache_key(r, data) != zoo.cache_key(zoo.recipe(p, seed=1), data)
    assert zoo.cache_key(r, data) != zoo.cache_key(zoo.recipe(p, "overfit"), data)
    other = D.shapes(64, 32, 32, seed=9)
    assert zoo.cache_key(r, data) != zoo.cache_key(r, other)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_cache_is_detected_and_rebuilt(smoke, tmp_path, damage):
    p, data = smoke
    _, info = zoo.teacher(p, data, directory=str(tmp_path), progress=False)
    path = info["cache_path"]
    raw = open(path, "rb").read()
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw = raw[:-100] + bytes([raw[-100] ^ 0xFF]) + raw[-99:]
    else:
        raw = b"not a cache file"
    open(path, "wb").write(raw)
    with pytest.raises(zoo.CorruptCache):
        zoo.load_checked(path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, info2 = zoo.teacher(p, data, directory=str(tmp_path), progress=False)
    assert not info2["from_cache"] and any("rebuilding" in str(x.message) for x in w)
    zoo.load_checked(path)  # the rebuilt file is valid


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    class Boom(Exception):
        pass

    def bad_replace(a, b):
        raise Boom()

    monkeypatch.setattr(os, "replace", bad_replace)
    with pytest.raises(Boom):
        zoo.save_atomic({"x": torch.ones(3)}, str(tmp_path / "f.pt"))
    assert os.listdir(tmp_path) == []


def test_unknown_variant(smoke):
    with pytest.raises(ValueError, match="variant"):
        zoo.recipe(smoke[0], "giant")


def test_stored_accuracies_follow_the_evaluation_splits(tmp_path):
    from kdcourse import data as D
    from kdcourse import profiles, zoo
    from kdcourse.train import evaluate

    prof = profiles.get_profile("smoke")
    ds = D.load(prof)
    model, info = zoo.teacher(prof, ds, directory=str(tmp_path), progress=False)
    assert info["eval_splits"] == zoo.eval_fingerprint(ds)
    bigger = D.load(prof.replace(n_test=prof.n_test + 64))  # same teacher data, another test split
    assert zoo.cache_key(zoo.recipe(prof), bigger) == zoo.cache_key(zoo.recipe(prof), ds)
    again, info2 = zoo.teacher(prof, bigger, directory=str(tmp_path), progress=False)
    assert info2["from_cache"] and info2["eval_splits"] == zoo.eval_fingerprint(bigger)
    assert info2["test_acc"] == evaluate(again, bigger.test)["acc"]
    _, info3 = zoo.teacher(prof, bigger, directory=str(tmp_path), progress=False)  # stored now: no re-evaluation needed
    assert info3["eval_splits"] == info2["eval_splits"] and info3["test_acc"] == info2["test_acc"]
