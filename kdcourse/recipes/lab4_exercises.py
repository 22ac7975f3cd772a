"""Lab 4's later exercises: their reference answers and the runners that
call the student's versions.

* :func:`born_again_tuned` — born-again training with each generation's
  temperature chosen on validation; :func:`run_born_again_tuned` runs a
  search like it on one seed.
* :func:`deep_supervision_loss` — BYOT's loss over a network's exits;
  :class:`ExitLoss` trains a :class:`~kdcourse.models.heads.DeepSupervision`
  model with it (or a student's version).
* :func:`mutual_step_in_turn` — one step of deep mutual learning as in the
  paper's Algorithm 1 (peers updated in turn); :func:`run_mutual_in_turn`
  trains peers with such a step, one Adam per peer.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import models, runs, runtime
from ..data import ImageData, Split
from ..models.heads import DeepSupervision, EnsembleTeacher
from ..train import Distill, History, Objective, StepOutput, evaluate, fit, memo_logits, scheduled
from .lab4 import MutualResult, _builder, peer_accuracies


# --------------------------------------------------------------------------
# Reference answers of the lab's exercises (the checks compare with these)
# --------------------------------------------------------------------------

def born_again_tuned(new_model: Callable[[], nn.Module], train: Callable, val_acc: Callable[[nn.Module], float],
                     candidates: Sequence[float], generations: int = 3, alpha: float = 0.5) -> tuple:
    """Born-again training with each distilled generation's temperature chosen
    on the validation split: for generation g = 2, 3, …, one fresh network per
    candidate T is distilled from generation g − 1 (the previous winner), and
    the one with the best ``val_acc`` becomes generation g.

    Returns ``(networks, temperatures)``: all ``generations`` networks oldest
    first, and the chosen T of generations 2, 3, …"""
    gens = [new_model()]
    train(gens[0], Objective())  # generation 1: labels only
    chosen = []
    for _ in range(generations - 1):
        tried = {}
        for T in candidates:
            student = new_model()  # a fresh network for every candidate
            train(student, Distill(gens[-1], T=T, alpha=alpha))
            tried[T] = student
        best = max(tried, key=lambda T: val_acc(tried[T]))  # chosen on validation, never on test
        gens.append(tried[best])
        chosen.append(best)
    return gens, chosen


def deep_supervision_loss(exit_logits: dict, labels: torch.Tensor, T: float = 3.0, alpha: float = 0.5) -> torch.Tensor:
    """BYOT's loss over a network's exits (without its feature-hint term)::

        CE(z_final, y) + Σ_{exits e ≠ final} [ (1 − α)·CE(z_e, y) + α·T²·KL(p_final^T ‖ p_e^T) ]

    ``exit_logits``: ``{name: (N, C) logits}``, the backbone's own head under
    ``"final"``; ``labels``: (N,). The final head's probabilities are
    detached: it teaches the exits, it is not taught by them."""
    final = exit_logits["final"]
    target = F.softmax(final.detach() / T, dim=-1)
    loss = F.cross_entropy(final, labels)
    for name, z in exit_logits.items():
        if name != "final":
            kl = F.kl_div(F.log_softmax(z / T, dim=-1), target, reduction="batchmean")
            loss = loss + (1 - alpha) * F.cross_entropy(z, labels) + alpha * T * T * kl
    return loss


def mutual_step_in_turn(peers: Sequence[nn.Module], optimizers: Sequence, x: torch.Tensor, labels: torch.Tensor,
                        loss_fn: Callable, T: float = 1.0, alpha: float = 0.5) -> None:
    """One step of deep mutual learning as in Algorithm 1 of Zhang et al.
    (2018): peer 1 is updated from every peer's current predictions, then
    peer 2 from the *updated* peer 1, and so on; ``optimizers[k]`` holds peer
    k's parameters. ``loss_fn(peer_logits, labels, T=, alpha=)`` is the summed
    DML loss with the other peers detached, so with the others' logits
    computed without gradients its gradient reaches peer k only, and is the
    gradient of peer k's own loss."""
    for k in range(len(peers)):
        logits = []
        for j, peer in enumerate(peers):
            if j == k:
                logits.append(peer(x))
            else:
                with torch.no_grad():
                    logits.append(peer(x))
        loss = loss_fn(logits, labels, T=T, alpha=alpha)
        optimizers[k].zero_grad()
        loss.backward()
        optimizers[k].step()


class ExitLoss(Objective):
    """Train a :class:`~kdcourse.models.heads.DeepSupervision` model with one
    loss over all its exits, ``loss(exit_logits, labels, T=, alpha=)`` (default
    :func:`deep_supervision_loss`); evaluation uses the backbone's output."""

    def __init__(self, loss: Callable | None = None, T=3.0, alpha=0.5):
        super().__init__()
        self.loss_fn = loss or deep_supervision_loss
        self.T, self.alpha = T, alpha

    def setup(self, model: nn.Module, train: Split) -> None:
        if not isinstance(model, DeepSupervision):
            raise ValueError("ExitLoss trains a DeepSupervision model: wrap the backbone, "
                             "e.g. DeepSupervision(backbone, exits=('layer1', 'layer2'))")

    def forward(self, model: nn.Module, batch, state) -> StepOutput:
        T, alpha = scheduled(self.T, state), scheduled(self.alpha, state)
        out = model.exits_logits(batch.x)
        final = out["final"]
        loss = self.loss_fn(out, batch.labels, T=T, alpha=alpha)
        return StepOutput(loss, final.detach(), {"exits_loss": float(loss.detach())})


