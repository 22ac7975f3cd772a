"""Compressing a BERT-style transformer: models, teacher cache and KD recipes.

Everything is built from a Hugging Face ``BertConfig`` — nothing is
downloaded (``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` are set before
``transformers`` is imported).

    cfg = lab_config(profile)                       # sizes for smoke / laptop / full
    ds = load_data(profile)                         # kdcourse.text.TextData
    teacher, info = teacher_model(profile, ds)      # trained once, cached on disk
    student = build(cfg.student, ds)
    fit(student, ds.train, LayerDistill(teacher, student), epochs=..., lr=...)

Models: :class:`TextTransformer` wraps ``BertForSequenceClassification``
(plus an optional masked-LM head): ``model(input_ids)`` returns logits
(B, C), so the course's ``fit`` / ``evaluate`` work unchanged, and
``model.forward_all(input_ids)`` returns hidden states and attentions the
Hugging Face way (see :mod:`kdcourse.losses.transformer`).

Recipes (all built on :func:`kdcourse.train.fit`, one loop):

* prediction-layer KD — :class:`kdcourse.train.Distill` as is;
* intermediate-layer KD (TinyBERT) — :class:`LayerDistill`: embedding,
  hidden states (learned projections) and attentions through a layer map,
  plus prediction-layer KD;
* DistilBERT's triple loss — :class:`DistilBertObjective` (soft CE over
  masked-LM distributions + masked LM + cosine), a general-distillation
  objective on unlabelled text;
* two-stage (TinyBERT) — :func:`two_stage`: general distillation on the
  unlabelled corpus, then task distillation on the labelled set;
* progressive layer-by-layer transfer (MobileBERT) — :func:`progressive`:
  one layer at a time with the layers below frozen, then prediction KD.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses  # noqa: E402
import logging  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, NamedTuple, Sequence  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from . import runs, runtime, text, zoo  # noqa: E402
from .losses import transformer as tl  # noqa: E402
from .losses.response import kd_loss  # noqa: E402
from .train import Distill, Objective, StepOutput, evaluate, fit, freeze  # noqa: E402

FORMAT = 1


# --------------------------------------------------------------------------
# Sizes per profile
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class BertSpec:
    """The shape of a BERT (fields of ``transformers.BertConfig``)."""

    layers: int  # num_hidden_layers
    hidden: int  # hidden_size
    heads: int  # num_attention_heads (hidden must be divisible by it)
    intermediate: int  # intermediate_size of the feed-forward block
    dropout: float = 0.1  # hidden_dropout_prob
    attention_dropout: float = 0.0  # attention_probs_dropout_prob (0: HF returns attentions after dropout)

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "intermediate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BertSpec.{name} must be a positive int, got {v!r}")
        if self.hidden % self.heads:
            raise ValueError(f"BertSpec.hidden={self.hidden} must be divisible by heads={self.heads}")

    def describe(self) -> str:
        return f"BERT {self.layers}L-{self.hidden}H-{self.heads}A"


@dataclass(frozen=True)
class LabConfig:
    """Everything Lab 3 sizes by profile (the profile itself sizes the image labs)."""

    n_teacher_train: int  # labelled reviews the teacher is trained on
    n_train: int  # the students' labelled reviews (the first n_train of the teacher's)
    n_val: int
    n_test: int
    n_general: int  # unlabelled reviews for general distillation
    teacher: BertSpec
    student: BertSpec
    teacher_epochs: int
    teacher_lr: float
    teacher_batch_size: int
    mlm_weight: float  # weight of the teacher's auxiliary masked-LM loss (gives it an MLM head)
    mlm_fraction: float  # part of each teacher batch that also gets a masked copy for that loss
    student_epochs: int  # task epochs for every student recipe
    general_epochs: int  # epochs over the unlabelled corpus in stage 1 of two-stage KD
    progressive_epochs: int  # epochs per layer in progressive (MobileBERT-style) transfer
    lr: float  # student learning rate (Adam, cosine decay)
    batch_size: int
    T: float = 2.0  # temperature of prediction-layer KD
    alpha: float = 0.9  # weight of the KD term against the labels
    latency_batch: int = 32  # reviews per batch in the latency measurement
    threads: int | None = None  # torch threads for the lab (None: leave torch's default)


LAB3: dict[str, LabConfig] = {
    "smoke": LabConfig(
        n_teacher_train=600, n_train=300, n_val=200, n_test=300, n_general=600,
        teacher=BertSpec(4, 32, 2, 64), student=BertSpec(2, 16, 2, 32),
        teacher_epochs=3, teacher_lr=2e-3, teacher_batch_size=32, mlm_weight=1.0, mlm_fraction=0.5,
        student_epochs=2, general_epochs=1, progressive_epochs=1, lr=3e-3, batch_size=64,
        threads=1,  # models this small run fastest on one thread (and CI machines are shared)
    ),
    "laptop": LabConfig(
        n_teacher_train=8000, n_train=1500, n_val=1000, n_test=2000, n_general=4000,
        teacher=BertSpec(8, 128, 4, 512), student=BertSpec(4, 48, 4, 192),
        teacher_epochs=6, teacher_lr=5e-4, teacher_batch_size=32, mlm_weight=1.0, mlm_fraction=0.5,
        student_epochs=12, general_epochs=2, progressive_epochs=1, lr=2e-3, batch_size=64,
    ),
    "full": LabConfig(
        n_teacher_train=40000, n_train=4000, n_val=2000, n_test=5000, n_general=20000,
        teacher=BertSpec(12, 256, 4, 1024), student=BertSpec(4, 64, 4, 256),
        teacher_epochs=8, teacher_lr=3e-4, teacher_batch_size=64, mlm_weight=1.0, mlm_fraction=0.5,
        student_epochs=20, general_epochs=4, progressive_epochs=2, lr=2e-3, batch_size=128,
    ),
}


def lab_config(profile) -> LabConfig:
    """The :class:`LabConfig` for a profile (or a profile name)."""
    name = profile if isinstance(profile, str) else getattr(profile, "name", None)
    if name not in LAB3:
        raise ValueError(f"no Lab 3 sizes for profile {name!r}; use one of {sorted(LAB3)}")
    return LAB3[name]


def load_data(profile, seed: int = 0) -> text.TextData:
    """The reviews task (:mod:`kdcourse.text`) at the profile's sizes."""
    c = lab_config(profile)
    return text.make_data(c.n_train, c.n_val, c.n_test, n_teacher_train=c.n_teacher_train, n_general=c.n_general,
                          seed=seed)


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

