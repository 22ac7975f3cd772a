"""Teacher outputs on a whole split, computed once and shared by objectives.

A lab trains dozens of students from one frozen teacher; the teacher's
logits, the intermediate features the objectives read, and a BERT teacher's
hidden states and attentions are computed in one pass over the
(non-augmented) training split and looked up by ``batch.index``.

One memo serves them all, with one keying rule. An entry is keyed by

* the **teacher**: the live module (its plain attributes, e.g. an
  ensemble's averaging mode, shape its outputs too; checked through a weak
  reference, so a freed module's id can never serve a new one) and a digest
  of its weights and buffers — a teacher trained further, or a student that
  later becomes a teacher (born-again), is never served stale outputs;
* the **split**: its type and a digest of its tensors (images or token ids,
  labels);
* the **output**: ``("logits", batch_size)``, ``("feature", name, size,
  batch_size)``, ``("hidden", k, dtype, batch_size)`` or ``("attention", k,
  dtype, batch_size)``. The batch size is part of the key because it is part
  of how a number was computed: results stay bit-identical to a fresh
  eval-mode pass at that batch size.

:func:`teacher_outputs` (logits + named features), :func:`memo_logits`
(logits, as ``predict_logits``) and
:meth:`kdcourse.distill.transformer.TeacherTargets.compute` all read and
write it; :func:`clear_teacher_cache` empties it (``clear_logit_memo`` is
the same function under its old name).
"""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import features as feats
from .data import Split
from .train import _model_device, predict_logits

CACHE_LIMIT_BYTES = 2e9  # above this, "auto" runs the teacher live instead of caching its features
MEMO_ENTRIES = 32  # at most this many outputs are kept (least recently used go first) ...
MEMO_BYTES = 4e9  # ... and at most this many bytes (the entries of the latest call are always kept)
LOGIT_MEMO_SIZE = MEMO_ENTRIES  # old name

# key -> (weak reference to the teacher, tensor)
_MEMO: "OrderedDict[tuple, tuple[weakref.ref, torch.Tensor]]" = OrderedDict()
_SPLIT_DIGESTS: dict = {}  # (id, version, data_ptr) of a split tensor -> (weak ref, digest)


def clear_teacher_cache() -> None:
    """Forget every cached teacher output (entries are also evicted LRU)."""
    _MEMO.clear()
    _SPLIT_DIGESTS.clear()


clear_logit_memo = clear_teacher_cache  # old name (Lab 1's benchmark times the teacher pass with it)


def _digest(tensors) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    """Digest of one split tensor, remembered while the tensor lives and is not
    modified in place (its version counter moves on every in-place op)."""
    try:
        tag = (id(t), t._version, t.data_ptr())
    except RuntimeError:  # inference-mode tensors have no version counter
        return _digest([t])
    hit = _SPLIT_DIGESTS.get(tag)
    if hit is not None and hit[0]() is t:
        return hit[1]
    d = _digest([t])
    _SPLIT_DIGESTS[tag] = (weakref.ref(t), d)
    for k in [k for k, (ref, _) in _SPLIT_DIGESTS.items() if ref() is None]:
        del _SPLIT_DIGESTS[k]
    return d


def _split_tensors(split) -> list[torch.Tensor]:
    if not hasattr(split, "__dict__"):
        return []
    return [v for _, v in sorted(vars(split).items()) if isinstance(v, torch.Tensor)]


def _base_key(teacher: nn.Module, split) -> tuple:
    """The teacher and split half of every key (see the module docstring)."""
    # the weights are always re-hashed: ``p.data`` updates (EMA, hand-made edits) bypass version counters
    return (id(teacher), _digest(teacher.state_dict().values()),
            type(split).__qualname__, tuple(_tensor_digest(t) for t in _split_tensors(split)))


def _get(teacher, base: tuple, item: tuple) -> torch.Tensor | None:
    hit = _MEMO.get(base + item)
    if hit is not None and hit[0]() is teacher:
        _MEMO.move_to_end(base + item)
        return hit[1]
    return None


