"""Self-distillation: a network's own kind as its teacher (lab 4).

Four methods, each a few lines on top of the one loop (:func:`kdcourse.train.fit`):

* **Born-again networks** (Furlanello et al., ICML 2018, arXiv:1805.04770):
  generation 1 learns from the labels; generation k+1, a freshly initialised
  network of the *same* architecture, is distilled from the frozen
  generation k (with its own temperature). :func:`born_again` is the loop,
  :func:`run_born_again` runs it over seeds and measures every generation
  and the ensemble of generations.
* **Deep supervision / "be your own teacher"** (Zhang et al., ICCV 2019,
  arXiv:1905.08094): :class:`DeepSupervision` adds auxiliary classifiers
  (exits) at named intermediate layers of a backbone without changing the
  backbone's output; :class:`ExitDistillation` trains every exit on the
  labels and distils the deepest exit into the shallow ones.
* **Deep mutual learning** (Zhang et al., CVPR 2018, arXiv:1706.00384):
  :class:`MutualLearning` trains an ``nn.ModuleList`` of peers together,
  each learning from the labels and the others' detached predictions.
* **Ensembles of teachers**: :class:`EnsembleTeacher` averages the
  members' logits (``mode="logits"``) or their probabilities at a
  temperature (``mode="probs"``) and can be passed to ``Distill``.

    lab = settings(profile)
    gens = run_born_again(lab.network, ds, seeds=profile.seeds, temperatures=(1.0, 1.0), alpha=lab.alpha,
                          epochs=lab.epochs, lr=lab.lr)
    runs.show_table(gens.table_rows())
    print(significance(gens.generation(2), gens.generation(1)))
"""
from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as data_module
from . import models, runs, runtime
from .data import Batch, ImageData, Split
from .losses.mutual import average_logits, average_probs_as_logits, mutual_learning_loss
from .losses.response import kd_loss
from .train import Distill, History, Objective, StepOutput, TrainState, evaluate, fit, memo_logits, scheduled


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def summary_of(name: str, values: Sequence[float], params: int | None = None) -> runs.Summary:
    """A :class:`~kdcourse.runs.Summary` (mean, sample std) of accuracies."""
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError(f"{name}: no values to summarise")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return runs.Summary(name, statistics.fmean(values), std, len(values), values, params)


def verdict(better: runs.Summary, worse: runs.Summary) -> str:
    """Say whether ``better`` differs from ``worse`` beyond the seed noise:
    "gain above noise", "loss above noise" or "within seed-to-seed noise".

    The rule is |Welch t| >= 2 (:func:`kdcourse.runs.welch_t`). With 3 seeds
    a side that is lenient — the 5 % two-sided threshold is about 2.8 to 4.3
    depending on the degrees of freedom — so "within noise" means these
    runs cannot tell the two apart, and "above noise" is a first
    indication, not a proof. A summary
    of one run has no spread of its own: it is compared with twice the
    other side's standard deviation, and the reading says "one run".
    """
    if better.n < 2:
        spread = 2 * worse.std
        if spread == 0:
            return "one run, no spread to compare with"
        inside = abs(better.mean - worse.mean) < spread
        return "one run: within 2 std of the baseline" if inside else \
            ("one run: more than 2 std above the baseline" if better.mean > worse.mean else "one run: more than 2 std below the baseline")
    t, _ = runs.welch_t(better, worse)
    if abs(t) < 2:
        return "within seed-to-seed noise"
    return "gain above noise" if t > 0 else "loss above noise"


def significance(better: runs.Summary, worse: runs.Summary) -> str:
    """One line: the difference in points, in pooled standard deviations,
    Welch's t and the :func:`verdict`."""
    diff = 100 * (better.mean - worse.mean)
    gap = runs.gap_in_std(better, worse)
    t, dof = runs.welch_t(better, worse)
    return (f"{better.name} − {worse.name}: {diff:+.2f} points = {gap:+.1f} pooled std, "
            f"Welch t = {t:+.1f} ({dof:.1f} d.o.f., n = {better.n} and {worse.n}) → {verdict(better, worse)}")


