"""The course's models: ``build`` a model from a spec, count its parameters.

* :mod:`.vision` — ResNet (CIFAR style), SmallCNN, MobileCNN, MLP for 32x32 images,
  all able to return named features (``model(x, return_features=True)``);
* :mod:`.heads` — auxiliary exits (deep supervision) and ensembles;
* :mod:`.detector` — the toy dense detector of Lab 2;
* :mod:`.bert` — a BERT-style classifier from a Hugging Face config (Lab 3).
"""
from __future__ import annotations

import torch.nn as nn

from .vision import (FEATURE_NAMES, MLP, BasicBlock, MobileCNN, ResNet, SmallCNN, _Staged, conv_bn,  # noqa: F401
                     separable)

ARCHS = {"resnet": ResNet, "cnn": SmallCNN, "mobile": MobileCNN, "mlp": MLP}


def build(spec: dict, num_classes: int = 10) -> nn.Module:
    """Build a model from a spec such as ``{"arch": "resnet", "depth": 14, "width": 16}``."""
    if not isinstance(spec, dict) or "arch" not in spec:
        raise ValueError(f"spec must be a dict with an 'arch' key, got {spec!r}")
    spec = dict(spec)
    arch = spec.pop("arch")
    if arch not in ARCHS:
        raise ValueError(f"spec['arch']={arch!r} is not known; use one of {sorted(ARCHS)}")
    return ARCHS[arch](num_classes=num_classes, **spec)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(spec: dict) -> str:
    """Short human name for a spec, e.g. ``resnet14-w16`` or ``cnn-8-16-32``."""
    if spec["arch"] == "resnet":
        return f"resnet{spec.get('depth', 20)}-w{spec.get('width', 16)}" + ("-s2" if spec.get("stem_stride", 1) == 2 else "")
    if spec["arch"] == "cnn":
        return "cnn-" + "-".join(str(w) for w in spec.get("widths", (8, 16, 32))) + (f"x{spec['convs']}" if spec.get("convs", 1) > 1 else "")
    if spec["arch"] == "mobile":
        return "mobile-" + "-".join(str(w) for w in spec.get("widths", (16, 32, 64))) + f"x{spec.get('blocks', 2)}"
    return spec["arch"]
