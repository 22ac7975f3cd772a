"""Lab 4's experiments: self-distillation, a network's own kind as its teacher.

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

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .. import models, runs, runtime
from ..data import ImageData, Split, with_label_noise  # noqa: F401  (with_label_noise: re-exported for the lab)
from ..distill.self import ExitDistillation, MutualLearning
from ..models.heads import DeepSupervision, EnsembleTeacher
from ..profiles import Lab4Settings as LabSettings, lab4_settings as settings  # noqa: F401
from ..runs import compare_row, per_seed, significance, summary_of, verdict  # noqa: F401
from ..train import Distill, History, Objective, evaluate, fit


class Averaged(nn.Module):
    """An ensemble as one model ``x -> logits``, averaged by ``average(member_logits,
    mode=mode, T=T)`` (the lab's own ``ensemble_logits``; :class:`EnsembleTeacher`
    is the package's)."""

    def __init__(self, members: Sequence[nn.Module], average: Callable, mode: str = "logits", T: float = 1.0):
        super().__init__()
        if mode not in ("logits", "probs"):
            raise ValueError(f"mode must be 'logits' (average logits) or 'probs' (average probabilities), got {mode!r}")
        if not list(members):
            raise ValueError("members is empty: pass at least one trained model")
        self.members, self.average, self.mode, self.T = nn.ModuleList(members), average, mode, float(T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.average([m(x) for m in self.members], mode=self.mode, T=self.T)


def ensemble_distill(members: Sequence[nn.Module], mode: str = "logits", T: float = 4.0, alpha: float = 0.9,
                     loss: Callable | None = None, average: Callable | None = None) -> Distill:
    """``Distill`` from the ensemble of ``members`` (one temperature for both
    the averaging and the loss, so ``mode="probs"`` distils exactly the
    averaged probabilities at ``T``); ``average``: your own
    ``average(member_logits, mode=, T=)`` instead of :class:`EnsembleTeacher`."""
    teacher = EnsembleTeacher(members, mode=mode, T=T) if average is None else Averaged(members, average, mode, T)
    return Distill(teacher, loss=loss, T=T, alpha=alpha)


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
                       weight_decay=weight_decay, val=data.val, val_each_epoch=False, seed=seed, progress=progress,
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


@torch.no_grad()
def exit_accuracies(model: DeepSupervision, split: Split, batch_size: int = 512) -> dict:
    """Test accuracy of each exit, of ``"final"``, and of ``"all exits"``
    (the mean of every exit's logits, as BYOT's ensemble)."""
    was_training = model.training
    model.eval()
    dev = runtime.device_of(model)
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
                         epochs: int, lr: float, batch_size: int = 128, loss: Callable | None = None,
                         progress: bool = True) -> ExitResult:
    """Train ``DeepSupervision(build(), exits)`` with :class:`ExitDistillation`
    (or, given ``loss(exit_logits, labels, T=, alpha=)``, with :class:`ExitLoss`
    and that loss) once per seed; measure every exit on the test set. The
    backbone is built first after seeding, so it starts from the same weights
    as a plain ``runs.train_run(build, seed=seed)``."""
    new_model = _builder(build, data.num_classes)
    acc: dict = {}
    all_runs = []
    for seed in seeds:
        run = runs.train_run(f"deep supervision T={T:g} α={alpha:g}", lambda: DeepSupervision(new_model(), exits), data,
                             objective=lambda: ExitDistillation(T=T, alpha=alpha) if loss is None else _exit_loss(loss, T=T, alpha=alpha),
                             epochs=epochs, lr=lr, seed=seed,
                             batch_size=batch_size, keep_model=True, progress=progress, val_each_epoch=False)
        for k, v in exit_accuracies(run.model, data.test).items():
            acc.setdefault(k, []).append(v)
        all_runs.append(run)
    return ExitResult(tuple(exits), acc, all_runs, models.count_params(all_runs[0].model.backbone))


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
                             seed=seed, batch_size=batch_size, keep_model=True, progress=progress,
                             val_each_epoch=False)
        peer_acc.append(peer_accuracies(run.model, data.test))
        ens_acc.append(evaluate(EnsembleTeacher(list(run.model)).eval(), data.test)["acc"])
        all_runs.append(run)
    return MutualResult(peers, float(T), float(alpha), all_runs, peer_acc, ens_acc,
                        models.count_params(all_runs[0].model[0]))


# --------------------------------------------------------------------------
# Lab helpers: a temperature sweep for one generation, noisy labels
# --------------------------------------------------------------------------

# The laptop lab's networks see all 8,000 training images (as lab 1's students):
# on 4,000 the scratch network's seed-to-seed spread hid every effect.


def _exit_loss(loss, T, alpha):
    from .lab4_exercises import ExitLoss

    return ExitLoss(loss, T=T, alpha=alpha)


# The reference answers of the lab's later exercises and their runners (re-exported: the lab calls sd.<name>).
from .lab4_exercises import (ExitLoss, born_again_tuned, deep_supervision_loss, mutual_step_in_turn,  # noqa: E402,F401
                             run_born_again_tuned, run_mutual_in_turn)
# The lab's data, its temperature sweep and its reporting (re-exported: the lab calls sd.<name>).
from .lab4_report import (LAPTOP_N_TRAIN, T_975, lab_data, mdd_line, minimal_detectable_difference,  # noqa: E402,F401
                          side_by_side, t_critical, temperature_sweep)
