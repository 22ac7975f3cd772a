"""Relation-based distillation: match how samples relate to *each other*.

Every loss here takes a batch of student and teacher embeddings — (B, D_s)
and (B, D_t), or feature maps (B, C, H, W) flattened per sample — and
compares a B x B (or B x B x B) structure computed from each side, so the
two networks' widths need not match and no regressor is needed.

* :func:`rkd_distance` — RKD distance-wise (Park et al. 2019,
  arXiv:1904.05068): pairwise Euclidean distances, each side divided by the
  mean of its distances over all pairs i != j, compared with the Huber loss.
* :func:`rkd_angle` — RKD angle-wise: the cosine of the angle at every
  vertex j of every triplet (i, j, k), compared with the Huber loss. (A
  reference chapter's "angle-wise" loss is a Gram-matrix loss, not this.)
* :func:`similarity_preserving` — SP (Tung & Mori 2019, arXiv:1907.09682):
  row-L2-normalised Gram matrices G = F F^T, squared Frobenius distance / B^2.
* :func:`batch_similarity_kl` — the lab handout's relation loss: a softmax
  over the batch of logit dot products, KL(teacher || student).

Teacher inputs are detached (constants).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _validate

EPS = 1e-12


def _check_pair(student, teacher, min_batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point torch.Tensor of shape (B, D) or (B, C, H, W)")
        if x.ndim < 2:
            raise ValueError(f"{name} must have a batch dimension and features, shape (B, D); got {tuple(x.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must hold the same B samples, got batch sizes {student.shape[0]} and {teacher.shape[0]}"
        )
    if student.shape[0] < min_batch:
        raise ValueError(f"relation losses compare samples with each other: need a batch of at least {min_batch}, "
                         f"got {student.shape[0]}")
    return student.flatten(1), teacher.detach().flatten(1)


# --------------------------------------------------------------------------
# RKD
# --------------------------------------------------------------------------

def pairwise_distances(e: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Euclidean distances (B, B) between the rows of ``e`` (B, D).

    Safe for equal rows: the square root is taken only where the squared
    distance exceeds ``eps`` (elsewhere the distance is 0 with zero
    gradient), so duplicates in a batch give finite gradients — the
    derivative of sqrt at 0 is infinite.
    """
    sq = (e.unsqueeze(1) - e.unsqueeze(0)).pow(2).sum(-1)
    pos = sq > eps
    return torch.where(pos, sq.where(pos, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def normalized_distances(e: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """psi_D: pairwise distances divided by mu, their mean over all pairs i != j.

    mu averages every off-diagonal pair, as the RKD paper defines it (eq. 4).
    A duplicate pair (squared distance <= ``eps``) counts at distance
    ``sqrt(eps)`` = 1e-6, in mu and in psi, as the authors' code does (it
    clamps squared distances to 1e-12 before the square root); the value is
    a constant there (zero gradient). (Not divided by the maximum: one
    outlier pair would shrink every other distance.)

    Source: Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068).
    """
    d = pairwise_distances(e, eps)
    off = ~torch.eye(d.shape[0], dtype=torch.bool, device=d.device)
    d = torch.where(off & (d == 0), torch.full_like(d, eps ** 0.5), d)
    return d / d[off].mean()


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance-wise loss.

        psi_D(x_i, x_j) = ||x_i - x_j||_2 / mu,   mu = mean of ||x_k - x_l||_2 over all pairs k != l
        L = mean_{i,j} huber( psi_D(s_i, s_j) - psi_D(t_i, t_j) )

    Huber (smooth L1) with delta = 1; the mean runs over all B^2 ordered
    pairs (the diagonal contributes 0), as in the authors' code. Each side
    is normalised by its *own* mean distance, so the student matches the
    teacher's geometry, not its scale.

    Args:
        student: (B, D_s) embeddings (or (B, ...) flattened per sample).
        teacher: (B, D_t), detached. B >= 2.
    Returns:
        scalar tensor. RepDistiller weights it by 25.

    Source: Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068).
    """
    s, t = _check_pair(student, teacher)
    return F.smooth_l1_loss(normalized_distances(s), normalized_distances(t))


def _safe_unit(d: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """d / ||d|| along the last dim; exactly 0 (with zero gradient) where
    ||d||^2 <= eps. ``F.normalize`` instead divides by max(||d||, eps), whose
    gradient is about 1/eps = 1e12 at a zero vector."""
    sq = d.pow(2).sum(-1, keepdim=True)
    pos = sq > eps
    norm = sq.where(pos, torch.ones_like(sq)).sqrt()
    return torch.where(pos, d / norm, torch.zeros_like(d))


safe_unit = _safe_unit  # public name: Lab 2 compares it with F.normalize and v / v.norm() on a zero vector


def triplet_angles(e: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """psi_A: cos of the angle at x_j in the triangle (x_i, x_j, x_k), as a
    (B, B, B) tensor indexed [j, i, k]: < (x_i - x_j)/||.||, (x_k - x_j)/||.|| >.
    Entries with i = j, k = j (or equal samples) are 0.

    Computed from the Gram matrix G of the centred rows (angles do not change
    under translation; centring limits cancellation):
    <x_i - x_j, x_k - x_j> = G_ik - G_ij - G_jk + G_jj — B^3 elementwise
    operations instead of B batched (B x D) @ (D x B) products.

    Source: Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068).
    """
    e = e - e.mean(dim=0, keepdim=True)
    g = e @ e.t()
    diag = g.diagonal()
    sq = (diag.unsqueeze(0) + diag.unsqueeze(1) - 2 * g).clamp_min(0)  # sq[j, i] = ||x_i - x_j||^2
    pos = sq > eps
    inv = torch.where(pos, sq.where(pos, torch.ones_like(sq)).rsqrt(), torch.zeros_like(sq))  # 1/||x_i - x_j||, 0 if equal
    num = g.unsqueeze(0) - g.unsqueeze(2) - g.unsqueeze(1) + diag.view(-1, 1, 1)  # [j, i, k]
    return num * inv.unsqueeze(2) * inv.unsqueeze(1)


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle-wise loss on every triplet.

        psi_A(x_i, x_j, x_k) = < e_ij, e_kj >,  e_ij = (x_i - x_j) / ||x_i - x_j||_2
        L = mean_{i,j,k} huber( psi_A(s_i, s_j, s_k) - psi_A(t_i, t_j, t_k) )

    Huber with delta = 1, mean over all B^3 ordered triplets (degenerate
    ones, with i = j or k = j, contribute 0 on both sides), as in the
    authors' code. Unit vectors use a safe norm: two *equal* samples give a
    zero vector with zero gradient instead of an exploding one.

    Args:
        student: (B, D_s); teacher: (B, D_t), detached. B >= 3. Memory B^2 * D.
    Returns:
        scalar tensor. RepDistiller weights it by 50.

    Source: Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068).
    """
    s, t = _check_pair(student, teacher, min_batch=3)
    return F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))