def per_seed(better: runs.Summary, worse: runs.Summary) -> str:
    """The differences seed by seed, in points (``values`` in seed order).

    Where both sides start from the same weights and batches (this lab's
    comparisons with scratch), these paired differences are less noisy than
    the difference of the means — with 3 seeds, still only an indication."""
    if better.n != worse.n:
        raise ValueError(f"per_seed needs the same seeds on both sides, got n = {better.n} and {worse.n}")
    diffs = [100 * (a - b) for a, b in zip(better.values, worse.values)]
    return f"{better.name} − {worse.name}, seed by seed: " + ", ".join(f"{d:+.2f}" for d in diffs) + " points"


def compare_row(summary: runs.Summary, baseline: runs.Summary, method: str | None = None, inference: str = "1 network",
                anchor: str = "") -> dict:
    """A row of the lab's summary table: ``summary`` against ``baseline``."""
    same = summary is baseline
    return {
        "method": method or summary.name,
        "at inference": inference,
        "test acc (%)": f"{100 * summary.mean:.2f} ± {100 * summary.std:.2f}",
        "seeds": summary.n,
        "Δ vs scratch (points)": "" if same else f"{100 * (summary.mean - baseline.mean):+.2f}",
        "Welch t": "" if same or summary.n < 2 else f"{runs.welch_t(summary, baseline)[0]:+.1f}",
        "reading": "baseline" if same else verdict(summary, baseline),
        "published anchor": anchor,
    }


# --------------------------------------------------------------------------
# Ensembles of teachers
# --------------------------------------------------------------------------

