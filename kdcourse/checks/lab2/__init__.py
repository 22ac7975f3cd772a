"""Lab 2 checks: the hook extractor, the FitNets hint loss, the FitNets
objective and its parameter list, attention transfer, the RKD distance and
angle losses, the similarity-preserving loss, in-batch InfoNCE, the channel
statistics loss, PKT and linear CKA — each names the usual mistakes, compares
gradients with the reference's (not only values) and names an in-place change
of an input as such.

One module per group of exercises (``extract``, ``hint``, ``at_rkd``,
``fitnets``, ``fitnets_params``, ``sp_nce``, ``angle``, ``similarity``; shared
helpers in ``_common``); every name is re-exported here, so
``from kdcourse.checks import lab2; lab2.check_fitnets`` and
``lab2.EXERCISES`` (read by the grader) work as before.
"""
from __future__ import annotations

from ... import features as fx
from ...losses import feature, relation
from .. import contract
from ._common import (  # noqa: F401
    _clone_args, _loss_data, _pair_probe, _quiet, _r, _randn, check_gradients, check_inputs_untouched,
)
from .angle import (  # noqa: F401
    ANGLE_GRADIENT_VARIANTS, ANGLE_VARIANTS, _ANGLE_CASES, _NORMALIZE_HINT, _SAFE, _angle_variant, _angles_with,
    _chapter_gram, _plain_unit, _with_duplicates, check_rkd_angle, probe_rkd_angle,
)
from .at_rkd import (  # noqa: F401
    AT_VARIANTS, RKD_VARIANTS, _AT_CASES, _RKD_CASES, _at_variant, _map_norm, _mean_nz, _pooled_map_variant,
    _rkd_with, _upsampled_at, check_attention_transfer, check_rkd_distance, probe_at_loss, probe_rkd_distance,
)
from .extract import (  # noqa: F401
    EXTRACT_VARIANTS, _Boom, _NESTED, _extract_hooks_left, _extract_with, check_feature_extractor,
    probe_extract_features,
)
from .fitnets import (  # noqa: F401
    FITNETS_VALUE_HINTS, _DETACHED, _DUPLICATE, _FITNETS_HINTS, _NO_REGRESSOR, _ONE_BY_ONE, _OwnHelpers,
    _REGRESSORS_MISSING, _STUDENT_MISSING, _TEACHER_LISTED, _TEACHER_SIDE, _TRAIN_MODE, _TeacherCalls, _WITH_GRAD,
    _channels, _extract, _fitnets_reference_loss, _match_regressors, _probe_hint, _regressors_of, _stepoutput,
    check_fitnets, fitnets_setting, probe_fitnets, run_fitnets,
)
from .fitnets_params import (  # noqa: F401
    FITNETS_PARAMETER_VARIANTS, FITNETS_VARIANTS, _ParamsObjective, _fitnets_reference, _fitnets_variants,
    _flat_params, check_fitnets_parameters, probe_fitnets_parameters, run_fitnets_parameters,
)
from .hint import (  # noqa: F401
    HINT_EXERCISE_VARIANTS, HINT_VARIANTS, _Counting, _as_exercise_variant, _hint_variant, _ignored_regressor,
    _no_regressor, _pool_larger, _pool_t, _regressor, _teacher_not_detached, check_hint_loss, probe_hint_loss,
)
from .sp_nce import (  # noqa: F401
    INFO_NCE_VARIANTS, SP_VARIANTS, _SP_CASES, _cos, _nce_with, _reference_info_nce, _row_gram, _sp_with,
    check_info_nce, check_sp_loss, probe_info_nce, probe_sp_loss,
)


__all__ = ["check_feature_extractor", "check_hint_loss", "check_attention_transfer", "check_rkd_distance",
           "check_fitnets", "check_fitnets_parameters", "check_sp_loss", "check_info_nce", "check_rkd_angle",
           "ANGLE_VARIANTS", "ANGLE_GRADIENT_VARIANTS",
           "FITNETS_VARIANTS", "FITNETS_PARAMETER_VARIANTS", "self_test_questions",
           "HINT_VARIANTS", "AT_VARIANTS", "RKD_VARIANTS", "SP_VARIANTS", "INFO_NCE_VARIANTS",
           "check_stats_loss", "check_pkt", "check_cka", "STATS_VARIANTS", "PKT_VARIANTS", "CKA_VARIANTS", "EXERCISES"]


# --------------------------------------------------------------------------
# The end-of-lab self-test (checked in the notebook, never graded)
# --------------------------------------------------------------------------

