"""An offline text-classification task for Lab 3 (compressing a BERT).

Nothing is downloaded: short English-like reviews are generated from a seed
by a small grammar, tokenised by a word-level tokenizer, and held in memory.

The task
--------
Each review gets one of four labels: ``very negative``, ``negative``,
``positive``, ``very positive``. The label is a function of the review's
*structure*, not of which words it contains:

* a **clause** is ``[filler] the ASPECT VERB [not|never] [MODIFIER] ADJECTIVE``
  (``the plot was not very good``) or, with a negation in front of the
  clause, ``i did not think the ASPECT was [MODIFIER] ADJECTIVE``;
* an adjective has a polarity (+ or -) and a strength: mild (``good``,
  ``dull``) or strong (``excellent``, ``awful``);
* a **modifier** changes the strength: intensifiers (``very``,
  ``extremely``, ...) make it strong, diminishers (``slightly``,
  ``somewhat``, ...) make it mild;
* a **negation** flips the polarity and makes the clause mild:
  ``not good`` is negative, ``not bad`` positive, ``not very good``
  mildly negative, ``not terrible`` mildly positive;
* a review is one clause, or two clauses joined by

  ====================  ===================================  =================
  form                  example                              label from
  ====================  ===================================  =================
  ``single``            the food was very good               the clause
  ``but``               A , but B                            B (contrast)
  ``although_first``    although A , B                       B
  ``although_second``   A , although B                       A
  ``and``               A and B  (same polarity)             both (strong if
                                                             either is strong)
  ====================  ===================================  =================

  In ``but`` and ``although`` reviews the two clauses usually have opposite
  polarities (``CONTRAST_OPPOSITE`` of the time), so the words of a review
  say little about its label: ``the food was not good , but the service was
  great`` and ``the food was good , but the service was not great`` contain
  the same words and have opposite labels. A bag-of-words model therefore
  stays well below what a model that reads word order reaches (measured in
  Lab 3 and in ``tests/test_text.py``).

The generator is deterministic for a seed. :func:`make_data` gives the
teacher's labelled set (``teacher_train``), the students' smaller labelled
set (``train``, the first ``n_train`` reviews of ``teacher_train``),
``val``, ``test`` and an unlabelled corpus ``general`` (labels ``-1``) for
TinyBERT-style general distillation. Every split has its own derived seed.

Encoding
--------
``[CLS] w1 w2 ... [SEP] [PAD] ...`` with a fixed length ``max_len``; the pad
id is 0, so the attention mask is ``input_ids != 0``. :class:`TextSplit`
offers the same interface as :class:`kdcourse.data.Split` where the trainer
needs it (``batches``, ``num_batches``, ``labels``, ``augment``,
``classes``, ``num_classes``), so :func:`kdcourse.train.fit`,
``evaluate`` and ``predict_logits`` work on it unchanged.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import Batch

from .review_tokens import (ADJECTIVES, ASPECTS, BUCKET_POOL, CLASSES, CLS, CONTRAST_OPPOSITE,  # noqa: F401
                            DEFAULT_MAX_LEN, DIMINISHERS, FILLERS, FORM_WEIGHTS, FORMS, FUNCTION_WORDS,
                            INTENSIFIERS, MASK, MAX_WORDS, NEGATIONS, PAD, SEP, SPECIALS, UNK, VERBS, BagOfWords,
                            WordTokenizer, bag_of_words, mask_tokens, vocabulary)


# --------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Clause:
    text: str
    polarity: int  # +1 / -1 after negation
    strength: int  # 1 mild, 2 strong
    negated: bool


def _clause(rng: random.Random, polarity: int | None = None) -> Clause:
    """One clause; ``polarity`` (after negation) is forced when given."""
    negated = rng.random() < 0.35
    adj_sign = None if polarity is None else (polarity if not negated else -polarity)
    adjs = [a for a, (p, _) in ADJECTIVES.items() if adj_sign is None or p == adj_sign]
    adj = rng.choice(adjs)
    sign, strength = ADJECTIVES[adj]
    r = rng.random()
    modifier = ""
    if r < 0.3:
        modifier, strength = rng.choice(INTENSIFIERS), 2
    elif r < 0.5:
        modifier, strength = rng.choice(DIMINISHERS), 1
    if negated:
        sign, strength = -sign, 1
    aspect = rng.choice(ASPECTS)
    adj_words = f"{modifier} {adj}".strip()
    if negated and rng.random() < 0.3:
        text = f"i did not think the {aspect} was {adj_words}"
    else:
        neg = f"{rng.choice(NEGATIONS)} " if negated else ""
        text = f"the {aspect} {rng.choice(VERBS)} {neg}{adj_words}"
    return Clause(text, sign, strength, negated)


def _label(polarity: int, strength: int) -> int:
    return {(-1, 2): 0, (-1, 1): 1, (1, 1): 2, (1, 2): 3}[(polarity, strength)]


def make_review(rng: random.Random) -> tuple[str, int, str]:
    """One review: ``(text, label, form)``."""
    form = rng.choices(FORMS, FORM_WEIGHTS)[0]
    filler = f"{rng.choice(FILLERS)} " if rng.random() < 0.25 else ""
    if form == "single":
        c = _clause(rng)
        return filler + c.text, _label(c.polarity, c.strength), form
    if form == "and":
        a = _clause(rng)
        b = _clause(rng, polarity=a.polarity)
        return f"{filler}{a.text} and {b.text}", _label(a.polarity, max(a.strength, b.strength)), form
    first = _clause(rng)
    opposite = rng.random() < CONTRAST_OPPOSITE
    second = _clause(rng, polarity=-first.polarity if opposite else first.polarity)
    if form == "but":
        return f"{filler}{first.text} , but {second.text}", _label(second.polarity, second.strength), form
    if form == "although_first":  # "although A , B": B decides
        return f"{filler}although {first.text} , {second.text}", _label(second.polarity, second.strength), form
    return f"{filler}{first.text} , although {second.text}", _label(first.polarity, first.strength), form


def generate(n: int, seed: int) -> tuple[list[str], list[int], list[str]]:
    """``n`` reviews from ``seed``: texts, labels (0..3) and forms."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = random.Random(seed)
    texts, labels, forms = [], [], []
    for _ in range(n):
        t, y, f = make_review(rng)
        texts.append(t)
        labels.append(y)
        forms.append(f)
    return texts, labels, forms


