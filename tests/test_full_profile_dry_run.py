"""A dry run of every lab through the ``full`` profile's code path, on a CPU.

The ``full`` profile reads CIFAR-10 from disk (``dataset="cifar10"``), trains
students with augmentation (so distillation runs the teacher live, no logit
cache), and sizes Labs 2-4 by their ``full`` settings. Here CIFAR-10 is a few
images written in CIFAR's own on-disk format, and sizes and epochs are
overridden to tiny, so the code a GPU run would execute is executed in CI.

Every size a lab reads from its ``full`` settings is overridden through the
profile (``extra["lab2"]``, ``["lab3"]``, ``["lab6"]``, ``["synthesis"]``;
Labs 1, 4 and 5 size themselves from the profile's own fields): one that the
overrides miss runs at GPU size on the CPU (Lab 6's full synthesis alone is
5,000 images x 1,000 steps), so the child reports each test's duration and
pytest's faulthandler dumps the stack of any test still running after
``STUCK_S`` seconds.

The lab tests run in a process of their own (``test_dry_run_in_its_own_process``
starts pytest on this file with ``KDCOURSE_DRY_RUN_CHILD=1``): in the whole
suite's process, after the deployment tests have compiled models with
Inductor, the full path's first backward pass crashed the interpreter
(segmentation fault), taking every later test with it.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcourse import data, datafree, deploy, profiles, runs, zoo
from kdcourse.distill import Distill
from kdcourse.recipes import lab2, lab3, lab4, lab6

CHILD = os.environ.get("KDCOURSE_DRY_RUN_CHILD") == "1"
child_only = pytest.mark.skipif(not CHILD, reason="runs in its own process: see test_dry_run_in_its_own_process")
LAB_TESTS = 6
STUCK_S = 120  # no lab test here needs more than seconds; one still running after this has met a full-size setting
LIMIT_S = 600  # the whole child process (about 20 s on two idle cores)


@pytest.mark.skipif(CHILD, reason="the child process runs the lab tests themselves")
def test_dry_run_in_its_own_process(tmp_path):
    env = dict(os.environ, KDCOURSE_DRY_RUN_CHILD="1", KDCOURSE_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
           "-o", f"faulthandler_timeout={STUCK_S}", str(Path(__file__))]
    try:
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                              timeout=LIMIT_S)
    except subprocess.TimeoutExpired as exc:
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr))
        pytest.fail(f"the full-profile dry run took over {LIMIT_S} s (a lab setting the tiny overrides miss?):\n"
                    f"{out[-6000:]}", pytrace=False)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert f"{LAB_TESTS} passed" in proc.stdout, tail


TINY_IMAGE = dict(teacher={"arch": "resnet", "depth": 8, "width": 4}, student={"arch": "cnn", "widths": (4, 4, 4)},
                  n_val=16, n_test=24, teacher_epochs=1, student_epochs=1, batch_size=16, seeds=(0,))


def write_cifar(root, per_batch=12, n_test=24):
    """CIFAR-10's python format: five pickled training batches, a test batch, the meta file."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(data.CIFAR10_CLASSES)}, f)