def _put(teacher, base: tuple, entries: dict) -> None:
    for item, v in entries.items():
        _MEMO[base + item] = (weakref.ref(teacher), v)
    keep = {base + item for item in entries}
    for k in [k for k, (ref, _) in _MEMO.items() if ref() is None]:  # teachers that are gone
        del _MEMO[k]
    size = lambda: sum(v.numel() * v.element_size() for _, v in _MEMO.values())  # noqa: E731
    while len(_MEMO) > max(MEMO_ENTRIES, len(keep)) or (len(_MEMO) > len(keep) and size() > MEMO_BYTES):
        oldest = next(k for k in _MEMO if k not in keep)
        del _MEMO[oldest]


def cached(teacher: nn.Module, split, items: Sequence[tuple],
           compute: Callable[[list], dict]) -> dict:
    """The memo's one entry point: ``{item: tensor}`` for ``items`` of
    ``teacher`` on ``split``; the items not cached yet are computed together by
    ``compute(missing_items) -> {item: tensor}`` and stored."""
    base = _base_key(teacher, split)
    got = {item: _get(teacher, base, item) for item in dict.fromkeys(items)}
    missing = [item for item, v in got.items() if v is None]
    if missing:
        new = compute(missing)
        if set(new) != set(missing):
            raise RuntimeError(f"compute returned {sorted(map(str, new))}, expected {sorted(map(str, missing))}")
        _put(teacher, base, new)
        got.update(new)
    return got


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, split: Split, names: Sequence[str], sizes: dict | None = None,
                    batch_size: int = 256) -> tuple[torch.Tensor, dict]:
    """Logits (N, C) and ``{name: (N, ...)}`` features of ``teacher`` on every
    sample of ``split`` (in order, eval mode). A 4-D feature is average-pooled
    to ``sizes[name] = (H, W)`` when given and smaller than its own size.

    Memoised (see the module docstring): the outputs not cached yet are
    computed together in one pass over the split, so objectives built on the
    same teacher and split (a seed sweep, several methods) share the work.
    """
    sizes = {k: tuple(v) for k, v in (sizes or {}).items()}
    names = list(dict.fromkeys(names))
    logits_item = ("logits", batch_size)
    items = [logits_item] + [("feature", n, sizes.get(n), batch_size) for n in names]

    def compute(missing):
        layers = [it[1] for it in missing if it[0] == "feature"]
        if not layers:  # logits only: exactly predict_logits
            return {logits_item: predict_logits(teacher, split, batch_size)}
        was_training = teacher.training
        teacher.eval()
        acc = {it: [] for it in missing}
        try:
            for b in split.batches(batch_size, device=_model_device(teacher)):
                out, f = feats.extract(teacher, b.x, layers, detach=True)
                for it in missing:
                    v = out if it[0] == "logits" else f[it[1]]
                    sz = it[2] if it[0] == "feature" else None
                    if v.ndim == 4 and sz is not None and v.shape[-2] * v.shape[-1] > sz[0] * sz[1]:
                        v = F.adaptive_avg_pool2d(v, sz)
                    acc[it].append(v.float().cpu())
        finally:
            teacher.train(was_training)
        return {it: torch.cat(chunks) for it, chunks in acc.items()}

    got = cached(teacher, split, items, compute)
    return got[logits_item], {n: got[("feature", n, sizes.get(n), batch_size)] for n in names}


def memo_logits(teacher, split: Split, batch_size: int = 512) -> torch.Tensor:
    """``predict_logits(teacher, split, batch_size)``, computed once and reused:
    the logits entry of the teacher-output memo (see the module docstring;
    ``clear_teacher_cache()`` empties it). Callables that are not modules,
    and splits without tensors, are not memoised."""
    if not isinstance(teacher, nn.Module) or not _split_tensors(split):
        return predict_logits(teacher, split, batch_size)
    return teacher_outputs(teacher, split, (), batch_size=batch_size)[0]
