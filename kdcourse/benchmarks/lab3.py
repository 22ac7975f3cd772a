"""Lab 3 figures: ``python -m kdcourse bench lab3 [--profile laptop] [--repeats 3]``.

Prints, measured in this one run:

1. the BERT teacher (from the cache when present — ``$KDCOURSE_CACHE`` or
   ``~/.cache/kdcourse`` — else trained and cached, with its training time);
2. parameters of teacher and student, with and without the embedding
   tables, and their ratio;
3. CPU latency p50 of one forward pass over one batch of test reviews for
   both models (warm-up, repeats and threads printed; teacher and student
   timed alternately ``repeats`` times, medians of the per-round p50s and of
   the per-round ratios);
4. test accuracy (last epoch) over the profile's seeds, mean ± std, of the
   teacher and the students: scratch, prediction-only KD, intermediate-layer
   KD, two-stage KD and the two control rows (prediction-only KD on train +
   teacher-labelled general text, intermediate-layer KD on train, both at
   two-stage KD's number of samples) with computed readings; the retention
   of the best recipe and its gap to scratch;
5. whether the issue's targets are met (>= 10x fewer parameters, >= 5x
   faster, best KD >= 95% of the teacher), with the numbers;
6. optionally (``--only ...,notebook,smoke``) the solution notebook's Run
   All time in the profile (teacher cached) and in the smoke profile.

``KDCOURSE_THREADS`` sets the torch thread count for the whole run.
``python -m kdcourse.benchmarks.lab3 --only size,latency`` runs a subset.
"""
from __future__ import annotations

import os
import time

import torch

from .common import cli, run_all, smoke_run_all

PARTS = ("size", "latency", "accuracy")
ALL_PARTS = PARTS + ("notebook", "smoke")
NOTEBOOK = os.path.join("solutions", "03_compress_bert.ipynb")


def main(profile: str = "laptop", repeats: int = 3, only: tuple = PARTS) -> int:
    from .. import profiles, runs
    from .. import transformers_kd as tk

    prof = profiles.get_profile(profile)
    cfg = tk.lab_config(prof)
    torch.set_num_threads(int(os.environ.get("KDCOURSE_THREADS", torch.get_num_threads())))
    print(f"# Lab 3 benchmark — profile {prof.name}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    ds = tk.load_data(prof)
    print(f"data: teacher_train={len(ds.teacher_train)} train={len(ds.train)} general={len(ds.general)} "
          f"val={len(ds.val)} test={len(ds.test)}")
    t0 = time.perf_counter()
    teacher, info = tk.teacher_model(prof, ds, progress=False)
    origin = "from cache" if info["from_cache"] else f"trained now in {time.perf_counter() - t0:.0f} s"
    print(f"teacher {info['arch']}: test acc {100 * info['test_acc']:.2f}% ({origin}; training took "
          f"{info['train_seconds']:.0f} s when it was built)")
    student = tk.build(cfg.student, ds)
    sp = tk.size_and_speed(teacher, student, ds.test.input_ids[: cfg.latency_batch], repeats=30, warmup=5,
                           rounds=max(1, repeats))
    (p_t, p_s), (pe_t, pe_s) = sp["params"], sp["params_no_embeddings"]
    if "size" in only:
        print(f"\nparameters: teacher {p_t:,} ({pe_t:,} without embeddings), student {cfg.student.describe()} "
              f"{p_s:,} ({pe_s:,}); ratio {p_t / p_s:.1f}x ({pe_t / pe_s:.1f}x without embeddings)")
    if "latency" in only:
        print(f"\nCPU latency, one batch of {sp['batch'][0]} reviews x {sp['batch'][1]} tokens, {sp['threads']} threads, "
              f"{sp['warmup']} warm-up + {sp['repeats']} timed passes, median over {sp['rounds']} alternating rounds:")
        print(f"  teacher p50 {sp['p50_ms'][0]:.2f} ms, student p50 {sp['p50_ms'][1]:.2f} ms, "
              f"speed-up {sp['speedup']:.1f}x")

    best = None
    if "accuracy" in only:
        t0 = time.perf_counter()
        from .. import lesson
        from ..losses import transformer as tl
        from ..recipes import lab3_controls as recipe

        lm = tl.uniform_layer_map(cfg.student.layers, cfg.teacher.layers)
        targets = tk.teacher_targets(teacher, ds, lm)
        results = tk.compare(teacher, ds, cfg, prof.seeds, layer_map=lm, targets=targets, progress=False)
        results.update(recipe.controls(teacher, ds, cfg, prof.seeds, layer_map=lm, targets=targets, progress=False))
        print(f"\ntest accuracy after the last epoch, seeds {prof.seeds} ({cfg.student_epochs} task epochs, "
              f"{cfg.general_epochs} general epochs for two-stage; {time.perf_counter() - t0:.0f} s):")
        print(f"  teacher: {100 * info['test_acc']:.2f}%")
        summaries = {k: runs.summarize(v) for k, v in results.items()}
        for name, s in summaries.items():
            vals = ", ".join(f"{100 * v:.2f}" for v in s.values)
            print(f"  {name:<50} {100 * s.mean:6.2f} ± {100 * s.std:.2f} %  ({100 * s.mean / info['test_acc']:.1f}% "
                  f"of the teacher; runs: {vals})")
        more_text, more_steps = recipe.CONTROLS
        print(f"  controls at two-stage KD's {recipe.two_stage_samples(cfg, ds):,} training samples:")
        for effect, (a, b) in (("more steps alone", (more_steps, "intermediate-layer KD")),
                               ("the unlabelled text, with layer matching", ("two-stage KD", more_steps)),
                               ("layer matching, on the same text", ("two-stage KD", more_text))):
            print("   ", lesson.reading(effect, (summaries[a], summaries[b]), labels=(a, b)))
        best_name = max((k for k in summaries if k not in ("scratch", *recipe.CONTROLS)), key=lambda k: summaries[k].mean)
        best, scratch = summaries[best_name], summaries["scratch"]
        t_stat, dof = runs.welch_t(best, scratch)
        print(f"  best KD recipe: {best_name}; minus scratch {100 * (best.mean - scratch.mean):+.2f} points = "
              f"{runs.gap_in_std(best, scratch):.1f} pooled std (Welch t {t_stat:.1f}, {dof:.1f} dof)")

    print("\ntargets (issue 4):")
    print(f"  {'met' if p_t / p_s >= 10 else 'NOT met'}: >= 10x fewer parameters ({p_t / p_s:.1f}x; "
          f"{pe_t / pe_s:.1f}x without embeddings)")
    print(f"  {'met' if sp['speedup'] >= 5 else 'NOT met'}: >= 5x faster on this CPU ({sp['speedup']:.1f}x)")
    if best is not None:
        print(f"  {'met' if best.mean >= 0.95 * info['test_acc'] else 'NOT met'}: best KD >= 95% of the teacher "
              f"({100 * best.mean / info['test_acc']:.1f}%)")

    if "notebook" in only:
        run_all(NOTEBOOK, prof.name, label="teacher cached")
    if "smoke" in only:
        smoke_run_all(NOTEBOOK)
    return 0


if __name__ == "__main__":  # pragma: no cover
    cli(main, PARTS, __doc__, ALL_PARTS)
