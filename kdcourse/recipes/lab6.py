"""Lab 6's experiments: what a student learns from (transfer sets), and a patient teacher.

    sets = lab6.transfer_sets(ds, teacher, n=500, synthesized=synth)
    results = lab6.compare_transfer_sets(teacher, ds, sets, build=spec, seeds=(0, 1, 2), epochs=30, lr=3e-3, T=4.0)
    patient = lab6.patient_and_consistent(teacher, ds, sets[lab6.REAL].split, build=spec, epochs=30, patience=3,
                                          lr=3e-3, T=4.0, alpha=0.9)

Transfer sets (every one has the same number of images, and every student
the same architecture, steps and learning rate; the distillation loss is
:func:`kdcourse.losses.kd_loss`):

* **real images + labels** — KD with ``alpha < 1``: soft targets and labels;
* **real images, no labels** — the same images, soft targets only (``alpha = 1``);
* **Gaussian noise** — pixels drawn from N(0, 1) in the data's normalised
  units (the data's mean colour, spread about its std), clamped to valid pixels;
* **colour-inverted** — every real image with its colours inverted
  (``1 - pixel``): the same shapes, a different distribution of colours;
* **shuffled patches** — every real image cut into a 4 x 4 grid of 8 x 8
  patches, shuffled: the colours and local texture of the real data, not its shapes;
* **synthesized** — DeepInversion images (:mod:`kdcourse.datafree`).

Every set but the first is unlabelled: its ``labels`` are the teacher's
arg-max, which ``alpha = 1`` never uses (only the training-accuracy column of
the history reads them: agreement with the teacher).

Patient and consistent (Beyer et al., *Knowledge distillation: A good teacher
is patient and consistent*, CVPR 2022, arXiv:2106.05237): a student trained
with random shifts and flips and a **live** teacher that sees the same
augmented view, for ``patience`` times the usual epochs, against the
cached-logit student at equal steps and at equal wall-clock.
"""
from __future__ import annotations

import math
import statistics
import time
import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import models, runs, runtime
from ..data import ImageData, Split
from ..train import Distill, predict_logits

REAL = "real images + labels"
UNLABELLED = "real images, no labels"
NOISE = "Gaussian noise"
INVERTED = "colour-inverted"
SHUFFLED = "shuffled patches"
SYNTHESIZED = "synthesized (DeepInversion)"


@dataclass
class TransferSet:
    split: Split
    alpha: float  # weight of the distillation term (1: soft targets only)
    note: str