# --------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------

@dataclass
class TextSplit:
    """Encoded reviews held in memory; duck-type compatible with
    :class:`kdcourse.data.Split` for the trainer.

    ``input_ids`` (N, L) int64 with pad id 0; ``labels`` (N,) int64 (``-1``
    for unlabelled text); ``texts`` and ``forms`` keep the raw reviews and
    their construction (see the module docstring) for analysis.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    classes: tuple = CLASSES
    texts: tuple = field(default=(), repr=False)
    forms: tuple = field(default=(), repr=False)
    augment: bool = False  # never: there is no text augmentation (teacher outputs may be cached)

    def __post_init__(self):
        if self.input_ids.ndim != 2 or self.input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids must be an int64 tensor (N, L), got {self.input_ids.dtype} "
                             f"{tuple(self.input_ids.shape)}")
        if self.labels.shape != self.input_ids.shape[:1]:
            raise ValueError(f"labels must have shape ({self.input_ids.shape[0]},), got {tuple(self.labels.shape)}")
        if self.texts and len(self.texts) != len(self.labels):
            raise ValueError("texts must have one entry per sample (or be empty)")
        if self.augment:
            raise ValueError("augment=True is not supported for text splits")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(N, L) bool: True at real tokens, False at padding."""
        return self.input_ids != 0

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).all())

    def with_augment(self, augment: bool) -> "TextSplit":
        if augment:
            raise ValueError("text splits have no augmentation; use augment=False")
        return self

    def subset(self, index) -> "TextSplit":
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        pick = lambda seq: tuple(seq[i] for i in index.tolist()) if seq else ()  # noqa: E731
        return TextSplit(self.input_ids[index], self.labels[index], self.classes, pick(self.texts), pick(self.forms))

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Iterator[Batch]:
        """Yield :class:`~kdcourse.data.Batch` (x = input ids (B, L_b)), in
        order or shuffled with ``generator``.

        Each batch is cut to its longest review (trailing padding removed:
        with the attention mask, real tokens compute the same either way).
        When shuffling, reviews of similar length are grouped: the shuffled
        order is cut into pools of ``BUCKET_POOL`` batches, each pool is
        sorted by length and cut into batches, and the batches are shuffled
        — less padding, so faster training, with the same randomness.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(self)
        lengths = self.attention_mask.sum(1)
        if shuffle:
            order = torch.randperm(n, generator=generator)
            groups = []
            for pool in order.split(batch_size * BUCKET_POOL):
                pool = pool[torch.sort(lengths[pool], stable=True).indices]
                groups.extend(pool.split(batch_size))
            groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        else:
            groups = list(torch.arange(n).split(batch_size))
        for idx in groups:
            width = max(1, int(lengths[idx].max()))
            x, y = self.input_ids[idx, :width], self.labels[idx]
            if device is not None:
                x, y = x.to(device), y.to(device)
            yield Batch(x, y, idx)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def fingerprint(self) -> str:
        """A short hash of the ids and labels (for cache keys)."""
        h = hashlib.sha256()
        h.update(str(tuple(self.input_ids.shape)).encode())
        h.update(self.input_ids.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class TextData:
    """The text task's splits (an ``ImageData``-like container).

    ``teacher_train`` trains the teacher; ``train`` (its first ``n_train``
    reviews) is the students' labelled set; ``general`` is unlabelled text
    for general distillation; ``val`` and ``test`` are labelled.
    """

    name: str
    train: TextSplit
    val: TextSplit
    test: TextSplit
    teacher_train: TextSplit
    general: TextSplit
    tokenizer: WordTokenizer

    @property
    def classes(self) -> tuple:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def max_len(self) -> int:
        return self.tokenizer.max_len

    def fingerprint(self) -> str:
        return hashlib.sha256("|".join(s.fingerprint() for s in (self.teacher_train, self.val, self.test))
                              .encode()).hexdigest()[:16]


def make_split(n: int, seed: int, tokenizer: WordTokenizer, labelled: bool = True) -> TextSplit:
    texts, labels, forms = generate(n, seed)
    y = torch.tensor(labels, dtype=torch.int64) if labelled else torch.full((n,), -1, dtype=torch.int64)
    return TextSplit(tokenizer.encode_batch(texts), y, CLASSES, tuple(texts), tuple(forms))


def make_data(n_train: int, n_val: int, n_test: int, n_teacher_train: int | None = None, n_general: int = 0,
              seed: int = 0, max_len: int = DEFAULT_MAX_LEN) -> TextData:
    """The reviews task with the given split sizes (each split its own seed).

    ``n_teacher_train >= n_train`` reviews are generated for the teacher; the
    students' ``train`` is the first ``n_train`` of them. ``n_general``
    unlabelled reviews (labels ``-1``) form the general-distillation corpus.
    """
    for name, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(n_general, int) or n_general < 0:
        raise ValueError(f"n_general must be an int >= 0, got {n_general!r}")
    n_teacher_train = max(n_train, n_teacher_train or n_train)
    tok = WordTokenizer(max_len=max_len)
    teacher_train = make_split(n_teacher_train, seed * 1000 + 11, tok)
    general = make_split(max(1, n_general), seed * 1000 + 15, tok, labelled=False)
    if n_general == 0:
        general = general.subset(torch.arange(0))
    return TextData(
        name="reviews",
        train=teacher_train.subset(torch.arange(n_train)) if n_teacher_train > n_train else teacher_train,
        val=make_split(n_val, seed * 1000 + 12, tok),
        test=make_split(n_test, seed * 1000 + 13, tok),
        teacher_train=teacher_train,
        general=general,
        tokenizer=tok,
    )


