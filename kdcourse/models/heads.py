"""Extra heads on top of a network: auxiliary classifiers at intermediate
layers (deep supervision, BYOT) and the average of several models.

* :class:`ExitHead`, :class:`DeepSupervision` — "be your own teacher"
  (Zhang et al., ICCV 2019, arXiv:1905.08094): classifiers ("exits") at
  named intermediate layers of a backbone, without changing its output.
* :class:`EnsembleTeacher` — the average of several models' logits or
  probabilities, as one model (Hinton et al. 2015, arXiv:1503.02531, sec. 1).
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import runtime
from ..losses.mutual import average_logits, average_probs_as_logits
from .vision import conv_bn


class EnsembleTeacher(nn.Module):
    """The average of several models' predictions, as one model ``x -> logits``.

    Args:
        members: models ``x -> logits`` (N, C), all over the same classes.
        mode: ``"logits"`` — the mean of the members' logits; ``"probs"`` —
            logits whose softmax at temperature ``T`` is the mean of the
            members' softmax at ``T`` (``T * log mean_k softmax(z_k / T)``).
        T: the temperature of ``mode="probs"``; give it the temperature the
            distillation loss uses (:func:`ensemble_distill` does). Ignored
            for ``mode="logits"``.

    The two modes differ: averaging logits multiplies the members'
    probabilities (a geometric mean, renormalised); averaging probabilities
    adds them (Hinton et al. 2015 average the ensemble's predictions).
    """

    def __init__(self, members: Sequence[nn.Module], mode: str = "logits", T: float = 1.0):
        super().__init__()
        if mode not in ("logits", "probs"):
            raise ValueError(f"mode must be 'logits' (average logits) or 'probs' (average probabilities), got {mode!r}")
        members = list(members)
        if not members:
            raise ValueError("members is empty: pass at least one trained model")
        self.members = nn.ModuleList(members)
        self.mode, self.T = mode, float(T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [m(x) for m in self.members]
        if self.mode == "logits":
            return average_logits(logits)
        return average_probs_as_logits(logits, T=self.T)


class ExitHead(nn.Module):
    """An auxiliary classifier on a feature map (B, C, H, W): a 3x3 stride-2
    convolution (a small bottleneck, as BYOT puts before each shallow
    classifier), global average pooling and a linear layer."""

    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        self.conv = conv_bn(in_channels, width, stride=2)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(feature), 1), 1))


class DeepSupervision(nn.Module):
    """A backbone with auxiliary classifiers ("exits") at named layers.

    ``model(x)`` returns exactly ``backbone(x)``: the heads read the
    intermediate features and change nothing in the backbone's forward pass
    (they change its *training* through their losses, which is the point).
    :meth:`exits_logits` returns every exit's logits, the backbone's own
    head last under the name ``"final"``.

    Args:
        backbone: a model ``x -> logits``. Models of :mod:`kdcourse.models`
            are read with ``return_features=True``; any other model through
            forward hooks on the submodules named in ``exits``.
        exits: names of intermediate layers (``backbone.get_submodule(name)``
            or keys of its features dict), shallow to deep.
        width: channels of each head's bottleneck (default: the widest
            feature map among the backbone's measured features).
        example_input: an input shape used once to measure the features' sizes.
    """

    def __init__(self, backbone: nn.Module, exits: Sequence[str] = ("layer1", "layer2"), width: int | None = None,
                 example_input: tuple = (1, 3, 32, 32)):
        super().__init__()
        exits = tuple(exits)
        if not exits:
            raise ValueError("exits is empty: name at least one intermediate layer, e.g. exits=('layer1', 'layer2')")
        if "final" in exits:
            raise ValueError("'final' is reserved for the backbone's own head; name intermediate layers only")
        self.backbone = backbone
        self.exits = exits
        try:
            self._native = "return_features" in inspect.signature(backbone.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            self._native = False
        if not self._native:
            names = dict(backbone.named_modules())
            missing = [e for e in exits if e not in names]
            if missing:
                raise ValueError(f"exits {missing} are not submodules of the backbone; choose from {sorted(n for n in names if n)[:12]} …")
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            logits, feats = self._forward_features(torch.zeros(example_input, device=runtime.device_of(backbone)))
        backbone.train(was_training)
        missing = [e for e in exits if e not in feats]
        if missing:
            raise ValueError(f"exits {missing} are not among the backbone's features {sorted(feats)}")
        flat = [e for e in exits if not isinstance(feats[e], torch.Tensor) or feats[e].ndim != 4]
        if flat:
            raise ValueError(f"exits {flat} do not give (B, C, H, W) feature maps; choose convolutional layers "
                             f"such as 'layer1' or 'layer2'")
        num_classes = logits.shape[1]
        width = width or max(int(f.shape[1]) for f in feats.values() if isinstance(f, torch.Tensor) and f.ndim == 4)
        self.heads = nn.ModuleDict({e: ExitHead(int(feats[e].shape[1]), width, num_classes) for e in exits})

    def _forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self._native:
            return self.backbone(x, return_features=True)
        store: dict = {}
        handles = [self.backbone.get_submodule(e).register_forward_hook(
            lambda module, inputs, output, e=e: store.__setitem__(e, output)) for e in self.exits]
        try:
            logits = self.backbone(x)
        finally:
            for h in handles:
                h.remove()
        return logits, store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def exits_logits(self, x: torch.Tensor) -> dict:
        """``{exit name: logits (B, C)}`` for every exit, then ``"final"``."""
        logits, feats = self._forward_features(x)
        out = {e: self.heads[e](feats[e]) for e in self.exits}
        out["final"] = logits
        return out