class EnsembleTeacher(nn.Module):
    """The average of several models' predictions, as one model ``x -> logits``.

    Args:
        members: models ``x -> logits`` (N, C), all over the same classes.
        mode: ``"logits"`` — the mean of the members' logits; ``"probs"`` —
            logits whose softmax at temperature ``T`` is the mean of the
            members' softmax at ``T`` (``T * log mean_k softmax(z_k / T)``).
        T: the temperature of ``mode="probs"``; give it the temperature the
            distillation loss uses (:func:`ensemble_distill` does). Ignored
            for ``mode="logits"``.

    The two modes differ: averaging logits multiplies the members'
    probabilities (a geometric mean, renormalised); averaging probabilities
    adds them (Hinton et al. 2015 average the ensemble's predictions).
    """

    def __init__(self, members: Sequence[nn.Module], mode: str = "logits", T: float = 1.0):
        super().__init__()
        if mode not in ("logits", "probs"):
            raise ValueError(f"mode must be 'logits' (average logits) or 'probs' (average probabilities), got {mode!r}")
        members = list(members)
        if not members:
            raise ValueError("members is empty: pass at least one trained model")
        self.members = nn.ModuleList(members)
        self.mode, self.T = mode, float(T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [m(x) for m in self.members]
        if self.mode == "logits":
            return average_logits(logits)
        return average_probs_as_logits(logits, T=self.T)


def ensemble_distill(members: Sequence[nn.Module], mode: str = "logits", T: float = 4.0, alpha: float = 0.9,
                     loss: Callable | None = None) -> Distill:
    """``Distill`` from the ensemble of ``members`` (one temperature for both
    the averaging and the loss, so ``mode="probs"`` distils exactly the
    averaged probabilities at ``T``)."""
    return Distill(EnsembleTeacher(members, mode=mode, T=T), loss=loss, T=T, alpha=alpha)


# --------------------------------------------------------------------------
# Born-again networks
# --------------------------------------------------------------------------

def born_again(new_model: Callable[[], nn.Module], train: Callable[[nn.Module, Objective], object],
               temperatures: Sequence[float], alpha: float = 0.5) -> list[nn.Module]:
    """The born-again loop (reference solution of the lab's exercise).

    Args:
        new_model: ``new_model()`` returns a fresh, randomly initialised
            network (the same architecture every time).
        train: ``train(model, objective)`` trains ``model`` in place with the
            one loop (``kdcourse.train.fit``).
        temperatures: the temperature of each distilled generation:
            ``temperatures[0]`` trains generation 2 from generation 1,
            ``temperatures[1]`` generation 3 from generation 2, and so on.
        alpha: weight of the distillation term (the rest is cross-entropy).
    Returns:
        all ``len(temperatures) + 1`` trained generations, oldest first.
    """
    generations = [new_model()]
    train(generations[0], Objective())  # generation 1: labels only
    for T in temperatures:
        student = new_model()  # a fresh network, not the teacher trained further
        train(student, Distill(generations[-1], T=T, alpha=alpha))  # Distill freezes the teacher
        generations.append(student)
    return generations


@dataclass
class BornAgainResult:
    """What :func:`run_born_again` measured.

    ``runs[g][i]`` is generation ``g + 1`` for seed ``i``; ``ensembles[g][i]``
    the ensemble of generations ``1 .. g + 2`` (no extra training).
    """

    temperatures: tuple
    alpha: float
    ensemble_mode: str
    runs: list = field(default_factory=list)
    ensembles: list = field(default_factory=list)

    def generation(self, g: int) -> runs.Summary:
        """Summary of generation ``g`` (1-based)."""
        return runs.summarize(self.runs[g - 1], f"generation {g}")

    def ensemble(self, g: int) -> runs.Summary:
        """Summary of the ensemble of generations 1..g (g >= 2)."""
        return runs.summarize(self.ensembles[g - 2], f"ensemble of generations 1–{g}")

    def models(self, seed_index: int) -> list[nn.Module]:
        """The trained generations of one seed, oldest first."""
        return [gen[seed_index].model for gen in self.runs]

    def table_rows(self) -> list[dict]:
        rows = []
        base = self.generation(1)
        for g in range(1, len(self.runs) + 1):
            s = self.generation(g)
            rows.append({"model": s.name, "T": "labels only" if g == 1 else f"{self.temperatures[g - 2]:g}",
                         "params": f"{s.params:,}", "test acc (%)": f"{100 * s.mean:.2f} ± {100 * s.std:.2f}",
                         "vs generation 1 (points)": "" if g == 1 else f"{100 * (s.mean - base.mean):+.2f}",
                         "Welch t": "" if g == 1 else f"{runs.welch_t(s, base)[0]:+.1f}", "seeds": s.n})
        for g in range(2, len(self.runs) + 1):
            s = self.ensemble(g)
            rows.append({"model": s.name + f" (avg {self.ensemble_mode})", "T": "", "params": f"{s.params:,}",
                         "test acc (%)": f"{100 * s.mean:.2f} ± {100 * s.std:.2f}",
                         "vs generation 1 (points)": f"{100 * (s.mean - base.mean):+.2f}",
                         "Welch t": f"{runs.welch_t(s, base)[0]:+.1f}", "seeds": s.n})
        return rows


def _builder(build, num_classes: int) -> Callable[[], nn.Module]:
    if isinstance(build, dict):
        return lambda: models.build(build, num_classes)
    if callable(build):
        return build
    raise ValueError(f"build must be a model spec dict or a function returning a model, got {type(build).__name__}")


def run_born_again(build, data: ImageData, *, seeds: Sequence[int], temperatures: Sequence[float], alpha: float = 0.5,
                   epochs: int, lr: float, batch_size: int = 128, weight_decay: float = 0.0,
                   loop: Callable = born_again, ensemble_mode: str = "logits", reuse: Sequence[runs.Run] = (),
                   progress: bool = True) -> BornAgainResult:
    """Run a born-again ``loop`` once per seed and measure every generation.

    ``build`` is a model spec or a function returning a fresh model. For each
    seed the random generators are seeded once, then ``loop(new_model,
    train, temperatures, alpha)`` runs; generation 1 therefore starts from
    the same weights and sees the same batches as
    ``runs.train_run(..., seed=seed)`` with cross-entropy. Accuracy is the
    test accuracy after the last epoch.

    ``reuse``: scratch runs of the same ``build``, data, epochs and learning
    rate made with ``keep_model=True`` (e.g. ``runs.repeat(..., keep_model=True)``).
    Generation 1 of a seed found there is not trained again: its weights and
    history are copied, which is what training it would give (same seed,
    same initial weights, same batches; the random state the next
    generation starts from is the same too).
    """
    temperatures = tuple(float(T) for T in temperatures)
    if not temperatures:
        raise ValueError("temperatures is empty: give one temperature per distilled generation (e.g. (4, 4) for 3 generations)")
    if ensemble_mode not in ("logits", "probs"):
        raise ValueError(f"ensemble_mode must be 'logits' or 'probs', got {ensemble_mode!r}")
    result = BornAgainResult(temperatures, float(alpha), ensemble_mode,
                             [[] for _ in range(len(temperatures) + 1)], [[] for _ in range(len(temperatures))])
    new_model = _builder(build, data.num_classes)
    done = {r.seed: r for r in reuse}
    for r in done.values():
        if r.model is None:
            raise ValueError("reuse needs runs made with keep_model=True (their trained weights are copied)")
    for seed in seeds:
        runtime.seed_everything(seed)
        log: dict[int, tuple] = {}

        def train(model: nn.Module, objective: Objective, seed=seed, log=log):
            if not log and type(objective) is Objective and seed in done:  # generation 1 = the scratch run
                model.load_state_dict(done[seed].model.state_dict())
                log[id(model)] = (done[seed].history, done[seed].seconds)
                return done[seed].history
            t0 = time.perf_counter()
            hist = fit(model, data.train, objective, epochs=epochs, lr=lr, batch_size=batch_size,
                       weight_decay=weight_decay, val=data.val, seed=seed, progress=progress,
                       desc=f"generation {len(log) + 1} s{seed}")
            log[id(model)] = (hist, time.perf_counter() - t0)
            return hist

        gens = loop(new_model, train, temperatures, alpha)
        if not isinstance(gens, (list, tuple)) or len(gens) != len(temperatures) + 1:
            raise ValueError(f"the born-again loop must return {len(temperatures) + 1} generations "
                             f"(len(temperatures) + 1), got {gens!r:.80}")
        for g, model in enumerate(gens):
            if id(model) not in log:
                raise ValueError(f"generation {g + 1} returned by the loop was never trained with train(model, objective)")
            hist, seconds = log[id(model)]
            acc = evaluate(model, data.test)["acc"]
            result.runs[g].append(runs.Run(f"generation {g + 1}", seed, acc, hist.last("val_acc"),
                                           models.count_params(model), seconds, hist, model))
        for g in range(2, len(gens) + 1):
            ens = EnsembleTeacher(gens[:g], mode=ensemble_mode).eval()
            result.ensembles[g - 2].append(runs.Run(
                f"ensemble 1–{g}", seed, evaluate(ens, data.test)["acc"], evaluate(ens, data.val)["acc"],
                models.count_params(ens), sum(log[id(m)][1] for m in gens[:g]), History(), ens))
    return result


# --------------------------------------------------------------------------
# Deep supervision / be your own teacher
# --------------------------------------------------------------------------

class ExitHead(nn.Module):
    """An auxiliary classifier on a feature map (B, C, H, W): a 3x3 stride-2
    convolution (a small bottleneck, as BYOT puts before each shallow
    classifier), global average pooling and a linear layer."""

    def __init__(self, in_channels: int, width: int, num_classes: int):
        super().__init__()
        self.conv = models.conv_bn(in_channels, width, stride=2)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(feature), 1), 1))


