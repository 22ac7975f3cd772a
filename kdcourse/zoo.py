"""Teachers trained once and cached on disk.

    teacher, info = zoo.teacher(profile, data)               # the profile's teacher
    teacher, info = zoo.teacher(profile, data, "overfit", seed=1)

A cache file is keyed by a hash of everything that determines the weights:
the recipe (architecture, epochs, lr, augmentation, seed, ...), a
fingerprint of the training data and the file format. Files are written
atomically (temporary file + rename) with a SHA-256 checksum in front of the
payload; a truncated, corrupt or mismatched file is reported, removed and
rebuilt. The cache folder is ``$KDCOURSE_CACHE`` or ``~/.cache/kdcourse``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import models, runtime
from .data import ImageData
from .data.reviews import TextData
from .distill.transformer import TeacherObjective
from .models import bert
from .models.bert import TextTransformer, _transformers
from .profiles import lab3_settings
from .train import evaluate, fit, freeze

FORMAT = 1
MAGIC = b"kdcourse-cache-v1\n"


def cache_dir() -> str:
    return os.environ.get("KDCOURSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kdcourse")


@dataclass(frozen=True)
class Recipe:
    """How a teacher is trained; every field enters the cache key."""

    spec: tuple  # model spec as sorted (key, value) pairs (hashable)
    epochs: int
    lr: float
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0
    n_train: int | None = None  # train on the first n samples only (None: all)
    batch_size: int = 128
    label: str = "main"

    @property
    def model_spec(self) -> dict:
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.spec}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


def _spec_tuple(spec: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in spec.items()))


def recipe(profile, variant: str = "main", seed: int = 0) -> Recipe:
    """The recipe for a named teacher variant of ``profile``.

    * ``main``: the profile's teacher, trained with augmentation and weight decay.
    * ``overfit``: the same architecture on the first quarter of the
      teachers' training set only, no augmentation, no weight decay: it
      memorises its data and becomes over-confident there (the seed's
      "overfitted teacher").
    * ``small``: a smaller ResNet (for ensembles and size sweeps).
    """
    if variant == "main":
        return Recipe(_spec_tuple(profile.teacher), profile.teacher_epochs, profile.teacher_lr, seed=seed,
                      augment=profile.augment_teacher, label=variant)
    if variant == "overfit":
        return Recipe(_spec_tuple(profile.teacher), profile.teacher_epochs, profile.teacher_lr, weight_decay=0.0,
                      augment=False, seed=seed, n_train=max(1, profile.n_teacher_train // 4), label=variant)
    if variant == "small":
        spec = dict(profile.teacher, depth=8)
        return Recipe(_spec_tuple(spec), max(1, profile.teacher_epochs // 2), profile.teacher_lr, seed=seed,
                      augment=profile.augment_teacher, label=variant)
    raise ValueError(f"variant={variant!r} is not known; use 'main', 'overfit' or 'small'")


def data_fingerprint(data: ImageData) -> str:
    """A short hash of the teachers' training split (labels and a sample of pixels)."""
    h = hashlib.sha256()
    h.update(data.name.encode())
    split = data.teacher_train
    h.update(str(tuple(split.images.shape)).encode())
    h.update(split.labels.numpy().tobytes())
    h.update(split.images[:64].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(rec: Recipe, data: ImageData) -> str:
    payload = f"{FORMAT}|{rec.to_json()}|{data_fingerprint(data)}"
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cache_path(rec: Recipe, data: ImageData, directory: str | None = None) -> str:
    return os.path.join(directory or cache_dir(), f"teacher-{rec.label}-{cache_key(rec, data)}.pt")


# --------------------------------------------------------------------------
# Atomic, checksummed files
# --------------------------------------------------------------------------

def save_atomic(obj, path: str) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, with a checksum header."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + digest + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class CorruptCache(ValueError):
    pass


def load_checked(path: str):
    """Load a file written by :func:`save_atomic`; raise :class:`CorruptCache`
    if the header or checksum does not match."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(MAGIC):
        raise CorruptCache(f"{path}: not a kdcourse cache file (bad header)")
    rest = raw[len(MAGIC):]
    digest, sep, payload = rest.partition(b"\n")
    if not sep or hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CorruptCache(f"{path}: checksum mismatch (truncated or corrupted file)")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------

def train_teacher(rec: Recipe, data: ImageData, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train a teacher from its recipe (no cache involved)."""
    runtime.seed_everything(rec.seed)
    model = models.build(rec.model_spec, data.num_classes)
    train = data.teacher_train
    if rec.n_train is not None:
        train = train.subset(torch.arange(min(rec.n_train, len(train))))
    train = train.with_augment(rec.augment)
    t0 = time.perf_counter()
    hist = fit(model, train, epochs=rec.epochs, lr=rec.lr, weight_decay=rec.weight_decay, batch_size=rec.batch_size,
               seed=rec.seed, progress=progress, desc=f"teacher:{rec.label}")
    info = {
        "label": rec.label,
        "arch": models.describe(rec.model_spec),
        "params": models.count_params(model),
        "train_seconds": time.perf_counter() - t0,
        "train_acc": evaluate(model, train.with_augment(False))["acc"],
        **eval_info(model, data),
        "epochs": rec.epochs,
        "final_loss": hist.last("loss"),
    }
    return model, info


def eval_fingerprint(data: ImageData) -> str:
    """A short hash of the validation and test splits (sizes, labels and a
    sample of pixels): the accuracies stored with a teacher belong to them."""
    h = hashlib.sha256()
    for split in (data.val, data.test):
        h.update(str(tuple(split.images.shape)).encode())
        h.update(split.labels.numpy().tobytes())
        h.update(split.images[:16].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def eval_info(model: nn.Module, data: ImageData) -> dict:
    """Validation and test accuracy of ``model`` on ``data``, with the
    fingerprint of the splits they were measured on."""
    return {"val_acc": evaluate(model, data.val)["acc"], "test_acc": evaluate(model, data.test)["acc"],
            "eval_splits": eval_fingerprint(data)}


def teacher(profile, data: ImageData, variant: str = "main", seed: int = 0, directory: str | None = None,
            progress: bool = True, rebuild: bool = False) -> tuple[nn.Module, dict]:
    """Load the cached teacher for ``profile`` (train and cache it if missing).

    Returns the frozen model (eval mode, on the course device) and an info
    dict (architecture, parameters, accuracies, training time, cache path,
    whether it came from the cache).
    """
    rec = recipe(profile, variant, seed)

    def refresh(model, blob):
        if blob["info"].get("eval_splits") != eval_fingerprint(data):
            # same teacher, other validation/test splits (e.g. a changed n_test): its stored
            # accuracies would describe other images, so measure them again and store them
            blob["info"] = dict(blob["info"], **eval_info(model, data))
            return True
        return False

    return _stored_teacher(cache_path(rec, data, directory), cache_key(rec, data), rec.to_json(), "teacher cache",
                           lambda: models.build(rec.model_spec, data.num_classes),
                           lambda: train_teacher(rec, data, progress=progress), rebuild, refresh)


def _stored_teacher(path: str, key: str, recipe_json: str, what: str, build, train, rebuild: bool,
                    refresh=None) -> tuple[nn.Module, dict]:
    """The one load / verify / rebuild flow of every teacher on disk (image and BERT).

    Loads ``path`` when its checksum (:func:`load_checked`) and ``key`` match
    and the weights fit ``build()``; a corrupt, truncated or incompatible file
    is reported and rebuilt; otherwise ``train() -> (model, info)`` runs and its
    result is written atomically. ``refresh(model, blob) -> bool`` may update a
    loaded blob's info (then the file is rewritten). Returns the frozen model
    on the course device and its info (``cache_path``, ``from_cache`` added)."""
    if os.path.exists(path) and not rebuild:
        try:
            blob = load_checked(path)
            if blob.get("key") != key:
                raise CorruptCache(f"{path}: key mismatch")
            model = build()
            model.load_state_dict(blob["state_dict"])
            model = freeze(model.to(runtime.device()))
            if refresh is not None and refresh(model, blob):
                save_atomic(blob, path)
            return model, dict(blob["info"], cache_path=path, from_cache=True)
        except Exception as exc:  # corrupt, truncated, or written by an incompatible version
            warnings.warn(f"{what} {path} is unusable ({exc}); rebuilding it", stacklevel=3)
            os.remove(path)
    model, info = train()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic({"key": key, "recipe": recipe_json, "info": info, "state_dict": state}, path)
    return freeze(model), dict(info, cache_path=path, from_cache=False)


# --------------------------------------------------------------------------
# The BERT teacher of Lab 3: trained once, cached in the same format
# --------------------------------------------------------------------------

def _bert_key(c, data, seed: int) -> tuple[str, str]:
    transformers = _transformers()
    recipe = {"format": FORMAT, "teacher": dataclasses.asdict(c.teacher), "epochs": c.teacher_epochs,
              "lr": c.teacher_lr, "mlm_weight": c.mlm_weight, "mlm_fraction": c.mlm_fraction,
              "batch_size": c.teacher_batch_size, "seed": seed, "n": len(data.teacher_train),
              "vocab": data.tokenizer.vocab, "max_len": data.max_len,
              "transformers": ".".join(transformers.__version__.split(".")[:2])}
    rec = json.dumps(recipe, sort_keys=True)
    return rec, hashlib.sha256(f"{rec}|{data.fingerprint()}".encode()).hexdigest()[:20]


def train_bert_teacher(profile, data: TextData, seed: int = 0, progress: bool = True) -> tuple[TextTransformer, dict]:
    """Train the profile's BERT teacher on ``data.teacher_train`` (no cache)."""
    c = lab3_settings(profile)
    runtime.seed_everything(seed)
    model = bert.build(c.teacher, data, mlm_head=True, tie_mlm=False)
    t0 = time.perf_counter()
    objective = TeacherObjective(c.mlm_weight, mlm_fraction=c.mlm_fraction, seed=seed)
    hist = fit(model, data.teacher_train, objective, epochs=c.teacher_epochs, lr=c.teacher_lr,
               batch_size=c.teacher_batch_size, weight_decay=0.01, seed=seed, progress=progress, desc="BERT teacher")
    info = {
        "arch": c.teacher.describe(),
        "params": bert.count_params(model),
        "params_no_embeddings": bert.count_params(model, embeddings=False),
        "train_seconds": time.perf_counter() - t0,
        "train_acc": evaluate(model, data.teacher_train)["acc"],
        "val_acc": evaluate(model, data.val)["acc"],
        "test_acc": evaluate(model, data.test)["acc"],
        "epochs": c.teacher_epochs,
        "final_loss": hist.last("loss"),
    }
    return model, info


def bert_teacher(profile, data: TextData, seed: int = 0, directory: str | None = None,
                  progress: bool = True, rebuild: bool = False) -> tuple[TextTransformer, dict]:
    """The profile's BERT teacher: loaded from the cache, or trained and cached.

    The cache file (in ``$KDCOURSE_CACHE`` or ``~/.cache/kdcourse``) is keyed
    by the recipe, the data's fingerprint and the transformers version; it is
    written atomically with a checksum (:func:`kdcourse.save_atomic`), and
    a corrupt or incompatible file is reported and rebuilt. Returns the frozen
    teacher (eval mode) and an info dict.
    """
    c = lab3_settings(profile)
    rec, key = _bert_key(c, data, seed)
    return _stored_teacher(os.path.join(directory or cache_dir(), f"bert-teacher-{key}.pt"), key, rec,
                           "BERT teacher cache", lambda: bert.build(c.teacher, data, mlm_head=True, tie_mlm=False),
                           lambda: train_bert_teacher(profile, data, seed=seed, progress=progress), rebuild)
