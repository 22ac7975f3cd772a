"""Checks every loss shares: a bad input is a clear error naming the argument
and the fix, never a silent NaN or a quietly different loss.

* :func:`temperature` — a finite number > 0 (``T`` softens class
  distributions; ``tau``/``temperature`` scale similarities: same rule);
* :func:`alpha` — a blend weight in [0, 1];
* :func:`batch` — a tensor with at least ``min_batch`` samples (a mean over
  an empty batch is NaN);
* :func:`labels` — integer class indices in 0..C-1 (no ``-100``, which
  ``F.cross_entropy`` would silently skip; no float labels cast with ``.long()``);
* :func:`token_labels` — masked-LM targets: a token id in 0..V-1, or ``-100``
  where nothing is predicted (the one place ``-100`` is meant); integers only;
* :func:`probabilities` — non-negative rows that sum to 1 (attention
  *scores* before the softmax are not probabilities);
* :func:`layer_index` — a whole number (1.5 is not layer 1).

A loss (a mean) refuses an empty batch; a function that gives one value per
sample (``soft_targets``, ``entropy_bits``, ``pairwise_distances``, ...)
gives an empty result for one.
"""
from __future__ import annotations

import math
import numbers

import torch


def temperature(T, name: str = "T", typical: str = "1-20") -> float:
    """``T`` as a float; raises unless it is one finite number > 0."""
    if isinstance(T, torch.Tensor):
        if T.numel() != 1:
            raise ValueError(f"{name} must be a positive scalar, got a tensor of shape {tuple(T.shape)}")
        T = T.item()
    if isinstance(T, bool) or not isinstance(T, numbers.Real) or not math.isfinite(float(T)) or T <= 0:
        raise ValueError(f"{name} (temperature) must be a finite number > 0 (typical: {typical}), got {T!r}")
    return float(T)


def alpha(a, name: str = "alpha", what: str = "weight of the distillation term") -> float:
    """A blend weight in [0, 1]."""
    if isinstance(a, torch.Tensor) and a.numel() == 1:
        a = a.item()
    if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(float(a)) or not 0.0 <= a <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] ({what}), got {a!r}")
    return float(a)


def batch(name: str, x: torch.Tensor, min_batch: int = 1) -> torch.Tensor:
    """Raise when ``x`` holds fewer than ``min_batch`` samples along dim 0."""
    if x.ndim == 0 or x.shape[0] < min_batch:
        n = 0 if x.ndim == 0 else x.shape[0]
        if n == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}): a mean over 0 samples is NaN; "
                             f"skip empty batches (e.g. drop_last, or check len(batch) > 0)")
        raise ValueError(f"{name} needs a batch of at least {min_batch} samples, got {n}")
    return x


def labels(y, n: int, num_classes: int | None = None, name: str = "labels") -> torch.Tensor:
    """Integer class indices of shape (n,), each in 0..num_classes-1; returned as int64."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of class indices, shape ({n},), got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices (torch.int64), got dtype {y.dtype}; a float label "
                         f"cast with .long() would be truncated silently: pass the class indices themselves")
    if tuple(y.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} contains {int(y.min())} (e.g. -100, cross_entropy's ignore_index): the KD losses "
                         f"average over every sample, so drop unlabelled samples before the loss (or pass labels=None "
                         f"with alpha=1)")
    if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
        raise ValueError(f"{name} contains class {int(y.max())} but the logits have {num_classes} classes (0..{num_classes - 1})")
    return y.long()


def token_labels(y, shape, num_classes: int, name: str = "mlm_labels", ignore_index: int = -100) -> torch.Tensor:
    """Masked-LM targets of ``shape``: a token id in 0..num_classes-1 where a
    token is predicted, ``ignore_index`` elsewhere; returned as int64."""
    shape = tuple(shape)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{name} must be an int64 tensor of shape {shape} with {ignore_index} at unmasked positions, "
                         f"got {got}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids (torch.int64), got dtype {y.dtype}; a float label cast "
                         f"with .long() would be truncated silently: pass the token ids themselves")
    bad = (y != ignore_index) & ((y < 0) | (y >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"{name} contains {int(y[bad][0])}: a target is a token id in 0..{num_classes - 1} (the "
                         f"logits' last dimension), or {ignore_index} where nothing is predicted")
    return y.long()


def probabilities(name: str, p: torch.Tensor, dim: int = -1, atol: float = 1e-3) -> torch.Tensor:
    """Raise unless ``p`` is non-negative and sums to 1 along ``dim`` (rows of
    all zeros, e.g. padding, are allowed)."""
    if p.numel() == 0:
        return p
    with torch.no_grad():
        q = p.detach().float()
        sums = q.sum(dim)
        ok_rows = ((sums - 1).abs() <= atol) | (sums.abs() <= atol)
        if bool((q < -atol).any()) or not bool(ok_rows.all()):
            raise ValueError(f"{name} must be probabilities (non-negative, each row summing to 1 along dim {dim}); got "
                             f"values in [{float(q.min()):.3g}, {float(q.max()):.3g}] and row sums in "
                             f"[{float(sums.min()):.3g}, {float(sums.max()):.3g}]. Attention scores before the softmax "
                             f"are not probabilities: pass softmax(scores, dim=-1) (Hugging Face's output_attentions)")
    return p


def layer_index(name: str, k) -> int:
    """A layer number as an int; raises for 1.5, True or "3"."""
    if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point():
        k = k.item()
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"{name} must be a whole layer number (int), got {k!r}; int() would truncate it silently")
    return int(k)


def logits(name: str, x) -> torch.Tensor:
    """A floating-point (N, C) tensor with N >= 1."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, C), got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(
            f"{name} must have shape (N, C), got {tuple(x.shape)}; "
            f"flatten extra dimensions first, e.g. {name}.reshape(-1, {name}.shape[-1])"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return batch(name, x)
