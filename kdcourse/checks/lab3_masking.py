"""Lab 3 check on the exercise contract: BERT's masking of the unlabelled text
(Devlin et al. 2019, section 3.1): each real token is picked with
probability ``prob``; a picked token becomes ``[MASK]`` 80 % of the time, a
random word 10 % and stays itself 10 %; the labels hold the original token
where one was picked and ``-100`` everywhere else.

A right answer is random, so the probe does not compare tokens with the
reference's: it measures what the student's masking did on a large seeded
batch (padding and special tokens included) — the rules that must hold
exactly (counted violations) and the shares that must hold on average
(compared within four to five standard deviations) — and whether the same
generator gives the same masking whatever the global RNG did.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..data import review_tokens
from ..data.review_tokens import replace_picked
from . import CheckFailed, contract

SHARE_TOLERANCE = {"picked": 0.02, "to_mask": 0.05, "to_random": 0.04, "kept": 0.04}


def reference_mask_tokens(input_ids, vocab_size, generator, prob=0.15, mask_id=4, n_special=5):
    """(masked_ids, mlm_labels): BERT's 80/10/10 masking of ``prob`` of the real tokens (ids >= n_special);
    the 80/10/10 step is the package's own (:func:`kdcourse.data.review_tokens.replace_picked`)."""
    real = input_ids >= n_special
    pick = real & (torch.rand(input_ids.shape, generator=generator) < prob)
    return replace_picked(input_ids, pick, vocab_size, generator, mask_id, n_special)


def _masking_variant(kind: str):
    def mask_tokens(input_ids, vocab_size, generator, prob=0.15, mask_id=4, n_special=5):
        gen = None if kind == "global_rng" else generator
        real = input_ids >= n_special if kind != "specials" else torch.ones_like(input_ids, dtype=torch.bool)
        p = 0.15 if kind == "fixed_prob" else prob
        pick = real & (torch.rand(input_ids.shape, generator=gen) < p)
        labels = torch.full_like(input_ids, -100)
        labels[pick] = input_ids[pick]
        if kind == "labels_everywhere":
            labels = input_ids.clone()
        action = torch.rand(input_ids.shape, generator=gen)
        low = 0 if kind == "random_specials" else n_special
        words = torch.randint(low, vocab_size, input_ids.shape, generator=gen)
        masked = input_ids if kind == "in_place" else input_ids.clone()
        if kind == "all_mask":
            masked[pick] = mask_id
        elif kind == "independent":
            masked[pick & (action < 0.8)] = mask_id
            second = pick & (torch.rand(input_ids.shape, generator=gen) < 0.1)
            masked[second] = words[second]
        else:
            masked[pick & (action < 0.8)] = mask_id
            upper = 1.0 if kind == "no_keep" else 0.9
            swap = pick & (action >= 0.8) & (action < upper)
            masked[swap] = words[swap]
        if kind == "labels_of_masked":
            labels = torch.where(pick, masked, torch.full_like(input_ids, -100))
        return (masked.clone() if kind == "in_place" else masked), labels
    return mask_tokens


MASKING_VARIANTS = {
    "specials": (_masking_variant("specials"),
                 "padding and special tokens ([PAD], [CLS], [SEP], ...) are picked too: only real words, "
                 "input_ids >= n_special, may be masked and predicted."),
    "all_mask": (_masking_variant("all_mask"),
                 "every picked token becomes [MASK]: BERT replaces 80 % of them with [MASK], 10 % with a random word "
                 "and leaves 10 % unchanged, so the model cannot learn that only [MASK] positions matter."),
    "no_keep": (_masking_variant("no_keep"),
                "no picked token stays itself (80 % [MASK], 20 % random): 10 % must be left unchanged — split ONE "
                "draw per token at 0.8 and 0.9."),
    "independent": (_masking_variant("independent"),
                    "the random-word draw is independent of the [MASK] draw, so random words overwrite some masks "
                    "and the shares are not 80/10/10: draw one number per picked token and split it at 0.8 and 0.9."),
    "labels_everywhere": (_masking_variant("labels_everywhere"),
                          "labels are set at every position: put -100 where no token was picked (the loss ignores "
                          "those), and the original token where one was."),
    "labels_of_masked": (_masking_variant("labels_of_masked"),
                         "the labels hold the tokens after masking ([MASK] or the random word): the target is the "
                         "ORIGINAL token, input_ids at the picked positions."),
    "random_specials": (_masking_variant("random_specials"),
                        "the random words are drawn from the whole vocabulary, special tokens included: draw them "
                        "from n_special .. vocab_size - 1 (torch.randint(n_special, vocab_size, ...))."),
    "fixed_prob": (_masking_variant("fixed_prob"), "prob is ignored (always 0.15): pick each real token with probability prob."),
    "global_rng": (_masking_variant("global_rng"),
                   "the draws ignore the generator (torch.rand(shape) uses the global RNG): pass generator=generator "
                   "to every torch.rand / torch.randint, so a seeded generator gives the same masking every run."),
    "in_place": (_masking_variant("in_place"),
                 "input_ids is changed in place (masked = input_ids, then assigned into): the caller's batch is "
                 "not yours — start from input_ids.clone()."),
}


