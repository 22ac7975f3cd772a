"""Data-free distillation: losses that turn noise into images a teacher knows.

DeepInversion (Yin et al., *Dreaming to Distill: Data-free Knowledge Transfer
via DeepInversion*, CVPR 2020, arXiv:1912.08795) synthesizes a transfer set
from a trained teacher alone. A batch of noise images ``x`` is optimised so
that (1) the teacher classifies it as chosen classes (cross-entropy), (2) the
activations it causes look like those of the real data, as remembered by the
teacher's batch-norm layers, and (3) it looks like a natural image (a prior).

* :func:`bn_statistics_loss` — the *feature distribution regulariser* of the
  paper (eq. 4): for every batch-norm layer ``l``, the per-channel mean and
  variance of the layer's **input** on the batch, against the layer's running
  mean and running variance::

      R_feature(x) = sum_l ||mu_l(x) - running_mean_l||_2 + ||sigma2_l(x) - running_var_l||_2

  Statistics are per channel, reduced over the batch and spatial positions
  (dims 0, 2, 3 of a (B, C, H, W) input; dim 0 of (B, C)). The variance is
  the **biased** one (divide by N), the one batch norm itself normalises
  with and the one the authors' code uses (``var(1, unbiased=False)``); the
  norms are L2 norms, not their squares (as in the paper and its code).
  The teacher must be in eval mode: in train mode every forward pass would
  move its running statistics (and batch norm would normalise with the
  batch's own statistics).
* :func:`total_variation` and :func:`image_prior` — the image prior of the
  paper (eq. 3, ``R_prior = a_tv R_TV + a_l2 R_l2``). This course uses the
  squared-difference form: the mean squared difference between
  horizontally neighbouring pixels plus the same vertically, and for
  ``R_l2`` the mean squared pixel value. (The authors' code sums L2 norms of
  differences in four directions; the scale is folded into the weights.)

Pure torch: a model is an argument, nothing is trained here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validate


def _check_images(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}"
                         + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    return _validate.batch(name, x)


def batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every batch-norm layer (1d/2d/3d) of ``model`` that
    tracks running statistics, in registration order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


def channel_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and **biased** variance of ``x`` ((B, C, ...)),
    reduced over every dimension except 1 — what batch norm computes."""
    if x.ndim < 2:
        raise ValueError(f"x must have shape (B, C, ...), got {tuple(x.shape)}")
    _validate.batch("x", x)
    dims = [0] + list(range(2, x.ndim))
    var, mean = torch.var_mean(x, dim=dims, unbiased=False)
    return mean, var


def bn_statistics_loss(teacher: nn.Module, images: torch.Tensor, require_eval: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepInversion's feature-statistics loss and the teacher's logits.

    Runs ``teacher`` once on ``images`` with a forward *pre*-hook on every
    batch-norm layer (its input), and returns ``(loss, logits)`` with
    ``loss = sum over layers of ||mean - running_mean||_2 + ||var - running_var||_2``
    (per-channel mean and biased variance of the layer's input). Gradients
    flow to ``images``; the hooks are removed before returning, also on error.
    A teacher in train mode is refused (``require_eval=False`` computes the
    loss anyway: the checks use it to show what train mode does).

    Source: Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha & Kautz, "Dreaming to Distill: Data-free Knowledge
        Transfer via DeepInversion", CVPR 2020 (arXiv:1912.08795).
    """
    _check_images("images", images)
    if require_eval and teacher.training:
        raise ValueError("teacher is in train mode: its running statistics would move with every call "
                         "(and batch norm would use the batch's statistics); call teacher.eval() first")
    layers = batch_norm_layers(teacher)
    if not layers:
        raise ValueError("teacher has no batch-norm layers with running statistics: the loss needs them")
    terms: list[torch.Tensor] = []

    def hook(module, inputs):
        mean, var = channel_statistics(inputs[0])
        terms.append(torch.linalg.vector_norm(mean - module.running_mean)
                     + torch.linalg.vector_norm(var - module.running_var))

    handles = [m.register_forward_pre_hook(hook) for _, m in layers]
    try:
        logits = teacher(images)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(terms).sum(), logits


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between horizontal neighbours plus the mean
    squared difference between vertical neighbours. ``images``: (B, C, H, W).

    Source: the image prior of Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha & Kautz, "Dreaming to Distill:
        Data-free Knowledge Transfer via DeepInversion", CVPR 2020 (arXiv:1912.08795).
    """
    _check_images("images", images)
    if min(images.shape[-2:]) < 2:
        raise ValueError(f"images must be at least 2 x 2 pixels (neighbours to compare), got H x W = "
                         f"{images.shape[-2]} x {images.shape[-1]}: a mean over no neighbour pairs is NaN")
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    return dx.pow(2).mean() + dy.pow(2).mean()


def image_prior(images: torch.Tensor, tv_weight: float, l2_weight: float) -> torch.Tensor:
    """``tv_weight * total_variation(images) + l2_weight * mean(images ** 2)``.

    Source: Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha & Kautz, "Dreaming to Distill: Data-free Knowledge
        Transfer via DeepInversion", CVPR 2020 (arXiv:1912.08795).
    """
    _check_images("images", images)
    for name, w in (("tv_weight", tv_weight), ("l2_weight", l2_weight)):
        if not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"{name} must be a number >= 0, got {w!r}")
    return tv_weight * total_variation(images) + l2_weight * images.pow(2).mean()


def synthesis_loss(teacher: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, bn_weight: float,
                   tv_weight: float, l2_weight: float) -> torch.Tensor:
    """The whole DeepInversion objective for one batch:
    ``CE(teacher(images), targets) + bn_weight * R_feature + R_prior``.

    Source: Yin, Molchanov, Li, Alvarez, Mallya, Hoiem, Jha & Kautz, "Dreaming to Distill: Data-free Knowledge
        Transfer via DeepInversion", CVPR 2020 (arXiv:1912.08795).
    """
    bn, logits = bn_statistics_loss(teacher, images)
    targets = _validate.labels(targets, logits.shape[0], logits.shape[1], name="targets")
    return F.cross_entropy(logits, targets) + bn_weight * bn + image_prior(images, tv_weight, l2_weight)
