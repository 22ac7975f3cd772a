"""Old import path of Lab 3's code (kept so existing notebooks keep working).

* ``BertSpec``, ``LabConfig`` (``Lab3Settings``), ``LAB3``, ``lab_config`` (``lab3_settings``): :mod:`kdcourse.profiles`
* ``TextTransformer``, ``build``, ``bert_config``, ``count_params``: :mod:`kdcourse.models.bert`
* ``mask_tokens``: :mod:`kdcourse.data.reviews`
* ``LayerDistill``, ``DistilBertObjective``, ``TeacherObjective``, ``TeacherTargets``: :mod:`kdcourse.distill.transformer`
* the BERT teacher on disk (``teacher_model``, ``train_teacher``): :mod:`kdcourse.zoo` (``bert_teacher``)
* the recipes and the lab comparison: :mod:`kdcourse.recipes.lab3`
* ``latency``: removed; use :func:`kdcourse.deploy.measure.measure_latency` (p50/p99).
"""
from .data.reviews import mask_tokens  # noqa: F401
from .distill.transformer import (DistilBertObjective, LayerDistill, Projections, TeacherObjective,  # noqa: F401
                                  TeacherTargets)
from .models.bert import TextTransformer, TransformerOutputs, _transformers, bert_config, build, count_params  # noqa: F401
from .profiles import LAB3, BertSpec  # noqa: F401
from .profiles import Lab3Settings as LabConfig  # noqa: F401
from .profiles import lab3_settings as lab_config  # noqa: F401
from .recipes.lab3 import (RECIPES, _run, compare, load_data, progressive, size_and_speed, teacher_targets,  # noqa: F401
                           two_stage)
from .train import Distill, Objective, evaluate, fit, freeze  # noqa: F401
from .zoo import FORMAT  # noqa: F401
from .zoo import _bert_key as _teacher_key  # noqa: F401
from .zoo import bert_teacher as teacher_model  # noqa: F401
from .zoo import train_bert_teacher as train_teacher  # noqa: F401
