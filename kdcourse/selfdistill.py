"""Old import path of Lab 4's code (kept so existing notebooks keep working).

The code now lives where each idea belongs:

* statistics (``summary_of``, ``verdict``, ``significance``, ``per_seed``,
  ``compare_row``): :mod:`kdcourse.runs`
* ``DeepSupervision``, ``ExitHead``, ``EnsembleTeacher``: :mod:`kdcourse.models.heads`
* ``ExitDistillation``, ``MutualLearning``: :mod:`kdcourse.distill.self`
* the lab's runners, data and temperature sweep: :mod:`kdcourse.recipes.lab4`
* ``LabSettings``/``settings``: :mod:`kdcourse.profiles` (``Lab4Settings``, ``lab4_settings``)
* ``with_label_noise``: :mod:`kdcourse.data`
"""
from .data import with_label_noise  # noqa: F401
from .distill.self import ExitDistillation, MutualLearning  # noqa: F401
from .models.heads import DeepSupervision, EnsembleTeacher, ExitHead  # noqa: F401
from .profiles import Lab4Settings as LabSettings  # noqa: F401
from .profiles import lab4_settings as settings  # noqa: F401
from .recipes.lab4 import (LAPTOP_N_TRAIN, BornAgainResult, ExitResult, MutualResult, born_again,  # noqa: F401
                           ensemble_distill, exit_accuracies, lab_data, peer_accuracies, run_born_again,
                           run_deep_supervision, run_mutual, temperature_sweep)
from .runs import compare_row, per_seed, significance, summary_of, verdict  # noqa: F401
from .train import Distill, Objective, evaluate, fit  # noqa: F401  (names the old module had)
