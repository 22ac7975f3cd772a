"""The objective of the toy detector: its task loss plus detection distillation
(Chen et al., NeurIPS 2017, "Learning Efficient Object Detection Models with
Knowledge Distillation"; the terms are in :mod:`kdcourse.losses.detection`)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import features as fx
from .. import runtime
from ..data import Batch, Split
from ..data.toy_detection import ToyDetection
from ..train import Objective, StepOutput, TrainState, freeze
from .features import _probe


class DetectionObjective(Objective):
    """Task loss of the toy detector, plus (with a ``teacher``) the three
    detection-distillation terms of :mod:`kdcourse.losses.detection`.

        task  = CE(object anchors) + CE(background anchors) + smooth-L1 on the true boxes
        distil = w_cls * classification_kd(softmax, T)     object anchors + background anchors
                                                            (``balance=False``: one mean over all anchors)
               + w_box * masked_box_regression(mask = teacher says "object" with p > 0.5)
               + w_feat * multiscale_feature_loss(levels, adapters)      1x1 adapters where channels differ

    Targets are looked up by ``batch.index`` in ``data`` (a :class:`ToyDetection`).

    Source: after Chen, Choi, Yu, Han & Chandraker, "Learning Efficient Object Detection Models with Knowledge
        Distillation", NeurIPS 2017.; feature imitation after Wang, Yuan, Zhang & Feng, "Distilling Object
        Detectors with Fine-grained Feature Imitation", CVPR 2019.
    """

    def __init__(self, data: ToyDetection, teacher: nn.Module | None = None, T: float = 2.0, w_cls: float = 1.0,
                 w_box: float = 1.0, w_feat: float = 1.0, levels: Sequence[str] = ("p3", "p4"), balance: bool = True):
        super().__init__()
        self.data, self.T, self.w_cls, self.w_box, self.w_feat = data, T, w_cls, w_box, w_feat
        self.balance = balance
        self.levels = list(levels)
        object.__setattr__(self, "teacher", freeze(teacher) if teacher is not None else None)
        self.adapters = nn.ModuleDict()

    def setup(self, model: nn.Module, train: Split) -> None:
        from ..losses.detection import FeatureAdapters

        if len(train) != len(self.data.split):
            raise ValueError("train must be the ToyDetection split these targets belong to (data.split)")
        if self.teacher is not None and self.w_feat:
            x = train.images[:2].to(runtime.device_of(model))
            s = _probe(model, x, self.levels)
            t = _probe(self.teacher, x.to(runtime.device_of(self.teacher)), self.levels)
            self.adapters = FeatureAdapters({k: v[0] for k, v in s.items()}, {k: v[0] for k, v in t.items()}).to(runtime.device_of(model))

    def predict(self, model, x):
        return model(x)[0].flatten(0, 1)  # (B * A, C + 1): not used for accuracy (fit gets val=None)

    def forward(self, model: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        from ..losses.detection import classification_kd, masked_box_regression, multiscale_feature_loss

        dev = batch.x.device
        cls_t, box_t = self.data.cls[batch.index].to(dev), self.data.box[batch.index].to(dev)
        if self.teacher is not None and self.w_feat:
            (cls, box), s_feats = fx.extract(model, batch.x, self.levels)
        else:
            (cls, box), s_feats = model(batch.x), {}
        pos = cls_t > 0
        ce_all = F.cross_entropy(cls.flatten(0, 1), cls_t.flatten(), reduction="none").view_as(cls_t)
        ce = ce_all[pos].mean() + ce_all[~pos].mean()  # objects and background weighted equally
        reg = masked_box_regression(box, box_t, pos.float())
        loss = ce + reg
        parts = {"ce": ce.item(), "box": reg.item()}
        if self.teacher is not None:
            with torch.no_grad():
                (t_cls, t_box), t_feats = fx.extract(self.teacher, batch.x, self.levels, detach=True)
            mask = (1 - t_cls.softmax(-1)[..., 0]) > 0.5
            if self.balance:  # object and background anchors weighted equally, like the task loss
                kd_cls = classification_kd(cls, t_cls, T=self.T, kind="softmax", mask=pos) + \
                    classification_kd(cls, t_cls, T=self.T, kind="softmax", mask=~pos)
            else:  # plain mean over anchors: ~90% of them are background here
                kd_cls = classification_kd(cls, t_cls, T=self.T, kind="softmax")
            kd_box = masked_box_regression(box, t_box, mask.float())
            loss = loss + self.w_cls * kd_cls + self.w_box * kd_box
            parts.update(kd_cls=kd_cls.item(), kd_box=kd_box.item())
            if self.w_feat:
                kd_feat = multiscale_feature_loss(s_feats, t_feats, self.adapters)
                loss = loss + self.w_feat * kd_feat
                parts["kd_feat"] = kd_feat.item()
        return StepOutput(loss, None, parts)
