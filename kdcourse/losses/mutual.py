"""Learning from peers and from several teachers: pure functions of logits.

Notation: ``K`` models (peers or teachers) give logits ``z_1 .. z_K``, each
(N, C); ``p_k^T = softmax(z_k / T)``; ``y`` are the labels (N,).

Deep mutual learning (Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning",
CVPR 2018, arXiv:1706.00384). Every peer learns from the labels
and from each of the other peers::

    L_k   = (1 - alpha) * CE(z_k, y)
            + alpha * T^2 * 1/(K-1) * sum_{l != k} KL(p_l^T || p_k^T)
    L     = sum_k L_k                                   (what is minimised)

* The other peers' predictions ``p_l`` are **targets**: they are detached,
  so the gradient of ``L`` with respect to peer ``k``'s logits is the
  gradient of ``L_k`` alone. Summing the ``L_k`` and taking one optimiser
  step therefore updates every peer by its own loss, and no peer is pulled
  towards another by the other's loss (the gradients of the peers stay
  separate; they meet only through the values of the predictions).
* The KL is averaged over the other peers (one KL per peer), not taken
  against the peers' averaged prediction.
* The paper uses ``T = 1`` and weights CE and KL equally: its loss is
  ``2 * L`` at ``alpha = 0.5`` (a constant factor Adam does not see).
  ``T > 1`` with the ``T^2`` factor follows Hinton et al. (2015).
* The paper updates the peers one after another within each mini-batch,
  recomputing predictions in between; training all peers from the same
  predictions with one step (as here) needs one forward pass per peer.

Ensembles of teachers (the "multi-teacher" and "ensemble of generations"
targets) come in two kinds, and they differ:

* :func:`average_logits` — ``mean_k z_k``; softmax at temperature ``T``
  of the averaged logits is a normalised *geometric* mean of the members'
  ``p_k^T``.
* :func:`average_probs_as_logits` — logits whose softmax at ``T`` is the
  *arithmetic* mean ``mean_k p_k^T`` (Hinton et al. 2015, section 1, average
  the members' predictions): ``T * log(mean_k softmax(z_k / T))``.
  Any distillation loss that divides logits by the same ``T`` then sees
  exactly the averaged probabilities.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from . import _validate

from ._validate import logits as _check_logits
from ._validate import temperature as _check_temperature


def _check_alpha(alpha) -> float:
    return _validate.alpha(alpha, what="weight of the peer term")


def _check_group(name: str, logits: Sequence[torch.Tensor], min_k: int) -> list[torch.Tensor]:
    if isinstance(logits, torch.Tensor):
        if logits.ndim != 3:
            raise ValueError(f"{name} must be a list of (N, C) tensors or one (K, N, C) tensor, got shape {tuple(logits.shape)}")
        logits = list(logits.unbind(0))
    if not isinstance(logits, (list, tuple)):
        raise ValueError(f"{name} must be a list of (N, C) logit tensors, one per model, got {type(logits).__name__}")
    if len(logits) < min_k:
        raise ValueError(f"{name} needs at least {min_k} models' logits, got {len(logits)}")
    for k, z in enumerate(logits):
        _check_logits(f"{name}[{k}]", z)
        if z.shape != logits[0].shape:
            raise ValueError(
                f"{name}[{k}] has shape {tuple(z.shape)} but {name}[0] has {tuple(logits[0].shape)}; "
                f"every model must score the same N images over the same C classes"
            )
    return list(logits)


def _check_labels(labels, n: int, num_classes: int | None = None) -> torch.Tensor:
    return _validate.labels(labels, n, num_classes)


def peer_kl(logits: torch.Tensor, peer_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_peer^T || p^T)``, batch-averaged; the peer is a constant.

    Args:
        logits: (N, C) the learning model's logits (gradients flow here).
        peer_logits: (N, C) the other model's logits (detached here).
        T: temperature > 0 on both sides.
    Returns:
        scalar tensor (>= 0).

    Source: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018 (arXiv:1706.00384).
    """
    T = _check_temperature(T)
    _check_logits("logits", logits)
    _check_logits("peer_logits", peer_logits)
    if logits.shape != peer_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and peer_logits {tuple(peer_logits.shape)} must have the same shape (N, C)")
    log_p = F.log_softmax(logits / T, dim=-1)
    log_q = F.log_softmax(peer_logits.detach() / T, dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (T * T)


def mutual_learning_losses(
    peer_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    T: float = 1.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Each peer's deep-mutual-learning loss ``L_k`` (see the module docstring).

    Args:
        peer_logits: K >= 2 tensors (N, C), one per peer (or one (K, N, C) tensor).
        labels: (N,) int64 class indices.
        T: temperature > 0 of the peer term (the paper: 1).
        alpha: weight of the peer term in [0, 1]; 0 is independent training.
    Returns:
        (K,) tensor; entry k depends on peer k's logits only (others detached).

    Source: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018 (arXiv:1706.00384).
    """
    logits = _check_group("peer_logits", peer_logits, min_k=2)
    T, alpha = _check_temperature(T), _check_alpha(alpha)
    labels = _check_labels(labels, logits[0].shape[0], logits[0].shape[1])
    K = len(logits)
    out = []
    for k, z in enumerate(logits):
        kl = sum(peer_kl(z, logits[j], T) for j in range(K) if j != k) / (K - 1)
        out.append((1.0 - alpha) * F.cross_entropy(z, labels) + alpha * kl)
    return torch.stack(out)


def mutual_learning_loss(
    peer_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    T: float = 1.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """``sum_k L_k``: the scalar to minimise when all peers train together.

    Same arguments as :func:`mutual_learning_losses`; returns a scalar.

    Source: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018 (arXiv:1706.00384).
    """
    return mutual_learning_losses(peer_logits, labels, T=T, alpha=alpha).sum()


def average_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``mean_k z_k``: (N, C) from K >= 1 tensors (N, C) (or one (K, N, C))."""
    group = _check_group("logits", logits, min_k=1)
    return torch.stack(group).mean(0)


def average_probs_as_logits(logits: Sequence[torch.Tensor], T: float = 1.0) -> torch.Tensor:
    """Logits ``T * log(mean_k softmax(z_k / T))`` (N, C).

    ``softmax(result / T)`` equals the arithmetic mean of the members'
    probabilities at temperature ``T`` (computed with a log-sum-exp, so it
    stays finite for large logits). ``argmax`` of the result is the
    prediction of the probability-averaging ensemble at that temperature.

    Source: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning
        Workshop (arXiv:1503.02531, 2015). (section 1)
    """
    group = _check_group("logits", logits, min_k=1)
    T = _check_temperature(T)
    log_p = torch.stack([F.log_softmax(z / T, dim=-1) for z in group])  # (K, N, C)
    return T * (torch.logsumexp(log_p, dim=0) - math.log(len(group)))
