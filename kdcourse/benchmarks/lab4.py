"""Lab 4 figures: ``python -m kdcourse bench lab4 [--profile laptop] [--repeats 3]``.

Prints, measured in this one run:

1. the epoch time of each method on the lab's network — labels only, one
   born-again generation (distillation from cached logits of the previous
   generation), deep supervision with self-distillation (two exits), and
   mutual learning of two peers — as medians of ``repeats`` alternating
   epochs, and their ratios to labels only;
2. the accuracy figures of the lab (test accuracy after the last epoch,
   mean ± std over the profile's seeds): scratch, born-again generations
   1 → 3 with the lab's temperature and the ensembles of generations, the
   exits of deep supervision, mutual learning; each with its difference to
   scratch, Welch's t and the verdict;
3. Lab 4 "Run All" in the profile and in the smoke profile.

``python -m kdcourse.benchmarks.lab4 --only epoch,accuracy --T 1`` runs a
subset (``--T``: the born-again / exit temperature; the notebook chooses
it on the validation set, this benchmark takes it as given).
"""
from __future__ import annotations

import os
import statistics

import torch
import torch.nn as nn

from .common import cli, run_all, smoke_run_all

PARTS = ("epoch", "accuracy", "notebook", "smoke")
NOTEBOOK = os.path.join("solutions", "04_self_distillation.ipynb")


def _epoch_times(lab, ds, repeats: int, batch_size: int) -> dict:
    from .. import models, runtime
    from .. import selfdistill as sd
    from ..train import Distill, fit, freeze

    runtime.seed_everything(0)
    teacher = freeze(models.build(lab.network, ds.num_classes))
    makers = {
        "labels only": lambda: (models.build(lab.network, ds.num_classes), None),
        "born-again generation": lambda: (models.build(lab.network, ds.num_classes), Distill(teacher, T=1.0, alpha=lab.alpha)),
        "deep supervision (2 exits)": lambda: (sd.DeepSupervision(models.build(lab.network, ds.num_classes), lab.exits),
                                               sd.ExitDistillation(T=1.0, alpha=lab.alpha)),
        "mutual learning (2 peers)": lambda: (nn.ModuleList([models.build(lab.network, ds.num_classes) for _ in range(2)]),
                                              sd.MutualLearning(T=lab.dml_T, alpha=lab.dml_alpha)),
    }
    times: dict = {k: [] for k in makers}
    for r in range(repeats):
        for name, make in makers.items():
            runtime.seed_everything(r)
            model, obj = make()
            hist = fit(model, ds.train, obj, epochs=1, lr=lab.lr, batch_size=batch_size, progress=False)
            times[name].append(hist.seconds)
    return {k: statistics.median(v) for k, v in times.items()}


def main(profile: str = "laptop", repeats: int = 3, only: tuple = PARTS, T: float = 1.0) -> int:
    from .. import models, profiles, runs
    from .. import selfdistill as sd

    prof = profiles.get_profile(profile)
    lab = sd.settings(prof)
    torch.set_num_threads(int(os.environ.get("KDCOURSE_THREADS", torch.get_num_threads())))
    print(f"# Lab 4 benchmark — profile {prof.name}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    ds = sd.lab_data(prof)  # the lab's data: the students' splits only
    n = models.count_params(models.build(lab.network, ds.num_classes))
    print(f"network {models.describe(lab.network)} ({n:,} params), {lab.epochs} epochs at lr {lab.lr:g}, "
          f"{len(ds.train)} training images, seeds {prof.seeds}")

    if "epoch" in only:
        et = _epoch_times(lab, ds, repeats, prof.batch_size)
        base = et["labels only"]
        print(f"\nepoch time (median of {repeats}):")
        for name, sec in et.items():
            print(f"  {name:<28} {sec:6.2f} s   ratio to labels only {sec / base:.2f}")

    if "accuracy" in only:
        common = dict(epochs=lab.epochs, lr=lab.lr, progress=False)
        scratch_runs = runs.repeat("scratch", prof.seeds, build=lab.network, data=ds, keep_model=True, **common)
        scratch = runs.summarize(scratch_runs)
        temps = (T,) * (lab.generations - 1)
        ban = sd.run_born_again(lab.network, ds, seeds=prof.seeds, temperatures=temps, alpha=lab.alpha,
                                reuse=scratch_runs, **common)
        exits = sd.run_deep_supervision(lab.network, ds, seeds=prof.seeds, exits=lab.exits, T=T, alpha=lab.alpha, **common)
        dml = sd.run_mutual(lab.network, ds, seeds=prof.seeds, peers=2, T=lab.dml_T, alpha=lab.dml_alpha, **common)
        print(f"\naccuracy (test, last epoch; T = {T:g} for born-again and exits, alpha = {lab.alpha}):")
        print(f"  scratch: {scratch}")
        rows = [ban.generation(g) for g in range(2, lab.generations + 1)]
        rows += [ban.ensemble(g) for g in range(2, lab.generations + 1)]
        for name in exits.acc:
            s = exits.summary(name)
            s.name = f"deep supervision, {s.name}"
            rows.append(s)
        rows += [dml.peer(0), dml.mean_peer(), dml.ensemble()]
        for s in rows:
            print(f"  {s.name:<40} {s}   " + sd.significance(s, scratch).split(": ", 1)[1])

    if "notebook" in only:
        run_all(NOTEBOOK, prof.name, label="teachers cached")
    if "smoke" in only:
        smoke_run_all(NOTEBOOK)
    return 0


if __name__ == "__main__":  # pragma: no cover
    cli(main, PARTS, __doc__, extras={"T": dict(type=float, default=1.0,
                                              help="temperature of born-again generations and exits")})
