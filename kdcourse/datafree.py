"""A synthesized transfer set: noise optimised through a frozen teacher, cached.

    settings = datafree.settings_for(profile)
    synth, info = datafree.synthesized_set(teacher, ds, settings, step=synthesis_step)

:func:`synthesize` runs DeepInversion (Yin et al., CVPR 2020): for each batch
it starts from Gaussian noise, picks the target classes (balanced: the same
number of images per class), and calls ``step(teacher, images, targets,
optimizer, bn_weight=, tv_weight=, l2_weight=)`` ``settings.steps`` times —
the step is the notebook's own ``synthesis_step`` (or :func:`reference_step`).
Between steps the loop does what the step should not have to: random jitter
(the images are rolled by up to ``jitter`` pixels and flipped, with the
optimiser's moment estimates, so the images stay sharp at every offset —
the paper's "random jitter and flip"), and clamping to the valid pixel
range. A progress bar counts the steps.

:func:`synthesized_set` caches the result on disk like a teacher
(:mod:`kdcourse.zoo`'s checksummed, atomic files), keyed by the teacher's
weights, the settings, the data's normalisation and the code of ``step``
(and of the functions it uses by default), so an edited step is never served
stale images. A corrupt or truncated file is reported and rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import types
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import runtime
from .data import ImageData, Split
from .losses.datafree import bn_statistics_loss, image_prior
from .train import freeze
from .zoo import CorruptCache, cache_dir, load_checked, save_atomic

FORMAT = 1


@dataclass(frozen=True)
class SynthesisSettings:
    """How a synthesized set is made; every field enters the cache key."""

    n_images: int = 500  # in total, balanced over the classes
    batch_size: int = 100  # images optimised together (their batch statistics are matched)
    steps: int = 120  # optimiser steps per batch
    lr: float = 0.1  # Adam on the pixels (normalised units)
    bn_weight: float = 0.05
    tv_weight: float = 1.0
    l2_weight: float = 0.01
    jitter: int = 2  # random roll of up to this many pixels per step (0: none), plus flips
    seed: int = 0

    def __post_init__(self):
        for name in ("n_images", "batch_size", "steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SynthesisSettings.{name} must be a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"SynthesisSettings.lr must be > 0, got {self.lr!r}")
        for name in ("bn_weight", "tv_weight", "l2_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"SynthesisSettings.{name} must be >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.jitter, int) or self.jitter < 0:
            raise ValueError(f"SynthesisSettings.jitter must be an int >= 0, got {self.jitter!r}")

    def replace(self, **changes) -> "SynthesisSettings":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def settings_for(profile) -> SynthesisSettings:
    """The synthesis settings of a profile (``profile.extra["synthesis"]``
    overrides fields). Smoke: a few images and steps (seconds); laptop: 500
    images x 120 steps (5 batches of 100), sized to stay within about four
    minutes on two cores; full (a GPU): 5,000 images x 1,000 steps."""
    base = {
        "smoke": SynthesisSettings(n_images=40, batch_size=20, steps=8),
        "laptop": SynthesisSettings(),
        "full": SynthesisSettings(n_images=5000, batch_size=250, steps=1000),
    }.get(profile.name, SynthesisSettings())
    return base.replace(**profile.extra.get("synthesis", {}))


def reference_step(teacher: nn.Module, images: torch.Tensor, targets: torch.Tensor, optimizer, *, bn_weight: float,
                   tv_weight: float, l2_weight: float, bn_loss: Callable = bn_statistics_loss,
                   prior: Callable = image_prior) -> float:
    """One DeepInversion step on ``images`` (the optimiser's parameter): the
    teacher frozen (eval mode, no gradient to its weights), loss
    ``CE(logits, targets) + bn_weight * bn_loss + prior(images, tv_weight, l2_weight)``,
    zero the gradients, backward, step. Returns the loss as a float."""
    freeze(teacher)
    bn, logits = bn_loss(teacher, images)
    loss = F.cross_entropy(logits, targets) + bn_weight * bn + prior(images, tv_weight, l2_weight)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def balanced_targets(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` class labels, as equal a count per class as ``n`` allows, shuffled."""
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=generator)]


def _jitter(images: torch.Tensor, optimizer, dx: int, dy: int, flip: bool, undo: bool = False) -> None:
    """Roll the images by (dy, dx) pixels and flip them left-right (or undo
    that), with the optimiser's per-pixel state moved the same way, in place."""
    tensors = [images] + [v for v in optimizer.state.get(images, {}).values()
                          if isinstance(v, torch.Tensor) and v.shape == images.shape]
    with torch.no_grad():
        for t in tensors:
            if undo:
                moved = torch.roll(t.flip(3) if flip else t, shifts=(-dy, -dx), dims=(2, 3))
            else:
                moved = torch.roll(t, shifts=(dy, dx), dims=(2, 3))
                moved = moved.flip(3) if flip else moved
            t.copy_(moved)