# --------------------------------------------------------------------------
# Similarity-preserving
# --------------------------------------------------------------------------

def sp_gram(features: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Tung & Mori's G~: G = Q Q^T with Q = features reshaped to (B, -1),
    then each row divided by its L2 norm. (B, B).

    Source: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (arXiv:1907.09682).
    """
    q = features.flatten(1)
    return F.normalize(q @ q.t(), p=2, dim=1, eps=eps)


def similarity_preserving(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD for one pair of layers.

        G = Q Q^T,  G~[i, :] = G[i, :] / ||G[i, :]||_2
        L = (1 / B^2) || G~_T - G~_S ||_F^2

    Not the cosine-similarity matrix (normalising Q's rows first): that is a
    different loss, not a rescaling of this one.

    Args:
        student: (B, C_s, H_s, W_s) or (B, D_s); teacher: (B, ...) of any
            width, detached. B >= 2.
    Returns:
        scalar tensor. The paper weights it by gamma = 3000.
    Reference: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, eq. (2)-(4).

    Source: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (arXiv:1907.09682).
    """
    s, t = _check_pair(student, teacher)
    return (sp_gram(t) - sp_gram(s)).pow(2).sum() / s.shape[0] ** 2


# --------------------------------------------------------------------------
# The handout's batch-similarity KL
# --------------------------------------------------------------------------

def batch_similarity_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 0.5,
                        normalize: bool = False) -> torch.Tensor:
    """KL between per-sample distributions over the batch.

        S = z z^T / tau,   P[i, :] = softmax(S[i, :])
        L = (1/B) sum_i KL( P_t[i, :] || P_s[i, :] )

    Args:
        student_logits, teacher_logits: (B, C) (any width; only dot products
            within each side are used).
        tau: temperature > 0 (the handout: 0.5).
        normalize: L2-normalise each row of z first (cosine similarities).
            Without it, a sample's dot product with *itself* dominates its row
            when logits are large, and P is nearly one-hot on the diagonal —
            measure it in the lab before trusting this loss.
    Returns:
        scalar tensor.

    Source: this course's lab handout (no paper).
    """
    tau = _validate.temperature(tau, name="tau", typical="0.1-1")
    s, t = _check_pair(student_logits, teacher_logits)
    if normalize:
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    log_p_s = F.log_softmax(s @ s.t() / tau, dim=1)
    log_p_t = F.log_softmax(t @ t.t() / tau, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def similarity_entropy(logits: torch.Tensor, tau: float = 0.5, normalize: bool = False) -> torch.Tensor:
    """Mean entropy (nats) of the rows of softmax(z z^T / tau) — log(B) is
    uniform over the batch, 0 is one-hot. A diagnostic for
    :func:`batch_similarity_kl`."""
    tau = _validate.temperature(tau, name="tau", typical="0.1-1")
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim < 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point torch.Tensor of shape (B, C), got {got}")
    z = _validate.batch("logits", logits).detach().flatten(1)
    if normalize:
        z = F.normalize(z, dim=1)
    p = F.softmax(z @ z.t() / tau, dim=1)
    return -(p * p.clamp_min(1e-30).log()).sum(1).mean()
