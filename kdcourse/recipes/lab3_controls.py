"""Lab 3: the two-stage recipe a student writes, run with the course's loop,
and the control rows that separate its causes.

The student's recipe has the signature of :func:`two_stage_kd`::

    recipe(teacher, student, train, targets, layer_map, T, alpha) -> student

where ``train(model, split, objective)`` trains ``model`` in place on
``data.<split>`` ("general": the unlabelled reviews, ``cfg.general_epochs``;
"train": the labelled ones, ``cfg.student_epochs``, validated on
``data.val``). :func:`run_recipe` supplies that ``train`` and turns one seed
into a :class:`kdcourse.runs.Run`.

Two-stage KD changes three things at once against intermediate-layer KD on
the labelled set: more text (the unlabelled reviews), more steps, and layer
matching on that text. The controls (:func:`controls`) keep the total
number of training samples equal to the two-stage recipe's
(:func:`two_stage_samples`):

* **prediction-only KD on train + general** — the teacher labels the
  unlabelled reviews (its arg-max as the label, its soft predictions as the
  KD target): more text and more steps, no layer matching;
* **intermediate-layer KD at the same steps** — the labelled reviews only,
  for as many samples as two-stage KD sees: more steps, no extra text.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from .. import runs, runtime
from ..data import reviews as text
from ..distill.transformer import LayerDistill
from ..models.bert import build
from ..profiles import Lab3Settings
from ..train import Distill, fit, predict_logits
from .lab3 import _run

SPLITS = ("general", "train")


def two_stage_kd(teacher, student, train: Callable, targets: dict, layer_map, T: float, alpha: float):
    """The reference recipe (TinyBERT's two stages on one student).

    1. general distillation on the unlabelled reviews: embeddings, hidden
       states and attention through ``layer_map`` — no prediction layer
       (the text has no labels), the teacher's ``targets["general"]``;
    2. task distillation on the labelled reviews: the same layer losses plus
       the prediction layer (``T``, ``alpha``), ``targets["train"]``, keeping
       the projections learned in stage 1.
    """
    general = LayerDistill(teacher, student, layer_map=layer_map, w_prediction=0.0, targets=targets["general"])
    train(student, "general", general)
    task = LayerDistill(teacher, student, layer_map=layer_map, targets=targets["train"],
                           projections=general.projections, T=T, alpha=alpha)
    train(student, "train", task)
    return student


def run_recipe(name: str, recipe: Callable, teacher, data: text.TextData, cfg: Lab3Settings, *, seed: int,
               targets: dict, layer_map: Sequence[int], keep_model: bool = False, progress: bool = True) -> runs.Run:
    """Seed, build a fresh student of ``cfg.student`` and call ``recipe`` on
    it with a ``train(model, split, objective)`` that runs
    :func:`kdcourse.train.fit`; the test accuracy after the last stage."""
    runtime.seed_everything(seed)
    student = build(cfg.student, data)
    epochs = {"general": cfg.general_epochs, "train": cfg.student_epochs}
    histories = []

    def train(model, split, objective):
        if split not in epochs:
            raise ValueError(f"train(model, split, objective): split must be one of {SPLITS}, got {split!r}")
        if model is not student:
            raise ValueError("train(model, ...) must be given the student this recipe was called with")
        histories.append(fit(model, getattr(data, split), objective, epochs=epochs[split], lr=cfg.lr,
                             batch_size=cfg.batch_size, val=data.val if split == "train" else None, seed=seed,
                             progress=progress, desc=f"{name} {split} s{seed}"))

    t0 = time.perf_counter()
    out = recipe(teacher, student, train, targets, list(layer_map), cfg.T, cfg.alpha)
    if out is not student:
        raise ValueError(f"{name}: the recipe must return the student it trained")
    if not histories:
        raise ValueError(f"{name}: the recipe never called train(...)")
    return _run(name, seed, student, data, histories, time.perf_counter() - t0, keep_model)


def two_stage_samples(cfg: Lab3Settings, data: text.TextData) -> int:
    """Training samples the two-stage recipe sees: general epochs x unlabelled
    reviews + task epochs x labelled reviews."""
    return cfg.general_epochs * len(data.general) + cfg.student_epochs * len(data.train)


def matched_epochs(cfg: Lab3Settings, data: text.TextData, n: int) -> int:
    """Epochs over ``n`` samples that come closest to :func:`two_stage_samples`."""
    return max(1, round(two_stage_samples(cfg, data) / n))


def teacher_labelled_union(teacher, data: text.TextData) -> text.TextSplit:
    """``data.train`` followed by ``data.general`` labelled with the
    teacher's arg-max (the teacher labels the unlabelled reviews)."""
    pseudo = predict_logits(teacher, data.general).argmax(1)
    ids = torch.cat([data.train.input_ids, data.general.input_ids])
    return text.TextSplit(ids, torch.cat([data.train.labels, pseudo]), data.train.classes,
                          tuple(data.train.texts) + tuple(data.general.texts),
                          tuple(data.train.forms) + tuple(data.general.forms))


CONTROLS = ("prediction-only KD, train + general (same steps)", "intermediate-layer KD, train (same steps)")


def controls(teacher, data: text.TextData, cfg: Lab3Settings, seeds: Sequence[int], *, layer_map: Sequence[int],
             targets: dict, hidden_loss: Callable | None = None, attention_loss: Callable | None = None,
             keep_model: bool = False, progress: bool = True) -> dict[str, list]:
    """The two control rows of :data:`CONTROLS` over ``seeds``, each at the
    two-stage recipe's number of training samples."""
    union = teacher_labelled_union(teacher, data)
    losses = {k: v for k, v in (("hidden_loss", hidden_loss), ("attention_loss", attention_loss)) if v is not None}
    probe = build(cfg.student, data)
    common = dict(build=lambda: build(cfg.student, data), data=data, lr=cfg.lr, batch_size=cfg.batch_size,
                  keep_model=keep_model, progress=progress)
    pred_name, layer_name = CONTROLS
    return {
        pred_name: runs.repeat(pred_name, seeds, train=union, epochs=matched_epochs(cfg, data, len(union)),
                               objective=lambda: Distill(teacher, T=cfg.T, alpha=cfg.alpha), **common),
        layer_name: runs.repeat(layer_name, seeds, epochs=matched_epochs(cfg, data, len(data.train)),
                                objective=lambda: LayerDistill(teacher, probe, layer_map=list(layer_map),
                                                                  targets=targets["train"], T=cfg.T, alpha=cfg.alpha,
                                                                  **losses), **common),
    }
