"""Teachers and students for 32x32 images, all able to return named features.

* :class:`ResNet` — CIFAR-style ResNet (He et al. 2016, section 4.2): a 3x3
  stem, three stages (``layer1``..``layer3``) of basic blocks at widths
  w, 2w, 4w, global average pooling and a linear head. ``depth = 6n + 2``.
* :class:`SmallCNN` — a plain conv student with the same stage names, so a
  teacher and a student can be paired layer by layer.

``model(x)`` returns logits (B, num_classes); ``model(x, return_features=True)``
returns ``(logits, features)`` where ``features`` maps ``"layer1"``,
``"layer2"``, ``"layer3"`` (B, C, H, W) and ``"pool"`` (B, C) to tensors.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_NAMES = ("layer1", "layer2", "layer3", "pool")


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _Staged(nn.Module):
    """Shared forward for models made of ``stem``, three stages and a head."""

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = {}
        h = self.stem(x)
        for name in ("layer1", "layer2", "layer3"):
            h = getattr(self, name)(h)
            feats[name] = h
        pooled = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        feats["pool"] = pooled
        logits = self.fc(pooled)
        return (logits, feats) if return_features else logits


class ResNet(_Staged):
    """CIFAR-style ResNet of ``depth = 6n + 2`` layers and base ``width``.

    ``stem_stride=2`` halves the resolution in the stem (stages then run at
    16, 8 and 4 pixels for 32x32 input): four times less compute for the same
    parameters, which keeps teachers quick to train on a CPU."""

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10, in_channels: int = 3,
                 stem_stride: int = 1):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        n = (depth - 2) // 6
        self.stem = conv_bn(in_channels, width, stride=stem_stride)
        widths = (width, 2 * width, 4 * width)
        c_in = width
        for i, c_out in enumerate(widths):
            blocks = [BasicBlock(c_in if j == 0 else c_out, c_out, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_channels = {"layer1": widths[0], "layer2": widths[1], "layer3": widths[2], "pool": widths[2]}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class SmallCNN(_Staged):
    """A plain student: a stride-2 stem, then three conv stages at ``widths``
    with ``convs`` 3x3 conv-BN-ReLU layers each, max-pooling between stages.

    For 32x32 input ``layer1`` is at 16x16, ``layer2`` at 8x8 and ``layer3`` at
    4x4 — the spatial sizes of a :class:`ResNet` with ``stem_stride=2``.
    """

    def __init__(self, widths=(8, 16, 32), convs: int = 1, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive ints, got {widths}")
        if not isinstance(convs, int) or convs < 1:
            raise ValueError(f"convs (3x3 layers per stage) must be a positive int, got {convs!r}")
        self.stem = conv_bn(in_channels, widths[0], stride=2)
        c = widths[0]
        for i, w in enumerate(widths):
            layers = [nn.MaxPool2d(2)] if i else []
            for _ in range(convs):
                layers.append(conv_bn(c, w))
                c = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(c, num_classes)
        self.feature_channels = {"layer1": widths[0], "layer2": widths[1], "layer3": widths[2], "pool": widths[2]}


def separable(c_in: int, c_out: int) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1 convolution (MobileNet, Howard et al.
    2017): about 9/c_out + 1/9 of a full 3x3 convolution's parameters."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class MobileCNN(_Staged):
    """A parameter-efficient student: a full 3x3 stem, then three stages of
    depthwise-separable blocks (``blocks`` per stage) at ``widths``, halving
    the resolution between stages (32 -> 16 -> 8 -> 4 for 32x32 input)."""

    def __init__(self, widths=(16, 32, 64), blocks: int = 2, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or min(widths) < 1 or blocks < 1:
            raise ValueError(f"widths must be three positive ints and blocks >= 1, got {widths}, {blocks}")
        self.stem = conv_bn(in_channels, widths[0], stride=2)
        c = widths[0]
        for i, w in enumerate(widths):
            layers = [nn.MaxPool2d(2)] if i else []
            for _ in range(blocks):
                layers.append(separable(c, w))
                c = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(c, num_classes)
        self.feature_channels = {"layer1": widths[0], "layer2": widths[1], "layer3": widths[2], "pool": widths[2]}


class MLP(nn.Module):
    """A multilayer perceptron on flattened inputs (the seed's MLP example)."""

    def __init__(self, in_features: int, hidden=(128,), num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        layers, c = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(c, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            c = h
        layers.append(nn.Linear(c, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
