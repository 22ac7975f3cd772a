"""Lab 1 figures: ``python -m kdcourse bench lab1 [--profile laptop]``.

Prints, measured in this one run:

1. the first teacher build (a fresh, temporary cache), in seconds;
2. the epoch time of a scratch student, a KD student with cached teacher
   logits and a KD student with a live teacher (medians of ``repeats``
   alternating epochs) and their ratios;
3. the accuracy figures: teacher, scratch and KD students over the
   profile's seeds (mean ± std; T chosen on the validation split of one
   seed over the lab's grid, as the notebook chooses it), compression and
   retention, and the gap in pooled standard deviations;
4. Lab 1 "Run All" in the profile with the profile's teacher cached (the
   lab then builds its over-fitted teachers) and with all teachers cached,
   and in the smoke profile from an empty cache. Without ``teacher`` in
   ``--only`` the usual cache is used and the notebook runs once.

``python -m kdcourse.benchmarks.lab1 --only epoch,accuracy`` runs a subset.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from .common import cli, run_all, smoke_run_all

PARTS = ("teacher", "epoch", "accuracy", "notebook", "smoke")
NOTEBOOK = os.path.join("solutions", "01_classic_kd.ipynb")
TEMPERATURES, ALPHA_MAIN = (1, 2, 4, 8, 16), 0.9  # the lab's grid; T_MAIN is chosen on validation, as in the notebook


def _epoch_times(profile, ds, teacher, repeats: int) -> dict:
    from .. import models, runtime
    from ..train import Distill, clear_logit_memo, fit

    times = {"scratch": [], "KD, cached teacher logits": [], "KD, live teacher": []}
    setup = {}
    for r in range(repeats):
        for name in times:
            runtime.seed_everything(r)
            student = models.build(profile.student, ds.num_classes)
            obj = None
            clear_logit_memo()  # time the one-time teacher pass every repeat
            if name != "scratch":
                obj = Distill(teacher, cache=name.startswith("KD, cached"))
            t0 = time.perf_counter()
            hist = fit(student, ds.train, obj, epochs=1, lr=profile.lr, batch_size=profile.batch_size, progress=False)
            setup.setdefault(name, []).append(time.perf_counter() - t0 - hist.seconds)
            times[name].append(hist.seconds)
    return {k: (statistics.median(v), statistics.median(setup[k])) for k, v in times.items()}


def main(profile: str = "laptop", repeats: int = 3, only: tuple = PARTS) -> int:
    from .. import data, models, profiles, runs, zoo
    from ..train import Distill

    prof = profiles.get_profile(profile)
    torch.set_num_threads(int(os.environ.get("KDCOURSE_THREADS", torch.get_num_threads())))
    print(f"# Lab 1 benchmark — profile {prof.name}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    ds = data.load(prof)
    # a fresh cache when the first teacher build is timed; otherwise the usual one
    fresh = tempfile.TemporaryDirectory(prefix="kdcourse-bench-") if "teacher" in only else None  # deleted at exit
    cache = fresh.name if fresh else zoo.cache_dir()
    os.environ["KDCOURSE_CACHE"] = cache

    t0 = time.perf_counter()
    teacher, info = zoo.teacher(prof, ds, directory=cache, progress=False)
    if "teacher" in only:
        print(f"first teacher build ({info['arch']}, {info['params']:,} params, {info['epochs']} epochs): "
              f"{time.perf_counter() - t0:.0f} s (training {info['train_seconds']:.0f} s); test acc {100 * info['test_acc']:.2f}%")

    if "epoch" in only:
        et = _epoch_times(prof, ds, teacher, repeats)
        base = et["scratch"][0]
        print(f"\nepoch time on {len(ds.train)} images (median of {repeats}, one-time setup in brackets):")
        for name, (sec, setup) in et.items():
            print(f"  {name:<28} {sec:6.2f} s  (setup {setup:.2f} s)   ratio to scratch {sec / base:.2f}")

    if "accuracy" in only:
        common = dict(build=prof.student, data=ds, epochs=prof.student_epochs, lr=prof.lr, progress=False)
        scratch = runs.summarize(runs.repeat("scratch", prof.seeds, **common))
        # T chosen as the lab chooses it: one seed per temperature, highest validation accuracy
        sweep = {T: runs.train_run(f"KD T={T}", seed=prof.seeds[0], **common,
                                   objective=lambda T=T: Distill(teacher, T=T, alpha=ALPHA_MAIN)) for T in TEMPERATURES}
        T_MAIN = max(sweep, key=lambda T: sweep[T].val_acc)
        print("\nvalidation accuracy by T (seed %d): " % prof.seeds[0]
              + ", ".join(f"T={T}: {100 * r.val_acc:.2f}%" for T, r in sweep.items()) + f" -> T = {T_MAIN}")
        kd = runs.summarize([sweep[T_MAIN]] + runs.repeat("KD", prof.seeds[1:], **common,
                                                          objective=lambda: Distill(teacher, T=T_MAIN, alpha=ALPHA_MAIN)))
        n_t, n_s = info["params"], models.count_params(models.build(prof.student, ds.num_classes))
        print(f"\naccuracy (test, last epoch, seeds {prof.seeds}):")
        print(f"  teacher {info['arch']}: {n_t:,} params, {100 * info['test_acc']:.2f}%")
        print(f"  student {models.describe(prof.student)}: {n_s:,} params ({n_t / n_s:.1f}x smaller)")
        print(f"  scratch: {scratch}")
        print(f"  KD T={T_MAIN:g} alpha={ALPHA_MAIN}: {kd}  -> {100 * kd.mean / info['test_acc']:.1f}% of the teacher")
        t_stat, dof = runs.welch_t(kd, scratch)
        print(f"  KD - scratch: {100 * (kd.mean - scratch.mean):+.2f} points = {runs.gap_in_std(kd, scratch):.1f} pooled std "
              f"(Welch t {t_stat:.1f}, {dof:.1f} dof)")

    if "notebook" in only:
        if "teacher" in only:  # the fresh cache holds only the profile's teacher: the lab builds the others
            run_all(NOTEBOOK, prof.name, cache=cache, label="profile teacher cached")
        run_all(NOTEBOOK, prof.name, cache=cache, label="all teachers cached")
    if "smoke" in only:
        smoke_run_all(NOTEBOOK)
    return 0


if __name__ == "__main__":  # pragma: no cover
    cli(main, PARTS, __doc__)
