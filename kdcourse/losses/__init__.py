"""Distillation losses: pure functions of tensors (plus small modules where a
loss owns parameters). They import torch only: no data, models or training."""
from .response import entropy_bits, kd_loss, kl_divergence, soft_targets

__all__ = ["entropy_bits", "kd_loss", "kl_divergence", "soft_targets"]
