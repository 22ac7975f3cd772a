"""Lab 4 checks of deep mutual learning: the loss (values *and* gradients:
a loss with the right value can still leak gradients between peers, targets
not detached, or stop them, the learner's own side detached) and the peers
updated in turn (the DML paper's Algorithm 1, on the exercise contract)."""
from __future__ import annotations

import contextlib
import io
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .contract import draw_int
from ..losses import mutual
from . import Case, CheckFailed, _close, contract, diagnose
from .lab4_common import _attempt, _decide, _digest, _inputs_changed, _kl


# --------------------------------------------------------------------------
# The mutual-learning loss
# --------------------------------------------------------------------------


def _dml(kl_term, ce=lambda z, y, T: F.cross_entropy(z, y), combine=None, detach=True, total=lambda ls: sum(ls)):
    """Build a mutual loss from its pieces: ``kl_term(k, logits, T)`` is the
    peer term of peer k (already averaged as the variant wants)."""
    def loss(peer_logits, labels, T=1.0, alpha=0.5):
        zs = list(peer_logits)
        per = []
        for k, z in enumerate(zs):
            others = [(o.detach() if detach else o) for j, o in enumerate(zs) if j != k]
            peer = kl_term(z, others, T)
            hard = ce(z, labels, T)
            per.append(combine(hard, peer, alpha) if combine else (1 - alpha) * hard + alpha * peer)
        return total(per)
    return loss


_mean_kl = lambda z, others, T: sum(_kl(o, z, T) for o in others) / len(others) * T * T  # noqa: E731

MUTUAL_LOSS_VARIANTS = {
    "no_T2": (_dml(lambda z, others, T: sum(_kl(o, z, T) for o in others) / len(others)),
              "off by a factor T² on the peer term — multiply the KL by T**2 as in the KD loss."),
    "avg_probs_target": (_dml(lambda z, others, T: F.kl_div(
        F.log_softmax(z / T, -1), torch.stack([F.softmax(o / T, -1) for o in others]).mean(0), reduction="batchmean") * T * T),
        "with 3 or more peers the KL is taken against the *averaged* prediction of the others; DML averages "
        "one KL per other peer: (1/(K-1)) Σ_{l≠k} KL(p_l ‖ p_k)."),
    "avg_logits_target": (_dml(lambda z, others, T: _kl(torch.stack(others).mean(0), z, T) * T * T),
                          "with 3 or more peers the KL is taken against the others' averaged *logits*; DML averages "
                          "one KL per other peer: (1/(K-1)) Σ_{l≠k} KL(p_l ‖ p_k)."),
    "divide_by_K": (_dml(lambda z, others, T: sum(_kl(o, z, T) for o in others) / (len(others) + 1) * T * T),
                    "the peer term is divided by K (all peers); average over the K-1 *other* peers."),
    "no_average": (_dml(lambda z, others, T: sum(_kl(o, z, T) for o in others) * T * T),
                   "the KLs to the other peers are summed; average them (divide by K-1) so the peer term "
                   "does not grow with the number of peers."),
    "mean_over_peers": (_dml(_mean_kl, total=lambda ls: sum(ls) / len(ls)),
                        "the peers' losses are averaged; return their *sum*, so every peer gets the gradient "
                        "of its own full loss."),
    "alpha_swapped": (_dml(_mean_kl, combine=lambda h, p, a: a * h + (1 - a) * p),
                      "alpha weights the wrong term: alpha multiplies the peer (KL) term, (1 - alpha) the cross-entropy."),
    "no_ce": (_dml(_mean_kl, combine=lambda h, p, a: a * p),
              "the label term is missing: add (1 - alpha) * cross_entropy(z_k, labels) for every peer."),
    "ce_at_T": (_dml(_mean_kl, ce=lambda z, y, T: F.cross_entropy(z / T, y)),
                "the cross-entropy with the labels must use the raw logits (T = 1), not logits / T."),
    "kl_mean_reduction": (_dml(lambda z, others, T: sum(_kl(o, z, T, "mean") for o in others) / len(others) * T * T),
                          "F.kl_div with reduction='mean' also divides by the number of classes; use reduction='batchmean'."),
}

# Same value as the reference, different gradients.
# (The KL direction is one of them: summed over all peers, sum_k sum_{l!=k}
# KL(p_l || p_k) and its reverse add up the same ordered pairs.)
MUTUAL_GRAD_VARIANTS = {
    "reversed": (_dml(lambda z, others, T: sum(_kl(z, o, T) for o in others) / len(others) * T * T),
                 "the KL runs the wrong way (summed over all peers its value is the same, the gradients are not): each peer k is the *student* of the others, "
                 "so compute KL(p_other ‖ p_k) — F.kl_div(log_softmax(z_k / T), softmax(z_other / T))."),
    "not_detached": (_dml(_mean_kl, detach=False),
                     "gradients leak between peers: the other peers' predictions are targets and must be detached "
                     "(z_other.detach()); otherwise peer k's loss also pulls every other peer towards peer k."),
    "own_detached": (_dml(lambda z, others, T: _mean_kl(z.detach(), others, T)),
                     "the learner's own logits are detached inside the KL, so the peer term trains nothing; "
                     "detach only the *other* peers' predictions (the targets)."),
}


