"""kdcourse — the package behind the knowledge-distillation course.

Modules (lower layers never import upper ones):

1. ``losses``                      pure loss functions of tensors
2. ``models``, ``data``, ``profiles``, ``runtime``
3. ``train`` (the one loop), ``runs`` (seeded runs), ``zoo`` (cached teachers)
4. ``checks``, ``widgets``, ``plots``
5. ``labgen``, ``notebooks``, ``bench``, ``cli``
"""
__version__ = "0.1.0"
