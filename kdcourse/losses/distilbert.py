"""DistilBERT's triple loss (Sanh et al. 2019, arXiv:1910.01108): a soft
cross-entropy between the teacher's and the student's masked-LM
distributions at the masked positions, the student's own masked-LM loss,
and a cosine between last hidden states over the real tokens. Re-exported
by :mod:`kdcourse.losses.transformer`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _validate
from ._sequence import _mask, _pair, _tensor


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

    Source: Sanh, Debut, Chaumond & Wolf, "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and
        lighter", NeurIPS 2019 EMC^2 Workshop (arXiv:1910.01108).
    """
    b, s, _ = _pair("student_logits", student_logits, "teacher_logits", teacher_logits, 3, "(B, S, V)")
    T = _validate.temperature(T)
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
        mlm_labels: (B, S) int64, the original token (0..V-1) at masked
            positions and ``-100`` elsewhere (padding included); float labels
            or other ids are an error.
    Returns:
        mean over the masked tokens (0 when none is masked).

    Source: Devlin, Chang, Lee & Toutanova, "BERT: Pre-training of Deep Bidirectional Transformers for Language
        Understanding", NAACL 2019 (arXiv:1810.04805).
    """
    _tensor("mlm_logits", mlm_logits, 3, "(B, S, V)")
    mlm_labels = _validate.token_labels(mlm_labels, mlm_logits.shape[:2], mlm_logits.shape[-1])
    if not bool((mlm_labels != -100).any()):
        return mlm_logits.sum() * 0.0
    return F.cross_entropy(mlm_logits.reshape(-1, mlm_logits.shape[-1]), mlm_labels.reshape(-1), ignore_index=-100)


def hidden_cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DistilBERT's cosine term: mean over real tokens of 1 - cos(h^S, h^T).

    Args:
        student_hidden, teacher_hidden: (B, S, D) last hidden states (student
            projected to the teacher's width when they differ).
        attention_mask: (B, S); padded tokens are left out.

    Source: Sanh, Debut, Chaumond & Wolf, "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and
        lighter", NeurIPS 2019 EMC^2 Workshop (arXiv:1910.01108).
    """
    b, s, _ = _pair("student_hidden", student_hidden, "teacher_hidden", teacher_hidden, 3, "(B, S, D)",
                    "; project the student to the teacher's width first")
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

    Source: Sanh, Debut, Chaumond & Wolf, "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and
        lighter", NeurIPS 2019 EMC^2 Workshop (arXiv:1910.01108).
    """
    token_mask = mlm_labels != -100
    ce = token_soft_ce(student_mlm_logits, teacher_mlm_logits, token_mask, T)
    mlm = masked_lm_loss(student_mlm_logits, mlm_labels)
    cos = hidden_cosine_loss(student_hidden, teacher_hidden, attention_mask)
    total = alpha_ce * ce + alpha_mlm * mlm + alpha_cos * cos
    if return_parts:
        return total, {"ce": ce.item(), "mlm": mlm.item(), "cos": cos.item()}
    return total
