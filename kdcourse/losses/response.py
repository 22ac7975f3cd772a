"""Response-based distillation (Hinton, Vinyals & Dean 2015, arXiv:1503.02531).

Notation: ``z_s``, ``z_t`` are student and teacher logits (N, C); ``T > 0`` is
the temperature; ``p^T = softmax(z / T)``.

* soft targets           p_i^T = exp(z_i / T) / sum_j exp(z_j / T)
* distillation term      KL(p_t^T || p_s^T) = sum_i p_t,i^T (log p_t,i^T - log p_s,i^T)
  averaged over the N samples (PyTorch's ``reduction="batchmean"``; plain
  ``"mean"`` would also divide by C and is a common bug)
* KD loss                alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(z_s, y)

Why T^2: the gradient of the KL term with respect to a student logit is
(p_s,i^T - p_t,i^T) / T, and for large T that is about (z_s,i - z_t,i) / (C T^2)
(zero-mean logits). Multiplying by T^2 keeps the soft term's gradients on the
same scale as the hard term's whatever the temperature (Hinton et al. 2015,
section 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _validate


_check_temperature = _validate.temperature  # old private names, kept for callers
_check_logits = _validate.logits


def soft_targets(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) along the last dimension.

    Args:
        logits: (..., C) raw scores.
        T: temperature > 0. T -> 0 gives the one-hot argmax, T -> inf uniform.
    Returns:
        probabilities of the same shape, each row summing to 1.

    Source: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning
        Workshop (arXiv:1503.02531, 2015).
    """
    T = _validate.temperature(T)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError("logits must be a floating-point torch.Tensor of shape (..., C)")
    return F.softmax(logits / T, dim=-1)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(p_t^T || p_s^T), summed over classes and averaged over the N samples.

    The teacher's distribution is the target (first argument of the KL), as in
    Hinton et al.; minimising it over the student is cross-entropy with soft
    targets minus the (constant) teacher entropy.

    Args:
        student_logits, teacher_logits: (N, C).
        T: temperature > 0 applied to *both* sides.
    Returns:
        scalar tensor (>= 0).

    Source: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning
        Workshop (arXiv:1503.02531, 2015).
    """
    T = _validate.temperature(T)
    _validate.logits("student_logits", student_logits)
    _validate.logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (N, C)"
        )
    log_p_s = F.log_softmax(student_logits / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=-1)
    # F.kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    T: float = 4.0,
    alpha: float = 0.9,
) -> torch.Tensor:
    """Hinton's distillation loss.

        loss = alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))
               + (1 - alpha) * CE(z_s, labels)

    Args:
        student_logits: (N, C) student scores (gradients flow through these).
        teacher_logits: (N, C) teacher scores (treated as constants).
        labels: (N,) int64 class indices, or ``None`` for pure distillation
            (then ``alpha`` must be 1).
        T: temperature > 0 (Hinton et al. used 1-20; 2-8 is typical).
        alpha: weight of the distillation term, in [0, 1].
    Returns:
        scalar tensor.

    Source: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning
        Workshop (arXiv:1503.02531, 2015).
    """
    alpha = _validate.alpha(alpha)
    soft = kl_divergence(student_logits, teacher_logits.detach(), T) * (_validate.temperature(T) ** 2)
    if labels is None:
        if alpha != 1.0:
            raise ValueError("labels=None needs alpha=1 (there is no hard-label term to blend)")
        return soft
    labels = _validate.labels(labels, student_logits.shape[0], student_logits.shape[1])
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard


def entropy_bits(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits along the last dimension, with 0 log 0 = 0.

    Args:
        probs: (..., C) probabilities (rows sum to 1, else an error: logits or
            scores are not probabilities; all-zero rows count as 0 bits).
    Returns:
        (...) entropies; a uniform distribution over C classes gives log2(C).
    """
    if not isinstance(probs, torch.Tensor):
        probs = torch.as_tensor(probs, dtype=torch.float64)
    if (probs < 0).any():
        raise ValueError("probs must be non-negative (did you pass logits? apply softmax first)")
    _validate.probabilities("probs", probs)
    logp = torch.where(probs > 0, torch.log2(probs.clamp_min(torch.finfo(probs.dtype).tiny)), torch.zeros_like(probs))
    return -(probs * logp).sum(-1)
