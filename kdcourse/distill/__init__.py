"""The distillation objectives: plug-ins of the one loop (:func:`kdcourse.train.fit`).

==========================  ==============================================  =====
module                      objectives                                      lab
==========================  ==============================================  =====
:mod:`.response`            Distill (Hinton et al. 2015)                    1, all
:mod:`.features`            FeatureDistill + Term, CRDDistill               2
:mod:`.detection`           DetectionObjective (Chen et al. 2017)           2
:mod:`.transformer`         LayerDistill (TinyBERT), DistilBertObjective    3
:mod:`.self`                ExitDistillation (BYOT), MutualLearning (DML)   4
==========================  ==============================================  =====

Each objective's docstring gives the paper it follows. Every objective
resolves its ``T`` and ``alpha`` (numbers or schedules of training
progress) with :func:`kdcourse.train.scheduled` at every step, and declares
``channels_last_ok`` when only the model sees the activations.
"""
from .detection import DetectionObjective  # noqa: F401
from .features import CRDDistill, FeatureDistill, Term  # noqa: F401
from .response import Distill  # noqa: F401
from .self import ExitDistillation, MutualLearning  # noqa: F401
from .transformer import DistilBertObjective, LayerDistill  # noqa: F401
