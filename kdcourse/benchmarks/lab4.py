"""Lab 4 figures: ``python -m kdcourse bench lab4 [--profile laptop] [--repeats 3]``.

Prints, measured in this one run:

1. ``epoch``: the epoch time of each method on the lab's network — labels
   only, one born-again generation (distillation from cached logits of the
   previous generation), deep supervision with self-distillation (two
   exits), mutual learning of two peers in one joint step and updated in
   turn — as medians of ``repeats`` alternating epochs, and their ratios to
   labels only;
2. ``scratch``: the baseline of both columns of the lab (clean labels, and
   the lab's share of noisy training labels): test accuracy after the last
   epoch over the profile's seeds, its standard deviation and the minimal
   detectable difference MDD = t·s·√(2/n) at the lab's rule (t = 2) and at
   the 5 % level (t = t₀.₉₇₅(2n − 2));
3. ``accuracy``: ``scratch``, then in each column born-again generations
   1 → 3 at ``--T`` and the ensembles of generations, the exits of deep
   supervision, mutual learning with the joint step, and (clean labels)
   mutual learning updated in turn; each with its difference to scratch,
   Welch's t and the verdict;
4. ``notebook``/``smoke``: Lab 4 "Run All" in the profile and in the smoke
   profile.

``python -m kdcourse bench lab4 --only scratch,accuracy --T 2`` runs a subset
(``--T``: the born-again / exit temperature; the notebook chooses one per
generation on the validation set, this benchmark takes it as given;
``--noise``: the noisy column's share of random labels, default the lab's).
"""
from __future__ import annotations

import os
import statistics

import torch
import torch.nn as nn

from .common import cli, run_all, smoke_run_all

PARTS = ("epoch", "scratch", "accuracy", "notebook", "smoke")
NOTEBOOK = os.path.join("solutions", "04_self_distillation.ipynb")


def _epoch_times(lab, ds, repeats: int) -> dict:
    from .. import models, runtime
    from ..distill.self import ExitDistillation, MutualLearning
    from ..models.heads import DeepSupervision
    from ..recipes import lab4 as recipe
    from ..train import Distill, fit, freeze

    runtime.seed_everything(0)
    teacher = freeze(models.build(lab.network, ds.num_classes))
    build = lambda: models.build(lab.network, ds.num_classes)  # noqa: E731
    makers = {
        "labels only": lambda: (build(), None),
        "born-again generation": lambda: (build(), Distill(teacher, T=1.0, alpha=lab.alpha)),
        "deep supervision (2 exits)": lambda: (DeepSupervision(build(), lab.exits), ExitDistillation(T=1.0, alpha=lab.alpha)),
        "mutual learning (2 peers)": lambda: (nn.ModuleList([build() for _ in range(2)]),
                                                MutualLearning(T=lab.dml_T, alpha=lab.dml_alpha)),
    }
    times: dict = {k: [] for k in list(makers) + ["mutual learning (2 peers, in turn)"]}
    for r in range(repeats):
        for name, make in makers.items():
            runtime.seed_everything(r)
            model, obj = make()
            hist = fit(model, ds.train, obj, epochs=1, lr=lab.lr, batch_size=lab.batch_size, progress=False)
            times[name].append(hist.seconds)
        res = recipe.run_mutual_in_turn(lab.network, ds, seeds=(r,), peers=2, T=lab.dml_T, alpha=lab.dml_alpha,
                                        epochs=1, lr=lab.lr, batch_size=lab.batch_size)
        times["mutual learning (2 peers, in turn)"].append(res.runs[0].seconds)
    return {k: statistics.median(v) for k, v in times.items()}


