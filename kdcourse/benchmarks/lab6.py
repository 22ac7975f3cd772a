"""Lab 6 figures: ``python -m kdcourse bench lab6 [--profile laptop] [--only ...]``.

Prints, measured in this one run:

1. ``synthesis`` — the first synthesis of the profile's synthesized set in a
   fresh, temporary cache (seconds, images, steps), then the same call from
   the cache; the teacher's mean probability of the target class and the
   BN-statistics loss of real, synthesized and noise batches;
2. ``transfer`` — the transfer-set table (the profile's seeds, mean ± std,
   same student, steps, T) and the synthesized-vs-noise gap in pooled
   standard deviations (target ≥ 3);
3. ``patient`` — the patient-and-consistent runs (one seed): epochs, training
   time and test accuracy of each, and the cost per epoch (cached logits,
   live teacher with augmentation, the teacher's forward pass alone);
4. ``notebook`` — Lab 6 "Run All" in the profile with the usual cache, twice
   (the first run synthesizes the set with the notebook's own step if it is
   not cached yet; the second has everything cached), and ``smoke`` — Run
   All in the smoke profile from an empty cache.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from .common import cli, run_all, smoke_run_all

PARTS = ("synthesis", "transfer", "patient", "notebook", "smoke")
NOTEBOOK = os.path.join("solutions", "06_transfer_sets.ipynb")


def main(profile: str = "laptop", repeats: int = 3, only: tuple = PARTS) -> int:
    from .. import data, datafree, profiles, runs, zoo
    from ..losses.datafree import bn_statistics_loss
    from ..recipes import lab6

    prof = profiles.get_profile(profile)
    torch.set_num_threads(int(os.environ.get("KDCOURSE_THREADS", torch.get_num_threads())))
    print(f"# Lab 6 benchmark — profile {prof.name}, {torch.get_num_threads()} threads, torch {torch.__version__} "
          f"(load average {os.getloadavg()[0]:.1f})")
    ds = data.load(prof)
    teacher, info = zoo.teacher(prof, ds, progress=False)
    lab, synth_settings = lab6.settings_for(prof), datafree.settings_for(prof)
    print(f"teacher {info['arch']} test acc {100 * info['test_acc']:.2f}%; {lab}; {synth_settings}")

    synth = None
    if "synthesis" in only:
        with tempfile.TemporaryDirectory(prefix="kdcourse-bench-synth-") as fresh:
            t0 = time.perf_counter()
            synth, s_info = datafree.synthesized_set(teacher, ds, synth_settings, directory=fresh, progress=False)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            datafree.synthesized_set(teacher, ds, synth_settings, directory=fresh, progress=False)
            cached = time.perf_counter() - t0
        steps = synth_settings.steps * -(-synth_settings.n_images // synth_settings.batch_size)
        print(f"\nfirst synthesis: {len(synth)} images, {steps} batch steps of {synth_settings.batch_size}: {first:.0f} s "
              f"(target ≤ 240 s on 2 cores); from the cache: {cached:.2f} s")
        conf = lab6.per_class_confidence(teacher, synth)
        print("teacher's mean probability of the target class: " +
              ", ".join(f"{c} {100 * float(p):.0f}%" for c, p in zip(ds.classes, conf)))
        noise = lab6.gaussian_noise(ds.train, 100)
        for name, split in (("real", ds.train), ("synthesized", synth), ("noise", noise)):
            x = split.subset(torch.arange(min(100, len(split)))).images
            with torch.no_grad():
                print(f"  BN-statistics loss, 100 {name} images: {float(bn_statistics_loss(teacher, x)[0]):.3f}")

    if "transfer" in only or "patient" in only:
        if synth is None:
            synth, _ = datafree.synthesized_set(teacher, ds, synth_settings, progress=False)
        sets = lab6.transfer_sets(ds, teacher, lab.n_transfer, synthesized=synth, alpha=lab.alpha)

    if "transfer" in only:
        t0 = time.perf_counter()
        results = lab6.compare_transfer_sets(teacher, ds, sets, build=prof.student, seeds=prof.seeds, epochs=lab.epochs,
                                             lr=prof.lr, T=lab.T, progress=False)
        summary = {name: runs.summarize(rs) for name, rs in results.items()}
        print(f"\ntransfer sets ({lab.n_transfer} images each, {lab.epochs} epochs, T={lab.T:g}, seeds {prof.seeds}; "
              f"{time.perf_counter() - t0:.0f} s):")
        real = summary[lab6.REAL]
        print(runs.markdown_table([{"transfer set": n, "test acc (%)": f"{100 * s.mean:.2f} ± {100 * s.std:.2f}",
                                    "% of real + labels": f"{100 * s.mean / real.mean:.1f}"} for n, s in summary.items()]))
        gap = runs.gap_in_std(summary[lab6.SYNTHESIZED], summary[lab6.NOISE])
        t, dof = runs.welch_t(summary[lab6.SYNTHESIZED], summary[lab6.NOISE])
        print(f"synthesized − noise: {100 * (summary[lab6.SYNTHESIZED].mean - summary[lab6.NOISE].mean):+.2f} points = "
              f"{gap:.1f} pooled std (Welch t {t:.1f}, {dof:.1f} dof; target ≥ 3 pooled std)")

    if "patient" in only:
        pc = lab6.patient_and_consistent(teacher, ds, sets[lab6.REAL].split, build=prof.student, epochs=lab.epochs,
                                         patience=lab.patience, lr=prof.lr, T=lab.T, alpha=lab.alpha,
                                         seed=prof.seeds[0], progress=False)
        print(f"\npatient and consistent (seed {prof.seeds[0]}, {lab.n_transfer} real images):")
        print(runs.markdown_table([{"run": n, "epochs": pc["epochs"][n], "train s": f"{pc['train_seconds'][n]:.1f}",
                                    "test acc (%)": f"{100 * r.test_acc:.2f}"} for n, r in pc["runs"].items()]))
        c = pc["epoch_seconds"]
        print(f"cost per epoch: cached logits {c['cached logits']:.2f} s, live teacher + augmentation "
              f"{c['live teacher + augmentation']:.2f} s ({c['live teacher + augmentation'] / c['cached logits']:.1f}x), "
              f"the teacher's forward pass alone {c['teacher forward']:.2f} s")

    if "notebook" in only:
        cache = zoo.cache_dir()
        run_all(NOTEBOOK, prof.name, cache=cache, label="usual cache (synthesizes the set if it is not cached)")
        run_all(NOTEBOOK, prof.name, cache=cache, label="teacher and synthesized set cached")
    if "smoke" in only:
        smoke_run_all(NOTEBOOK)
    return 0


if __name__ == "__main__":  # pragma: no cover
    cli(main, PARTS, __doc__)
