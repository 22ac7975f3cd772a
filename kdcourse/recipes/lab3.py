"""Lab 3's experiments: compressing a BERT-style transformer with KD recipes.

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

import copy
import statistics
import time
from typing import Callable, Sequence

import torch

from .. import runs, runtime
from .. import data as _data
from ..data import reviews as text
from ..deploy.measure import compare_latency
from ..distill.transformer import DistilBertObjective, LayerDistill, TeacherTargets
from ..losses import transformer as tl
from ..models.bert import TextTransformer, build, count_params
from ..profiles import BertSpec, Lab3Settings as LabConfig, lab3_settings as lab_config
from ..train import Distill, evaluate, fit
from ..zoo import bert_teacher as teacher_model  # noqa: F401  (the lab's teacher, cached on disk)


def load_data(profile, seed: int = 0) -> text.TextData:
    """The reviews task (:mod:`kdcourse.text`) at the profile's sizes."""
    c = lab_config(profile)
    return text.make_data(c.n_train, c.n_val, c.n_test, n_teacher_train=c.n_teacher_train, n_general=c.n_general,
                          seed=seed)


def _run(name: str, seed: int, model: TextTransformer, data, histories: list, seconds: float,
         keep_model: bool) -> runs.Run:
    from ..train import History

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
    on one batch (:func:`kdcourse.deploy.measure.compare_latency`: the two are
    timed alternately ``rounds`` times; p50 = median of the per-round p50s,
    speed-up = median of the per-round ratios). ``threads`` defaults to the
    current ``torch.get_num_threads()``."""
    threads = threads or torch.get_num_threads()
    x = input_ids.cpu()
    lat = compare_latency({"teacher": (copy.deepcopy(teacher).cpu().eval(), x),
                           "student": (copy.deepcopy(student).cpu().eval(), x)},
                          runs=repeats, warmup=warmup, repeats=rounds, threads=threads)
    lt, ls = lat["teacher"], lat["student"]
    return {
        "params": (count_params(teacher), count_params(student)),
        "params_no_embeddings": (count_params(teacher, embeddings=False), count_params(student, embeddings=False)),
        "p50_ms": (lt.p50_ms, ls.p50_ms),
        "speedup": statistics.median(a / b for a, b in zip(lt.repeat_p50s, ls.repeat_p50s)),
        "batch": tuple(x.shape), "threads": threads, "repeats": repeats, "warmup": warmup, "rounds": rounds,
    }