class DeepSupervision(nn.Module):
    """A backbone with auxiliary classifiers ("exits") at named layers.

    ``model(x)`` returns exactly ``backbone(x)``: the heads read the
    intermediate features and change nothing in the backbone's forward pass
    (they change its *training* through their losses, which is the point).
    :meth:`exits_logits` returns every exit's logits, the backbone's own
    head last under the name ``"final"``.

    Args:
        backbone: a model ``x -> logits``. Models of :mod:`kdcourse.models`
            are read with ``return_features=True``; any other model through
            forward hooks on the submodules named in ``exits``.
        exits: names of intermediate layers (``backbone.get_submodule(name)``
            or keys of its features dict), shallow to deep.
        width: channels of each head's bottleneck (default: the widest
            feature map among the backbone's measured features).
        example_input: an input shape used once to measure the features' sizes.
    """

    def __init__(self, backbone: nn.Module, exits: Sequence[str] = ("layer1", "layer2"), width: int | None = None,
                 example_input: tuple = (1, 3, 32, 32)):
        super().__init__()
        exits = tuple(exits)
        if not exits:
            raise ValueError("exits is empty: name at least one intermediate layer, e.g. exits=('layer1', 'layer2')")
        if "final" in exits:
            raise ValueError("'final' is reserved for the backbone's own head; name intermediate layers only")
        self.backbone = backbone
        self.exits = exits
        try:
            self._native = "return_features" in inspect.signature(backbone.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            self._native = False
        if not self._native:
            names = dict(backbone.named_modules())
            missing = [e for e in exits if e not in names]
            if missing:
                raise ValueError(f"exits {missing} are not submodules of the backbone; choose from {sorted(n for n in names if n)[:12]} …")
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            logits, feats = self._forward_features(torch.zeros(example_input, device=_first_device(backbone)))
        backbone.train(was_training)
        missing = [e for e in exits if e not in feats]
        if missing:
            raise ValueError(f"exits {missing} are not among the backbone's features {sorted(feats)}")
        flat = [e for e in exits if not isinstance(feats[e], torch.Tensor) or feats[e].ndim != 4]
        if flat:
            raise ValueError(f"exits {flat} do not give (B, C, H, W) feature maps; choose convolutional layers "
                             f"such as 'layer1' or 'layer2'")
        num_classes = logits.shape[1]
        width = width or max(int(f.shape[1]) for f in feats.values() if isinstance(f, torch.Tensor) and f.ndim == 4)
        self.heads = nn.ModuleDict({e: ExitHead(int(feats[e].shape[1]), width, num_classes) for e in exits})

    def _forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self._native:
            return self.backbone(x, return_features=True)
        store: dict = {}
        handles = [self.backbone.get_submodule(e).register_forward_hook(
            lambda module, inputs, output, e=e: store.__setitem__(e, output)) for e in self.exits]
        try:
            logits = self.backbone(x)
        finally:
            for h in handles:
                h.remove()
        return logits, store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def exits_logits(self, x: torch.Tensor) -> dict:
        """``{exit name: logits (B, C)}`` for every exit, then ``"final"``."""
        logits, feats = self._forward_features(x)
        out = {e: self.heads[e](feats[e]) for e in self.exits}
        out["final"] = logits
        return out


def _first_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class ExitDistillation(Objective):
    """Train a :class:`DeepSupervision` model: the deepest head teaches the
    shallow ones (BYOT, Zhang et al. 2019, without its feature-hint
    term)::

        loss = CE(z_final, y)
               + sum_exits [ (1 - alpha) * CE(z_exit, y)
                             + alpha * T^2 * KL(p_final^T || p_exit^T) ]

    The final head's probabilities are detached in the KL (a teacher), so the
    KL trains the shallow heads and the layers below them, never the final
    head. ``alpha = 0`` is plain deep supervision (labels at every exit).
    Evaluation uses the backbone's own output (``model(x)``).
    """

    def __init__(self, T=3.0, alpha=0.5, loss: Callable | None = None):
        super().__init__()
        self.T, self.alpha = T, alpha
        self.loss_fn = loss or kd_loss

    def setup(self, model: nn.Module, train: Split) -> None:
        if not isinstance(model, DeepSupervision):
            raise ValueError("ExitDistillation trains a DeepSupervision model: wrap the backbone, "
                             "e.g. DeepSupervision(backbone, exits=('layer1', 'layer2'))")

    def forward(self, model: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        T, alpha = scheduled(self.T, state), scheduled(self.alpha, state)
        out = model.exits_logits(batch.x)
        final = out.pop("final")
        ce_final = F.cross_entropy(final, batch.labels)
        loss, parts = ce_final, {"ce_final": ce_final.item()}
        for name, z in out.items():
            term = self.loss_fn(z, final.detach(), batch.labels, T=T, alpha=alpha)
            loss = loss + term
            parts[f"exit_{name}"] = term.item()
        return StepOutput(loss, final, parts)


@torch.no_grad()
def exit_accuracies(model: DeepSupervision, split: Split, batch_size: int = 512) -> dict:
    """Test accuracy of each exit, of ``"final"``, and of ``"all exits"``
    (the mean of every exit's logits, as BYOT's ensemble)."""
    was_training = model.training
    model.eval()
    dev = _first_device(model)
    correct: dict = {}
    for b in split.batches(batch_size, device=dev):
        out = model.exits_logits(b.x)
        out["all exits"] = torch.stack(list(out.values())).mean(0)
        for k, z in out.items():
            correct[k] = correct.get(k, 0) + int((z.argmax(1) == b.labels).sum())
    model.train(was_training)
    return {k: v / len(split) for k, v in correct.items()}


@dataclass
class ExitResult:
    """What :func:`run_deep_supervision` measured: ``acc[name]`` is a list over seeds."""

    exits: tuple
    acc: dict
    runs: list
    backbone_params: int

    def summary(self, name: str) -> runs.Summary:
        return summary_of(f"exit {name}" if name not in ("final", "all exits") else name, self.acc[name],
                          self.backbone_params)


def run_deep_supervision(build, data: ImageData, *, seeds: Sequence[int], exits=("layer1", "layer2"), T=3.0, alpha=0.5,
                         epochs: int, lr: float, batch_size: int = 128, progress: bool = True) -> ExitResult:
    """Train ``DeepSupervision(build(), exits)`` with :class:`ExitDistillation`
    once per seed; measure every exit on the test set. The backbone is built
    first after seeding, so it starts from the same weights as a plain
    ``runs.train_run(build, seed=seed)``."""
    new_model = _builder(build, data.num_classes)
    acc: dict = {}
    all_runs = []
    for seed in seeds:
        run = runs.train_run(f"deep supervision T={T:g} α={alpha:g}", lambda: DeepSupervision(new_model(), exits), data,
                             objective=lambda: ExitDistillation(T=T, alpha=alpha), epochs=epochs, lr=lr, seed=seed,
                             batch_size=batch_size, keep_model=True, progress=progress)
        for k, v in exit_accuracies(run.model, data.test).items():
            acc.setdefault(k, []).append(v)
        all_runs.append(run)
    return ExitResult(tuple(exits), acc, all_runs, models.count_params(all_runs[0].model.backbone))


# --------------------------------------------------------------------------
# Deep mutual learning
# --------------------------------------------------------------------------

class MutualLearning(Objective):
    """Train K >= 2 peers together (``model`` is an ``nn.ModuleList``).

    Each step runs every peer on the batch and minimises
    ``loss(peer_logits, labels, T=, alpha=)`` — by default
    :func:`kdcourse.losses.mutual.mutual_learning_loss`, the sum of the peers'
    DML losses with the other peers' predictions detached, so each peer's
    parameters receive the gradient of its own loss only.

    Args:
        T, alpha: temperature and weight of the peer term (numbers or
            schedules of progress); the paper: T = 1, equal weights.
        loss: your own ``loss(list of (N, C) logits, labels, T=, alpha=)``.
        eval_peer: which peer :meth:`predict` uses (an index), or
            ``"ensemble"`` for the mean of the peers' logits.
    """

    channels_last_ok = True  # the peers' logits are all it reads

    def __init__(self, T=1.0, alpha=0.5, loss: Callable | None = None, eval_peer: int | str = 0):
        super().__init__()
        if not (eval_peer == "ensemble" or (isinstance(eval_peer, int) and eval_peer >= 0)):
            raise ValueError(f"eval_peer must be a peer index (0, 1, ...) or 'ensemble', got {eval_peer!r}")
        self.T, self.alpha, self.eval_peer = T, alpha, eval_peer
        self.loss_fn = loss or mutual_learning_loss

    def setup(self, model: nn.Module, train: Split) -> None:
        if not isinstance(model, nn.ModuleList) or len(model) < 2:
            raise ValueError("MutualLearning trains peers: pass model=nn.ModuleList([peer_1, peer_2, ...]) with at least 2 peers")
        if isinstance(self.eval_peer, int) and self.eval_peer >= len(model):
            raise ValueError(f"eval_peer={self.eval_peer} but there are only {len(model)} peers")

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.eval_peer == "ensemble":
            return average_logits([peer(x) for peer in model])
        return model[self.eval_peer](x)

    def forward(self, model: nn.Module, batch: Batch, state: TrainState) -> StepOutput:
        T, alpha = scheduled(self.T, state), scheduled(self.alpha, state)
        logits = [peer(batch.x) for peer in model]
        loss = self.loss_fn(logits, batch.labels, T=T, alpha=alpha)
        parts = {f"ce_peer{k}": F.cross_entropy(z.detach(), batch.labels).item() for k, z in enumerate(logits)}
        shown = average_logits([z.detach() for z in logits]) if self.eval_peer == "ensemble" else logits[self.eval_peer]
        return StepOutput(loss, shown, parts)


def peer_accuracies(peers: nn.ModuleList, split: Split) -> list[float]:
    """Accuracy of each peer on ``split``."""
    return [evaluate(p, split)["acc"] for p in peers]


@dataclass
class MutualResult:
    """What :func:`run_mutual` measured: ``peer_acc[i][k]`` is peer ``k`` of seed ``i``."""

    peers: int
    T: float
    alpha: float
    runs: list
    peer_acc: list
    ensemble_acc: list
    peer_params: int

    def peer(self, k: int) -> runs.Summary:
        return summary_of(f"DML peer {k + 1}", [a[k] for a in self.peer_acc], self.peer_params)

    def mean_peer(self) -> runs.Summary:
        """Per seed, the mean accuracy of its peers (the expected accuracy of
        one DML-trained network); n = number of seeds."""
        return summary_of(f"DML (mean of {self.peers} peers)", [statistics.fmean(a) for a in self.peer_acc], self.peer_params)

    def ensemble(self) -> runs.Summary:
        return summary_of(f"DML ensemble of {self.peers} peers", self.ensemble_acc, self.peer_params * self.peers)


def run_mutual(build, data: ImageData, *, seeds: Sequence[int], peers: int = 2, T: float = 1.0, alpha: float = 0.5,
               epochs: int, lr: float, batch_size: int = 128, loss: Callable | None = None,
               progress: bool = True) -> MutualResult:
    """Deep mutual learning of ``peers`` networks built from ``build``, once
    per seed, in the one loop. Peer 1 is built first after seeding, so it
    starts from the same weights (and sees the same batches) as
    ``runs.train_run(build, seed=seed)`` — the independent baseline."""
    if not isinstance(peers, int) or peers < 2:
        raise ValueError(f"peers must be an int >= 2, got {peers!r}")
    new_model = _builder(build, data.num_classes)
    all_runs, peer_acc, ens_acc = [], [], []
    for seed in seeds:
        run = runs.train_run(f"DML x{peers}", lambda: nn.ModuleList([new_model() for _ in range(peers)]), data,
                             objective=lambda: MutualLearning(T=T, alpha=alpha, loss=loss), epochs=epochs, lr=lr,
                             seed=seed, batch_size=batch_size, keep_model=True, progress=progress)
        peer_acc.append(peer_accuracies(run.model, data.test))
        ens_acc.append(evaluate(EnsembleTeacher(list(run.model)).eval(), data.test)["acc"])
        all_runs.append(run)
    return MutualResult(peers, float(T), float(alpha), all_runs, peer_acc, ens_acc,
                        models.count_params(all_runs[0].model[0]))


# --------------------------------------------------------------------------
# Per-profile settings of the lab
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class LabSettings:
    """Lab 4's knobs for one profile (the notebook may override any)."""

    network: dict  # model spec of every network in the lab (teacher and student are the same size here)
    epochs: int  # epochs of every network trained in the lab
    lr: float  # Adam learning rate of every network trained in the lab
    alpha: float  # weight of the distillation term (born-again, multi-teacher, exits)
    sweep_T: tuple  # temperatures tried for generation 2 (one seed); the best on validation is used after
    generations: int  # born-again generations, the first one included
    dml_T: float  # deep mutual learning (the paper: T = 1, equal weights)
    dml_alpha: float
    exits: tuple  # layers that get an auxiliary classifier


def settings(profile) -> LabSettings:
    """The lab's settings for ``profile`` (keyed by ``profile.name``).

    Lab 4 trains about 25 networks of one size (no separate teacher), so the
    offline profiles use a cheaper schedule than lab 1, at a learning rate
    of 1e-2 (lab 1: 3e-3). The laptop profile uses a plain three-stage CNN of
    7k parameters (``cnn-8-16-32``), about 2.5 times cheaper per step than
    the lab-1 student, for 12 epochs on ``LAPTOP_N_TRAIN`` images, to keep
    "Run All" within minutes on 2 cores; smoke uses ``profile.student`` for
    60 % of ``profile.student_epochs``; ``full`` uses the profile as is.
    """
    base = dict(alpha=0.5, sweep_T=(1.0, 2.0, 4.0), generations=3, dml_T=1.0, dml_alpha=0.5, exits=("layer1", "layer2"))
    if profile.name == "laptop":  # pinned: 12 epochs on LAPTOP_N_TRAIN images, whatever lab 1's student uses
        return LabSettings(network={"arch": "cnn", "widths": (8, 16, 32)}, epochs=12, lr=1e-2, **base)
    if profile.dataset == "shapes":
        return LabSettings(network=dict(profile.student), epochs=max(1, round(0.6 * profile.student_epochs)), lr=1e-2,
                           **base)
    return LabSettings(network=dict(profile.student), epochs=profile.student_epochs, lr=profile.lr,
                       **dict(base, sweep_T=(1.0, 2.0, 4.0, 8.0)))


# --------------------------------------------------------------------------
# Lab helpers: a temperature sweep for one generation, noisy labels
# --------------------------------------------------------------------------

# The laptop lab trains about 25 networks; 4,000 images x 12 epochs keeps it
# within minutes on 2 cores (lab 1's laptop students see 8,000 images).
LAPTOP_N_TRAIN = 4000


def lab_data(profile) -> ImageData:
    """The data of lab 4. Offline profiles generate only the students'
    splits (laptop: ``LAPTOP_N_TRAIN`` training images); no network here
    needs the teachers' larger set, which takes most of the generation
    time. The validation and test images are those
    of :func:`kdcourse.data.load`, the training images are drawn from the
    same distribution but are not the same images as in labs 1 and 2."""
    if profile.dataset == "shapes":
        n_train = min(profile.n_train, LAPTOP_N_TRAIN) if profile.name == "laptop" else profile.n_train
        return data_module.shapes(n_train, profile.n_val, profile.n_test)
    return data_module.load(profile)


def temperature_sweep(teacher: nn.Module, build, data: ImageData, temperatures: Sequence[float], *, alpha: float,
                      epochs: int, lr: float, seed: int = 0, batch_size: int = 128, progress: bool = True) -> list[dict]:
    """Distil one fresh network from ``teacher`` at each temperature (one
    seed, ``seed + 1``, so the students do not start from the teacher's
    initial weights). Returns rows with the teacher's mean soft-target
    entropy on the training images at that T (bits), and the student's
    validation and test accuracy after the last epoch."""
    train_logits = memo_logits(teacher, data.train)  # the Distill runs below reuse this teacher pass
    rows = []
    for T in temperatures:
        p = F.softmax(train_logits / float(T), dim=1)
        entropy = float(-(p * p.clamp_min(1e-12).log2()).sum(1).mean())
        run = runs.train_run(f"T={T:g}", build, data, objective=lambda T=T: Distill(teacher, T=T, alpha=alpha),
                             epochs=epochs, lr=lr, seed=seed + 1, batch_size=batch_size, progress=progress)
        rows.append({"T": float(T), "entropy_bits": entropy, "val_acc": run.val_acc, "test_acc": run.test_acc, "run": run})
    return rows


def with_label_noise(data: ImageData, fraction: float, seed: int = 0) -> ImageData:
    """``data`` with a ``fraction`` of the students' training labels replaced
    by uniformly random classes (validation and test stay clean). Soft
    targets are known to help most when labels are noisy; try it."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1] (share of training labels to randomise), got {fraction!r}")
    if fraction == 0:
        return data
    g = torch.Generator().manual_seed(seed)
    labels = data.train.labels.clone()
    flip = torch.rand(len(labels), generator=g) < fraction
    labels[flip] = torch.randint(0, data.num_classes, (int(flip.sum()),), generator=g)
    train = Split(data.train.images, labels, data.train.classes, data.train.augment, data.train.mean, data.train.std)
    return ImageData(data.name, train, data.val, data.test, data.teacher_train)
