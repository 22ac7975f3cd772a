"""Old import path of Lab 2's code (kept so existing notebooks keep working).

* ``Term``, ``FeatureDistill``, ``CRDDistill``: :mod:`kdcourse.distill.features`
* the teacher-output cache (``teacher_outputs``, ``clear_teacher_cache``): :mod:`kdcourse.teacher_cache`
* the toy detection data: :mod:`kdcourse.data.toy_detection`; the detector and
  its metrics: :mod:`kdcourse.models.detector`; its objective: :mod:`kdcourse.distill.detection`
* the lab's methods and weights (``lab2_objective``, ``scale_weights``, ``lab_settings``):
  :mod:`kdcourse.recipes.lab2`; ``REPDISTILLER_WEIGHTS`` and the settings: :mod:`kdcourse.profiles`
"""
from .data.toy_detection import TOY_CLASSES, ToyDetection, toy_detection_data  # noqa: F401
from .distill.detection import DetectionObjective  # noqa: F401
from .distill.features import CACHE_LIMIT_BYTES, CRDDistill, FeatureDistill, Term  # noqa: F401
from .models.detector import ToyDetector, box_iou_cells, detection_scores  # noqa: F401
from .profiles import LAB2, REPDISTILLER_WEIGHTS  # noqa: F401
from .recipes.lab2 import LAB2_METHODS, LAB2_WEIGHT_KEYS, lab2_objective, lab_settings, scale_weights  # noqa: F401
from .teacher_cache import clear_teacher_cache, teacher_outputs  # noqa: F401
from .train import Objective, freeze  # noqa: F401
