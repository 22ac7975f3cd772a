"""The words of Lab 3's reviews and what turns them into model inputs: the
vocabulary (specials first, ``[PAD]`` = 0), the whitespace
:class:`WordTokenizer`, word counts for the bag-of-words baseline, and BERT's
masking for the masked-LM losses. The grammar that makes the reviews, and
their splits, are in :mod:`kdcourse.data.reviews` (which re-exports every
name here)."""
from __future__ import annotations

from typing import Sequence

import torch

CLASSES = ("very negative", "negative", "positive", "very positive")
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIALS = (PAD, UNK, CLS, SEP, MASK)

ASPECTS = ("food", "service", "movie", "plot", "acting", "staff", "room", "price",
           "music", "ending", "hotel", "book", "camera", "screen", "dialogue", "view")
VERBS = ("was", "is", "seemed", "felt", "looked")
# adjective -> (polarity, strength): polarity +1/-1, strength 1 (mild) or 2 (strong)
ADJECTIVES = {
    "good": (1, 1), "nice": (1, 1), "fine": (1, 1), "pleasant": (1, 1), "decent": (1, 1), "solid": (1, 1),
    "great": (1, 2), "excellent": (1, 2), "wonderful": (1, 2), "superb": (1, 2),
    "bad": (-1, 1), "poor": (-1, 1), "dull": (-1, 1), "weak": (-1, 1), "bland": (-1, 1), "boring": (-1, 1),
    "awful": (-1, 2), "terrible": (-1, 2), "horrible": (-1, 2), "dreadful": (-1, 2),
}
INTENSIFIERS = ("very", "really", "extremely", "truly")
DIMINISHERS = ("slightly", "somewhat", "mildly", "fairly")
NEGATIONS = ("not", "hardly")
FILLERS = ("honestly", "overall", "well", "frankly")
FUNCTION_WORDS = ("the", ",", "but", "although", "and", "i", "did", "think")
FORMS = ("single", "but", "although_first", "although_second", "and")
FORM_WEIGHTS = (0.2, 0.3, 0.15, 0.15, 0.2)
CONTRAST_OPPOSITE = 0.85  # P(opposite polarities) in "but"/"although" reviews
MAX_WORDS = 21  # longest review the grammar can make, in words
DEFAULT_MAX_LEN = MAX_WORDS + 2  # plus [CLS] and [SEP]
BUCKET_POOL = 16  # batches per length-sorted pool when shuffling (see TextSplit.batches)


def vocabulary() -> tuple[str, ...]:
    """Every token the generator can produce, specials first ([PAD] has id 0)."""
    words = (*FUNCTION_WORDS, *ASPECTS, *VERBS, *ADJECTIVES, *INTENSIFIERS, *DIMINISHERS, *NEGATIONS, *FILLERS)
    seen, out = set(), list(SPECIALS)
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return tuple(out)


class WordTokenizer:
    """Whitespace tokenizer over a fixed vocabulary (ids are positions in it).

    ``encode`` adds ``[CLS]`` and ``[SEP]`` and pads with ``[PAD]`` (id 0) to
    ``max_len``; unknown words become ``[UNK]``.
    """

    def __init__(self, vocab: Sequence[str] | None = None, max_len: int = DEFAULT_MAX_LEN):
        vocab = tuple(vocab) if vocab is not None else vocabulary()
        if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocab must start with the special tokens {SPECIALS}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate tokens")
        if not isinstance(max_len, int) or max_len < 3:
            raise ValueError(f"max_len must be an int >= 3 ([CLS], a word, [SEP]), got {max_len!r}")
        self.vocab = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.max_len = max_len
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = range(len(SPECIALS))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids = [self.cls_id] + [self.index.get(w, self.unk_id) for w in text.split()] + [self.sep_id]
        if len(ids) > self.max_len:
            raise ValueError(f"text has {len(ids) - 2} words, more than max_len={self.max_len} allows "
                             f"(max_len counts [CLS] and [SEP]); raise max_len: {text!r}")
        return ids + [self.pad_id] * (self.max_len - len(ids))

    def encode_batch(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, max_len) int64 input ids."""
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.int64).view(len(texts), self.max_len)

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        words = [self.vocab[i] for i in ids]
        if skip_special:
            words = [w for w in words if w not in SPECIALS]
        return " ".join(words)


def bag_of_words(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, V) float word counts, ignoring the special tokens (ids < 5)."""
    counts = torch.zeros(input_ids.shape[0], vocab_size)
    counts.scatter_add_(1, input_ids, torch.ones_like(input_ids, dtype=torch.float32))
    counts[:, : len(SPECIALS)] = 0
    return counts


class BagOfWords(torch.nn.Module):
    """A linear classifier on word counts: it cannot see word order, so it
    cannot tell which clause a "but" points to, nor what a "not" negates."""

    def __init__(self, vocab_size: int, num_classes: int = len(CLASSES)):
        super().__init__()
        self.vocab_size = vocab_size
        self.linear = torch.nn.Linear(vocab_size, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.linear(bag_of_words(input_ids, self.vocab_size).to(self.linear.weight.device))


# --------------------------------------------------------------------------
# Masked-LM inputs
# --------------------------------------------------------------------------

def mask_tokens(input_ids: torch.Tensor, vocab_size: int, generator: torch.Generator, prob: float = 0.15,
                mask_id: int = 4, n_special: int = len(SPECIALS)) -> tuple[torch.Tensor, torch.Tensor]:
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
    masked, labels = replace_picked(ids, pick, vocab_size, generator, mask_id, n_special)
    return masked.to(input_ids.device), labels.to(input_ids.device)


def replace_picked(input_ids: torch.Tensor, pick: torch.Tensor, vocab_size: int, generator: torch.Generator,
                   mask_id: int = 4, n_special: int = len(SPECIALS)) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 on the tokens already picked (``pick``, a bool tensor
    of ``input_ids``' shape): one uniform draw per token, below 0.8 the token
    becomes ``mask_id``, from 0.8 to 0.9 a random word in
    ``n_special .. vocab_size - 1``, above 0.9 it stays. Returns
    ``(masked_ids, mlm_labels)``: a new tensor (the input is left alone) and
    the original token where picked, ``-100`` elsewhere."""
    labels = torch.where(pick, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator)
    random_words = torch.randint(n_special, vocab_size, input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[pick & (action < 0.8)] = mask_id
    swap = pick & (action >= 0.8) & (action < 0.9)
    masked[swap] = random_words[swap]
    return masked, labels