def main(profile: str = "laptop", repeats: int = 3, only: tuple = PARTS, T: float = 1.0, noise: float | None = None) -> int:
    from .. import models, profiles, runs
    from ..data import with_label_noise
    from ..recipes import lab4 as recipe

    prof = profiles.get_profile(profile)
    lab = profiles.lab4_settings(prof)
    noise = lab.label_noise if noise is None else float(noise)
    torch.set_num_threads(int(os.environ.get("KDCOURSE_THREADS", torch.get_num_threads())))
    print(f"# Lab 4 benchmark — profile {prof.name}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    ds = recipe.lab_data(prof)  # the lab's data: the students' splits only
    columns = {"clean labels": ds}
    if noise > 0:
        columns[f"{noise:.0%} noisy labels"] = with_label_noise(ds, noise)
    n = models.count_params(models.build(lab.network, ds.num_classes))
    print(f"network {models.describe(lab.network)} ({n:,} params), {lab.epochs} epochs at lr {lab.lr:g} (cosine), "
          f"batches of {lab.batch_size}, {len(ds.train)} training images, {len(ds.test)} test images, seeds {prof.seeds}")

    if "epoch" in only:
        et = _epoch_times(lab, ds, repeats)
        base = et["labels only"]
        print(f"\nepoch time (median of {repeats}):")
        for name, sec in et.items():
            print(f"  {name:<34} {sec:6.2f} s   ratio to labels only {sec / base:.2f}")

    if "scratch" in only or "accuracy" in only:
        kw = dict(epochs=lab.epochs, lr=lab.lr, batch_size=lab.batch_size, progress=False)
        scratch_runs, scratch = {}, {}
        print("\nscratch (test accuracy after the last epoch):")
        for col, d in columns.items():
            scratch_runs[col] = runs.repeat("scratch", prof.seeds, build=lab.network, data=d, keep_model=True, **kw)
            scratch[col] = runs.summarize(scratch_runs[col], f"scratch ({col})")
            print(f"  {col:<18} {scratch[col]}   per seed {[round(100 * v, 2) for v in scratch[col].values]}")
            print(f"  {'':<18} " + recipe.mdd_line(scratch[col], len(prof.seeds)))

        if "accuracy" in only:
            temps = (T,) * (lab.generations - 1)
            for col, d in columns.items():
                ban = recipe.run_born_again(lab.network, d, seeds=prof.seeds, temperatures=temps, alpha=lab.alpha,
                                            reuse=scratch_runs[col], **kw)
                exits = recipe.run_deep_supervision(lab.network, d, seeds=prof.seeds, exits=lab.exits, T=T,
                                                    alpha=lab.alpha, **kw)
                dml = recipe.run_mutual(lab.network, d, seeds=prof.seeds, peers=2, T=lab.dml_T, alpha=lab.dml_alpha, **kw)
                rows = [ban.generation(g) for g in range(2, lab.generations + 1)]
                rows += [ban.ensemble(g) for g in range(2, lab.generations + 1)]
                for name in exits.acc:
                    s = exits.summary(name)
                    s.name = f"deep supervision, {s.name}"
                    rows.append(s)
                rows += [dml.peer(0), dml.mean_peer(), dml.ensemble()]
                if col == "clean labels":
                    kw_turn = {k: v for k, v in kw.items() if k != "progress"}
                    turn = recipe.run_mutual_in_turn(lab.network, d, seeds=prof.seeds, peers=2, T=lab.dml_T,
                                                     alpha=lab.dml_alpha, **kw_turn)
                    for s in (turn.mean_peer(), turn.ensemble()):
                        s.name = s.name.replace("DML", "DML in turn")
                        rows.append(s)
                print(f"\naccuracy, {col} (test, last epoch; T = {T:g} for born-again and exits, alpha = {lab.alpha}):")
                print(f"  scratch: {scratch[col]}")
                for s in rows:
                    print(f"  {s.name:<40} {s}   " + runs.significance(s, scratch[col]).split(": ", 1)[1])

    if "notebook" in only:
        run_all(NOTEBOOK, prof.name, label="teachers cached")
    if "smoke" in only:
        smoke_run_all(NOTEBOOK)
    return 0


if __name__ == "__main__":  # pragma: no cover
    cli(main, PARTS, __doc__, extras={"T": dict(type=float, default=1.0,
                                              help="temperature of born-again generations and exits"),
                                      "noise": dict(type=float, default=None,
                                                    help="share of random training labels in the second column "
                                                         "(default: the lab's; 0: clean labels only)")})