def _batch(seed: int):
    """(128, 100) ids: [CLS] first, [SEP] after 30..98 words, [PAD] after that; words n_special .. vocab - 1."""
    g = contract.generator(seed)
    n_special, vocab = [(5, 30), (5, 40), (6, 25)][seed % 3]
    ids = torch.randint(n_special, vocab, (128, 100), generator=g)
    lengths = 30 + torch.randint(0, 69, (128,), generator=g)
    pos = torch.arange(100)[None, :]
    ids[pos == lengths[:, None] + 1] = 3
    ids[pos > lengths[:, None] + 1] = 0
    ids[:, 0] = 2
    ids[torch.rand(ids.shape, generator=g) < 0.02] = 1  # a few unknown words: specials, never picked
    return ids, vocab, n_special


def probe_mask_tokens(fn: Callable, seed: int = 0) -> dict:
    """On a seeded (128, 100) batch (prob 0.15, 0.3 or 0.5; several vocabularies):
    counted violations of the exact rules, the shares picked / [MASK] /
    random / kept, whether the input was changed and whether the same
    generator seed reproduces the masking under a different global RNG."""
    ids, vocab, n_special = _batch(seed)
    prob, mask_id = [0.15, 0.3, 0.5][seed % 3], 4
    given = ids.clone()
    outs = []
    for k in range(2):
        torch.manual_seed(10_000 + 7 * seed + k)  # a different global RNG state each call
        got, raised = contract.attempt(fn, given, vocab, torch.Generator().manual_seed(seed), prob=prob,
                                       mask_id=mask_id, n_special=n_special)
        if raised:
            return {**raised, "input_changed": not torch.equal(given, ids)}
        if not (isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got)):
            raise contract.PlainDataError("mask_tokens must return a pair of tensors (masked_ids, mlm_labels)")
        outs.append(got)
        if k == 0:
            changed = not torch.equal(given, ids)
            given = ids.clone()
    masked, labels = outs[0]
    data = {"input_changed": changed, "reproducible": all(torch.equal(a, b) for a, b in zip(outs[0], outs[1])),
            "shapes": [list(masked.shape), list(labels.shape)], "dtypes": [str(masked.dtype), str(labels.dtype)]}
    if masked.shape != ids.shape or labels.shape != ids.shape:
        return data
    masked, labels = masked.long(), labels.long()
    real, picked = ids >= n_special, labels != -100
    kept, to_mask = picked & (masked == ids), picked & (masked == mask_id) & (ids != mask_id)
    to_random = picked & ~kept & ~to_mask
    n_picked = max(int(picked.sum()), 1)
    data["violations"] = {  # whether each exact rule is broken somewhere (counts would depend on the draw order)
        "picked_special_or_padding": bool((picked & ~real).any()),
        "label_not_the_original": bool((picked & (labels != ids)).any()),
        "changed_but_not_picked": bool((~picked & (masked != ids)).any()),
        "random_word_out_of_range": bool((to_random & ((masked < n_special) | (masked >= vocab))).any()),
    }
    data["shares"] = {"picked": float(picked[real].float().mean()), "to_mask": int(to_mask.sum()) / n_picked,
                      "to_random": int(to_random.sum()) / n_picked, "kept": int(kept.sum()) / n_picked}
    return data


def compare_masking(student, other, seed=0) -> str | None:
    """Exact on faults, rules, shapes and reproducibility; the shares within ``SHARE_TOLERANCE``."""
    for key in ("raised", "input_changed", "reproducible", "shapes", "dtypes", "violations"):
        if student.get(key) != other.get(key):
            return f"[{key!r}]: got {student.get(key)!r}, expected {other.get(key)!r}"
    for key, tol in SHARE_TOLERANCE.items():
        a, b = (student.get("shares") or {}).get(key), (other.get("shares") or {}).get(key)
        if (a is None) != (b is None) or (a is not None and abs(a - b) > tol):
            return f"['shares'][{key!r}]: got {a!r}, expected about {b!r} (± {tol})"
    return None


def check_mask_tokens(fn: Callable) -> bool:
    """``fn(input_ids, vocab_size, generator, prob=0.15, mask_id=4, n_special=5)`` →
    ``(masked_ids, mlm_labels)``: BERT's masking, measured on seeded batches."""
    ex = contract.exercise(3, "mask_tokens")
    seeds = (0, 1, 2)
    student = {s: contract.run_probe(ex, fn, s) for s in seeds}
    reference = {s: contract.run_probe(ex, ex.reference, s) for s in seeds}
    variants = lambda name, seed: contract.run_probe(ex, ex.variants[name][0], seed)  # noqa: E731
    v = contract.diagnose_data(ex, student, reference, variants)
    if not v.ok:
        first = student[seeds[0]]
        if v.variant is None and first.get("raised"):
            raise CheckFailed(f"mask_tokens raised {first['raised']} on a check batch"
                              + (f": {first['message']}" if first.get("message") else ""))
        raise CheckFailed(v.hint.replace("on a hidden test", "on a check batch"))
    shares = student[seeds[0]]["shares"]
    print(f"✓ mask_tokens follows BERT's rules on 3 seeded batches of 128 x 100 tokens (prob 0.15, 0.3, 0.5): "
          f"at prob 0.15 it picked {100 * shares['picked']:.1f}% of the real tokens, of those "
          f"{100 * shares['to_mask']:.0f}% [MASK], {100 * shares['to_random']:.0f}% random, {100 * shares['kept']:.0f}% kept")
    return True


EXERCISE = contract.Exercise(name="mask_tokens", points=1.0, check=check_mask_tokens, probe=probe_mask_tokens,
                             reference=reference_mask_tokens, variants=MASKING_VARIANTS, hidden_seeds=tuple(range(6)),
                             compare=compare_masking,
                             # the package's own masking (the MLM objectives use it): an answer may not delegate to it
                             refuse=(review_tokens.mask_tokens, review_tokens.replace_picked))
