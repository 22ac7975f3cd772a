"""Teacher outputs on a whole split, computed once and shared by objectives.

A lab trains dozens of students from one frozen teacher; the teacher's
logits and the intermediate features the objectives read are computed in
one pass over the (non-augmented) training split and looked up by
``batch.index``.
"""
from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import features as feats
from .data import Split
from .train import predict_logits

CACHE_LIMIT_BYTES = 2e9  # above this, "auto" runs the teacher live instead of caching its features
_MEMO: "OrderedDict[tuple, tuple]" = OrderedDict()
_MEMO_SIZE = 16  # cached (teacher, split, layer) entries


def clear_teacher_cache() -> None:
    """Forget every cached teacher output (entries are also evicted LRU)."""
    _MEMO.clear()


def _memo_key(teacher, split, name, size):
    return (id(teacher), id(split.images), len(split), name, size)


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, split: Split, names: Sequence[str], sizes: dict | None = None,
                    batch_size: int = 256) -> tuple[torch.Tensor, dict]:
    """Logits (N, C) and ``{name: (N, ...)}`` features of ``teacher`` on every
    sample of ``split`` (in order, eval mode). A 4-D feature is average-pooled
    to ``sizes[name] = (H, W)`` when given and smaller than its own size.

    Memoised per (teacher, split, layer, size): the layers not cached yet are
    computed together in one pass over the split, so objectives built on the
    same teacher and split (a seed sweep, several methods) share the work.
    """
    sizes = {k: tuple(v) for k, v in (sizes or {}).items()}
    wanted = [("__logits__", None)] + [(n, sizes.get(n)) for n in dict.fromkeys(names)]
    missing = [(n, sz) for n, sz in wanted if _memo_key(teacher, split, n, sz) not in _MEMO]
    if missing:
        was_training = teacher.training
        teacher.eval()
        dev = next(teacher.parameters()).device
        layer_names = [n for n, _ in missing if n != "__logits__"]
        acc = {m: [] for m in missing}
        for b in split.batches(batch_size, device=dev):
            out, f = feats.extract(teacher, b.x, layer_names, detach=True) if layer_names else (teacher(b.x), {})
            for n, sz in missing:
                v = out if n == "__logits__" else f[n]
                if v.ndim == 4 and sz is not None and v.shape[-2] * v.shape[-1] > sz[0] * sz[1]:
                    v = F.adaptive_avg_pool2d(v, sz)
                acc[(n, sz)].append(v.float().cpu())
        teacher.train(was_training)
        for (n, sz), chunks in acc.items():
            # the key holds ids: keep the objects alive with the entry so no id is reused while it exists
            _MEMO[_memo_key(teacher, split, n, sz)] = (teacher, split.images, torch.cat(chunks))
    for n, sz in wanted:
        _MEMO.move_to_end(_memo_key(teacher, split, n, sz))
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    get = lambda n, sz: _MEMO[_memo_key(teacher, split, n, sz)][2]  # noqa: E731
    return get("__logits__", None), {n: get(n, sz) for n, sz in wanted[1:]}


# The teacher's logits on a split, shared by every Distill run that uses the
# same teacher on the same data (a lab trains dozens of students from one
# teacher). Keyed by the live module (checked through a weak reference), a
# digest of its weights and a digest of the split's tensors, so a retrained
# teacher or a different split can never be served stale logits.
_LOGIT_MEMO: "OrderedDict[tuple, tuple[weakref.ref, torch.Tensor]]" = OrderedDict()
LOGIT_MEMO_SIZE = 4


def _digest(tensors) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def memo_logits(teacher, split: Split) -> torch.Tensor:
    """``predict_logits(teacher, split)``, computed once per (teacher
    module and its weights, split tensors — images or token ids, labels)
    and reused (at most ``LOGIT_MEMO_SIZE`` entries;
    ``clear_logit_memo()`` empties it). Callables that are not modules are
    not memoised."""
    inputs = [v for _, v in sorted(vars(split).items()) if isinstance(v, torch.Tensor)] if hasattr(split, "__dict__") else []
    if not isinstance(teacher, nn.Module) or not inputs:
        return predict_logits(teacher, split)
    # the same live module (its plain attributes, e.g. an ensemble's averaging mode, shape its
    # outputs too), with the same weights, on the same tensors
    key = (id(teacher), type(split).__qualname__, _digest(teacher.state_dict().values()), _digest(inputs))
    hit = _LOGIT_MEMO.get(key)
    if hit is not None and hit[0]() is teacher:
        _LOGIT_MEMO.move_to_end(key)
        return hit[1]
    logits = predict_logits(teacher, split)
    _LOGIT_MEMO[key] = (weakref.ref(teacher), logits)
    while len(_LOGIT_MEMO) > LOGIT_MEMO_SIZE:
        _LOGIT_MEMO.popitem(last=False)
    return logits


def clear_logit_memo() -> None:
    _LOGIT_MEMO.clear()
