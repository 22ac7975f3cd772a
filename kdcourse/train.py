"""One training loop for every lab; the loss is a plug-in (an *objective*).

    history = fit(student, data.train, Distill(teacher, T=4, alpha=0.9),
                  epochs=20, val=data.val)

An objective is called once per mini-batch as ``objective(model, batch, state)``
and returns a :class:`StepOutput` (the loss to minimise, the logits used for
training accuracy, and named parts of the loss for the history). Objectives
are ``nn.Module`` s, so one that owns parameters (a hint regressor, a memory
bank) has them optimised together with the model. Before the first epoch
``fit`` calls ``objective.setup(model, train)`` (e.g. to cache teacher logits).

The loop knows no concrete loss or objective: distillation objectives live
in :mod:`kdcourse.distill` (``Distill`` in :mod:`kdcourse.distill.response`),
and each declares whether ``fit`` may train in channels-last layout
(``channels_last_ok``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import runtime
from .data import Batch, Split


# --------------------------------------------------------------------------
# State passed to objectives, and what they return
# --------------------------------------------------------------------------

@dataclass
class TrainState:
    """Where training is: objectives use ``progress`` (0 -> 1) for schedules."""

    epoch: int = 0
    epochs: int = 1
    step: int = 0
    steps_per_epoch: int = 1

    @property
    def progress(self) -> float:
        return min(1.0, (self.epoch * self.steps_per_epoch + self.step) / max(1, self.epochs * self.steps_per_epoch))


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to minimise
    logits: torch.Tensor | None = None  # (B, C) for training accuracy, or None
    parts: dict = field(default_factory=dict)  # name -> float, logged per epoch


def scheduled(value, state: TrainState) -> float:
    """A number, or a schedule ``f(progress) -> number`` evaluated now."""
    return float(value(state.progress)) if callable(value) else float(value)


# --------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------

class Objective(nn.Module):
    """Base class: cross-entropy on the model's logits."""

    channels_last_ok = True  # only the model sees activations (see _use_channels_last)

    def setup(self, model: nn.Module, train: Split) -> None:
        """Called once by :func:`fit` before the first epoch."""

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits used for evaluation (override for multi-model objectives)."""
        return model(x)

    def forward(self, model: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        logits = model(batch.x)
        loss = F.cross_entropy(logits, batch.labels)
        return StepOutput(loss, logits, {"ce": loss.item()})


CrossEntropy = Objective


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter; returns the model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model




# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------

@torch.no_grad()
def predict_logits(model, split: Split, batch_size: int = 512, predict: Callable | None = None) -> torch.Tensor:
    """Logits (N, C) for every sample of ``split``, in order, in eval mode."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    dev = _model_device(model)
    predict = predict or (lambda m, x: m(x))
    out = [predict(model, b.x).float().cpu() for b in split.batches(batch_size, device=dev)]
    if was_training:
        model.train()
    return torch.cat(out)


def evaluate(model, split: Split, batch_size: int = 512, predict: Callable | None = None) -> dict:
    """``{"acc": accuracy in [0, 1], "loss": mean cross-entropy}`` on ``split``."""
    logits = predict_logits(model, split, batch_size, predict)
    labels = split.labels
    return {
        "acc": (logits.argmax(1) == labels).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
    }


def _model_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------

class History(list):
    """One dict per epoch: ``epoch``, ``loss``, ``train_acc``, ``val_acc``
    (if a validation split was given), ``seconds`` and the objective's parts."""

    def series(self, key: str) -> list:
        return [row.get(key) for row in self]

    def last(self, key: str):
        return self[-1].get(key) if self else None

    @property
    def seconds(self) -> float:
        return sum(self.series("seconds"))


