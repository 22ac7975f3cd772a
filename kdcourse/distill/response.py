"""Response-based distillation: the student matches the teacher's softened
outputs (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network", 2015, arXiv:1503.02531)::

    loss = (1 - alpha) * CE(student_logits, labels)
           + alpha * T^2 * KL(softmax(teacher_logits / T) || softmax(student_logits / T))

:class:`Distill` wraps any loss with the signature
``loss(student_logits, teacher_logits, labels, T=..., alpha=...)``. The teacher
is frozen and kept in eval mode (asserted every step). When the training
split has no random augmentation the teacher's logits are computed once
(:func:`kdcourse.teacher_cache.memo_logits`) and looked up by sample index
(aligned under shuffling); otherwise the teacher runs live on each augmented
batch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..data import Batch, Split
from ..teacher_cache import memo_logits
from ..train import Objective, StepOutput, TrainState, freeze, scheduled


class Distill(Objective):
    """Distil a frozen ``teacher`` into the model being fitted.

    Args:
        teacher: a trained model (or any callable ``x -> logits``); it is
            frozen and put in eval mode here.
        loss: ``loss(student_logits, teacher_logits, labels, T=, alpha=)``;
            default :func:`kdcourse.losses.kd_loss`. Pass your own to train
            with it.
        T, alpha: numbers, or schedules ``f(progress) -> number`` with
            progress going from 0 to 1 over training.
        cache: ``"auto"`` (cache teacher logits when the split is not
            augmented), ``True`` (require it) or ``False`` (always live).
        frozen: keep ``True``. ``False`` exists only to demonstrate the
            pitfall of an unfrozen teacher: the teacher is then in train mode
            (its batch-norm statistics drift) and its parameters are optimised
            with the student's whenever the loss lets gradients reach
            ``teacher_logits`` (the reference ``kd_loss`` detaches them; a
            typical hand-written loss does not).

    Source: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning
        Workshop (arXiv:1503.02531, 2015).
    """

    # fit may train in channels-last layout when the teacher's logits are cached (only the model sees activations)
    channels_last_ok = property(lambda self: self._cached is not None)

    def __init__(self, teacher, loss: Callable | None = None, T=4.0, alpha=0.9, cache="auto", frozen: bool = True):
        super().__init__()
        if loss is None:
            from ..losses import kd_loss as loss
        if cache not in ("auto", True, False):
            raise ValueError(f"cache must be 'auto', True or False, got {cache!r}")
        self.loss_fn = loss
        self.T, self.alpha, self.cache, self.frozen = T, alpha, cache, frozen
        if frozen:
            # Not registered as a submodule: fit() must neither optimise it
            # nor switch it to train mode.
            object.__setattr__(self, "teacher", freeze(teacher) if isinstance(teacher, nn.Module) else teacher)
        else:
            self.teacher = teacher  # registered: its parameters get optimised
            for p in teacher.parameters():
                p.requires_grad_(True)
        self._cached: torch.Tensor | None = None

    def setup(self, model: nn.Module, train: Split) -> None:
        self._cached = None
        use_cache = self.frozen and (self.cache is True or (self.cache == "auto" and not train.augment))
        if self.cache is True and (train.augment or not self.frozen):
            raise ValueError("cache=True needs a frozen teacher and a split without augmentation (augment=False)")
        if use_cache:
            self._cached = memo_logits(self.teacher, train)

    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        if self._cached is not None:
            return self._cached[batch.index].to(batch.x.device)
        if not self.frozen:
            return self.teacher(batch.x)
        if isinstance(self.teacher, nn.Module) and self.teacher.training:
            raise RuntimeError("the teacher is in train mode; distillation needs teacher.eval() (use kdcourse.train.freeze)")
        with torch.no_grad():
            return self.teacher(batch.x)

    def forward(self, model: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        teacher_logits = self.teacher_logits(batch)
        student_logits = model(batch.x)
        T, alpha = scheduled(self.T, state), scheduled(self.alpha, state)
        loss = self.loss_fn(student_logits, teacher_logits, batch.labels, T=T, alpha=alpha)
        return StepOutput(loss, student_logits, {"kd": loss.item(), "T": T, "alpha": alpha})
