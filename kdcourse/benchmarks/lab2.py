"""Lab 2 figures: what hooks cost, what each distillation objective costs per
epoch relative to plain training, what the teacher cache saves, and the
training time the lab's plan adds up to.

    python -m kdcourse bench lab2 --profile laptop --repeats 3

Timings are medians over ``repeats``; ratios are taken within one run of
this command (same machine, same moment). The teacher is untrained here: its
weights do not change the cost.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from .. import data, models, runtime
from .. import features as fx
from ..distill.features import FeatureDistill, Term
from ..recipes.lab2 import LAB2_METHODS, LAB2_WEIGHT_KEYS, lab2_objective, lab_settings
from ..teacher_cache import clear_teacher_cache
from ..losses import relation
from ..profiles import get_profile
from ..train import fit, freeze
from .common import cli, run_all, smoke_run_all


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def objectives(teacher, weights: dict, crd_k: int = 4096) -> dict:
    """The lab's methods (name -> zero-argument factory; None = cross-entropy)."""
    return {m: lab2_objective(m, teacher, weights, crd_k=crd_k) for m in LAB2_METHODS}


def planned_runs(cfg: dict, n_seeds: int) -> dict:
    """Student runs of each method in the lab notebook at the lab's budget:
    one per seed, plus the weight choice (one seed per extra candidate: the
    chosen one is the first seed's run), plus the hint sweep (layer1,
    layer3, the weighted three-layer hint, channel means). The notebook also
    trains scratch and response KD once per seed at Lab 1's budget (see
    ``lab1_budget_runs``)."""
    plan = {m: n_seeds for m in LAB2_METHODS}
    for m in LAB2_WEIGHT_KEYS:
        plan[m] += len(cfg["weight_scales"]) - 1
    plan["feature (FitNets)"] += 4 * cfg["sweep_seeds"]
    return plan


def lab1_budget_runs(n_seeds: int) -> dict:
    """The notebook's "is it the budget?" runs: scratch and response KD, one per seed, at Lab 1's budget."""
    return {"scratch": n_seeds, "response (KD)": n_seeds}


PARTS = ("cost", "notebook", "smoke")
NOTEBOOK = os.path.join("solutions", "02_feature_relation_kd.ipynb")


def main(profile: str = "laptop", repeats: int = 3, only: tuple = PARTS) -> int:
    if "cost" in only:
        _costs(profile, repeats)
    if "notebook" in only:
        run_all(NOTEBOOK, get_profile(profile).name, label="teacher cached")
    if "smoke" in only:
        smoke_run_all(NOTEBOOK)
    return 0


def _costs(profile: str, repeats: int) -> None:
    prof = get_profile(profile)
    cfg = lab_settings(prof)
    repeats = max(1, int(repeats))
    t0 = time.perf_counter()
    ds = data.load(prof)
    train = ds.train if cfg["n_train"] is None else ds.train.subset(torch.arange(min(cfg["n_train"], len(ds.train))))
    runtime.seed_everything(0)
    dev = runtime.device()
    teacher = freeze(models.build(prof.teacher, ds.num_classes).to(dev))
    print(f"Lab 2 benchmark — profile {prof.name}, device {dev}, torch threads {torch.get_num_threads()}, "
          f"repeats {repeats} (medians); data ready in {time.perf_counter() - t0:.1f} s")

    # 1. hooks: what reading features costs
    student = models.build(prof.student, ds.num_classes).to(dev).eval()
    bs = cfg["batch_size"]
    x = next(train.batches(bs, device=dev)).x
    names = ["layer1", "layer2", "layer3", "fc:input"]
    with torch.no_grad():
        plain = _median_seconds(lambda: [student(x) for _ in range(10)], repeats) / 10
        own = _median_seconds(lambda: [student(x, return_features=True) for _ in range(10)], repeats) / 10
        hooked = _median_seconds(lambda: [fx.extract(student, x, names) for _ in range(10)], repeats) / 10
    print(f"\n1. forward pass of the student, batch {x.shape[0]}: plain {1e3 * plain:.2f} ms, "
          f"return_features {1e3 * own:.2f} ms ({own / plain:.2f}x), 4 hooks {1e3 * hooked:.2f} ms ({hooked / plain:.2f}x)")

    # 2. one epoch per objective (teacher outputs cached and shared, as in the lab)
    clear_teacher_cache()
    t1 = time.perf_counter()
    FeatureDistill(teacher, [Term(n, n, relation.rkd_distance) for n in names], alpha=0.9).setup(
        models.build(prof.student, ds.num_classes).to(dev), train)
    cache_s = time.perf_counter() - t1
    print(f"\n2. teacher pass over the {len(train)} training images (logits + 4 layers, cached once): {cache_s:.1f} s")
    warm = models.build(prof.student, ds.num_classes)  # first fit() pays one-time imports (optimizer machinery)
    fit(warm, train.subset(torch.arange(min(8, len(train)))), epochs=1, lr=prof.lr, batch_size=8, progress=False)
    per_epoch = {}
    for name, make in objectives(teacher, cfg["weights"], cfg["crd_k"]).items():
        def one_epoch(make=make):
            runtime.seed_everything(0)
            m = models.build(prof.student, ds.num_classes)
            fit(m, train, make() if make else None, epochs=1, lr=prof.lr, batch_size=bs, progress=False)
        per_epoch[name] = _median_seconds(one_epoch, repeats)
    base = per_epoch["scratch"]
    print(f"   {'objective':<18} {'s / epoch':>10} {'x scratch':>10}")
    for name, sec in per_epoch.items():
        print(f"   {name:<18} {sec:>10.2f} {sec / base:>10.2f}")

    # 3. the same FitNets epoch with the teacher run live (augmented split: no cache possible)
    def live_epoch():
        runtime.seed_everything(0)
        m = models.build(prof.student, ds.num_classes)
        fit(m, train.with_augment(True), lab2_objective("feature (FitNets)", teacher, cfg["weights"])(), epochs=1,
            lr=prof.lr, batch_size=bs, progress=False)
    live = _median_seconds(live_epoch, repeats)
    cached = per_epoch["feature (FitNets)"]
    print(f"\n3. FitNets epoch with the teacher run live (augmentation on): {live:.2f} s = "
          f"{live / cached:.2f}x the cached epoch ({cached:.2f} s)")

    # 4. what the lab's plan of runs adds up to
    plan = planned_runs(cfg, len(prof.seeds))
    total = sum(per_epoch[m] * k * cfg["epochs"] for m, k in plan.items())
    print(f"\n4. the lab trains {sum(plan.values())} students x {cfg['epochs']} epochs on {len(train)} images in batches of {bs}: "
          f"about {total:.0f} s of training on this machine (+ teacher pass {cache_s:.0f} s, data, the toy detector)")
    extra = lab1_budget_runs(len(prof.seeds))
    scale = (len(ds.train) / len(train)) * prof.student_epochs
    lab1 = sum(per_epoch[m] * k * scale for m, k in extra.items())
    print(f"   plus {sum(extra.values())} students at Lab 1's budget ({len(ds.train)} images x {prof.student_epochs} epochs, "
          f"batches of {prof.batch_size}): about {lab1:.0f} s if an image costs the same in larger batches (an upper bound)")
    print(f"\ncost benchmark wall time {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":  # pragma: no cover
    cli(main, PARTS, __doc__)
