"""Objectives that distil a network into itself or into its peers (Lab 4).

* :class:`ExitDistillation` — "be your own teacher" (Zhang et al., ICCV 2019,
  arXiv:1905.08094): the deepest exit of a :class:`~kdcourse.models.heads.DeepSupervision`
  model teaches its shallow exits.
* :class:`MutualLearning` — deep mutual learning (Zhang et al., CVPR 2018,
  arXiv:1706.00384): K peers trained together, each learning from the labels
  and the others' detached predictions.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Batch, Split
from ..losses.mutual import average_logits, mutual_learning_loss
from ..losses.response import kd_loss
from ..models.heads import DeepSupervision
from ..train import Objective, StepOutput, TrainState, scheduled


class ExitDistillation(Objective):
    """Train a :class:`DeepSupervision` model: the deepest head teaches the
    shallow ones (BYOT, Zhang et al. 2019, without its feature-hint
    term)::

        loss = CE(z_final, y)
               + sum_exits [ (1 - alpha) * CE(z_exit, y)
                             + alpha * T^2 * KL(p_final^T || p_exit^T) ]

    The final head's probabilities are detached in the KL (a teacher), so the
    KL trains the shallow heads and the layers below them, never the final
    head. ``alpha = 0`` is plain deep supervision (labels at every exit).
    Evaluation uses the backbone's own output (``model(x)``).

    Source: Zhang, Song, Gao, Chen, Bao & Ma, "Be Your Own Teacher: Improve the Performance of Convolutional
        Neural Networks via Self Distillation", ICCV 2019 (arXiv:1905.08094).
    """

    def __init__(self, T=3.0, alpha=0.5, loss: Callable | None = None):
        super().__init__()
        self.T, self.alpha = T, alpha
        self.loss_fn = loss or kd_loss

    def setup(self, model: nn.Module, train: Split) -> None:
        if not isinstance(model, DeepSupervision):
            raise ValueError("ExitDistillation trains a DeepSupervision model: wrap the backbone, "
                             "e.g. DeepSupervision(backbone, exits=('layer1', 'layer2'))")

    def forward(self, model: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        T, alpha = scheduled(self.T, state), scheduled(self.alpha, state)
        out = model.exits_logits(batch.x)
        final = out.pop("final")
        ce_final = F.cross_entropy(final, batch.labels)
        loss, parts = ce_final, {"ce_final": ce_final.item()}
        for name, z in out.items():
            term = self.loss_fn(z, final.detach(), batch.labels, T=T, alpha=alpha)
            loss = loss + term
            parts[f"exit_{name}"] = term.item()
        return StepOutput(loss, final, parts)


class MutualLearning(Objective):
    """Train K >= 2 peers together (``model`` is an ``nn.ModuleList``).

    Each step runs every peer on the batch and minimises
    ``loss(peer_logits, labels, T=, alpha=)`` — by default
    :func:`kdcourse.losses.mutual.mutual_learning_loss`, the sum of the peers'
    DML losses with the other peers' predictions detached, so each peer's
    parameters receive the gradient of its own loss only.

    Args:
        T, alpha: temperature and weight of the peer term (numbers or
            schedules of progress); the paper: T = 1, equal weights.
        loss: your own ``loss(list of (N, C) logits, labels, T=, alpha=)``.
        eval_peer: which peer :meth:`predict` uses (an index), or
            ``"ensemble"`` for the mean of the peers' logits.

    Source: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018 (arXiv:1706.00384).
    """

    channels_last_ok = True  # the peers' logits are all it reads

    def __init__(self, T=1.0, alpha=0.5, loss: Callable | None = None, eval_peer: int | str = 0):
        super().__init__()
        if not (eval_peer == "ensemble" or (isinstance(eval_peer, int) and eval_peer >= 0)):
            raise ValueError(f"eval_peer must be a peer index (0, 1, ...) or 'ensemble', got {eval_peer!r}")
        self.T, self.alpha, self.eval_peer = T, alpha, eval_peer
        self.loss_fn = loss or mutual_learning_loss

    def setup(self, model: nn.Module, train: Split) -> None:
        if not isinstance(model, nn.ModuleList) or len(model) < 2:
            raise ValueError("MutualLearning trains peers: pass model=nn.ModuleList([peer_1, peer_2, ...]) with at least 2 peers")
        if isinstance(self.eval_peer, int) and self.eval_peer >= len(model):
            raise ValueError(f"eval_peer={self.eval_peer} but there are only {len(model)} peers")

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.eval_peer == "ensemble":
            return average_logits([peer(x) for peer in model])
        return model[self.eval_peer](x)

    def forward(self, model: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        T, alpha = scheduled(self.T, state), scheduled(self.alpha, state)
        logits = [peer(batch.x) for peer in model]
        loss = self.loss_fn(logits, batch.labels, T=T, alpha=alpha)
        parts = {f"ce_peer{k}": F.cross_entropy(z.detach(), batch.labels).item() for k, z in enumerate(logits)}
        shown = average_logits([z.detach() for z in logits]) if self.eval_peer == "ensemble" else logits[self.eval_peer]
        return StepOutput(loss, shown, parts)