def pixel_range(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (low, high) of a valid pixel in the split's normalised units, shaped (1, C, 1, 1)."""
    mean = torch.tensor(split.mean).view(1, -1, 1, 1)
    std = torch.tensor(split.std).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


def _images(split: Split) -> torch.Tensor:
    x = split.images
    if x.dtype == torch.uint8:  # large sets are stored as bytes: normalise as Split.batches does
        mean, std = torch.tensor(split.mean).view(1, -1, 1, 1), torch.tensor(split.std).view(1, -1, 1, 1)
        x = (x.float() / 255.0 - mean) / std
    return x


def _like(split: Split, images: torch.Tensor, labels: torch.Tensor) -> Split:
    return Split(images.contiguous(), labels, split.classes, False, split.mean, split.std)


def teacher_labelled(teacher, split: Split) -> Split:
    """The split with its labels replaced by the teacher's arg-max."""
    return _like(split, _images(split), predict_logits(teacher, split).argmax(1))


def gaussian_noise(like: Split, n: int, seed: int = 0) -> Split:
    """``n`` images of N(0, 1) noise in ``like``'s normalised units, clamped to valid pixels (labels: zeros)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = pixel_range(like)
    x = torch.randn((n, *like.images.shape[1:]), generator=g)
    return _like(like, torch.maximum(torch.minimum(x, hi), lo), torch.zeros(n, dtype=torch.long))


def colour_inverted(split: Split) -> Split:
    """Every image with its colours inverted (pixel -> 1 - pixel)."""
    mean, std = torch.tensor(split.mean).view(1, -1, 1, 1), torch.tensor(split.std).view(1, -1, 1, 1)
    pixels = _images(split) * std + mean
    return _like(split, ((1 - pixels) - mean) / std, split.labels)


def shuffled_patches(split: Split, patch: int = 8, seed: int = 0) -> Split:
    """Every image cut into (H/patch) x (W/patch) patches, shuffled (a fresh order per image)."""
    x = _images(split)
    n, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"patch={patch} must divide the image size {h}x{w}")
    gh, gw = h // patch, w // patch
    tiles = x.reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c, patch, patch)
    g = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(n, gh * gw, generator=g), dim=1)
    tiles = tiles[torch.arange(n).unsqueeze(1), order]
    out = tiles.reshape(n, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
    return _like(split, out, split.labels)


def transfer_sets(data: ImageData, teacher, n: int, synthesized: Split | None = None, alpha: float = 0.9,
                  seed: int = 0) -> dict[str, TransferSet]:
    """The lab's transfer sets, each of ``n`` images (the first ``n`` student
    training images, or ``n`` synthesized ones)."""
    if not isinstance(n, int) or not 0 < n <= len(data.train):
        raise ValueError(f"n must be an int between 1 and {len(data.train)} (the student's training images), got {n!r}")
    real = data.train.subset(torch.arange(n))
    sets = {
        REAL: TransferSet(real, alpha, f"soft targets and labels (alpha={alpha:g})"),
        UNLABELLED: TransferSet(teacher_labelled(teacher, real), 1.0, "soft targets only"),
        NOISE: TransferSet(teacher_labelled(teacher, gaussian_noise(real, n, seed)), 1.0, "soft targets only"),
        INVERTED: TransferSet(teacher_labelled(teacher, colour_inverted(real)), 1.0, "soft targets only"),
        SHUFFLED: TransferSet(teacher_labelled(teacher, shuffled_patches(real, seed=seed)), 1.0, "soft targets only"),
    }
    if synthesized is not None:
        if len(synthesized) < n:
            raise ValueError(f"the synthesized set has {len(synthesized)} images but n={n}: synthesize at least n "
                             "(SynthesisSettings.n_images) or lower n")
        synth = synthesized.subset(torch.arange(n))
        sets[SYNTHESIZED] = TransferSet(teacher_labelled(teacher, synth), 1.0, "soft targets only")
    return sets


def compare_transfer_sets(teacher, data: ImageData, sets: dict, *, build: dict, seeds, epochs: int, lr: float,
                          T: float, batch_size: int = 128, progress: bool = True) -> dict[str, list]:
    """One KD student per set and seed (same architecture, steps, lr and T;
    each set's own ``alpha``), measured on ``data.test``: ``{name: [Run, ...]}``."""
    out = {}
    for name, ts in sets.items():
        out[name] = runs.repeat(name, seeds, build=build, data=data, train=ts.split, epochs=epochs, lr=lr,
                                batch_size=batch_size, progress=progress,
                                objective=lambda a=ts.alpha: Distill(teacher, T=T, alpha=a))
    return out


def teacher_forward_seconds(teacher, split: Split, batch_size: int = 128, seed: int = 0) -> float:
    """Wall time of the teacher's forward passes over one (augmented) epoch of ``split``, as a live teacher runs them."""
    dev = runtime.device()
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in split.batches(batch_size, shuffle=True, generator=gen, device=dev):
            teacher(batch.x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _epoch_seconds(run) -> float:
    return statistics.median(run.history.series("seconds"))


def patient_and_consistent(teacher, data: ImageData, train: Split, *, build: dict, epochs: int, patience: int,
                           lr: float, T: float, alpha: float, seed: int = 0, batch_size: int = 128,
                           progress: bool = True) -> dict:
    """Beyer et al.'s comparison on one seed.

    * ``cached, equal steps``: cached teacher logits, no augmentation, ``patience * epochs`` epochs;
    * ``patient``: random shifts and flips, the teacher live on the same augmented batch, ``patience * epochs`` epochs;
    * ``cached, equal wall-clock``: cached logits for as many epochs as fit in the patient run's training time.

    Returns the runs, the epoch costs (median seconds per epoch of each
    run; the live teacher's forward over one augmented epoch, measured
    separately) and the epochs each run got."""
    if not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be a positive int (a multiple of the usual epochs), got {patience!r}")
    long = patience * epochs
    common = dict(build=build, data=data, lr=lr, batch_size=batch_size, progress=progress, seed=seed)
    steps_cached = runs.train_run("cached, equal steps", train=train.with_augment(False), epochs=long,
                                  objective=lambda: Distill(teacher, T=T, alpha=alpha, cache=True), **common)
    patient = runs.train_run("patient (augmented, live teacher)", train=train.with_augment(True), epochs=long,
                             objective=lambda: Distill(teacher, T=T, alpha=alpha, cache=False), **common)
    cached_epoch = _epoch_seconds(steps_cached)
    wall_epochs = max(long, int(patient.history.seconds // max(cached_epoch, 1e-6)))
    wall_cached = runs.train_run("cached, equal wall-clock", train=train.with_augment(False), epochs=wall_epochs,
                                 objective=lambda: Distill(teacher, T=T, alpha=alpha, cache=True), **common)
    forward = teacher_forward_seconds(teacher, train.with_augment(True), batch_size, seed)
    return {
        "runs": {"cached, equal steps": steps_cached, "patient": patient, "cached, equal wall-clock": wall_cached},
        "epochs": {"cached, equal steps": long, "patient": long, "cached, equal wall-clock": wall_epochs},
        "epoch_seconds": {"cached logits": cached_epoch, "live teacher + augmentation": _epoch_seconds(patient),
                          "teacher forward": forward},
        "train_seconds": {k: r.history.seconds for k, r in (("cached, equal steps", steps_cached), ("patient", patient),
                                                            ("cached, equal wall-clock", wall_cached))},
    }


def patience_rows(pc: dict, real_runs: Sequence, epochs: int) -> list[dict]:
    """The table of :func:`patient_and_consistent`: first the usual cached
    runs ``real_runs`` (one per seed, ``epochs`` epochs: mean train time,
    mean ± std), then one row per run of ``pc`` (epochs, train time, accuracy)."""
    real = runs.summarize(real_runs)
    rows = [{"run": f"cached logits, usual schedule (table above, {real.n} seeds)", "epochs": epochs,
             "train time (s)": f"{sum(r.history.seconds for r in real_runs) / real.n:.1f}", **runs.result_row(real)}]
    rows += [{"run": name, "epochs": pc["epochs"][name], "train time (s)": f"{pc['train_seconds'][name]:.1f}",
              **runs.result_row(run)} for name, run in pc["runs"].items()]
    return rows


def per_class_confidence(teacher, split: Split) -> torch.Tensor:
    """For each class c: the teacher's mean probability of c on the images labelled c (the targets, for a synthesized set)."""
    probs = torch.softmax(predict_logits(teacher, split), 1)
    return torch.stack([probs[split.labels == c, c].mean() if (split.labels == c).any() else torch.tensor(math.nan)
                        for c in range(len(split.classes))])


def student_params(build: dict, num_classes: int) -> int:
    return models.count_params(models.build(build, num_classes))


@dataclass(frozen=True)
class Lab6Settings:
    """The lab's sizes per profile (``profile.extra["lab6"]`` overrides fields)."""

    n_transfer: int  # images in every transfer set (the synthesized set has at least this many)
    epochs: int  # the usual schedule for every transfer-set student
    patience: int  # the patient run trains patience x epochs
    T: float = 4.0
    alpha: float = 0.9  # for the one labelled set (the others use alpha = 1)


def settings_for(profile) -> Lab6Settings:
    base = {
        "smoke": Lab6Settings(n_transfer=40, epochs=2, patience=2),
        "laptop": Lab6Settings(n_transfer=500, epochs=30, patience=3),
        "full": Lab6Settings(n_transfer=5000, epochs=30, patience=4),
    }.get(profile.name, Lab6Settings(n_transfer=500, epochs=30, patience=3))

    return dataclasses.replace(base, **profile.extra.get("lab6", {}))