def self_test_questions(cfg: dict, fitnets, scratch) -> list:
    """Lab 2's self-test: three questions on the mechanics, two read from this
    run (``cfg``: the lab's settings; ``fitnets``, ``scratch``: Summaries)."""
    from ... import lesson

    gain = round(100 * (fitnets.mean - scratch.mean), 1)
    return [
        lesson.Choice("optimiser", "Which parameters must the optimiser get when you train with FitNets?",
                      ["the student's only", "the student's and the regressors'",
                       "the student's, the regressors' and the teacher's"], "the student's and the regressors'",
                      "the regressors are trained with the student (left out, they stay random); the teacher is "
                      "frozen — Exercise 4."),
        lesson.Numeric("regressor_weights", "A student layer with 32 channels is hinted by a teacher layer with 128 "
                       "channels. How many numbers (weights and biases) does the 1x1 regressor learn?",
                       32 * 128 + 128, 0.0, "nn.Conv2d(32, 128, 1) has 128 x 32 x 1 x 1 weights and 128 biases."),
        lesson.Choice("sp_rescale", "Multiply one sample's student features by 3. Which loss changes?",
                      ["the cosine-matrix loss only", "SP (row-normalised Gram) only", "both", "neither"],
                      "SP (row-normalised Gram) only",
                      "cosines ignore each sample's length; in G = F F^T the sample's column is scaled in every other "
                      "row, and row-normalising those rows does not undo it (the cell after Exercise 8 computes it)."),
        lesson.Numeric("negatives", "With this lab's batches, how many negatives does in-batch InfoNCE score each "
                       "anchor against?", cfg["batch_size"] - 1, 0.0,
                       f"the other images of the batch: batch size {cfg['batch_size']} minus the positive."),
        lesson.Numeric("fitnets_gain", "By how many points (mean over seeds) did FitNets beat scratch in your section 6 "
                       "table? (negative if it fell below)", gain, 0.11,
                       f"read the 'vs scratch' column of the FitNets row: {gain:+.1f} in this run."),
    ]


EXERCISES = [
    contract.Exercise(name="extract_features", points=1.0, check=check_feature_extractor, probe=probe_extract_features,
                      reference=fx.extract, variants=EXTRACT_VARIANTS, hidden_seeds=(0, 1, 2, 3), rtol=1e-6,
                      atol=1e-9, refuse=(fx.FeatureExtractor.__call__, fx.FeatureExtractor.collect)),
    contract.Exercise(name="hint_loss", points=1.0, check=check_hint_loss, probe=probe_hint_loss,
                      reference=feature.hint_loss, variants=HINT_EXERCISE_VARIANTS, hidden_seeds=(0, 1, 2, 3, 4),
                      rtol=1e-6, atol=1e-9),
    contract.Exercise(name="at_loss", points=1.0, check=check_attention_transfer, probe=probe_at_loss,
                      reference=feature.attention_transfer_loss, variants=AT_VARIANTS, hidden_seeds=tuple(range(6)),
                      rtol=1e-6, atol=1e-9),
    contract.Exercise(name="rkd_distance", points=1.0, check=check_rkd_distance, probe=probe_rkd_distance,
                      reference=relation.rkd_distance, variants=RKD_VARIANTS, hidden_seeds=tuple(range(5)),
                      rtol=1e-6, atol=1e-9),
    contract.Exercise(name="FitNets", points=2.0, check=check_fitnets, probe=probe_fitnets,
                      reference=_fitnets_reference(), variants=FITNETS_VARIANTS, hidden_seeds=(0, 1, 2, 3),
                      rtol=1e-5, atol=1e-7),
    contract.Exercise(name="fitnets_parameters", points=1.0, check=check_fitnets_parameters,
                      probe=probe_fitnets_parameters, reference=_fitnets_reference("fitnets_parameters"),
                      variants=FITNETS_PARAMETER_VARIANTS, hidden_seeds=(0, 1)),
    contract.Exercise(name="rkd_angle", points=1.0, check=check_rkd_angle, probe=probe_rkd_angle,
                      reference=relation.rkd_angle, variants={**ANGLE_VARIANTS, **ANGLE_GRADIENT_VARIANTS},
                      hidden_seeds=tuple(range(5)), rtol=1e-6, atol=1e-9),
    contract.Exercise(name="sp_loss", points=1.0, check=check_sp_loss, probe=probe_sp_loss,
                      reference=relation.similarity_preserving, variants=SP_VARIANTS, hidden_seeds=tuple(range(5)),
                      rtol=1e-6, atol=1e-9),
    contract.Exercise(name="info_nce", points=1.0, check=check_info_nce, probe=probe_info_nce,
                      reference=_reference_info_nce, variants=INFO_NCE_VARIANTS, hidden_seeds=tuple(range(5)),
                      rtol=1e-6, atol=1e-9),
]

# The similarity part (the handout's channel statistics, PKT, linear CKA): checks in .similarity.
from .similarity import (  # noqa: E402
    CKA_VARIANTS, PKT_VARIANTS, STATS_VARIANTS, check_cka, check_pkt, check_stats_loss,
    declarations as _similarity_declarations,
)

EXERCISES += _similarity_declarations()
