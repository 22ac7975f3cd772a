"""kdcourse — the package behind the knowledge-distillation course.

The layer table (the one copy; CONTRIBUTING.md links here). A module imports
only from its own layer or lower ones; ``tests/test_layout.py`` checks it.

=====  =====================================================  ===========================================
layer  modules                                                what lives there
=====  =====================================================  ===========================================
1      ``losses/`` (``_validate`` shared by every loss)        pure loss functions of tensors
2      ``runtime``, ``profiles``, ``data/``, ``models/``,       device/seeds/threads; Profile and one typed
       ``features``                                           settings dataclass per lab; data sets;
                                                              models; the one hook-based feature capture
3      ``train``                                              ``fit``, ``Objective``, ``History``,
                                                              ``evaluate``, ``predict_logits`` (no concrete
                                                              loss or objective)
4      ``teacher_cache``, ``distill/``                        teacher outputs computed once; the
                                                              objectives (``Distill`` and the others)
5      ``zoo``, ``runs``, ``datafree``                        cached teachers on disk (image and BERT);
                                                              seeded runs, summaries, verdicts, rows
6      ``recipes/``, ``deploy/``, ``checks/``, ``lesson``,     the multi-run experiments of each lab;
       ``lab_end``, ``widgets``, ``plots``                    deployment; what notebooks call
7      ``labgen``, ``grading/``, ``tools/``, ``benchmarks/``    instructor and CI tooling
8      ``cli``                                                the one entry point
=====  =====================================================  ===========================================

Old import paths kept as thin re-exports while notebooks move:
``feature_kd``, ``selfdistill``, ``transformers_kd`` (→ ``distill``,
``recipes``, ``models``, ``profiles``, ``zoo``), ``text`` (→ ``data.reviews``),
``notebooks`` and ``report`` (→ ``tools``), ``train.Distill`` (→ ``distill.response``).
"""
__version__ = "0.1.0"