class TransformerOutputs(NamedTuple):
    """What :meth:`TextTransformer.forward_all` returns (HF conventions)."""

    logits: torch.Tensor  # (B, C)
    hidden_states: tuple  # L + 1 tensors (B, S, D); [0] = embedding output
    attentions: tuple  # L tensors (B, H, S, S), post-softmax probabilities
    attention_mask: torch.Tensor  # (B, S) bool, True at real tokens
    mlm_logits: torch.Tensor | None = None  # (B, S, V) when asked for


def _transformers():
    """Import ``transformers`` (offline), silencing torch's import-time notes
    about pytree registrations, which are not about this course."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import transformers

    return transformers


def bert_config(spec: BertSpec, vocab_size: int, num_labels: int, max_len: int):
    """A ``transformers.BertConfig`` for ``spec`` (eager attention, so that
    attention probabilities can be returned)."""
    BertConfig = _transformers().BertConfig

    return BertConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, intermediate_size=spec.intermediate,
        hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.attention_dropout,
        max_position_embeddings=max(32, max_len), type_vocab_size=1, num_labels=num_labels,
        pad_token_id=0, attn_implementation="eager",
    )


class TextTransformer(nn.Module):
    """``BertForSequenceClassification`` built from a config (random weights,
    no download), optionally with a masked-LM head (its decoder tied to the
    word embeddings, as in BERT, unless ``tie_mlm=False``).

    ``model(input_ids)`` -> logits (B, C); the attention mask is
    ``input_ids != pad_id``.
    """

    def __init__(self, config, mlm_head: bool = False, tie_mlm: bool = True):
        super().__init__()
        from transformers import BertForSequenceClassification
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead

        if getattr(config, "_attn_implementation", "eager") != "eager":
            config._attn_implementation = "eager"
        self.config = config
        self.pad_id = int(config.pad_token_id or 0)
        self.hf = BertForSequenceClassification(config)
        self.mlm = None
        if mlm_head:
            self.mlm = BertOnlyMLMHead(config)
            if tie_mlm:
                self.mlm.predictions.decoder.weight = self.hf.bert.embeddings.word_embeddings.weight

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    def _check(self, input_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.int64:
            raise ValueError("input_ids must be an int64 tensor of shape (B, S); got "
                             f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check(input_ids)
        return self.hf(input_ids=input_ids, attention_mask=(input_ids != self.pad_id).long()).logits

    def forward_all(self, input_ids: torch.Tensor, hidden_states: bool = True, attentions: bool = True,
                    mlm: bool = False) -> TransformerOutputs:
        """Logits plus HF ``hidden_states`` (L + 1) and ``attentions`` (L), and
        masked-LM logits when ``mlm`` (needs ``mlm_head=True``)."""
        self._check(input_ids)
        if mlm and self.mlm is None:
            raise ValueError("mlm=True needs a model built with mlm_head=True")
        mask = input_ids != self.pad_id
        out = self.hf(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=hidden_states or mlm,
                      output_attentions=attentions)
        hs = tuple(out.hidden_states) if out.hidden_states is not None else ()
        att = tuple(out.attentions) if attentions else ()
        if attentions and len(att) != self.num_layers:
            raise RuntimeError("the model returned no attentions; it must use attn_implementation='eager'")
        mlm_logits = self.mlm(hs[-1]) if mlm else None
        return TransformerOutputs(out.logits, hs if hidden_states else (), att, mask, mlm_logits)


def build(spec: BertSpec, data: text.TextData, mlm_head: bool = False, tie_mlm: bool = True) -> TextTransformer:
    """A fresh model of shape ``spec`` for ``data``'s vocabulary and classes."""
    if not isinstance(spec, BertSpec):
        raise ValueError(f"spec must be a BertSpec, got {type(spec).__name__}")
    return TextTransformer(bert_config(spec, data.vocab_size, data.num_classes, data.max_len), mlm_head=mlm_head,
                           tie_mlm=tie_mlm)


