"""The distillation objectives: plug-ins of the one loop (:func:`kdcourse.train.fit`).

============================  =====================================  ==========================
module                        objectives                             lab
============================  =====================================  ==========================
:mod:`.self`                  ExitDistillation, MutualLearning       4 (self-distillation)
============================  =====================================  ==========================

Each objective's docstring gives the paper it follows.
"""
