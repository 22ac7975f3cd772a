"""Contrastive distillation: make the student's embedding of an image pick out
the teacher's embedding of the *same* image among embeddings of others.

* :func:`info_nce` — in-batch InfoNCE (van den Oord et al. 2018): the other
  B - 1 samples of the batch are the negatives.
* :class:`Embed` — linear projection + L2 normalisation (the heads CRD puts on
  both networks so that their widths need not match).
* :class:`CRDInfoNCE` — contrastive representation distillation with memory
  banks indexed by sample (Tian, Krishnan & Isola 2020, arXiv:1910.10699),
  **simplified**: each anchor is scored against 1 positive + K negatives with
  a softmax (InfoNCE / cross-entropy), where the paper uses its NCE
  objective (a binary classifier per pair with the normaliser Z estimated
  from the first batch). What *is* as in the paper: two memory banks (one
  of teacher embeddings, one of student embeddings) of every training
  sample, addressed by the sample's index (``batch.index``), positives read
  at the sample's own index, K negatives drawn at other indices, both
  directions (student anchor vs teacher bank, teacher anchor vs student
  bank), momentum updates of the banks after each step.

A reference chapter draws its negatives from a randomly initialised bank
written round-robin with no index: its "positive" and "negatives" then have
nothing to do with which image is which.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validate


def _check_emb(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point (B, D) tensor of embeddings, got {shape}; "
                         f"pool feature maps first, e.g. x.mean(dim=(2, 3))")
    return _validate.batch(name, x)


def _check_temperature(temperature) -> float:
    return _validate.temperature(temperature, name="temperature", typical="0.07-0.5")


def info_nce(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """In-batch contrastive loss.

        u = s / ||s||,  v = t / ||t||,  logits[i, j] = <u_i, v_j> / temperature
        L = mean_i CE(logits[i, :], i) = -mean_i log( exp(<u_i,v_i>/tau) / sum_j exp(<u_i,v_j>/tau) )

    Args:
        student: (B, D) embeddings; teacher: (B, D) embeddings of the same B
            images in the same order (project both to a common D first, e.g.
            with :class:`Embed`), treated as constants.
        temperature: tau > 0.
    Returns:
        scalar tensor; log(B) for uninformative embeddings, 0 at best.

    Source: van den Oord, Li & Vinyals, "Representation Learning with Contrastive Predictive Coding",
        arXiv:1807.03748, 2018.
    """
    _check_emb("student", student)
    _check_emb("teacher", teacher)
    tau = _check_temperature(temperature)
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same "
                         f"shape (B, D): project them to a common width first (kdcourse.losses.contrastive.Embed)")
    u, v = F.normalize(student, dim=1), F.normalize(teacher.detach(), dim=1)
    logits = u @ v.t() / tau
    return F.cross_entropy(logits, torch.arange(len(u), device=u.device))


class Embed(nn.Module):
    """Linear projection to ``dim`` followed by L2 normalisation: (B, D_in) -> (B, dim)."""

    def __init__(self, in_dim: int, dim: int = 128):
        super().__init__()
        for arg, v in (("in_dim", in_dim), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        self.linear = nn.Linear(in_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def sample_negatives(index: torch.Tensor, n_data: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, k) indices drawn uniformly from ``range(n_data)`` *excluding* each
    row's own ``index`` (so a positive is never counted as a negative)."""
    idx = index.view(-1, 1).cpu()
    draw = torch.randint(0, n_data - 1, (idx.shape[0], k), generator=generator)
    return draw + (draw >= idx).long()  # skip the own index