def count_params(model: TextTransformer, embeddings: bool = True) -> int:
    """Parameters of the classifier (``model.hf``; an MLM head is not counted).
    ``embeddings=False`` leaves out the word, position and token-type tables."""
    hf = model.hf if isinstance(model, TextTransformer) else model
    total = sum(p.numel() for p in hf.parameters())
    if embeddings:
        return total
    emb = hf.bert.embeddings
    tables = (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings)
    return total - sum(t.weight.numel() for t in tables)


@torch.inference_mode()
def latency(model: nn.Module, input_ids: torch.Tensor, repeats: int = 50, warmup: int = 5,
            threads: int | None = None) -> dict:
    """CPU latency of one forward pass on one batch: p50 and p90 in ms.

    The model is copied to the CPU in eval mode; ``threads`` (default: the
    current ``torch.get_num_threads()``) is set for the measurement and
    restored afterwards.
    """
    import copy

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    old = torch.get_num_threads()
    threads = threads or old
    m = copy.deepcopy(model).cpu().eval()
    x = input_ids.cpu()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            m(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m(x)
            times.append(1000 * (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(old)
    times.sort()
    return {"p50_ms": statistics.median(times), "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "batch": tuple(x.shape), "threads": threads, "repeats": repeats, "warmup": warmup}


# --------------------------------------------------------------------------
# Masked-LM inputs
# --------------------------------------------------------------------------

def mask_tokens(input_ids: torch.Tensor, vocab_size: int, generator: torch.Generator, prob: float = 0.15,
                mask_id: int = 4, n_special: int = len(text.SPECIALS)) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: pick ``prob`` of the real (non-special) tokens; of
    those 80% become ``[MASK]``, 10% a random word, 10% stay. Returns
    ``(masked_ids, mlm_labels)`` with ``-100`` where nothing is predicted.
    At least one token per sequence is picked."""
    if not 0 < prob < 1:
        raise ValueError(f"prob must be in (0, 1), got {prob!r}")
    ids = input_ids.cpu()
    real = ids >= n_special
    r = torch.rand(ids.shape, generator=generator)
    pick = real & (r < prob)
    # guarantee one prediction per sequence with a real token
    none = ~pick.any(1) & real.any(1)
    if none.any():
        first_choice = torch.where(real, r, torch.full_like(r, 2.0)).argmin(1)
        pick[none, first_choice[none]] = True
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator)
    random_words = torch.randint(n_special, vocab_size, ids.shape, generator=generator)
    masked = ids.clone()
    masked[pick & (action < 0.8)] = mask_id
    swap = pick & (action >= 0.8) & (action < 0.9)
    masked[swap] = random_words[swap]
    return masked.to(input_ids.device), labels.to(input_ids.device)


# --------------------------------------------------------------------------
# The teacher: trained once, cached
# --------------------------------------------------------------------------

class TeacherObjective(Objective):
    """Cross-entropy on the labels, plus a masked-LM head trained alongside.

    The head reads the body's last hidden states on a masked copy of the
    first ``mlm_fraction`` of each batch, **detached**: it learns to predict
    the masked words from what the classifier computes, without pulling the
    body away from the task (a shared masked-LM loss slowed the classifier
    down badly on this task). The head must not share weights with the body
    (build the model with ``tie_mlm=False``). It gives the teacher the
    language-model distributions DistilBERT's loss distils.
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


def _teacher_key(c: LabConfig, data: text.TextData, seed: int) -> tuple[str, str]:
    transformers = _transformers()
    recipe = {"format": FORMAT, "teacher": dataclasses.asdict(c.teacher), "epochs": c.teacher_epochs,
              "lr": c.teacher_lr, "mlm_weight": c.mlm_weight, "mlm_fraction": c.mlm_fraction,
              "batch_size": c.teacher_batch_size, "seed": seed, "n": len(data.teacher_train),
              "vocab": data.tokenizer.vocab, "max_len": data.max_len,
              "transformers": ".".join(transformers.__version__.split(".")[:2])}
    rec = json.dumps(recipe, sort_keys=True)
    return rec, hashlib.sha256(f"{rec}|{data.fingerprint()}".encode()).hexdigest()[:20]


def train_teacher(profile, data: text.TextData, seed: int = 0, progress: bool = True) -> tuple[TextTransformer, dict]:
    """Train the profile's BERT teacher on ``data.teacher_train`` (no cache)."""
    c = lab_config(profile)
    runtime.seed_everything(seed)
    model = build(c.teacher, data, mlm_head=True, tie_mlm=False)
    t0 = time.perf_counter()
    objective = TeacherObjective(c.mlm_weight, mlm_fraction=c.mlm_fraction, seed=seed)
    hist = fit(model, data.teacher_train, objective, epochs=c.teacher_epochs, lr=c.teacher_lr,
               batch_size=c.teacher_batch_size, weight_decay=0.01, seed=seed, progress=progress, desc="BERT teacher")
    info = {
        "arch": c.teacher.describe(),
        "params": count_params(model),
        "params_no_embeddings": count_params(model, embeddings=False),
        "train_seconds": time.perf_counter() - t0,
        "train_acc": evaluate(model, data.teacher_train)["acc"],
        "val_acc": evaluate(model, data.val)["acc"],
        "test_acc": evaluate(model, data.test)["acc"],
        "epochs": c.teacher_epochs,
        "final_loss": hist.last("loss"),
    }
    return model, info


def teacher_model(profile, data: text.TextData, seed: int = 0, directory: str | None = None,
                  progress: bool = True, rebuild: bool = False) -> tuple[TextTransformer, dict]:
    """The profile's BERT teacher: loaded from the cache, or trained and cached.

    The cache file (in ``$KDCOURSE_CACHE`` or ``~/.cache/kdcourse``) is keyed
    by the recipe, the data's fingerprint and the transformers version; it is
    written atomically with a checksum (:func:`kdcourse.zoo.save_atomic`), and
    a corrupt or incompatible file is reported and rebuilt. Returns the frozen
    teacher (eval mode) and an info dict.
    """
    c = lab_config(profile)
    rec, key = _teacher_key(c, data, seed)
    path = os.path.join(directory or zoo.cache_dir(), f"bert-teacher-{key}.pt")
    if os.path.exists(path) and not rebuild:
        try:
            blob = zoo.load_checked(path)
            if blob.get("key") != key:
                raise zoo.CorruptCache(f"{path}: key mismatch")
            model = build(c.teacher, data, mlm_head=True, tie_mlm=False)
            model.load_state_dict(blob["state_dict"])
            info = dict(blob["info"], cache_path=path, from_cache=True)
            return freeze(model.to(runtime.device())), info
        except Exception as exc:  # corrupt, truncated, or written by an incompatible version
            warnings.warn(f"BERT teacher cache {path} is unusable ({exc}); rebuilding it", stacklevel=2)
            os.remove(path)
    model, info = train_teacher(profile, data, seed=seed, progress=progress)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    zoo.save_atomic({"key": key, "recipe": rec, "info": info, "state_dict": state}, path)
    return freeze(model), dict(info, cache_path=path, from_cache=False)


# --------------------------------------------------------------------------
# Teacher targets, computed once per split
# --------------------------------------------------------------------------

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
        """Run ``teacher`` over ``split`` once (eval mode)."""
        n_t = teacher.num_layers
        for k in hidden_layers:
            if not 0 <= k <= n_t:
                raise ValueError(f"hidden_layers must be HF indices 0..{n_t}, got {k}")
        for k in attention_layers:
            if not 1 <= k <= n_t:
                raise ValueError(f"attention_layers must be layer numbers 1..{n_t}, got {k}")
        was = teacher.training
        teacher.eval()
        dev = next(teacher.parameters()).device
        logits, hid, att = [], {k: [] for k in hidden_layers}, {k: [] for k in attention_layers}
        full = split.input_ids.shape[1]
        for b in split.batches(batch_size, device=dev):
            out = teacher.forward_all(b.x, hidden_states=bool(hidden_layers), attentions=bool(attention_layers))
            pad = full - b.x.shape[1]  # batches are cut to their longest review: pad back to the split's width
            logits.append(out.logits.float().cpu())
            for k in hid:
                hid[k].append(F.pad(out.hidden_states[k], (0, 0, 0, pad)).to(dtype).cpu())
            for k in att:
                att[k].append(F.pad(out.attentions[k - 1], (0, pad, 0, pad)).to(dtype).cpu())
        teacher.train(was)
        cat = lambda d: {k: torch.cat(v) for k, v in d.items()}  # noqa: E731
        return cls(torch.cat(logits), cat(hid), cat(att), n_t)

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


# --------------------------------------------------------------------------
# Intermediate-layer distillation (TinyBERT)
# --------------------------------------------------------------------------

class Projections(nn.Module):
    """TinyBERT's learned maps from the student's width to the teacher's:
    ``embedding`` (W_e) and ``hidden`` (W_h, shared by all layers).
    Identities when the widths are equal."""

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
            pred = kd_loss(s.logits, t.logits, batch.labels if labelled else None, T=self.T,
                           alpha=self.alpha if labelled else 1.0)
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
    the teacher's width and needs none). Labels are not used."""

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
                                         t.hidden_states[-1], s.attention_mask, T=self.T, alpha_ce=self.alpha_ce,
                                         alpha_mlm=self.alpha_mlm, alpha_cos=self.alpha_cos, return_parts=True)
        return StepOutput(loss, None, parts)


# --------------------------------------------------------------------------
# Multi-stage recipes (each stage is one call of kdcourse.train.fit)
# --------------------------------------------------------------------------

def _run(name: str, seed: int, model: TextTransformer, data, histories: list, seconds: float,
         keep_model: bool) -> runs.Run:
    from .train import History

    hist = History([row for h in histories for row in h])
    return runs.Run(name, seed, evaluate(model, data.test)["acc"], histories[-1].last("val_acc"),
                    count_params(model), seconds, hist, model if keep_model else None)


def two_stage(
    name: str,
    teacher: TextTransformer,
    data: text.TextData,
    spec: BertSpec,
    *,
    seed: int,
    general_epochs: int,
    task_epochs: int,
    lr: float,
    batch_size: int = 64,
    general_targets: TeacherTargets | None = None,
    task_targets: TeacherTargets | None = None,
    general: str = "tinybert",
    layer_map=None,
    layer_kwargs: dict | None = None,
    task_kwargs: dict | None = None,
    keep_model: bool = False,
    progress: bool = True,
) -> runs.Run:
    """TinyBERT's two stages for one seed, as a :class:`kdcourse.runs.Run`.

    1. **general** distillation on the unlabelled ``data.general`` corpus —
       ``general="tinybert"``: embedding, hidden-state and attention losses
       (:class:`LayerDistill` without the prediction layer);
       ``general="distilbert"``: :class:`DistilBertObjective`;
    2. **task** distillation on the labelled ``data.train``:
       :class:`LayerDistill` with the prediction layer (``task_kwargs`` are
       passed to it), keeping the stage-1 projections.

    ``layer_kwargs`` go to both :class:`LayerDistill` stages (e.g. your own
    ``hidden_loss`` and ``attention_loss``).

    The test accuracy is measured after the last epoch of stage 2.
    """
    if general not in ("tinybert", "distilbert"):
        raise ValueError(f"general must be 'tinybert' or 'distilbert', got {general!r}")
    if len(data.general) == 0:
        raise ValueError("data.general is empty: make the data with n_general > 0 for two-stage distillation")
    runtime.seed_everything(seed)
    student = build(spec, data, mlm_head=(general == "distilbert"))
    t0 = time.perf_counter()
    if general == "tinybert":
        stage1 = LayerDistill(teacher, student, layer_map=layer_map, w_prediction=0.0, targets=general_targets,
                              **(layer_kwargs or {}))
        projections = stage1.projections
    else:
        stage1 = DistilBertObjective(teacher, student, seed=seed)
        projections = None
    h1 = fit(student, data.general, stage1, epochs=general_epochs, lr=lr, batch_size=batch_size, seed=seed,
             progress=progress, desc=f"{name} general s{seed}")
    stage2 = LayerDistill(teacher, student, layer_map=layer_map, targets=task_targets, projections=projections,
                          **{**(layer_kwargs or {}), **(task_kwargs or {})})
    h2 = fit(student, data.train, stage2, epochs=task_epochs, lr=lr, batch_size=batch_size, val=data.val, seed=seed,
             progress=progress, desc=f"{name} task s{seed}")
    return _run(name, seed, student, data, [h1, h2], time.perf_counter() - t0, keep_model)


def progressive(
    name: str,
    teacher: TextTransformer,
    data: text.TextData,
    spec: BertSpec,
    *,
    seed: int,
    epochs_per_layer: int,
    final_epochs: int,
    lr: float,
    batch_size: int = 64,
    split: str = "train",
    targets: TeacherTargets | None = None,
    layer_map=None,
    T: float = 2.0,
    alpha: float = 0.9,
    keep_model: bool = False,
    progress: bool = True,
) -> runs.Run:
    """MobileBERT-style progressive knowledge transfer for one seed.

    Stage ``k = 1..L_S`` trains student layer ``k`` (and the embeddings with
    layer 1) to match its mapped teacher layer — hidden states and attention
    — with every other student parameter frozen; the projections carry over.
    A final stage trains the whole student with prediction-layer KD
    (:class:`kdcourse.train.Distill`, ``T``, ``alpha``) on ``data.train``. ``split`` ("train" or "general") is the text
    used for the layer stages.
    """
    runtime.seed_everything(seed)
    student = build(spec, data)
    layer_text = getattr(data, split)
    proj = None
    histories = []
    t0 = time.perf_counter()
    embeddings = student.hf.bert.embeddings
    for k in range(1, student.num_layers + 1):
        for p in student.parameters():
            p.requires_grad_(False)
        for p in student.hf.bert.encoder.layer[k - 1].parameters():
            p.requires_grad_(True)
        if k == 1:
            for p in embeddings.parameters():
                p.requires_grad_(True)
        obj = LayerDistill(teacher, student, layer_map=layer_map, student_layers=[k], w_prediction=0.0,
                           w_embedding=1.0 if k == 1 else 0.0, targets=targets, projections=proj)
        proj = obj.projections
        histories.append(fit(student, layer_text, obj, epochs=epochs_per_layer, lr=lr, batch_size=batch_size,
                             seed=seed, progress=progress, desc=f"{name} layer {k} s{seed}"))
    for p in student.parameters():
        p.requires_grad_(True)
    final = Distill(teacher, T=T, alpha=alpha)
    histories.append(fit(student, data.train, final, epochs=final_epochs, lr=lr, batch_size=batch_size,
                         val=data.val, seed=seed, progress=progress, desc=f"{name} final s{seed}"))
    return _run(name, seed, student, data, histories, time.perf_counter() - t0, keep_model)



# --------------------------------------------------------------------------
# The lab's comparison (used by the notebook and the benchmark)
# --------------------------------------------------------------------------

RECIPES = ("scratch", "prediction-only KD", "intermediate-layer KD", "two-stage KD")


def teacher_targets(teacher: TextTransformer, data: text.TextData, layer_map: Sequence[int]) -> dict:
    """:class:`TeacherTargets` for ``data.train`` and ``data.general`` at the
    embeddings and the mapped layers."""
    hidden, att = [0] + list(layer_map), list(layer_map)
    return {"train": TeacherTargets.compute(teacher, data.train, hidden, att),
            "general": TeacherTargets.compute(teacher, data.general, hidden, att) if len(data.general) else None}


def compare(teacher: TextTransformer, data: text.TextData, cfg: LabConfig, seeds: Sequence[int], *,
            layer_map=None, hidden_loss: Callable | None = None, attention_loss: Callable | None = None,
            targets: dict | None = None, recipes: Sequence[str] = RECIPES, keep_model: bool = False,
            progress: bool = True) -> dict[str, list]:
    """Train the student of ``cfg`` with each recipe over ``seeds``; returns
    ``{recipe: [runs.Run, ...]}`` (test accuracy after the last epoch).

    * ``scratch`` — cross-entropy on ``data.train``;
    * ``prediction-only KD`` — :class:`kdcourse.train.Distill` (``cfg.T``, ``cfg.alpha``);
    * ``intermediate-layer KD`` — :class:`LayerDistill` (embedding, hidden,
      attention and prediction layer) on ``data.train``;
    * ``two-stage KD`` — :func:`two_stage`: general distillation on
      ``data.general`` (``cfg.general_epochs``), then the above.

    Every student gets ``cfg.student_epochs`` task epochs. ``layer_map``,
    ``hidden_loss`` and ``attention_loss`` default to the reference ones.
    """
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        raise ValueError(f"unknown recipes {sorted(unknown)}; choose from {RECIPES}")
    probe = build(cfg.student, data)
    lm = layer_map(probe.num_layers, teacher.num_layers) if callable(layer_map) else layer_map
    lm = tl._check_layer_map(lm if lm is not None else tl.uniform_layer_map(probe.num_layers, teacher.num_layers),
                             probe.num_layers, teacher.num_layers)
    targets = targets or teacher_targets(teacher, data, lm)
    losses = {k: v for k, v in (("hidden_loss", hidden_loss), ("attention_loss", attention_loss)) if v is not None}
    common = dict(build=lambda: build(cfg.student, data), data=data, epochs=cfg.student_epochs, lr=cfg.lr,
                  batch_size=cfg.batch_size, keep_model=keep_model, progress=progress)
    out = {}
    for name in recipes:
        if name == "scratch":
            out[name] = runs.repeat(name, seeds, **common)
        elif name == "prediction-only KD":
            out[name] = runs.repeat(name, seeds, objective=lambda: Distill(teacher, T=cfg.T, alpha=cfg.alpha), **common)
        elif name == "intermediate-layer KD":
            out[name] = runs.repeat(name, seeds, objective=lambda: LayerDistill(
                teacher, probe, layer_map=lm, targets=targets["train"], T=cfg.T, alpha=cfg.alpha, **losses), **common)
        else:
            out[name] = [two_stage(name, teacher, data, cfg.student, seed=s, general_epochs=cfg.general_epochs,
                                   task_epochs=cfg.student_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                   general_targets=targets["general"], task_targets=targets["train"], layer_map=lm,
                                   layer_kwargs=losses, task_kwargs=dict(T=cfg.T, alpha=cfg.alpha),
                                   keep_model=keep_model, progress=progress) for s in seeds]
    return out


def size_and_speed(teacher: TextTransformer, student: TextTransformer, input_ids: torch.Tensor, repeats: int = 30,
                   warmup: int = 5, threads: int | None = None, rounds: int = 1) -> dict:
    """Parameters (with and without embeddings) and CPU latency of both models
    on one batch; with ``rounds > 1`` the two are timed alternately that many
    times and the medians of the per-round p50s (and of their ratios) are kept."""
    lt, ls, ratio = [], [], []
    for _ in range(rounds):
        a = latency(teacher, input_ids, repeats, warmup, threads)
        b = latency(student, input_ids, repeats, warmup, threads)
        lt.append(a["p50_ms"])
        ls.append(b["p50_ms"])
        ratio.append(a["p50_ms"] / b["p50_ms"])
    return {
        "params": (count_params(teacher), count_params(student)),
        "params_no_embeddings": (count_params(teacher, embeddings=False), count_params(student, embeddings=False)),
        "p50_ms": (statistics.median(lt), statistics.median(ls)),
        "speedup": statistics.median(ratio),
        "batch": tuple(input_ids.shape), "threads": a["threads"], "repeats": repeats, "warmup": warmup,
        "rounds": rounds,
    }