def synthesize(teacher: nn.Module, num_classes: int, settings: SynthesisSettings, step: Callable = reference_step, *,
               image_shape=(3, 32, 32), pixel_range=(-2.0, 2.0), progress: bool = True,
               desc: str = "synthesizing") -> tuple[torch.Tensor, torch.Tensor, list]:
    """Optimise ``settings.n_images`` noise images towards balanced classes.

    Returns ``(images, targets, losses)``: the images (N, C, H, W) on the CPU,
    the classes they were optimised towards, and the mean loss of each batch
    at its last step. ``pixel_range`` is the valid range of a pixel in the
    data's normalised units (images are clamped to it after every step)."""
    if not callable(step):
        raise ValueError(f"step must be a function (teacher, images, targets, optimizer, ...), got {type(step).__name__}")
    dev = runtime.device()
    teacher = freeze(teacher).to(dev)
    gen = torch.Generator().manual_seed(settings.seed)
    targets_all = balanced_targets(settings.n_images, num_classes, gen)
    out, losses = [], []
    n_batches = -(-settings.n_images // settings.batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_batches * settings.steps, desc=desc, unit="step", leave=False)
    lo, hi = pixel_range
    try:
        for targets in targets_all.split(settings.batch_size):
            images = torch.randn((len(targets), *image_shape), generator=gen).to(dev).requires_grad_(True)
            targets = targets.to(dev)
            opt = torch.optim.Adam([images], lr=settings.lr, betas=(0.5, 0.9))
            loss = float("nan")
            for _ in range(settings.steps):
                j = settings.jitter
                dx, dy = (int(v) for v in torch.randint(-j, j + 1, (2,), generator=gen)) if j else (0, 0)
                flip = bool(torch.rand((), generator=gen) < 0.5) if j else False
                _jitter(images, opt, dx, dy, flip)
                loss = step(teacher, images, targets, opt, bn_weight=settings.bn_weight,
                            tv_weight=settings.tv_weight, l2_weight=settings.l2_weight)
                _jitter(images, opt, dx, dy, flip, undo=True)
                with torch.no_grad():
                    images.clamp_(lo, hi)
                if bar is not None:
                    bar.update(1)
            loss = float(loss)
            if not torch.isfinite(torch.tensor(loss)):
                raise FloatingPointError(f"the synthesis loss became {loss}; lower SynthesisSettings.lr (now {settings.lr})")
            losses.append(loss)
            out.append(images.detach().cpu())
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(out), targets_all, losses


# --------------------------------------------------------------------------
# The disk cache
# --------------------------------------------------------------------------

def _code_digest(fn, h, seen=None) -> None:
    """Feed the bytecode and constants of ``fn`` (and of functions among its
    defaults) into ``h``: a stable digest of what the function does."""
    seen = seen if seen is not None else set()
    if id(fn) in seen:
        return
    seen.add(id(fn))
    code = getattr(fn, "__code__", None)
    if code is None:
        h.update(f"{type(fn).__module__}.{type(fn).__qualname__}".encode())
        return

    def feed(c):
        h.update(c.co_code)
        h.update(repr(c.co_names).encode())
        for const in c.co_consts:
            feed(const) if isinstance(const, types.CodeType) else h.update(repr(const).encode())

    feed(code)
    for default in list(fn.__defaults__ or ()) + list((fn.__kwdefaults__ or {}).values()):
        if callable(default):
            _code_digest(default, h, seen)


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A short hash of a model's weights and buffers (names, shapes, values)."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in teacher.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(teacher: nn.Module, settings: SynthesisSettings, step: Callable, split: Split) -> str:
    h = hashlib.sha256(f"{FORMAT}|{teacher_fingerprint(teacher)}|{settings.to_json()}|{split.mean}|{split.std}|"
                       f"{tuple(split.images.shape[1:])}|{len(split.classes)}".encode())
    _code_digest(step, h)
    return h.hexdigest()[:20]


def cache_path(key: str, directory: str | None = None) -> str:
    return os.path.join(directory or cache_dir(), f"synthesized-{key}.pt")


def synthesized_set(teacher: nn.Module, data: ImageData, settings: SynthesisSettings, step: Callable = reference_step,
                    *, directory: str | None = None, progress: bool = True, rebuild: bool = False) -> tuple[Split, dict]:
    """The synthesized transfer set for ``teacher`` (made and cached on first use).

    Returns a :class:`~kdcourse.data.Split` (labels: the classes the images
    were optimised towards) and an info dict (``seconds`` it took to make,
    the final batch losses, ``from_cache``, ``cache_path``)."""
    like = data.train
    key = cache_key(teacher, settings, step, like)
    path = cache_path(key, directory)
    if os.path.exists(path) and not rebuild:
        try:
            blob = load_checked(path)
            if blob.get("key") != key:
                raise CorruptCache(f"{path}: key mismatch")
            split = Split(blob["images"], blob["targets"], like.classes, False, like.mean, like.std)
            return split, dict(blob["info"], cache_path=path, from_cache=True)
        except Exception as exc:  # corrupt, truncated, or from another version
            warnings.warn(f"synthesized-set cache {path} is unusable ({exc}); rebuilding it", stacklevel=2)
            os.remove(path)
    lo = min((0 - m) / s for m, s in zip(like.mean, like.std))
    hi = max((1 - m) / s for m, s in zip(like.mean, like.std))
    t0 = time.perf_counter()
    images, targets, losses = synthesize(teacher, data.num_classes, settings, step, image_shape=tuple(like.images.shape[1:]),
                                         pixel_range=(lo, hi), progress=progress)
    info = {"seconds": time.perf_counter() - t0, "final_losses": losses, "settings": settings.to_json()}
    save_atomic({"key": key, "images": images.contiguous(), "targets": targets, "info": info}, path)
    return Split(images, targets, like.classes, False, like.mean, like.std), dict(info, cache_path=path, from_cache=False)