def fit(
    model: nn.Module,
    train: Split,
    objective: Objective | None = None,
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    val: Split | None = None,
    val_each_epoch: bool = True,
    seed: int = 0,
    lr_schedule: str = "cosine",
    progress: bool = True,
    desc: str = "train",
    extra_params: Iterable[torch.nn.Parameter] = (),
    params: Callable[[nn.Module, Objective], Iterable] | None = None,
) -> History:
    """Train ``model`` on ``train`` with ``objective`` (default: cross-entropy).

    Adam (AdamW when ``weight_decay > 0``) over the model's and the
    objective's trainable parameters, learning rate decayed by a cosine
    (``lr_schedule="cosine"``) or kept constant (``"constant"``).
    Shuffling uses a generator seeded by ``seed``. ``val`` is measured
    after every epoch, or only after the last one with
    ``val_each_epoch=False`` (the same numbers: evaluation changes nothing
    the training sees; a lab that reads only the final accuracy saves the
    passes).

    ``params(model, objective)``, when given, is called after
    ``objective.setup`` and lists *exactly* what the optimiser trains
    (tensors, or parameter groups ``{"params": [...], ...}``) instead of
    every trainable parameter of the model and the objective — Lab 2's
    FitNets exercise hands its own list (regressors included) this way.

    Raises ``FloatingPointError`` as soon as the loss is NaN or infinite,
    naming the epoch and step, instead of training on silently.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
    objective = objective if objective is not None else Objective()
    dev = runtime.device()
    model.to(dev)
    objective.to(dev)
    gen = torch.Generator().manual_seed(seed)
    objective.setup(model, train)
    cl = _use_channels_last(objective, train, dev)
    if cl:
        model.to(memory_format=torch.channels_last)

    if params is not None:
        groups = list(params(model, objective))
        if not groups:
            raise ValueError("params(model, objective) returned an empty list: nothing to train")
        trained = groups + ([{"params": list(extra_params)}] if extra_params else [])
        if isinstance(groups[0], dict):
            trained = [g if isinstance(g, dict) else {"params": [g]} for g in trained]
        else:
            trained = [p for g in trained for p in (g["params"] if isinstance(g, dict) else [g])]
    else:
        trained, seen = [], set()
        for p in list(model.parameters()) + list(objective.parameters()) + list(extra_params):
            if p.requires_grad and id(p) not in seen:
                trained.append(p)
                seen.add(id(p))
        if not trained:
            raise ValueError("nothing to train: the model and objective have no parameters with requires_grad=True")
    opt_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    opt = opt_cls(trained, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = train.num_batches(batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 0.5 * (1 + math.cos(math.pi * s / total))) if lr_schedule == "cosine" else (lambda s: 1.0)
    )

    history = History()
    state = TrainState(epochs=epochs, steps_per_epoch=steps_per_epoch)
    bar = _progress_bar(range(epochs), desc, progress)
    for epoch in bar:
        state.epoch = epoch
        model.train()
        objective.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        correct = seen_n = 0
        for step, batch in enumerate(train.batches(batch_size, shuffle=True, generator=gen, device=dev)):
            state.step = step
            if cl:
                batch = batch._replace(x=batch.x.contiguous(memory_format=torch.channels_last))
            out = objective(model, batch, state)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(
                    f"loss became {out.loss.item()} at epoch {epoch + 1}, step {step + 1} ({desc}); "
                    f"lower lr (now {lr}) or check the loss for log(0) / division by zero"
                )
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            n = len(batch.labels)
            seen_n += n
            sums["loss"] = sums.get("loss", 0.0) + out.loss.item() * n
            for k, v in out.parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            if out.logits is not None:
                correct += (out.logits.argmax(1) == batch.labels).sum().item()
        row = {"epoch": epoch + 1, **{k: v / seen_n for k, v in sums.items()}}
        row["train_acc"] = correct / seen_n if correct or out.logits is not None else None
        row["seconds"] = time.perf_counter() - t0
        if val is not None and (val_each_epoch or epoch == epochs - 1):
            row["val_acc"] = evaluate(model, val, predict=lambda m, x: objective.predict(m, x))["acc"]
        history.append(row)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: round(row[k], 4) for k in ("loss", "train_acc", "val_acc") if row.get(k) is not None})
    if cl:
        model.to(memory_format=torch.contiguous_format)  # hand back a model in the usual layout
    model.eval()
    return history


def _use_channels_last(objective: Objective, train: Split, dev: torch.device) -> bool:
    """Train in channels-last memory layout (about 20 % faster for the small
    CNNs on a CPU) only where nothing but the model sees the activations:
    on a CPU, with image batches, for cross-entropy, distillation from
    cached teacher logits, and objective classes that set
    ``channels_last_ok = True`` themselves (or a property that says so per
    instance: Lab 2's feature objectives with a cached teacher, which hand
    the losses contiguous features so student code calling ``.view`` still
    works). Live teachers keep the default layout."""
    images = getattr(train, "images", None)
    if dev.type != "cpu" or not isinstance(images, torch.Tensor) or images.dim() != 4:
        return False
    # only classes that declare it themselves (a subclass that reads features must not inherit it);
    # a property decides per instance (e.g. only with a cached teacher)
    flag = type(objective).__dict__.get("channels_last_ok", False)
    return bool(flag.__get__(objective) if isinstance(flag, property) else flag)


def _progress_bar(it, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="epoch", leave=False)


def __getattr__(name: str):
    """Old import paths (``from kdcourse.train import Distill, memo_logits``),
    resolved on first use so that this module imports no objective."""
    if name == "Distill":
        from .distill.response import Distill

        return Distill
    if name in ("memo_logits", "clear_logit_memo", "LOGIT_MEMO_SIZE"):
        from . import teacher_cache

        return getattr(teacher_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
