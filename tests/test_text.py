"""The offline reviews task: deterministic, labels follow the grammar's rules,
splits behave like kdcourse.data.Split for the trainer, and a bag of words
cannot solve it."""
import random

import pytest
import torch

from kdcourse import text
from kdcourse.train import evaluate, fit, predict_logits


def test_generator_is_deterministic_and_covers_every_form_and_class():
    a, b, c = text.generate(500, seed=3), text.generate(500, seed=3), text.generate(500, seed=4)
    assert a == b and a != c
    texts, labels, forms = a
    assert set(forms) == set(text.FORMS)
    assert set(labels) == {0, 1, 2, 3}
    assert max(len(t.split()) for t in texts) <= text.MAX_WORDS


@pytest.mark.parametrize("review,label", [
    ("the food was good", "positive"),
    ("the food was very good", "very positive"),
    ("the food was excellent", "very positive"),
    ("the food was slightly excellent", "positive"),
    ("the food was not good", "negative"),
    ("the food was not bad", "positive"),
    ("the food was not very good", "negative"),
    ("the food was not terrible", "positive"),
    ("i did not think the food was great", "negative"),
    ("the food was bad , but the service was great", "very positive"),
    ("the food was great , but the service was bad", "negative"),
    ("although the food was great , the service was not good", "negative"),
    ("the food was great , although the service was bad", "very positive"),
    ("the food was good and the service was excellent", "very positive"),
])
def test_rules_on_hand_written_reviews(review, label):
    assert text.CLASSES[label_of(review)] == label


def label_of(review: str) -> int:
    """An independent re-implementation of the labelling rules (from the
    module docstring), used to check every generated review."""
    words = review.split()
    if words and words[0] in text.FILLERS:
        words = words[1:]
    s = " ".join(words)

    def clause(c):
        w = c.split()
        negated = "not" in w or "hardly" in w
        adj = w[-1]
        pol, strength = text.ADJECTIVES[adj]
        if len(w) >= 2 and w[-2] in text.INTENSIFIERS:
            strength = 2
        if len(w) >= 2 and w[-2] in text.DIMINISHERS:
            strength = 1
        if negated:
            pol, strength = -pol, 1
        return pol, strength

    if s.startswith("although "):
        first, second = s[len("although "):].split(" , ")
        pol, st = clause(second)
    elif " , but " in s:
        pol, st = clause(s.split(" , but ")[1])
    elif " , although " in s:
        pol, st = clause(s.split(" , although ")[0])
    elif " and " in s:
        (p1, s1), (p2, s2) = clause(s.split(" and ")[0]), clause(s.split(" and ")[1])
        assert p1 == p2
        pol, st = p1, max(s1, s2)
    else:
        pol, st = clause(s)
    return {(-1, 2): 0, (-1, 1): 1, (1, 1): 2, (1, 2): 3}[(pol, st)]


def test_every_generated_label_follows_the_rules():
    texts, labels, _ = text.generate(3000, seed=11)
    assert [label_of(t) for t in texts] == labels


def test_same_words_opposite_labels_exist():
    """Swapping the clauses of a contrast review keeps its bag of words and
    (usually) flips its label: what makes the task impossible for a bag of words."""
    texts, labels, forms = text.generate(2000, seed=5)
    flipped = 0
    for t, y, f in zip(texts, labels, forms):
        if f == "but" and t.split()[0] not in text.FILLERS:
            a, b = t.split(" , but ")
            swapped = f"{b} , but {a}"
            assert sorted(swapped.split()) == sorted(t.split())
            flipped += (label_of(swapped) < 2) != (y < 2)
    assert flipped > 300


def test_tokenizer_round_trip_padding_and_errors():
    tok = text.WordTokenizer()
    assert tok.vocab[0] == text.PAD and tok.pad_id == 0
    ids = tok.encode("the food was good")
    assert len(ids) == tok.max_len and ids[0] == tok.cls_id and ids[5] == tok.sep_id and ids[6:] == [0] * (tok.max_len - 6)
    assert tok.decode(ids) == "the food was good"
    assert tok.encode("the zebra was good")[2] == tok.unk_id
    with pytest.raises(ValueError, match="max_len"):
        text.WordTokenizer(max_len=5).encode("the food was very very good")
    with pytest.raises(ValueError, match="special"):
        text.WordTokenizer(vocab=("a", "b"))


def test_make_data_splits():
    d = text.make_data(50, 20, 30, n_teacher_train=80, n_general=40, seed=1)
    assert (len(d.train), len(d.val), len(d.test), len(d.teacher_train), len(d.general)) == (50, 20, 30, 80, 40)
    assert torch.equal(d.train.input_ids, d.teacher_train.input_ids[:50])
    assert not torch.equal(d.val.input_ids[:20], d.test.input_ids[:20])
    assert (d.general.labels == -1).all() and d.train.labelled and not d.general.labelled
    assert d.num_classes == 4 and d.vocab_size == len(text.vocabulary())
    assert d.fingerprint() == text.make_data(50, 20, 30, n_teacher_train=80, n_general=40, seed=1).fingerprint()
    assert len(text.make_data(5, 5, 5).general) == 0
    with pytest.raises(ValueError, match="n_train"):
        text.make_data(0, 5, 5)


def test_batches_are_split_compatible_aligned_and_trimmed():
    d = text.make_data(200, 10, 10, seed=2)
    split = d.train
    seen = []
    for b in split.batches(32, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert b.x.dtype == torch.int64 and b.x.shape[0] == len(b.labels) == len(b.index)
        width = b.x.shape[1]
        assert torch.equal(b.x, split.input_ids[b.index, :width])
        assert (split.input_ids[b.index, width:] == 0).all()  # only padding was cut
        assert (b.x[:, -1] != 0).any()  # cut to the longest review of the batch
        seen.append(b.index)
    seen = torch.cat(seen)
    assert sorted(seen.tolist()) == list(range(200)) and seen.tolist() != list(range(200))
    in_order = torch.cat([b.index for b in split.batches(32)])
    assert in_order.tolist() == list(range(200))
    assert split.num_batches(32) == 7 and split.augment is False
    with pytest.raises(ValueError, match="augment"):
        split.with_augment(True)
    sub = split.subset(split.labels == 0)
    assert len(sub) == int((split.labels == 0).sum()) and all(label_of(t) == 0 for t in sub.texts)


def test_shuffled_batches_are_reproducible():
    d = text.make_data(100, 10, 10)
    a = [b.index.tolist() for b in d.train.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3))]
    b = [b.index.tolist() for b in d.train.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3))]
    assert a == b


def test_trainer_runs_on_text_splits_and_bag_of_words_fails():
    d = text.make_data(3000, 500, 1000, seed=0)
    torch.manual_seed(0)
    bow = text.BagOfWords(d.vocab_size)
    fit(bow, d.train, epochs=20, lr=2e-2, batch_size=128, progress=False)
    acc = evaluate(bow, d.test)["acc"]
    assert predict_logits(bow, d.test).shape == (1000, 4)
    # well above chance (word polarity counts tell something) but far from solving it
    assert 0.35 < acc < 0.65
    # on contrast reviews it is close to guessing the label of the wrong clause
    contrast = d.test.subset(torch.tensor([f == "but" for f in d.test.forms]))
    assert evaluate(bow, contrast)["acc"] < 0.6


def test_random_reviews_fit_max_len():
    rng = random.Random(0)
    tok = text.WordTokenizer()
    for _ in range(2000):
        t, _, _ = text.make_review(rng)
        tok.encode(t)