class CRDInfoNCE(nn.Module):
    """Simplified CRD: memory banks by sample index, softmax over 1 + K.

    Args:
        student_dim, teacher_dim: widths of the student and teacher embeddings
            fed in (e.g. the pooled features before the classifier).
        n_data: number of samples in the training split (bank size).
        dim: width of the common embedding (the paper: 128).
        k: negatives per anchor (the paper: 16384; at most n_data - 1 here).
        temperature: tau (the paper: 0.07).
        momentum: bank update ``m * old + (1 - m) * new`` then re-normalised
            (the paper: 0.5).

    ``forward(student, teacher, index)`` with (B, D_s), (B, D_t) and the (B,)
    sample indices returns the scalar loss

        L = CE([<u_i, T[idx_i]>, <u_i, T[neg_i1]>, ...] / tau, 0)
          + CE([<v_i, S[idx_i]>, <v_i, S[neg_i1]>, ...] / tau, 0)

    where u = embed_s(student), v = embed_t(teacher) and T, S are the teacher
    and student banks; then (in training mode) writes v and u into the banks
    at ``index``. Call :meth:`fill` first to start the teacher bank from real
    teacher embeddings (otherwise both banks start as random unit vectors,
    and each entry becomes meaningful once its sample has been seen).

    Source: Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020 (arXiv:1910.10699).
    """

    def __init__(self, student_dim: int, teacher_dim: int, n_data: int, dim: int = 128, k: int = 4096,
                 temperature: float = 0.07, momentum: float = 0.5):
        super().__init__()
        if isinstance(n_data, bool) or not isinstance(n_data, int) or n_data < 2:
            raise ValueError(f"n_data must be the size of the training split (>= 2), got {n_data!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (negatives per anchor) must be a positive int, got {k!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.temperature = _check_temperature(temperature)
        self.n_data, self.k, self.momentum = n_data, min(k, n_data - 1), momentum
        self.embed_s = Embed(student_dim, dim)
        self.embed_t = Embed(teacher_dim, dim)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("bank_t", F.normalize(torch.randn(n_data, dim, generator=g), dim=1))
        self.register_buffer("bank_s", F.normalize(torch.randn(n_data, dim, generator=g), dim=1))

    @torch.no_grad()
    def fill(self, teacher: torch.Tensor, student: torch.Tensor | None = None) -> None:
        """Write embeddings of every sample (rows in index order) into the banks."""
        _check_emb("teacher", teacher)
        if teacher.shape[0] != self.n_data:
            raise ValueError(f"fill needs one row per training sample ({self.n_data}), got {teacher.shape[0]}")
        self.bank_t.copy_(self.embed_t(teacher.to(self.bank_t.device)))
        if student is not None:
            self.bank_s.copy_(self.embed_s(student.to(self.bank_s.device)))

    def _contrast(self, anchor: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        idx = torch.cat([index.view(-1, 1).to(bank.device), neg.to(bank.device)], dim=1)  # (B, 1 + K)
        keys = bank[idx]  # (B, 1 + K, dim), no gradient (a buffer)
        logits = torch.bmm(keys, anchor.unsqueeze(2)).squeeze(2) / self.temperature
        return F.cross_entropy(logits, torch.zeros(len(anchor), dtype=torch.long, device=anchor.device))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        _check_emb("student", student)
        _check_emb("teacher", teacher)
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32) or index.ndim != 1 \
                or index.shape[0] != student.shape[0] or teacher.shape[0] != student.shape[0]:
            raise ValueError("index must be the (B,) int64 sample indices of the batch (batch.index), "
                             "with student and teacher of the same batch size B")
        if int(index.min()) < 0 or int(index.max()) >= self.n_data:
            raise ValueError(f"index values must lie in [0, {self.n_data}); is this the split the banks were built for?")
        u = self.embed_s(student)
        v = self.embed_t(teacher.detach())
        neg = sample_negatives(index, self.n_data, self.k)
        loss = self._contrast(u, self.bank_t, index, neg) + self._contrast(v, self.bank_s, index, neg)
        if self.training:
            with torch.no_grad():
                i = index.to(self.bank_t.device)
                m = self.momentum
                self.bank_t[i] = F.normalize(m * self.bank_t[i] + (1 - m) * v.detach(), dim=1)
                self.bank_s[i] = F.normalize(m * self.bank_s[i] + (1 - m) * u.detach(), dim=1)
        return loss

    def extra_repr(self) -> str:
        return (f"n_data={self.n_data}, k={self.k}, temperature={self.temperature}, momentum={self.momentum} "
                f"(simplified CRD: softmax/InfoNCE over 1 + k, not the paper's NCE)")
