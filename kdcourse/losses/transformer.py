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


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------

def _tensor(name: str, x, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return _validate.batch(name, x)


def _mask(attention_mask, batch: int, seq: int, like: torch.Tensor) -> torch.Tensor:
    """(B, S) mask as ``like``'s float dtype; all ones when ``None``."""
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=like.dtype, device=like.device)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, seq):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have shape (B, S) = ({batch}, {seq}), got {got}; "
                         f"build it as input_ids != pad_id")
    m = attention_mask.to(like.dtype)
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("attention_mask must contain only 0/1 (or False/True)")
    if not bool((m.sum(1) > 0).all()):
        raise ValueError("attention_mask has a sequence with no real token; every row needs at least one 1")
    return m


def _project(x: torch.Tensor, projection, target_width: int, what: str) -> torch.Tensor:
    if projection is not None:
        x = projection(x)
    if x.shape[-1] != target_width:
        raise ValueError(
            f"{what}: student width {x.shape[-1]} != teacher width {target_width}; pass a learned "
            f"projection, e.g. projection=nn.Linear({x.shape[-1] if projection is None else '...'}, {target_width})"
        )
    return x


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
    """
    _tensor("student", student, 3, "(B, S, D)")
    _tensor("teacher", teacher, 3, "(B, S, D)")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same "
                         f"shape (B, S, D); project the student to the teacher's width first")
    b, s, d = student.shape
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
    """
    _tensor("student_attention", student_attention, 4, "(B, H, S, S)")
    _tensor("teacher_attention", teacher_attention, 4, "(B, H, S, S)")
    if student_attention.shape != teacher_attention.shape:
        hint = (" — the numbers of heads differ; give the student the teacher's num_attention_heads"
                if student_attention.shape[1] != teacher_attention.shape[1] else "")
        raise ValueError(f"student_attention {tuple(student_attention.shape)} and teacher_attention "
                         f"{tuple(teacher_attention.shape)} must have the same shape (B, H, S, S){hint}")
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
    """
    _tensor("student_logits", student_logits, 2, "(N, C)")
    _tensor("teacher_logits", teacher_logits, 2, "(N, C)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (N, C)")
    T = _validate.temperature(T)
    p_t = F.softmax(teacher_logits.detach() / T, dim=-1)
    return -(p_t * F.log_softmax(student_logits / T, dim=-1)).sum(-1).mean()


# --------------------------------------------------------------------------
# DistilBERT (Sanh et al. 2019, arXiv:1910.01108): soft CE + MLM + cosine
# --------------------------------------------------------------------------

def token_soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, token_mask: torch.Tensor,
                  T: float = 2.0) -> torch.Tensor:
    """DistilBERT's distillation term on token distributions (masked LM).

        L_ce = T^2 * (1 / N_tok) * sum_{b,s: m_bs = 1} KL( softmax(t_bs / T) || softmax(s_bs / T) )

    averaged over the **selected tokens** (DistilBERT selects the masked
    positions, ``mlm_labels != -100``), not over the batch: PyTorch's
    ``reduction="batchmean"`` on a (B, S, V) tensor would divide by B and
    count padding.

    Args:
        student_logits, teacher_logits: (B, S, V) masked-LM logits.
        token_mask: (B, S) 1 where the token takes part.
        T: temperature > 0 (DistilBERT: 2).
    """
    _tensor("student_logits", student_logits, 3, "(B, S, V)")
    _tensor("teacher_logits", teacher_logits, 3, "(B, S, V)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (B, S, V)")
    T = _validate.temperature(T)
    b, s, _ = student_logits.shape
    if not isinstance(token_mask, torch.Tensor) or tuple(token_mask.shape) != (b, s):
        raise ValueError(f"token_mask must have shape (B, S) = ({b}, {s})")
    sel = token_mask.bool()
    n = int(sel.sum())
    if n == 0:
        return student_logits.sum() * 0.0
    log_ps = F.log_softmax(student_logits[sel] / T, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach()[sel].to(log_ps.dtype) / T, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="sum", log_target=True) / n * T * T


def masked_lm_loss(mlm_logits: torch.Tensor, mlm_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked-LM logits at the masked positions.

    Args:
        mlm_logits: (B, S, V).
        mlm_labels: (B, S) int64, the original token at masked positions and
            ``-100`` elsewhere (padding included).
    Returns:
        mean over the masked tokens (0 when none is masked).
    """
    _tensor("mlm_logits", mlm_logits, 3, "(B, S, V)")
    if not isinstance(mlm_labels, torch.Tensor) or mlm_labels.shape != mlm_logits.shape[:2]:
        raise ValueError(f"mlm_labels must be an int64 tensor of shape {tuple(mlm_logits.shape[:2])} with -100 at "
                         f"unmasked positions")
    if not bool((mlm_labels != -100).any()):
        return mlm_logits.sum() * 0.0
    return F.cross_entropy(mlm_logits.reshape(-1, mlm_logits.shape[-1]), mlm_labels.reshape(-1).long(),
                           ignore_index=-100)


def hidden_cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DistilBERT's cosine term: mean over real tokens of 1 - cos(h^S, h^T).

    Args:
        student_hidden, teacher_hidden: (B, S, D) last hidden states (student
            projected to the teacher's width when they differ).
        attention_mask: (B, S); padded tokens are left out.
    """
    _tensor("student_hidden", student_hidden, 3, "(B, S, D)")
    _tensor("teacher_hidden", teacher_hidden, 3, "(B, S, D)")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same shape; project the student first")
    b, s, _ = student_hidden.shape
    m = _mask(attention_mask, b, s, student_hidden)
    cos = F.cosine_similarity(student_hidden, teacher_hidden.to(student_hidden.dtype), dim=-1, eps=1e-8)
    return ((1 - cos) * m).sum() / m.sum()


def distilbert_loss(
    student_mlm_logits: torch.Tensor,
    teacher_mlm_logits: torch.Tensor,
    mlm_labels: torch.Tensor,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    T: float = 2.0,
    alpha_ce: float = 5.0,
    alpha_mlm: float = 2.0,
    alpha_cos: float = 1.0,
    return_parts: bool = False,
):
    """DistilBERT's triple loss.

        L = alpha_ce * L_ce + alpha_mlm * L_mlm + alpha_cos * L_cos

    with ``L_ce`` = :func:`token_soft_ce` over the masked positions,
    ``L_mlm`` = :func:`masked_lm_loss`, ``L_cos`` = :func:`hidden_cosine_loss`
    over the real tokens. Defaults are the weights of the DistilBERT training
    script (alpha_ce=5, alpha_mlm=2, alpha_cos=1, T=2).

    Returns:
        scalar tensor, or ``(loss, {"ce": .., "mlm": .., "cos": ..})`` with ``return_parts``.
    """
    token_mask = mlm_labels != -100
    ce = token_soft_ce(student_mlm_logits, teacher_mlm_logits, token_mask, T)
    mlm = masked_lm_loss(student_mlm_logits, mlm_labels)
    cos = hidden_cosine_loss(student_hidden, teacher_hidden, attention_mask)
    total = alpha_ce * ce + alpha_mlm * mlm + alpha_cos * cos
    if return_parts:
        return total, {"ce": ce.item(), "mlm": mlm.item(), "cos": cos.item()}
    return total