def _mutual_cases() -> list[Case]:
    cases = []
    for i, (k, n, c, T, alpha) in enumerate([(2, 6, 5, 1.0, 0.5), (3, 5, 4, 2.0, 0.7), (4, 4, 6, 3.0, 0.3),
                                             (3, 8, 10, 1.0, 0.9)]):
        g = contract.generator(100 + i)
        peers = [torch.randn(n, c, generator=g, dtype=torch.float64) * (1.0 + j) for j in range(k)]
        y = torch.randint(0, c, (n,), generator=g)
        cases.append(Case((peers, y), {"T": T, "alpha": alpha}, f"K={k} peers, N={n}, C={c}, T={T}, alpha={alpha}"))
    return cases


def _peer_grads(fn, case: Case) -> list[torch.Tensor]:
    peers = [z.clone().requires_grad_(True) for z in case.args[0]]
    out = fn(peers, case.args[1], **case.kwargs)
    if not isinstance(out, torch.Tensor) or out.ndim != 0:
        raise CheckFailed(f"mutual_loss must return a scalar (0-dim tensor), got "
                          f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if not out.requires_grad:
        raise CheckFailed("mutual_loss gives no gradient to the peers' logits — is everything detached?")
    grads = torch.autograd.grad(out, peers, allow_unused=True)
    return [torch.zeros_like(z) if g is None else g for z, g in zip(peers, grads)]


def check_mutual_loss(fn: Callable) -> bool:
    """``fn(peer_logits, labels, T=, alpha=)`` must equal
    Σ_k [(1-alpha)·CE(z_k, y) + alpha·T²·(1/(K-1))·Σ_{l≠k} KL(p_l^T ‖ p_k^T)]
    with the other peers detached — values *and* gradients."""
    cases = _mutual_cases()
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):  # print the ✓ line only once gradients agree too
        ok = diagnose("mutual_loss", fn, mutual.mutual_learning_loss, cases, MUTUAL_LOSS_VARIANTS)
    for case in cases:
        got, ref = _peer_grads(fn, case), _peer_grads(mutual.mutual_learning_loss, case)
        if all(_close(a, b) for a, b in zip(got, ref)):
            continue
        for variant, hint in MUTUAL_GRAD_VARIANTS.values():
            if all(_close(a, b) for a, b in zip(got, _peer_grads(variant, case))):
                raise CheckFailed(f"mutual_loss has the right value but wrong gradients: {hint}")
        worst = max(float((a - b).abs().max()) for a, b in zip(got, ref))
        raise CheckFailed(f"mutual_loss has the right value but its gradients differ from the reference on "
                          f"{case.label} (max difference {worst:.3g}); only the other peers' predictions "
                          f"should be detached")
    print(shown.getvalue().rstrip() + "\n✓ mutual_loss gradients match too: each peer's logits receive the gradient "
          "of its own loss only")
    return ok



def probe_mutual_loss(fn: Callable, seed: int) -> dict:
    """2-4 peers, random N, C, T and alpha (the defaults T=1, alpha=0.5 on
    every fourth seed): the loss and its gradient w.r.t. every peer's
    logits (a right value with leaking or blocked gradients is wrong)."""
    g = contract.generator(seed)
    k = 2 + seed % 3
    n, c = 1 + draw_int(g, 0, 8), 2 + draw_int(g, 0, 9)
    peers = [(torch.randn(n, c, generator=g, dtype=torch.float64) * (1.0 + j)).requires_grad_(True) for j in range(k)]
    y = torch.randint(0, c, (n,), generator=g)
    if seed % 4 == 0:
        out = fn(list(peers), y)
    else:
        T, alpha = [2.0, 1.0, 3.0, 4.0][seed % 4], [0.7, 0.3, 0.9, 0.5, 0.1][seed % 5]
        out = fn(list(peers), y, T=T, alpha=alpha)
    return {"loss": contract.scalar(out, "mutual_loss"), "grads": contract.grad(out, peers, seed)}



# --------------------------------------------------------------------------
# Exercise: deep mutual learning with the peers updated in turn
# --------------------------------------------------------------------------

