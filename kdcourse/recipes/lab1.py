"""What Lab 1's notebook calls around the student's own code.

* :func:`distill_step` — the reference distillation step (the student writes
  their own in the lab; :class:`StepObjective` trains with either).
* :class:`StepObjective` — plugs a step function
  ``step(student, teacher, batch, T, alpha, loss) -> (loss, student_logits)``
  into :func:`kdcourse.train.fit`. When the training split is not augmented
  the teacher the step receives serves the teacher's memoised logits for the
  batch it is called on (the same logits :class:`~kdcourse.train.Distill`
  caches), so a student's step costs no teacher forward pass per batch;
  called on anything else, or in train mode, it runs the real network.
* :class:`Ensemble` — a teacher made of members whose logits a function
  (the student's ``ensemble_logits``) combines.
* Small helpers that keep the notebook's cells short: validation summaries,
  the comparison and compression tables, the missing-class table.

    objective = lambda: StepObjective(distill_step, teacher, T=2.0, alpha=0.9, loss=kd_loss)
    kd_runs = runs.repeat("KD", seeds, objective=objective, build=spec, data=ds, epochs=10, lr=3e-3)
"""
from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .. import models, runs
from ..data import Batch, Split
from ..losses import entropy_bits
from ..train import Objective, StepOutput, TrainState, freeze, memo_logits, predict_logits, scheduled


def distill_step(student: nn.Module, teacher: nn.Module, batch: Batch, T: float, alpha: float, loss: Callable):
    """One distillation step: the teacher's logits (eval mode, no gradient),
    the student's logits, and ``loss(student_logits, teacher_logits, labels,
    T=T, alpha=alpha)``. Returns ``(loss, student_logits)``."""
    teacher.eval()
    with torch.no_grad():
        teacher_logits = teacher(batch.x)
    student_logits = student(batch.x)
    return loss(student_logits, teacher_logits, batch.labels, T=T, alpha=alpha), student_logits