@pytest.fixture
def full(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    write_cifar(tmp_path / "data")
    monkeypatch.setenv("KDCOURSE_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # our files are not the real ones
    lab3_tiny = dict(n_teacher_train=64, n_train=32, n_val=16, n_test=16, n_general=32,
                     teacher=profiles.BertSpec(2, 16, 2, 32), student=profiles.BertSpec(1, 8, 2, 16),
                     teacher_epochs=1, student_epochs=1, general_epochs=1, progressive_epochs=1, batch_size=16,
                     teacher_batch_size=16)
    lab2_tiny = dict(epochs=1, batch_size=16, crd_k=8, det_train=16, det_test=8, det_epochs=1, det_teacher_epochs=1)
    lab6_tiny = dict(n_transfer=8, epochs=1, patience=2)
    synthesis_tiny = dict(n_images=10, batch_size=10, steps=2)
    prof = profiles.get_profile("full", **TINY_IMAGE, extra={"lab3": lab3_tiny, "lab2": lab2_tiny, "lab6": lab6_tiny,
                                                            "synthesis": synthesis_tiny})
    assert prof.name == "full" and prof.dataset == "cifar10" and prof.augment_student
    return prof


@child_only
def test_lab1_full_path_cifar_teacher_and_live_distillation(full):
    ds = data.load(full)
    assert ds.name == "cifar10" and len(ds.val) == 16 and len(ds.test) == 24 and ds.train.images.dtype == torch.uint8
    teacher, info = zoo.teacher(full, ds, progress=False)
    assert not info["from_cache"] and 0 <= info["test_acc"] <= 1
    again, info2 = zoo.teacher(full, ds, progress=False)
    assert info2["from_cache"]
    train = ds.train.with_augment(full.augment_student)
    obj = Distill(teacher, T=4.0, alpha=0.9)
    run = runs.train_run("KD", full.student, ds, objective=lambda: obj, epochs=full.student_epochs, lr=full.lr,
                         batch_size=full.batch_size, train=train, progress=False)
    assert obj._cached is None  # augmented split: the teacher ran live on every batch
    assert 0 <= run.test_acc <= 1 and run.history[0]["kd"] > 0


@child_only
def test_lab2_full_path_every_method(full):
    cfg = profiles.lab2_settings(full)
    assert cfg.crd_k == 8 and cfg.n_train is None
    ds = data.load(full)
    teacher, _ = zoo.teacher(full, ds, progress=False)
    for method in lab2.LAB2_METHODS:
        make = lab2.lab2_objective(method, teacher, cfg.weights, crd_k=cfg.crd_k)
        run = runs.train_run(method, full.student, ds, objective=make, epochs=cfg.epochs, lr=full.lr,
                             batch_size=cfg.batch_size, progress=False)
        assert np.isfinite(run.history[0]["loss"]), method


@child_only
def test_lab3_full_path_bert_teacher_and_recipes(full):
    cfg = lab3.lab_config(full)
    assert cfg.teacher.layers == 2 and cfg.T == profiles.LAB3["full"].T  # tiny sizes, the full run's KD settings
    ds = lab3.load_data(full)
    teacher, info = lab3.teacher_model(full, ds, progress=False)
    assert not info["from_cache"] and lab3.teacher_model(full, ds, progress=False)[1]["from_cache"]
    results = lab3.compare(teacher, ds, cfg, full.seeds, progress=False)
    assert set(results) == set(lab3.RECIPES) and all(0 <= r[0].test_acc <= 1 for r in results.values())


@child_only
def test_lab4_full_path_settings_and_runners(full):
    lab = profiles.lab4_settings(full)
    assert lab.network == full.student and lab.epochs == full.student_epochs and 8.0 in lab.sweep_T
    ds = lab4.lab_data(full)
    assert ds.name == "cifar10"
    res = lab4.run_born_again(lab.network, ds, seeds=full.seeds, temperatures=(2.0,), alpha=lab.alpha, epochs=1,
                              lr=lab.lr, batch_size=full.batch_size, progress=False)
    assert len(res.table_rows()) == 3
    mutual = lab4.run_mutual(lab.network, ds, seeds=full.seeds, epochs=1, lr=lab.lr, batch_size=full.batch_size,
                             progress=False)
    assert len(mutual.peer_acc[0]) == 2


@child_only
def test_lab5_full_path_measures_a_cifar_student(full):
    ds = data.load(full)
    student = runs.train_run("s", full.student, ds, epochs=1, lr=full.lr, batch_size=full.batch_size,
                             keep_model=True, progress=False).model
    example = next(ds.test.batches(4)).x
    lat = deploy.measure_latency(student, example, runs=3, warmup=1, threads=1)
    assert lat.p50_ms > 0 and lat.batch_size == 4
    assert deploy.count_macs(student, example) > 0 and deploy.size_mb(student) > 0
    assert deploy.agreement(deploy.predict(student, ds.test), deploy.predict(student, ds.test)) == 1.0


@child_only
def test_lab6_full_path_synthesis_transfer_sets_and_patience(full):
    lab, synth_cfg = lab6.settings_for(full), datafree.settings_for(full)
    assert (lab.n_transfer, synth_cfg.steps) == (8, 2)  # the overrides reach both; the rest is the full settings
    assert synth_cfg.lr == datafree.settings_for(profiles.get_profile("full")).lr
    ds = data.load(full)
    teacher, _ = zoo.teacher(full, ds, progress=False)
    synth, info = datafree.synthesized_set(teacher, ds, synth_cfg)
    assert len(synth) == 10 and not info["from_cache"] and datafree.synthesized_set(teacher, ds, synth_cfg)[1]["from_cache"]
    assert synth.images.shape[1:] == ds.train.images.shape[1:]
    sets = lab6.transfer_sets(ds, teacher, lab.n_transfer, synthesized=synth, alpha=lab.alpha)
    results = lab6.compare_transfer_sets(teacher, ds, sets, build=full.student, seeds=full.seeds, epochs=lab.epochs,
                                         lr=full.lr, T=lab.T, batch_size=full.batch_size, progress=False)
    assert set(results) == set(sets) and all(0 <= r[0].test_acc <= 1 for r in results.values())
    pc = lab6.patient_and_consistent(teacher, ds, sets[lab6.REAL].split, build=full.student, epochs=lab.epochs,
                                     patience=lab.patience, lr=full.lr, T=lab.T, alpha=lab.alpha,
                                     batch_size=full.batch_size, progress=False)
    assert pc["epochs"]["patient"] == 2 and all(0 <= r.test_acc <= 1 for r in pc["runs"].values())
