"""Distillation losses for transformers (TinyBERT, MiniLM, DistilBERT).

Pure functions of tensors that work on any model returning hidden states and
attentions the Hugging Face way:

* ``hidden_states`` is a tuple of ``L + 1`` tensors (B, S, D): index 0 is the
  **embedding output**, index ``k`` the output of layer ``k`` (1-based);
* ``attentions`` is a tuple of ``L`` tensors (B, H, S, S): index ``k - 1``
  belongs to layer ``k``. They are **post-softmax probabilities** (each row
  sums to 1 over the keys; padded keys get exactly 0 when the model was given
  its attention mask). In train mode Hugging Face returns them *after*
  attention dropout (rows then no longer sum to 1): a student whose
  attentions are distilled should use ``attention_probs_dropout_prob=0``.

``attention_mask`` is (B, S), 1/True at real tokens and 0/False at padding.

Layer map (TinyBERT, Jiao et al. 2020, arXiv:1909.10351, section 3.1): a
student of ``L_S`` layers learns from teacher layers ``g(i) = i * L_T / L_S``
for student layers ``i = 1..L_S`` (4 -> 12 gives 3, 6, 9, 12). Both numbers
are 1-based layer numbers, which are also Hugging Face ``hidden_states``
indices; the embedding outputs (index 0) are matched separately by
:func:`embedding_loss`. Mapping by ``zip`` would pair student layers with the
*first* ``L_S`` teacher layers only.

The attention loss chosen here is **KL(teacher || student) on the attention
probabilities** (MiniLM, Wang et al. 2020, arXiv:2002.10957), averaged over
heads and real query positions, summed over real keys. TinyBERT instead takes
an MSE between the *pre-softmax scores*; Hugging Face models do not return
those (their ``attentions`` are probabilities), so matching them would need
hooks into the attention modules. Applying ``softmax``/``log_softmax`` to HF
attentions (as some tutorials do) treats probabilities as scores and is wrong.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import _validate
from ._sequence import _mask, _pair, _project, _tensor  # noqa: F401  (shared with losses.distilbert)


# --------------------------------------------------------------------------
# Layer map
# --------------------------------------------------------------------------

def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer for each student layer, uniformly spread (TinyBERT).

        g(i) = floor(i * n_teacher / n_student),   i = 1 .. n_student

    Layers are numbered from 1 (layer 0 would be the embeddings), so
    ``g(n_student) = n_teacher``: the last student layer always learns from
    the last teacher layer. ``uniform_layer_map(4, 12) == [3, 6, 9, 12]``.

    Args:
        n_student, n_teacher: numbers of transformer layers, 1 <= n_student <= n_teacher.
    Returns:
        list of ``n_student`` teacher layer numbers, strictly increasing.

    Source: Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu, "TinyBERT: Distilling BERT for Natural Language
        Understanding", Findings of EMNLP 2020 (arXiv:1909.10351).
    """
    for name, v in (("n_student", n_student), ("n_teacher", n_teacher)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int (a number of layers), got {v!r}")
    if n_student > n_teacher:
        raise ValueError(f"n_student={n_student} > n_teacher={n_teacher}: a student layer needs its own teacher "
                         f"layer; use a deeper teacher or fewer student layers")
    return [(i * n_teacher) // n_student for i in range(1, n_student + 1)]


def _check_layer_map(layer_map: Sequence[int], n_student: int, n_teacher: int) -> list[int]:
    layer_map = [_validate.layer_index(f"layer_map[{i}]", t) for i, t in enumerate(layer_map)]
    if len(layer_map) != n_student:
        raise ValueError(f"layer_map has {len(layer_map)} entries but the student has {n_student} layers; "
                         f"give one teacher layer per student layer (e.g. uniform_layer_map({n_student}, {n_teacher}))")
    if any(t < 1 or t > n_teacher for t in layer_map):
        raise ValueError(f"layer_map entries must be teacher layer numbers 1..{n_teacher} (0 is the embedding "
                         f"output, matched by embedding_loss), got {layer_map}")
    return layer_map


# --------------------------------------------------------------------------
# Hidden states and embeddings (TinyBERT eqs. 7 and 9)
# --------------------------------------------------------------------------

def masked_mse(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the real tokens only.

        sum_{b,s} m_bs * ||x_bs - y_bs||^2 / (D * sum_{b,s} m_bs)

    (Equal to ``F.mse_loss`` on the unpadded tokens.)

    Args:
        student, teacher: (B, S, D) (the student already projected to the teacher's width).
        attention_mask: (B, S) 1 at real tokens, 0 at padding; ``None`` = all real.

    Source: Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu, "TinyBERT: Distilling BERT for Natural Language
        Understanding", Findings of EMNLP 2020 (arXiv:1909.10351).
    """
    b, s, d = _pair("student", student, "teacher", teacher, 3, "(B, S, D)",
                    "; project the student to the teacher's width first")
    m = _mask(attention_mask, b, s, student)
    sq = (student - teacher.to(student.dtype)).pow(2).sum(-1)
    return (sq * m).sum() / (m.sum() * d)


def hidden_state_loss(
    student_hidden_states: Sequence[torch.Tensor],
    teacher_hidden_states: Sequence[torch.Tensor],
    layer_map: Sequence[int],
    projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TinyBERT's hidden-state loss over mapped layers.

        L_hidn = (1 / L_S) * sum_{i=1}^{L_S} MSE_mask( H^S_i W_h , H^T_{g(i)} )

    Args:
        student_hidden_states: HF tuple of ``L_S + 1`` tensors (B, S, d_s);
            index 0 (embeddings) is *not* used here.
        teacher_hidden_states: HF tuple of ``L_T + 1`` tensors (B, S, d_t)
            (entries never indexed may be ``None``, e.g. from a cache).
        layer_map: ``L_S`` teacher layer numbers, 1-based (see :func:`uniform_layer_map`).
        projection: learned map d_s -> d_t (``W_h``, e.g. ``nn.Linear``), shared by all
            layers; ``None`` only when d_s == d_t.
        attention_mask: (B, S); padded tokens are left out of the MSE.
    Returns:
        scalar tensor.

    Source: Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu, "TinyBERT: Distilling BERT for Natural Language
        Understanding", Findings of EMNLP 2020 (arXiv:1909.10351).
    """
    n_s, n_t = len(student_hidden_states) - 1, len(teacher_hidden_states) - 1
    if n_s < 1:
        raise ValueError("student_hidden_states must hold L_S + 1 tensors (embeddings first), got "
                         f"{len(student_hidden_states)}; call the model with output_hidden_states=True")
    layer_map = _check_layer_map(layer_map, n_s, n_t)
    total = 0.0
    for i, t in enumerate(layer_map, start=1):
        h_t = teacher_hidden_states[t]
        if h_t is None:
            raise ValueError(f"teacher_hidden_states[{t}] is None: the teacher targets do not hold layer {t}")
        h_s = _project(student_hidden_states[i], projection, h_t.shape[-1], "hidden_state_loss")
        total = total + masked_mse(h_s, h_t, attention_mask)
    return total / len(layer_map)


def embedding_loss(
    student_embeddings: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TinyBERT's embedding-layer loss: MSE_mask(E^S W_e, E^T).

    Args:
        student_embeddings: (B, S, d_s) — HF ``hidden_states[0]`` of the student.
        teacher_embeddings: (B, S, d_t) — HF ``hidden_states[0]`` of the teacher.
        projection: learned d_s -> d_t map (``W_e``); ``None`` only when d_s == d_t.
        attention_mask: (B, S).

    Source: Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu, "TinyBERT: Distilling BERT for Natural Language
        Understanding", Findings of EMNLP 2020 (arXiv:1909.10351).
    """
    _tensor("teacher_embeddings", teacher_embeddings, 3, "(B, S, D)")
    s = _project(_tensor("student_embeddings", student_embeddings, 3, "(B, S, D)"), projection,
                 teacher_embeddings.shape[-1], "embedding_loss")
    return masked_mse(s, teacher_embeddings, attention_mask)


# --------------------------------------------------------------------------
# Attention (MiniLM-style KL on probabilities)
# --------------------------------------------------------------------------

def attention_kl(
    student_attention: torch.Tensor,
    teacher_attention: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions of one layer.

        L_attn = 1 / (H * N_q) * sum_{b,h} sum_{q real} sum_{k real}
                 a^T_bhqk * (log a^T_bhqk - log a^S_bhqk)

    where ``N_q`` is the number of real query positions in the batch. Padded
    query rows (whatever the model puts there) and padded keys are left out;
    ``0 * log 0 = 0``. Inputs are **probabilities** (HF ``attentions``), not
    scores: no softmax is applied here.

    Args:
        student_attention, teacher_attention: (B, H, S, S) rows over keys summing to 1.
            Equal head counts are required (per-head maps are compared).
        attention_mask: (B, S) 1 at real tokens; ``None`` = all real.
        eps: floor for the student's probabilities inside the log.
    Returns:
        scalar tensor (>= 0).

    Source: Wang, Wei, Dong, Bao, Yang & Zhou, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
        Compression of Pre-Trained Transformers", NeurIPS 2020 (arXiv:2002.10957).
    """
    _pair("student_attention", student_attention, "teacher_attention", teacher_attention, 4, "(B, H, S, S)",
          lambda s_shape, t_shape: " — the numbers of heads differ; give the student the teacher's "
                                   "num_attention_heads" if s_shape[1] != t_shape[1] else "")
    _validate.probabilities("student_attention", student_attention, atol=1e-2)
    _validate.probabilities("teacher_attention", teacher_attention, atol=1e-2)
    b, h, s, _ = student_attention.shape
    m = _mask(attention_mask, b, s, student_attention)
    t = teacher_attention.to(student_attention.dtype)
    pair = m[:, None, :, None] * m[:, None, None, :]  # (B, 1, S, S): real query and real key
    kl = torch.xlogy(t, t) - torch.xlogy(t, student_attention.clamp_min(eps))
    return (kl * pair).sum() / (h * m.sum())


def attention_loss(
    student_attentions: Sequence[torch.Tensor],
    teacher_attentions: Sequence[torch.Tensor],
    layer_map: Sequence[int],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over student layers of :func:`attention_kl` with the mapped teacher layer.

    HF ``attentions`` have one entry per layer and **no** embedding entry, so
    layer ``k`` is ``attentions[k - 1]``.

    Args:
        student_attentions: ``L_S`` tensors (B, H, S, S).
        teacher_attentions: ``L_T`` tensors (B, H, S, S) (unused entries may be ``None``).
        layer_map: ``L_S`` teacher layer numbers, 1-based.
        attention_mask: (B, S).

    Source: Wang, Wei, Dong, Bao, Yang & Zhou, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
        Compression of Pre-Trained Transformers", NeurIPS 2020 (arXiv:2002.10957).; layer map: Jiao, Yin, Shang,
        Jiang, Chen, Li, Wang & Liu, "TinyBERT: Distilling BERT for Natural Language Understanding", Findings of
        EMNLP 2020 (arXiv:1909.10351).
    """
    n_s, n_t = len(student_attentions), len(teacher_attentions)
    layer_map = _check_layer_map(layer_map, n_s, n_t)
    total = 0.0
    for i, t in enumerate(layer_map, start=1):
        a_t = teacher_attentions[t - 1]
        if a_t is None:
            raise ValueError(f"teacher_attentions[{t - 1}] (layer {t}) is None: the teacher targets do not hold it")
        total = total + attention_kl(student_attentions[i - 1], a_t, attention_mask)
    return total / len(layer_map)


# --------------------------------------------------------------------------
# Prediction layer (TinyBERT eq. 10)
# --------------------------------------------------------------------------

def prediction_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """TinyBERT's prediction-layer loss: soft cross-entropy at temperature T.

        L_pred = -(1/N) * sum_n sum_c softmax(z_t / T)_c * log softmax(z_s / T)_c

    It differs from KL(p_t || p_s) by the teacher's entropy, a constant, so
    the gradients are the same. (For the T^2-scaled blend with the labels use
    :func:`kdcourse.losses.response.kd_loss`.)

    Args:
        student_logits, teacher_logits: (N, C).
        T: temperature > 0 (TinyBERT uses T = 1).

    Source: Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu, "TinyBERT: Distilling BERT for Natural Language
        Understanding", Findings of EMNLP 2020 (arXiv:1909.10351).
    """
    _pair("student_logits", student_logits, "teacher_logits", teacher_logits, 2, "(N, C)")
    T = _validate.temperature(T)
    p_t = F.softmax(teacher_logits.detach() / T, dim=-1)
    return -(p_t * F.log_softmax(student_logits / T, dim=-1)).sum(-1).mean()



# DistilBERT (Sanh et al. 2019): soft CE + MLM + cosine, in kdcourse.losses.distilbert (re-exported).
from .distilbert import distilbert_loss, hidden_cosine_loss, masked_lm_loss, token_soft_ce  # noqa: E402,F401
