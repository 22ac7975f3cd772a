"""Lab 2's experiments: which objective each method of the lab is, and its weights.

The objectives themselves are :class:`~kdcourse.distill.features.FeatureDistill`
and :class:`~kdcourse.distill.features.CRDDistill`; the settings per profile
are :class:`kdcourse.profiles.Lab2Settings`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch.nn as nn

from ..distill.features import CRDDistill, FeatureDistill, Term
from ..losses import feature, relation
from ..profiles import REPDISTILLER_WEIGHTS, lab2_settings
from ..train import Objective

#: Lab 2's methods -> the entries of the weights dict each one uses (scaled
#: together when a weight is chosen; "response + feature" reuses FitNets').
LAB2_WEIGHT_KEYS = {"feature (FitNets)": ("hint",), "AT": ("at",), "SP": ("sp",),
                    "RKD": ("rkd_distance", "rkd_angle"), "CRD": ("crd",)}
LAB2_METHODS = ("scratch", "response (KD)", "feature (FitNets)", "response + feature", "AT", "SP", "RKD", "CRD")



def lab_settings(profile) -> dict:
    """Lab 2's knobs for ``profile`` as a dict (see :class:`kdcourse.profiles.Lab2Settings`)."""
    return lab2_settings(profile).as_dict()


def scale_weights(weights: dict, method: str, scale: float) -> dict:
    """A copy of ``weights`` with ``method``'s entries (``LAB2_WEIGHT_KEYS``) multiplied by ``scale``."""
    if method not in LAB2_WEIGHT_KEYS:
        raise ValueError(f"method {method!r} has no loss weight; methods with one: {sorted(LAB2_WEIGHT_KEYS)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number (a multiple of the weight), got {scale!r}")
    out = dict(weights)
    for key in LAB2_WEIGHT_KEYS[method]:
        out[key] = float(weights[key]) * float(scale)
    return out


def lab2_objective(method: str, teacher: nn.Module, weights: dict, *, crd_k: int = 4096, hint_layer: str = "layer2",
                   hint_loss: Callable = feature.hint_loss, at_loss: Callable = feature.attention_transfer_loss,
                   rkd_distance: Callable = relation.rkd_distance) -> Callable[[], Objective] | None:
    """A zero-argument factory of Lab 2's objective ``method`` (``None`` for
    scratch: plain cross-entropy), with the loss weights in ``weights``.

    The notebook passes the student's own ``hint_loss``, ``at_loss`` and
    ``rkd_distance``; the defaults are the package's. Every feature term is
    added to cross-entropy; the response rows use Hinton's KD at T = 4,
    alpha = 0.9 (RepDistiller's setting).
    """
    if method not in LAB2_METHODS:
        raise ValueError(f"unknown Lab 2 method {method!r}; choose one of {list(LAB2_METHODS)}")
    needs = LAB2_WEIGHT_KEYS.get("feature (FitNets)" if method == "response + feature" else method, ())
    missing = [k for k in needs if k not in weights]
    if missing:
        raise ValueError(f"weights lacks {missing} for {method!r}; start from dict(REPDISTILLER_WEIGHTS)")
    w = {k: float(weights[k]) for k in needs}
    if method == "scratch":
        return None
    if method == "CRD":
        return lambda: CRDDistill(teacher, weight=w["crd"], k=crd_k)

    def terms() -> list:  # fresh Terms for every objective built
        if method in ("feature (FitNets)", "response + feature"):
            return [Term(hint_layer, hint_layer, hint_loss, w["hint"], name="hint")]
        if method == "AT":
            return [Term(f"layer{i}", f"layer{i}", at_loss, w["at"], name="at") for i in (1, 2, 3)]
        if method == "SP":
            return [Term("layer3", "layer3", relation.similarity_preserving, w["sp"], name="sp")]
        if method == "RKD":  # distance + angle on the pooled embeddings
            return [Term("fc:input", "fc:input", rkd_distance, w["rkd_distance"], name="rkd_d"),
                    Term("fc:input", "fc:input", relation.rkd_angle, w["rkd_angle"], name="rkd_a")]
        return []  # response (KD)

    alpha = 0.9 if method in ("response (KD)", "response + feature") else 0.0
    return lambda: FeatureDistill(teacher, terms(), T=4.0, alpha=alpha)
