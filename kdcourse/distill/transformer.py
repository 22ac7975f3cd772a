"""Objectives for compressing a BERT (Lab 3), and the BERT teacher's own objective.

* :class:`LayerDistill` — TinyBERT's intermediate-layer distillation (Jiao et
  al., Findings of EMNLP 2020, arXiv:1909.10351): embeddings, hidden states
  through learned projections and attentions through a layer map, plus
  prediction-layer KD (Hinton et al. 2015, arXiv:1503.02531).
* :class:`DistilBertObjective` — DistilBERT's triple loss (Sanh et al. 2019,
  arXiv:1910.01108): soft CE over masked-LM distributions, masked LM, cosine.
* :class:`TeacherObjective` — how the BERT teacher itself is trained
  (cross-entropy plus a detached masked-LM head).
* :class:`TeacherTargets` — the teacher's outputs on a split, computed once
  (stored in the shared teacher-output memo, :mod:`kdcourse.teacher_cache`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import teacher_cache
from ..data.reviews import mask_tokens
from ..losses import transformer as tl
from ..losses.response import kd_loss
from ..models.bert import TextTransformer, TransformerOutputs
from ..train import Objective, StepOutput, freeze, scheduled


class TeacherObjective(Objective):
    """Cross-entropy on the labels, plus a masked-LM head trained alongside.

    The head reads the body's last hidden states on a masked copy of the
    first ``mlm_fraction`` of each batch, **detached**: it learns to predict
    the masked words from what the classifier computes, without pulling the
    body away from the task (a shared masked-LM loss slowed the classifier
    down badly on this task). The head must not share weights with the body
    (build the model with ``tie_mlm=False``). It gives the teacher the
    language-model distributions DistilBERT's loss distils.

    Source: this course's teacher recipe; the masked-LM objective is Devlin, Chang, Lee & Toutanova, "BERT: Pre-
        training of Deep Bidirectional Transformers for Language Understanding", NAACL 2019 (arXiv:1810.04805).
    """

    def __init__(self, mlm_weight: float = 1.0, mask_prob: float = 0.15, mlm_fraction: float = 0.5, seed: int = 0):
        super().__init__()
        if not 0 < mlm_fraction <= 1:
            raise ValueError(f"mlm_fraction must be in (0, 1], got {mlm_fraction!r}")
        self.mlm_weight, self.mask_prob, self.mlm_fraction = float(mlm_weight), mask_prob, mlm_fraction
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    def setup(self, model, train) -> None:
        self.gen.manual_seed(self.seed)
        if self.mlm_weight > 0:
            if model.mlm is None:
                raise ValueError("TeacherObjective with mlm_weight > 0 needs a model built with mlm_head=True")
            body = {id(p) for p in model.hf.parameters()}
            if any(id(p) in body for p in model.mlm.parameters()):
                raise ValueError("the masked-LM head shares weights with the body; build the teacher with "
                                 "tie_mlm=False (the head is trained on detached hidden states)")

    def forward(self, model, batch, state):
        logits = model(batch.x)
        ce = F.cross_entropy(logits, batch.labels)
        parts = {"ce": ce.item()}
        loss = ce
        if self.mlm_weight > 0:
            n = max(1, int(round(self.mlm_fraction * len(batch.x))))  # a masked copy of part of the batch
            masked, labels = mask_tokens(batch.x[:n], model.config.vocab_size, self.gen, self.mask_prob)
            with torch.no_grad():
                out = model.forward_all(masked, hidden_states=True, attentions=False)
            mlm = tl.masked_lm_loss(model.mlm(out.hidden_states[-1]), labels)
            loss = ce + self.mlm_weight * mlm
            parts["mlm"] = mlm.item()
        return StepOutput(loss, logits, parts)


class TeacherTargets:
    """The teacher's outputs on every sample of a split, kept in memory for
    the layers a student needs (so the teacher runs once, not every step).

    ``hidden`` maps HF ``hidden_states`` indices (0 = embeddings) to (N, S, D)
    tensors, ``attentions`` maps 1-based layer numbers to (N, H, S, S);
    both are stored as ``dtype`` (float16 by default, to save memory).
    """

    def __init__(self, logits, hidden: dict, attentions: dict, num_layers: int):
        self.logits, self.hidden, self.attentions, self.num_layers = logits, hidden, attentions, num_layers

    @classmethod
    @torch.no_grad()
    def compute(cls, teacher: TextTransformer, split, hidden_layers: Sequence[int] = (),
                attention_layers: Sequence[int] = (), batch_size: int = 256,
                dtype: torch.dtype = torch.float16) -> "TeacherTargets":
        """Run ``teacher`` over ``split`` once (eval mode). The tensors live in
        the teacher-output memo (:mod:`kdcourse.teacher_cache`, one keying
        rule for every objective): a second call with the same teacher
        weights and split reuses them, and computes only the layers missing."""
        n_t = teacher.num_layers
        for k in hidden_layers:
            if not 0 <= k <= n_t:
                raise ValueError(f"hidden_layers must be HF indices 0..{n_t}, got {k}")
        for k in attention_layers:
            if not 1 <= k <= n_t:
                raise ValueError(f"attention_layers must be layer numbers 1..{n_t}, got {k}")
        hidden_layers, attention_layers = list(dict.fromkeys(hidden_layers)), list(dict.fromkeys(attention_layers))
        logits_item = ("logits", batch_size)
        items = ([logits_item] + [("hidden", k, dtype, batch_size) for k in hidden_layers]
                 + [("attention", k, dtype, batch_size) for k in attention_layers])

        def compute(missing):  # one pass for every output not in the teacher-output memo yet
            hid = [it[1] for it in missing if it[0] == "hidden"]
            att = [it[1] for it in missing if it[0] == "attention"]
            acc = {it: [] for it in missing}
            full = split.input_ids.shape[1]
            was = teacher.training
            teacher.eval()
            try:
                for b in split.batches(batch_size, device=next(teacher.parameters()).device):
                    out = teacher.forward_all(b.x, hidden_states=bool(hid), attentions=bool(att))
                    pad = full - b.x.shape[1]  # batches are cut to their longest review: pad back to the split's width
                    for it in missing:
                        if it[0] == "logits":
                            acc[it].append(out.logits.float().cpu())
                        elif it[0] == "hidden":
                            acc[it].append(F.pad(out.hidden_states[it[1]], (0, 0, 0, pad)).to(dtype).cpu())
                        else:
                            acc[it].append(F.pad(out.attentions[it[1] - 1], (0, pad, 0, pad)).to(dtype).cpu())
            finally:
                teacher.train(was)
            return {it: torch.cat(chunks) for it, chunks in acc.items()}

        got = teacher_cache.cached(teacher, split, items, compute)
        return cls(got[logits_item], {k: got[("hidden", k, dtype, batch_size)] for k in hidden_layers},
                   {k: got[("attention", k, dtype, batch_size)] for k in attention_layers}, n_t)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.logits, *self.hidden.values(), *self.attentions.values()])

    def lookup(self, index: torch.Tensor, device, attention_mask: torch.Tensor) -> TransformerOutputs:
        """The cached outputs of samples ``index`` as HF-shaped tuples; layers
        that were not cached are ``None``."""
        idx = index.cpu()
        w = attention_mask.shape[1]  # batches may be cut to their longest review
        hs = [None] * (self.num_layers + 1)
        for k, v in self.hidden.items():
            hs[k] = v[idx, :w].to(device=device, dtype=torch.float32)
        att = [None] * self.num_layers
        for k, v in self.attentions.items():
            att[k - 1] = v[idx, :, :w, :w].to(device=device, dtype=torch.float32)
        return TransformerOutputs(self.logits[idx].to(device), tuple(hs), tuple(att), attention_mask)


class Projections(nn.Module):
    """TinyBERT's learned maps from the student's width to the teacher's:
    ``embedding`` (W_e) and ``hidden`` (W_h, shared by all layers).
    Identities when the widths are equal.

    Source: Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu, "TinyBERT: Distilling BERT for Natural Language
        Understanding", Findings of EMNLP 2020 (arXiv:1909.10351).
    """

    def __init__(self, d_student: int, d_teacher: int):
        super().__init__()
        make = (lambda: nn.Linear(d_student, d_teacher)) if d_student != d_teacher else nn.Identity
        self.embedding = make()
        self.hidden = make()


class LayerDistill(Objective):
    """Intermediate-layer distillation (TinyBERT) plus prediction-layer KD.

        loss = w_embedding * L_embd + w_hidden * L_hidn + w_attention * L_attn
               + w_prediction * [alpha * T^2 KL + (1 - alpha) CE]   (labels unused when alpha = 1)

    Args:
        teacher: a trained :class:`TextTransformer` (frozen here; not a submodule).
        student: the student (only its shape is read, to size the projections
            and the layer map).
        layer_map: ``L_S`` teacher layer numbers, or a function
            ``(n_student, n_teacher) -> list``; default uniform (TinyBERT).
        student_layers: which student layers (1-based) take part (default
            all; :func:`progressive` trains one at a time).
        hidden_loss, attention_loss: the per-model loss functions, with the
            signatures of :func:`kdcourse.losses.transformer.hidden_state_loss`
            and ``attention_kl`` (per layer) — pass your own to train with them.
        targets: precomputed :class:`TeacherTargets` for the training split
            (default: computed in ``setup`` for the layers needed).
        projections: a :class:`Projections` to reuse (two-stage training keeps
            the same one); default a fresh one, trained with the student.

    Source: Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu, "TinyBERT: Distilling BERT for Natural Language
        Understanding", Findings of EMNLP 2020 (arXiv:1909.10351).; attention term (KL on probabilities): Wang,
        Wei, Dong, Bao, Yang & Zhou, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
        Pre-Trained Transformers", NeurIPS 2020 (arXiv:2002.10957).; prediction KD: Hinton, Vinyals & Dean,
        "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning Workshop (arXiv:1503.02531,
        2015).
    """

    def __init__(self, teacher: TextTransformer, student: TextTransformer, *, layer_map=None,
                 student_layers: Sequence[int] | None = None, w_embedding: float = 1.0, w_hidden: float = 1.0,
                 w_attention: float = 1.0, w_prediction: float = 1.0, T: float = 1.0, alpha: float = 1.0,
                 hidden_loss: Callable | None = None, attention_loss: Callable | None = None,
                 targets: TeacherTargets | None = None, projections: Projections | None = None):
        super().__init__()
        object.__setattr__(self, "teacher", freeze(teacher))
        n_s, n_t = student.num_layers, teacher.num_layers
        if callable(layer_map):
            layer_map = layer_map(n_s, n_t)
        self.layer_map = tl._check_layer_map(layer_map if layer_map is not None else tl.uniform_layer_map(n_s, n_t),
                                             n_s, n_t)
        self.student_layers = sorted(set(student_layers)) if student_layers is not None else list(range(1, n_s + 1))
        if any(not 1 <= i <= n_s for i in self.student_layers):
            raise ValueError(f"student_layers must be in 1..{n_s}, got {student_layers}")
        if w_attention and student.num_heads != teacher.num_heads:
            raise ValueError(f"the attention loss compares heads one by one: the student has {student.num_heads} "
                             f"heads, the teacher {teacher.num_heads}; give the student num_attention_heads="
                             f"{teacher.num_heads} or set w_attention=0")
        if w_attention and student.config.attention_probs_dropout_prob > 0:
            raise ValueError("the student's attention_probs_dropout_prob must be 0 for the attention loss: HF "
                             "returns attention probabilities after dropout in train mode")
        self.w = {"embedding": float(w_embedding), "hidden": float(w_hidden), "attention": float(w_attention),
                  "prediction": float(w_prediction)}
        self.T, self.alpha = T, alpha
        self.hidden_loss = hidden_loss or tl.hidden_state_loss
        self.attention_loss = attention_loss or tl.attention_kl
        self.projections = projections if projections is not None else Projections(student.hidden_size,
                                                                                    teacher.hidden_size)
        self.targets = targets
        self._given_targets = targets is not None

    # which teacher layers are needed
    def needed(self) -> tuple[list[int], list[int]]:
        mapped = [self.layer_map[i - 1] for i in self.student_layers]
        hidden = ([0] if self.w["embedding"] and 1 in self.student_layers else []) + (mapped if self.w["hidden"] else [])
        return sorted(set(hidden)), sorted(set(mapped)) if self.w["attention"] else []

    def setup(self, model, train) -> None:
        if not self._given_targets:
            hidden, att = self.needed()
            self.targets = TeacherTargets.compute(self.teacher, train, hidden, att)

    def forward(self, model, batch, state):
        mask = batch.x != model.pad_id
        t = self.targets.lookup(batch.index, batch.x.device, mask)
        s = model.forward_all(batch.x, attentions=bool(self.w["attention"]))
        parts, loss = {}, 0.0
        if self.w["embedding"] and 1 in self.student_layers:
            emb = tl.embedding_loss(s.hidden_states[0], t.hidden_states[0], self.projections.embedding, mask)
            loss = loss + self.w["embedding"] * emb
            parts["emb"] = emb.item()
        if self.w["hidden"]:
            if self.student_layers == list(range(1, model.num_layers + 1)):
                hid = self.hidden_loss(s.hidden_states, t.hidden_states, self.layer_map, self.projections.hidden, mask)
            else:  # a subset of layers (progressive transfer)
                hid = sum(tl.masked_mse(self.projections.hidden(s.hidden_states[i]),
                                        t.hidden_states[self.layer_map[i - 1]], mask)
                          for i in self.student_layers) / len(self.student_layers)
            loss = loss + self.w["hidden"] * hid
            parts["hidden"] = hid.item()
        if self.w["attention"]:
            att = sum(self.attention_loss(s.attentions[i - 1], t.attentions[self.layer_map[i - 1] - 1], mask)
                      for i in self.student_layers) / len(self.student_layers)
            loss = loss + self.w["attention"] * att
            parts["attn"] = att.item()
        logits = s.logits if batch.labels.min() >= 0 else None
        if self.w["prediction"]:
            labelled = logits is not None
            T, alpha = scheduled(self.T, state), scheduled(self.alpha, state)  # numbers or schedules, as everywhere
            pred = kd_loss(s.logits, t.logits, batch.labels if labelled else None, T=T,
                           alpha=alpha if labelled else 1.0)
            loss = loss + self.w["prediction"] * pred
            parts["pred"] = pred.item()
        return StepOutput(loss, logits, parts)


# --------------------------------------------------------------------------
# DistilBERT's triple loss (general distillation on unlabelled text)
# --------------------------------------------------------------------------

class DistilBertObjective(Objective):
    """DistilBERT's triple loss on masked text: soft CE between the teacher's
    and the student's masked-LM distributions at the masked positions
    (token-count normalised), the student's own masked-LM loss, and a cosine
    loss between last hidden states over real tokens. Teacher and student
    need masked-LM heads (``mlm_head=True``). When the widths differ the
    student's hidden states go through a learned projection (DistilBERT keeps
    the teacher's width and needs none). Labels are not used.

    Source: Sanh, Debut, Chaumond & Wolf, "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and
        lighter", NeurIPS 2019 EMC^2 Workshop (arXiv:1910.01108).
    """

    def __init__(self, teacher: TextTransformer, student: TextTransformer, T: float = 2.0, alpha_ce: float = 5.0,
                 alpha_mlm: float = 2.0, alpha_cos: float = 1.0, mask_prob: float = 0.15, seed: int = 0):
        super().__init__()
        if teacher.mlm is None or student.mlm is None:
            raise ValueError("DistilBertObjective needs masked-LM heads: build both models with mlm_head=True")
        object.__setattr__(self, "teacher", freeze(teacher))
        self.T, self.alpha_ce, self.alpha_mlm, self.alpha_cos, self.mask_prob = T, alpha_ce, alpha_mlm, alpha_cos, mask_prob
        self.projection = (nn.Linear(student.hidden_size, teacher.hidden_size)
                           if student.hidden_size != teacher.hidden_size else nn.Identity())
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    def setup(self, model, train) -> None:
        self.gen.manual_seed(self.seed)

    def forward(self, model, batch, state):
        masked, labels = mask_tokens(batch.x, model.config.vocab_size, self.gen, self.mask_prob)
        with torch.no_grad():
            t = self.teacher.forward_all(masked, attentions=False, mlm=True)
        s = model.forward_all(masked, attentions=False, mlm=True)
        loss, parts = tl.distilbert_loss(s.mlm_logits, t.mlm_logits, labels, self.projection(s.hidden_states[-1]),
                                         t.hidden_states[-1], s.attention_mask, T=scheduled(self.T, state), alpha_ce=self.alpha_ce,
                                         alpha_mlm=self.alpha_mlm, alpha_cos=self.alpha_cos, return_parts=True)
        return StepOutput(loss, None, parts)