class _ServedTeacher(nn.Module):
    """The teacher a step sees: memoised logits for exactly ``batch.x`` in
    eval mode, the real (frozen) network for anything else."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        object.__setattr__(self, "real", teacher)  # not a submodule: nothing optimises or re-modes it
        self.cached: torch.Tensor | None = None
        self.batch: Batch | None = None
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cached is not None and self.batch is not None and x is self.batch.x and not self.training:
            return self.cached[self.batch.index].to(x.device)
        self.real.train(self.training)
        return self.real(x)


class StepObjective(Objective):
    """Train with a step function (the student's ``distill_step``).

    Args:
        step: ``step(student, teacher, batch, T, alpha, loss) -> (loss, student_logits)``.
        teacher: the trained teacher; frozen here.
        T, alpha: numbers or schedules ``f(progress) -> number``.
        loss: ``loss(student_logits, teacher_logits, labels, T=, alpha=)``
            (default :func:`kdcourse.losses.kd_loss`).
    """

    channels_last_ok = True  # the student is the only network whose activations are computed (see train.fit)

    def __init__(self, step: Callable, teacher: nn.Module, T=4.0, alpha=0.9, loss: Callable | None = None):
        super().__init__()
        if not callable(step):
            raise ValueError(f"step must be a function step(student, teacher, batch, T, alpha, loss), got {step!r}")
        if loss is None:
            from ..losses import kd_loss as loss
        self.step_fn, self.loss_fn, self.T, self.alpha = step, loss, T, alpha
        object.__setattr__(self, "teacher", freeze(teacher))
        object.__setattr__(self, "served", _ServedTeacher(self.teacher))

    def setup(self, model: nn.Module, train: Split) -> None:
        self.served.cached = None if train.augment else memo_logits(self.teacher, train)

    def forward(self, model: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        T, alpha = scheduled(self.T, state), scheduled(self.alpha, state)
        self.served.batch = batch
        try:
            out = self.step_fn(model, self.served, batch, T, alpha, self.loss_fn)
        finally:
            self.served.batch = None
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError("the step must return (loss, student_logits), got "
                            f"{type(out).__name__}{'' if not isinstance(out, tuple) else f' of length {len(out)}'}")
        loss, logits = out
        return StepOutput(loss, logits, {"kd": float(loss.detach()), "T": T, "alpha": alpha})


class Ensemble(nn.Module):
    """A teacher whose logits are ``combine([m(x) for m in members], mode=mode, T=T)``."""

    def __init__(self, members: Sequence[nn.Module], combine: Callable, mode: str = "logits", T: float = 1.0):
        super().__init__()
        if len(members) < 1:
            raise ValueError("members must hold at least one model")
        self.members = nn.ModuleList(members)
        self.combine, self.mode, self.T = combine, mode, T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine([m(x) for m in self.members], mode=self.mode, T=self.T)


# --------------------------------------------------------------------------
# Helpers for the notebook's tables
# --------------------------------------------------------------------------

def val_summary(run_list: Sequence[runs.Run], name: str | None = None) -> runs.Summary:
    """Mean and std of the runs' **validation** accuracy (after the last epoch)."""
    vals = tuple(float(r.val_acc) for r in run_list)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return runs.Summary(name or run_list[0].name, statistics.fmean(vals), std, len(vals), vals, run_list[0].params)


def comparison_rows(teacher_name: str, teacher_acc: float, n_teacher: int, n_student: int,
                    students: dict) -> list[dict]:
    """The teacher / scratch / KD table: ``students`` maps a row name to a Summary."""
    rows = [{"model": f"teacher ({teacher_name})", "params": f"{n_teacher:,}", "compression": "1x",
             "test acc (%)": f"{100 * teacher_acc:.2f}", "% of teacher": "100"}]
    for name, s in students.items():
        rows.append({"model": name, "params": f"{n_student:,}", "compression": f"{n_teacher / n_student:.1f}x",
                     "test acc (%)": runs.fmt_mean_std(s) if s.n > 1 else f"{100 * s.mean:.2f}",
                     "% of teacher": f"{100 * s.mean / teacher_acc:.1f}"})
    return rows


def smaller_students(spec: dict, fractions=(4, 2)) -> list[dict]:
    """The student spec with every width divided by each fraction, then the spec itself."""
    return [dict(spec, widths=tuple(max(2, w // f) for w in spec["widths"])) for f in fractions] + [spec]


def compression_curve(sizes: Sequence[dict], n_teacher: int, teacher_acc: float, num_classes: int,
                      train_scratch: Callable, train_kd: Callable):
    """Train each size (``train_scratch(spec)`` / ``train_kd(spec)`` return Summaries);
    returns ``(rows, ratios, scratch_summaries, kd_summaries)``."""
    rows, ratios, scratch, kd = [], [], [], []
    for spec in sizes:
        n = models.count_params(models.build(spec, num_classes))
        s, k = train_scratch(spec), train_kd(spec)
        ratios.append(n_teacher / n)
        scratch.append(s)
        kd.append(k)
        rows.append({"student": models.describe(spec), "params": f"{n:,}", "compression": f"{n_teacher / n:.1f}x",
                     "scratch (%)": f"{100 * s.mean:.2f}", "KD (%)": f"{100 * k.mean:.2f}",
                     "KD % of teacher": f"{100 * k.mean / teacher_acc:.1f}", "seeds": k.n})
    return rows, ratios, scratch, kd


def plot_compression(ratios, scratch, kd, teacher_acc: float):
    """KD and scratch against the compression ratio; the teacher as a grey line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, series in (("KD", kd), ("scratch", scratch)):
        ax.errorbar(ratios, [100 * s.mean for s in series], yerr=[100 * s.std for s in series], marker="o", capsize=3,
                    label=name)
    ax.axhline(100 * teacher_acc, linestyle="--", color="0.4", label="teacher")
    ax.set_xscale("log")
    ax.set_xticks(ratios)
    ax.set_xticklabels([f"{r:.0f}x" for r in ratios])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("compression (teacher params / student params)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def teacher_rows(teachers: dict, test_logits: dict, ece: dict, students: dict, test_labels: torch.Tensor,
                 student_train: Split) -> list[dict]:
    """The over-fitted-teacher table: for each ``name -> teacher`` its test
    accuracy (from ``test_logits[name]``), its ECE on test (``ece[name]``, a
    fraction), the mean entropy (bits) of its predictions on the student's
    training images, and the test accuracy of ``students[name]`` (a Run)."""
    missing = [name for name in teachers if name not in test_logits or name not in ece or name not in students]
    if missing:
        raise KeyError(f"teacher_rows: no test logits, ECE or student run for {missing}; give each teacher all three")
    return [{"teacher": name,
             "teacher test acc (%)": f"{100 * float((test_logits[name].argmax(1) == test_labels).float().mean()):.2f}",
             "teacher ECE on test (%)": f"{100 * ece[name]:.2f}",
             "mean entropy of its predictions on the student's images (bits)":
                 f"{float(entropy_bits(torch.softmax(memo_logits(t, student_train), 1)).mean()):.3f}",
             "student test acc (%)": f"{100 * students[name].test_acc:.2f}"} for name, t in teachers.items()]


def missing_class_rows(students: dict, data, missing: int, grid=None, choose_bias: Callable | None = None) -> list[dict]:
    """For each ``name -> model`` trained without class ``missing``: its recall
    of that class and test accuracy, before and after adding the bias to that
    class's logit that maximises **validation** accuracy — chosen by
    ``choose_bias(val_logits, val_labels, missing, grid)`` (the student's, in
    the lab) or, by default, here."""
    grid = torch.linspace(0, 20, 81) if grid is None else grid

    def recall_and_acc(logits, labels, bias):
        shifted = logits.clone()
        shifted[:, missing] += bias
        pred = shifted.argmax(1)
        return float((pred[labels == missing] == missing).float().mean()), float((pred == labels).float().mean())

    rows, name = [], data.classes[missing]
    for student, model in students.items():
        val_logits, test_logits = predict_logits(model, data.val), predict_logits(model, data.test)
        if choose_bias is not None:
            b = float(choose_bias(val_logits, data.val.labels, missing, grid))
        else:
            b = float(max(grid, key=lambda v: recall_and_acc(val_logits, data.val.labels, float(v))[1]))
        r0, a0 = recall_and_acc(test_logits, data.test.labels, 0.0)
        r1, a1 = recall_and_acc(test_logits, data.test.labels, b)
        rows.append({"student": student, f"recall '{name}' (%)": round(100 * r0, 1), "test acc (%)": round(100 * a0, 2),
                     "bias (chosen on val)": round(b, 2), "recall after bias (%)": round(100 * r1, 1),
                     "test acc after bias (%)": round(100 * a1, 2)})
    return rows