# --------------------------------------------------------------------------
# Born-again with a temperature per generation (one seed)
# --------------------------------------------------------------------------

def run_born_again_tuned(build, data: ImageData, *, candidates: Sequence[float], generations: int, alpha: float,
                         epochs: int, lr: float, seed: int = 0, loop: Callable = born_again_tuned,
                         reuse: runs.Run | None = None, batch_size: int = 128, progress: bool = True) -> tuple:
    """Run a per-generation temperature search ``loop(new_model, train,
    val_acc, candidates, generations=, alpha=)`` on one seed.

    ``reuse``: the scratch run of this seed (``keep_model=True``); generation
    1 copies its weights instead of training again (same seed, same start).
    Returns ``(temperatures, rows)``: the chosen T per distilled generation
    and one row per network trained (generation, T, teacher's soft-target
    entropy on the training images in bits, validation and test accuracy)."""
    new_model = _builder(build, data.num_classes)
    trained: dict = {}
    rows: list = []
    runtime.seed_everything(seed)

    def train(model: nn.Module, objective: Objective):
        if type(objective) is Objective and reuse is not None and reuse.model is not None and not trained:
            model.load_state_dict(reuse.model.state_dict())
            trained[id(model)] = 1
            return
        if isinstance(objective, Distill):
            gen = trained.get(id(objective.teacher), 0) + 1
            p = F.softmax(memo_logits(objective.teacher, data.train) / float(objective.T), dim=1)
            entropy = float(-(p * p.clamp_min(1e-12).log2()).sum(1).mean())
        else:
            gen, entropy = 1, None
        fit(model, data.train, objective, epochs=epochs, lr=lr, batch_size=batch_size,
            seed=seed + len(trained), progress=progress, desc=f"generation {gen}")  # validation: measured below
        trained[id(model)] = gen
        if gen > 1:
            rows.append({"generation": gen, "T": float(objective.T), "entropy_bits": entropy,
                         "val_acc": evaluate(model, data.val)["acc"], "test_acc": evaluate(model, data.test)["acc"],
                         "model": model})

    def val_acc(model: nn.Module) -> float:
        return evaluate(model, data.val)["acc"]

    _, temperatures = loop(new_model, train, val_acc, tuple(candidates), generations=generations, alpha=alpha)
    return tuple(float(T) for T in temperatures), rows


# --------------------------------------------------------------------------
# Deep mutual learning with the peers updated in turn
# --------------------------------------------------------------------------

def run_mutual_in_turn(build, data: ImageData, *, seeds: Sequence[int], peers: int = 2, T: float = 1.0,
                       alpha: float = 0.5, epochs: int, lr: float, batch_size: int = 128,
                       step: Callable = mutual_step_in_turn, loss: Callable | None = None) -> MutualResult:
    """DML as in the paper's Algorithm 1: each peer has its own Adam (cosine
    decay, like :func:`kdcourse.train.fit`), and every mini-batch calls
    ``step(peers, optimizers, x, labels, loss, T=, alpha=)``. Peer 1 is built
    first after seeding and the batches come in :func:`~kdcourse.train.fit`'s
    order, so peer 1 starts like the scratch run of the seed."""
    from ..losses.mutual import mutual_learning_loss

    if not isinstance(peers, int) or peers < 2:
        raise ValueError(f"peers must be an int >= 2, got {peers!r}")
    loss = loss or mutual_learning_loss
    new_model = _builder(build, data.num_classes)
    dev = runtime.device()
    all_runs, peer_acc, ens_acc = [], [], []
    for seed in seeds:
        runtime.seed_everything(seed)
        nets = nn.ModuleList([new_model() for _ in range(peers)]).to(dev)
        opts = [torch.optim.Adam(p.parameters(), lr=lr) for p in nets]
        total = epochs * data.train.num_batches(batch_size)
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))) for o in opts]
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            nets.train()
            for batch in data.train.batches(batch_size, shuffle=True, generator=gen, device=dev):
                step(list(nets), opts, batch.x, batch.labels, loss, T=T, alpha=alpha)
                for s in scheds:
                    s.step()
            if not all(bool(torch.isfinite(p).all()) for p in nets.parameters()):
                raise FloatingPointError(f"a peer's weights became NaN/inf in epoch {epoch + 1} (seed {seed}); "
                                         f"lower lr (now {lr}) or check the loss")
        nets.eval()
        seconds = time.perf_counter() - t0
        accs = peer_accuracies(nets, data.test)
        peer_acc.append(accs)
        ens_acc.append(evaluate(EnsembleTeacher(list(nets)).eval(), data.test)["acc"])
        all_runs.append(runs.Run(f"DML in turn x{peers}", seed, accs[0], evaluate(nets[0], data.val)["acc"],
                                 models.count_params(nets[0]), seconds, History(), nets))
    return MutualResult(peers, float(T), float(alpha), all_runs, peer_acc, ens_acc, models.count_params(all_runs[0].model[0]))