def probe_mutual_loss_fn(peer_logits, labels, T=1.0, alpha=0.5):
    """The DML loss the probe hands to the student's step (the probe's own copy:
    summed over peers, the other peers' predictions detached)."""
    total = 0.0
    for k, z in enumerate(peer_logits):
        log_p = F.log_softmax(z / T, dim=-1)
        kl = 0.0
        for j, o in enumerate(peer_logits):
            if j != k:
                q = F.softmax(o.detach() / T, dim=-1)
                kl = kl + (q * (torch.log(q.clamp_min(1e-300)) - log_p)).sum(-1).mean()
        total = total + (1 - alpha) * F.cross_entropy(z, labels) + alpha * T * T * kl / (len(peer_logits) - 1)
    return total


def _peers(seed: int, k: int, d: int, c: int):
    torch.manual_seed(900 + seed)
    return [nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, c)).double() for _ in range(k)]


def probe_mutual_step_in_turn(fn: Callable, seed: int = 0) -> dict:
    """Two calls of the step (two batches) on K = 2, 3 or 4 small peers with
    SGD with momentum (so stale gradients and a wrong optimizer show): every
    peer's parameters after each call, and whether the batch was changed."""
    k, n, d, c = [(2, 6, 4, 3), (3, 5, 3, 4), (2, 8, 5, 5), (4, 4, 3, 3)][seed % 4]
    T, alpha = [1.0, 2.0, 3.0, 1.0][seed % 4], [0.5, 0.7, 0.3, 0.5][seed % 4]
    peers = _peers(seed, k, d, c)
    opts = [torch.optim.SGD(p.parameters(), lr=0.3, momentum=0.5) for p in peers]
    g = contract.generator(seed + 3)
    batches = [(torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g))
               for _ in range(2)]
    before = _digest([t for b in batches for t in b])
    snaps = []
    for x, y in batches:
        _, fault = _attempt(fn, peers, opts, x, y, probe_mutual_loss_fn, T=T, alpha=alpha)
        if fault:
            return {**fault, "inputs_changed_in_place": False}
        snaps.append([[contract.plain(p.detach().clone()) for p in peer.parameters()] for peer in peers])
    changed = _inputs_changed([contract.as_tensor(b) for b in before], [t for b in batches for t in b])
    return {"inputs_changed_in_place": changed, "params": snaps}


def _turn_variant(kind: str):
    def step(peers, optimizers, x, labels, loss_fn, T=1.0, alpha=0.5):
        if kind == "joint":  # one forward, one backward, every peer steps: the joint step
            loss = loss_fn([p(x) for p in peers], labels, T=T, alpha=alpha)
            for o in optimizers:
                o.zero_grad()
            loss.backward()
            for o in optimizers:
                o.step()
            return
        order = range(len(peers) - 1, -1, -1) if kind == "reversed" else range(len(peers))
        for k in order:
            logits = []
            for j, p in enumerate(peers):
                if j == k:
                    logits.append(p(x))
                else:
                    with torch.no_grad():
                        logits.append(p(x))
            loss = loss_fn(logits, labels, T=T, alpha=alpha)
            if kind != "no_zero_grad":
                optimizers[k].zero_grad()
            loss.backward()
            (optimizers[0] if kind == "first_optimizer" else optimizers[k]).step()
    return step


TURN_VARIANTS = {
    "joint": (_turn_variant("joint"),
              "every peer is updated from the predictions of the start of the step — that is the joint step "
              "(also what you get by computing the logits once before the loop). In turn: in peer k's turn, "
              "compute the other peers' *current* logits (the peers before k already updated), then step "
              "optimizers[k] only."),
    "no_zero_grad": (_turn_variant("no_zero_grad"),
                     "gradients accumulate from one step to the next: call optimizers[k].zero_grad() before "
                     "loss.backward()."),
    "first_optimizer": (_turn_variant("first_optimizer"),
                        "every turn steps optimizers[0]: peer k's update must use optimizers[k] (each optimizer "
                        "holds one peer's parameters)."),
    "reversed": (_turn_variant("reversed"),
                 "the peers are updated last to first; Algorithm 1 of the DML paper updates peer 1 first, then "
                 "peer 2 with peer 1's new predictions, and so on."),
}


def check_mutual_step_in_turn(fn: Callable) -> bool:
    """``fn(peers, optimizers, x, labels, loss_fn, T=, alpha=)``: one step of
    DML's Algorithm 1 — peer 1 updated from everyone's current predictions,
    then peer 2 from the updated peer 1, … (K = 2, 3 and 4 peers)."""
    _decide(contract.exercise(4, "mutual_step_in_turn"), fn, seeds=(0, 1, 3))
    print("✓ mutual_step_in_turn: each peer updated in turn, from the others' current predictions, by its own "
          "optimizer (2, 3 and 4 peers, two steps each)")
    return True


