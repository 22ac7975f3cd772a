"""Lab 4 checks: the born-again loop and the mutual-learning loss.

* :func:`check_born_again` runs the student's loop on a tiny problem with a
  recording ``train`` function and says which rule it breaks (fresh network
  per generation, teacher = the previous generation, frozen teacher, the
  right temperature per generation, every generation returned in order).
* :func:`check_mutual_loss` compares values with
  :func:`kdcourse.losses.mutual.mutual_learning_loss` on 2, 3 and 4 peers,
  names the usual mistakes, and then compares *gradients*: a loss with the
  right value can still leak gradients between peers (targets not
  detached) or stop them (the learner's own side detached).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import models
from ..data import Split
from ..losses import mutual
from ..train import Distill, Objective, fit
from . import Case, CheckFailed, _close, contract, diagnose


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------
# The mutual-learning loss
# --------------------------------------------------------------------------

def _kl(target_logits, logits, T, reduction="batchmean"):
    """KL(softmax(target/T) || softmax(logits/T)) (no T², no detach)."""
    with warnings.catch_warnings():  # reduction="mean" warns; it is a deliberate wrong variant here
        warnings.simplefilter("ignore", UserWarning)
        return F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(target_logits / T, -1),
                        reduction=reduction, log_target=True)


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
        g = _gen(100 + i)
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


# --------------------------------------------------------------------------
# The born-again loop
# --------------------------------------------------------------------------

class _Recorder:
    """``new_model`` and ``train`` for the check: tiny networks, tiny data,
    every call recorded."""

    def __init__(self):
        g = _gen(7)
        self.split = Split(torch.randn(24, 3, 4, 4, generator=g), torch.randint(0, 3, (24,), generator=g), ("a", "b", "c"))
        self.made: list[nn.Module] = []
        self.calls: list[dict] = []

    def new_model(self) -> nn.Module:
        torch.manual_seed(1000 + len(self.made))
        m = models.MLP(48, (6,), num_classes=3)
        self.made.append(m)
        return m

    def train(self, model, objective):
        rec = {"model": model, "objective": objective, "distill": isinstance(objective, Distill)}
        teacher = getattr(objective, "teacher", None)
        if isinstance(teacher, nn.Module):
            rec["teacher"] = teacher
            rec["before"] = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        if not isinstance(model, nn.Module):
            raise CheckFailed(f"train(model, objective) got a {type(model).__name__} as model; pass the network from new_model()")
        if teacher is model:
            raise CheckFailed(f"generation {len(self.calls) + 1} is its own teacher (Distill(student)); "
                              f"its teacher must be the previous generation")
        fit(model, self.split, objective, epochs=1, lr=0.05, batch_size=8, progress=False, lr_schedule="constant")
        if "teacher" in rec:
            after = teacher.state_dict()
            rec["teacher_changed"] = any(not torch.equal(rec["before"][k], after[k]) for k in rec["before"])
            rec["teacher_trainable"] = any(p.requires_grad for p in teacher.parameters())
        self.calls.append(rec)


def check_born_again(fn: Callable) -> bool:
    """``fn(new_model, train, temperatures, alpha)`` must train generation 1 on
    labels and each generation k+1 — a fresh network — by distillation from
    the frozen generation k at ``temperatures[k-1]``, and return every
    generation, oldest first."""
    temperatures, alpha = (2.0, 5.0, 3.0), 0.3
    n_gen = len(temperatures) + 1
    rec = _Recorder()
    try:
        out = fn(rec.new_model, rec.train, temperatures, alpha)
    except NotImplementedError:
        raise
    except CheckFailed:
        raise
    except Exception as exc:
        raise CheckFailed(f"born_again raised {type(exc).__name__}: {exc}") from exc

    if not isinstance(out, (list, tuple)) or not all(isinstance(m, nn.Module) for m in out):
        raise CheckFailed(f"born_again must return a list of the trained networks, got {type(out).__name__}")
    trained = [c["model"] for c in rec.calls]
    if len(rec.calls) != n_gen:
        raise CheckFailed(f"with {len(temperatures)} temperatures there are {n_gen} generations to train "
                          f"(generation 1 on labels, then one per temperature); train was called {len(rec.calls)} times")
    if len(out) != n_gen:
        hint = " — generation 1 is missing" if len(out) == n_gen - 1 and all(a is b for a, b in zip(out, trained[1:])) else ""
        raise CheckFailed(f"return every generation, oldest first: expected {n_gen} networks, got {len(out)}{hint}")
    for k in range(1, n_gen):
        if any(rec.calls[k]["model"] is c["model"] for c in rec.calls[:k]):
            raise CheckFailed(f"generation {k + 1} is an earlier generation trained further; every generation must be a "
                              f"fresh network from new_model() (same architecture, new random weights)")
    if any(m not in [id(x) for x in rec.made] for m in map(id, trained)):
        raise CheckFailed("train a network made by new_model() for every generation")
    if rec.calls[0]["distill"]:
        raise CheckFailed("generation 1 has no teacher: train it on the labels alone (kdcourse.train.Objective())")
    for k in range(1, n_gen):
        call, g = rec.calls[k], k + 1
        if not call["distill"]:
            raise CheckFailed(f"generation {g} was trained on the labels only; distil it from generation {g - 1} "
                              f"with Distill(teacher, T=..., alpha=...)")
        teacher = call.get("teacher")
        if teacher is call["model"]:
            raise CheckFailed(f"generation {g} is its own teacher; its teacher must be generation {g - 1}")
        if teacher is not trained[k - 1]:
            which = next((i + 1 for i, m in enumerate(trained) if m is teacher), None)
            if which == 1:
                raise CheckFailed(f"generation {g} learns from generation 1; each generation must learn from the "
                                  f"previous one (generation {g - 1}) — that is what makes them 'born again'")
            raise CheckFailed(f"the teacher of generation {g} must be generation {g - 1} (the network trained just before)")
        obj = call["objective"]
        if obj.T != temperatures[k - 1]:
            raise CheckFailed(f"generation {g} was distilled at T={obj.T:g}; each generation has its own temperature: "
                              f"generation 2 uses temperatures[0], generation 3 temperatures[1], … "
                              f"(here {temperatures[k - 1]:g})")
        if obj.alpha != alpha:
            raise CheckFailed(f"generation {g} was distilled with alpha={obj.alpha}; pass the loop's alpha ({alpha}) to Distill")
        if not obj.frozen or call.get("teacher_changed") or call.get("teacher_trainable"):
            raise CheckFailed(f"the teacher generation is not frozen: generation {g - 1} "
                              f"{'changed its weights' if call.get('teacher_changed') else 'had trainable weights'} "
                              f"while generation {g} trained. Distill(teacher) freezes it (eval mode, no gradients); "
                              f"do not pass frozen=False")
    if not all(a is b for a, b in zip(out, trained)):
        raise CheckFailed("return the generations in training order (generation 1 first), each network as trained")
    print(f"✓ born_again: {n_gen} generations, each a fresh network; generation k+1 distilled from the frozen "
          f"generation k at T = {', '.join(f'{T:g}' for T in temperatures)}")
    return True


# --------------------------------------------------------------------------
# Declarations (kdcourse.checks.contract): what the grader probes
# --------------------------------------------------------------------------

def probe_mutual_loss(fn: Callable, seed: int) -> dict:
    """2-4 peers, random N, C, T and alpha (the defaults T=1, alpha=0.5 on
    every fourth seed): the loss and its gradient w.r.t. every peer's
    logits (a right value with leaking or blocked gradients is wrong)."""
    g = contract.generator(seed)
    k = 2 + seed % 3
    n, c = 1 + int(torch.randint(0, 8, (1,), generator=g)), 2 + int(torch.randint(0, 9, (1,), generator=g))
    peers = [(torch.randn(n, c, generator=g, dtype=torch.float64) * (1.0 + j)).requires_grad_(True) for j in range(k)]
    y = torch.randint(0, c, (n,), generator=g)
    if seed % 4 == 0:
        out = fn(list(peers), y)
    else:
        T, alpha = [2.0, 1.0, 3.0, 4.0][seed % 4], [0.7, 0.3, 0.9, 0.5, 0.1][seed % 5]
        out = fn(list(peers), y, T=T, alpha=alpha)
    return {"loss": contract.scalar(out, "mutual_loss"), "grads": contract.grad(out, peers, seed)}


class _BornAgainProbe:
    """``new_model``/``train`` for the probe: seeded tiny networks and data;
    every call recorded as plain facts, the trained networks' logits kept."""

    def __init__(self, seed: int):
        g = contract.generator(seed)
        self.split = Split(torch.randn(24, 3, 4, 4, generator=g), torch.randint(0, 3, (24,), generator=g), ("a", "b", "c"))
        self.x = torch.randn(5, 3, 4, 4, generator=g)
        self.width = 4 + seed % 5
        self.made: list = []
        self.calls: list = []

    def index(self, m) -> int:
        return next((i for i, x in enumerate(self.made) if x is m), -1)

    def new_model(self) -> nn.Module:
        torch.manual_seed(1000 + len(self.made))
        m = models.MLP(48, (self.width,), num_classes=3)
        self.made.append(m)
        return m

    def train(self, model, objective):
        teacher = getattr(objective, "teacher", None)
        rec = {"model": self.index(model), "objective": "distill" if isinstance(objective, Distill) else
               "labels" if type(objective) is Objective else type(objective).__name__,
               "teacher": self.index(teacher) if teacher is not None else None,
               "T": float(objective.T) if isinstance(getattr(objective, "T", None), (int, float)) else None,
               "alpha": float(objective.alpha) if isinstance(getattr(objective, "alpha", None), (int, float)) else None,
               "frozen": bool(getattr(objective, "frozen", False))}
        before = {k: v.detach().clone() for k, v in teacher.state_dict().items()} if isinstance(teacher, nn.Module) else None
        if isinstance(model, nn.Module) and teacher is not model:
            torch.manual_seed(2000 + len(self.calls))
            fit(model, self.split, objective, epochs=1, lr=0.05, batch_size=8, progress=False, lr_schedule="constant")
        if before is not None:
            rec["teacher_changed"] = any(not torch.equal(before[k], v) for k, v in teacher.state_dict().items())
            rec["teacher_trainable"] = any(p.requires_grad for p in teacher.parameters())
        self.calls.append(rec)


def probe_born_again(fn: Callable, seed: int) -> dict:
    """2-4 temperatures and a random alpha on seeded tiny networks and data:
    which network each ``train`` call got (as an index into the ones
    ``new_model`` made), its objective, teacher, T, alpha, whether the
    teacher stayed frozen; which networks came back in which order; and the
    returned networks' logits on seeded inputs after training."""
    g = contract.generator(seed)
    temperatures = tuple(float(v) for v in (1 + torch.randint(0, 8, (2 + seed % 3,), generator=g)).tolist())
    alpha = [0.3, 0.5, 0.7, 0.9][seed % 4]
    rec = _BornAgainProbe(seed)
    out = fn(rec.new_model, rec.train, temperatures, alpha)
    if not isinstance(out, (list, tuple)):
        raise contract.PlainDataError(f"born_again must return a list of the trained networks, got {type(out).__name__}")
    data = {"calls": rec.calls, "returned": [rec.index(m) for m in out], "logits": []}
    with torch.no_grad():
        for m in out:
            data["logits"].append(contract.plain(m.eval()(rec.x)) if isinstance(m, nn.Module) else None)
    return data


def _born_again_with(reuse=False, teacher_of=lambda gens: gens[-1], T_of=lambda ts, k: ts[k], frozen=True,
                     keep_first=True, distill=True, pass_alpha=True):
    def loop(new_model, train, temperatures, alpha=0.5):
        gens = [new_model()]
        train(gens[0], Objective())
        for k in range(len(temperatures)):
            student = gens[-1] if reuse else new_model()
            kwargs = {"T": T_of(temperatures, k), "frozen": frozen}
            if pass_alpha:
                kwargs["alpha"] = alpha
            train(student, Distill(teacher_of(gens), **kwargs) if distill else Objective())
            gens.append(student)
        return gens if keep_first else gens[1:]
    return loop


BORN_AGAIN_VARIANTS = {
    "reuse": (_born_again_with(reuse=True),
              "every generation is an earlier generation trained further; each generation must be a fresh network "
              "from new_model() (same architecture, new random weights)"),
    "teacher_gen1": (_born_again_with(teacher_of=lambda gens: gens[0]),
                     "each generation learns from generation 1; it must learn from the previous one — that is what "
                     "makes them 'born again'"),
    "not_frozen": (_born_again_with(frozen=False),
                   "the teacher generation is not frozen: Distill(teacher) freezes it (eval mode, no gradients); do "
                   "not pass frozen=False"),
    "first_T": (_born_again_with(T_of=lambda ts, k: ts[0]),
                "every generation is distilled at temperatures[0]; generation 2 uses temperatures[0], generation 3 "
                "temperatures[1], …"),
    "no_first": (_born_again_with(keep_first=False),
                 "return every generation, oldest first: generation 1 is missing"),
    "labels_only": (_born_again_with(distill=False),
                    "the later generations are trained on the labels only; distil each from the previous generation "
                    "with Distill(teacher, T=..., alpha=...)"),
    "alpha_ignored": (_born_again_with(pass_alpha=False),
                      "alpha is not passed on: Distill(teacher, T=T, alpha=alpha) (its default is 0.9)"),
}


from ..recipes.lab4 import born_again as _born_again_reference  # noqa: E402  (the reference answer)

EXERCISES = [
    contract.Exercise(name="born_again", points=1.0, check=check_born_again, probe=probe_born_again,
                      reference=_born_again_reference, variants=BORN_AGAIN_VARIANTS, hidden_seeds=(0, 1, 2),
                      rtol=1e-5, atol=1e-6, timeout=120.0),
    contract.Exercise(name="mutual_loss", points=1.0, check=check_mutual_loss, probe=probe_mutual_loss,
                      reference=mutual.mutual_learning_loss,
                      variants={**MUTUAL_LOSS_VARIANTS, **MUTUAL_GRAD_VARIANTS}, hidden_seeds=tuple(range(6)),
                      rtol=1e-6, atol=1e-9),
]


# ==========================================================================
# Exercises on the exercise contract (kdcourse.checks.contract): the
# deep-supervision loss, born-again with a temperature per generation, and
# mutual learning with the peers updated in turn. Each visible check runs
# the same probe as the grader and decides exactly as it does.
# ==========================================================================

from ..recipes import lab4 as _recipe  # noqa: E402  (the reference answers)
import random  # noqa: E402

HIDDEN_SEEDS = (0, 1, 2, 3)
INPLACE_HINT = ("changes its inputs in place (e.g. z /= T, or exit_logits.pop('final')): the caller's tensors are not yours "
                "to change — compute new tensors (z / T) instead.")


def _digest(tensors) -> list:
    return [contract.plain(t.detach().clone()) for t in tensors]


def _inputs_changed(before: list, tensors) -> bool:
    return any(not torch.equal(b, t.detach()) for b, t in zip(before, tensors))


def _compare_faults(fields):
    """``compare(student, other, seed)``: a fault field (an in-place change, an
    exception) is compared first; when both sides show it they agree."""
    def compare(student, other, seed=0):
        for f in fields:
            fs, fo = student.get(f), other.get(f)
            if fs or fo:
                return None if fs == fo else f"{f}: {fs!r} vs {fo!r}"
        return contract.compare(student, other, 1e-6, 1e-9)
    return compare


def _decide(exercise, fn, seeds=(0, 1)) -> None:
    """The student's probe data against the reference's and the variants', as the grader decides."""
    student = {s: contract.run_probe(exercise, fn, s) for s in seeds}
    for s in seeds:
        if student[s].get("inputs_changed_in_place"):
            raise CheckFailed(f"{exercise.name} {INPLACE_HINT}")
        if student[s].get("raised"):
            raise CheckFailed(f"{exercise.name} raised {student[s]['raised']} on a check input"
                              + (f": {student[s].get('message', '')}" if student[s].get("message") else ""))
    reference = {s: contract.run_probe(exercise, exercise.reference, s) for s in seeds}
    variants = lambda name, seed: contract.run_probe(exercise, exercise.variants[name][0], seed)  # noqa: E731
    v = contract.diagnose_data(exercise, student, reference, variants)
    if not v.ok:
        raise CheckFailed(v.hint.replace("on a hidden test", "on a check input"))


def _attempt(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except NotImplementedError:
        raise
    except Exception as exc:
        if contract.is_refusal(exc):
            raise
        return None, {"raised": type(exc).__name__, "message": str(exc)[:300]}


# --------------------------------------------------------------------------
# Exercise: the deep-supervision loss over the exits
# --------------------------------------------------------------------------

def _ds_case(seed: int):
    g = contract.generator(seed)
    n_exits = [1, 2, 3, 2][seed % 4]
    n, c = [6, 4, 8, 5][seed % 4], [5, 10, 3, 7][seed % 4]
    names = [f"layer{i + 1}" for i in range(n_exits)]
    if seed % 2:  # "final" need not be last in the dict
        order = names[:1] + ["final"] + names[1:]
    else:
        order = names + ["final"]
    logits = {k: (torch.randn(n, c, generator=g, dtype=torch.float64) * (1.5 + i)).requires_grad_(True)
              for i, k in enumerate(order)}
    labels = torch.randint(0, c, (n,), generator=g)
    T, alpha = [3.0, 1.0, 4.0, 2.0][seed % 4], [0.5, 0.3, 0.9, 0.0][seed % 4]
    return logits, labels, T, alpha


def probe_deep_supervision_loss(fn: Callable, seed: int = 0) -> dict:
    """The loss on seeded exits (1 to 3 exits, ``"final"`` anywhere in the
    dict, several T and alpha) and its gradient on every exit's logits."""
    logits, labels, T, alpha = _ds_case(seed)
    before = _digest(list(logits.values()) + [labels])
    given = dict(logits)
    out, fault = _attempt(fn, given, labels, T=T, alpha=alpha)
    changed = _inputs_changed([contract.as_tensor(b) for b in before], list(logits.values()) + [labels]) or \
        list(given) != list(logits)
    if fault:
        return {**fault, "inputs_changed_in_place": changed}
    if not isinstance(out, torch.Tensor) or out.ndim != 0:
        return {"raised": "not a scalar tensor", "inputs_changed_in_place": changed}
    names = list(logits)
    grads = contract.grad(out, [logits[k] for k in names], seed)
    return {"inputs_changed_in_place": changed, "loss": contract.plain(out),
            "grad": dict(zip(names, grads)) if isinstance(grads, list) else grads}


def _ds_variant(final_ce=True, detach="final", t2=True, reverse=False, swap=False, average=False, self_kd=False,
                ce_at_T=False, reduction="batchmean"):
    def loss(exit_logits, labels, T=3.0, alpha=0.5):
        final = exit_logits["final"]
        total = F.cross_entropy(final, labels) if final_ce else 0.0
        terms = []
        for name, z in exit_logits.items():
            if name == "final" and not self_kd:
                continue
            teacher = final.detach() if detach == "final" else final
            student = z.detach() if detach == "exit" else z
            if reverse:
                kl = _kl(student, teacher, T, reduction)
            else:
                kl = _kl(teacher, student, T, reduction)
            ce = F.cross_entropy(z / T if ce_at_T else z, labels)
            kd = (T * T if t2 else 1.0) * kl
            terms.append(alpha * ce + (1 - alpha) * kd if swap else (1 - alpha) * ce + alpha * kd)
        return total + (sum(terms) / len(terms) if average else sum(terms))
    return loss


DS_LOSS_VARIANTS = {
    "final_not_detached": (_ds_variant(detach=None),
                           "the deepest head's prediction is a *target*: detach it (exit_logits['final'].detach()) "
                           "inside the KL, or the exits' losses also pull the final head towards the shallow exits "
                           "(the value is the same, the gradient on 'final' is not)."),
    "exit_detached": (_ds_variant(detach="exit"),
                      "the exit's own logits are detached inside the KL, so the distillation term trains nothing; "
                      "detach the final head's prediction (the teacher) instead."),
    "reversed": (_ds_variant(reverse=True),
                 "the KL runs the wrong way: the exit is the student, so compute KL(p_final ‖ p_exit) = "
                 "F.kl_div(log_softmax(z_exit / T), softmax(z_final.detach() / T), reduction='batchmean')."),
    "no_T2": (_ds_variant(t2=False), "off by a factor T² on the distillation term — multiply the KL by T**2."),
    "alpha_swapped": (_ds_variant(swap=True),
                      "alpha weights the wrong term: alpha multiplies the KL, (1 - alpha) the exit's cross-entropy."),
    "averaged_exits": (_ds_variant(average=True),
                       "the exits' terms are averaged; BYOT sums one term per exit (each exit gets its full loss)."),
    "no_final_ce": (_ds_variant(final_ce=False),
                    "the final head's own cross-entropy with the labels is missing: the loss starts with "
                    "CE(z_final, labels)."),
    "final_as_exit": (_ds_variant(self_kd=True),
                      "the final head is treated as one more exit (a KL of the final head to itself, and its "
                      "cross-entropy weighted by 1 - alpha): loop over the exits other than 'final'."),
    "ce_at_T": (_ds_variant(ce_at_T=True), "the cross-entropy with the labels uses the raw logits (T = 1), not logits / T."),
    "kl_mean": (_ds_variant(reduction="mean"),
                "F.kl_div with reduction='mean' also divides by the number of classes; use reduction='batchmean'."),
}


def check_deep_supervision_loss(fn: Callable) -> bool:
    """``fn(exit_logits, labels, T=, alpha=)``: CE(z_final, y) + Σ_exits
    [(1 − α)·CE(z_e, y) + α·T²·KL(p_final ‖ p_e)], the final head detached —
    values and gradients on every exit, 1 to 3 exits, ``"final"`` anywhere."""
    _decide(contract.exercise(4, "deep_supervision_loss"), fn, seeds=(0, 1, 2))
    print("✓ deep_supervision_loss matches the reference on 3 seeded cases (1–3 exits): values and the gradient "
          "on every exit's logits — the final head teaches, it is not taught")
    return True


# --------------------------------------------------------------------------
# Exercise: born-again, a temperature per generation chosen on validation
# --------------------------------------------------------------------------

class _TunedRecorder:
    """``new_model``, ``train`` and ``val_acc`` for the probe: nothing trains,
    every call is recorded, and a network's validation score is a seeded
    number that depends only on how it was trained (its generation and T),
    so the right choice is known whatever order the networks are made in."""

    def __init__(self, seed: int):
        self.seed = seed
        self.info: dict = {}  # id(model) -> how it was last trained
        self.models: dict = {}
        self.trained: list = []
        self.retrained = False

    def new_model(self):
        torch.manual_seed(500 + len(self.models))
        m = nn.Linear(2, 2)
        self.models[id(m)] = m
        return m

    def train(self, model, objective):
        if id(model) in self.info:
            self.retrained = True
        if isinstance(objective, Distill):
            teacher = objective.teacher
            t_info = self.info.get(id(teacher))
            gen = t_info["gen"] + 1 if t_info else 0
            info = {"kind": "distill", "gen": gen, "T": None if callable(objective.T) else float(objective.T),
                    "alpha": None if callable(objective.alpha) else float(objective.alpha),
                    "frozen": bool(objective.frozen), "teacher": id(teacher)}
        else:
            info = {"kind": "labels" if type(objective).__name__ in ("Objective", "CrossEntropy")
                    else type(objective).__name__, "gen": 1}
        self.info[id(model)] = info
        self.trained.append([info["gen"], info.get("T")])

    def val_acc(self, model) -> float:
        info = self.info.get(id(model))
        if info is None:
            return -1.0
        return random.Random(f"{self.seed}/{info['gen']}/{info.get('T')}").random()

    def describe(self, gens) -> list:
        out = []
        for i, m in enumerate(gens):
            info = dict(self.info.get(id(m), {"kind": "never trained"}))
            if "teacher" in info:
                teacher = info.pop("teacher")
                info["teacher_is_previous"] = i > 0 and teacher == id(gens[i - 1])
            out.append(info)
        return out


def probe_born_again_tuned(fn: Callable, seed: int = 0) -> dict:
    """Run the loop against recording ``new_model``/``train``/``val_acc``:
    what each returned network was trained with (generation, T, alpha,
    frozen teacher, teacher = the previous returned network), every
    (generation, T) trained, whether a network was trained twice, and the
    chosen temperatures."""
    rec = _TunedRecorder(seed)
    candidates = [(1.0, 4.0), (2.0, 1.0, 8.0), (4.0, 2.0, 1.0), (3.0, 6.0)][seed % 4]
    generations = [3, 2, 4, 3][seed % 4]
    alpha = [0.5, 0.3, 0.7, 0.9][seed % 4]
    out, fault = _attempt(fn, rec.new_model, rec.train, rec.val_acc, candidates, generations=generations, alpha=alpha)
    data = {"trained": sorted(rec.trained, key=lambda t: (t[0], -1.0 if t[1] is None else t[1])),
            "retrained": rec.retrained}
    if fault:
        return {**data, **fault}
    if not (isinstance(out, (list, tuple)) and len(out) == 2 and isinstance(out[0], (list, tuple))):
        return {**data, "raised": "not a pair (list of generations, temperatures)"}
    gens, temps = out
    data["returned"] = rec.describe(gens)
    try:
        data["chosen_T"] = [float(T) for T in temps]
    except (TypeError, ValueError):
        data["chosen_T"] = "not a list of numbers"
    return data


def _tuned_variant(teacher="best", pick=max, per_generation=True, fresh=True, first_gen=True, freeze=True,
                   score_teacher=False):
    def loop(new_model, train, val_acc, candidates, generations=3, alpha=0.5):
        gens = [new_model()]
        train(gens[0], Objective())
        chosen, fixed = [], None
        for g in range(generations - 1):
            tried = {}
            temps = candidates if (per_generation or fixed is None) else [fixed]
            reuse = None
            for T in temps:
                student = new_model() if (fresh or reuse is None) else reuse
                reuse = student
                t = gens[-1] if teacher in ("best", "last") else gens[0]
                train(student, Distill(t, T=T, alpha=alpha, frozen=freeze))
                tried[T] = student
            best = pick(tried, key=lambda T: val_acc(gens[-1] if score_teacher else tried[T]))
            fixed = best
            if teacher == "last":
                gens.append(tried[temps[-1]])
            else:
                gens.append(tried[best])
            chosen.append(best)
        return (gens if first_gen else gens[1:]), chosen
    return loop


TUNED_VARIANTS = {
    "last_tried": (_tuned_variant(teacher="last"),
                   "the next generation keeps the *last* network tried, not the one with the best validation "
                   "accuracy: keep the winner of each generation's search as the teacher of the next."),
    "min": (_tuned_variant(pick=min), "the temperature with the *lowest* validation accuracy is kept: use max."),
    "one_search": (_tuned_variant(per_generation=False),
                   "the temperature is searched only for generation 2 and reused after; search again for every "
                   "generation (its teacher is a different network)."),
    "from_first": (_tuned_variant(teacher="first"),
                   "every generation learns from generation 1; each generation's teacher is the previous "
                   "generation (the winner of its search)."),
    "not_fresh": (_tuned_variant(fresh=False),
                  "the same network is trained further for every candidate temperature; each candidate needs a "
                  "fresh network from new_model()."),
    "no_first": (_tuned_variant(first_gen=False), "return every generation, generation 1 (trained on the labels) first."),
    "not_frozen": (_tuned_variant(freeze=False), "the teacher is not frozen: do not pass frozen=False to Distill."),
    "scores_teacher": (_tuned_variant(score_teacher=True),
                       "the validation score is taken on the teacher, the same for every candidate; score each "
                       "candidate student with val_acc(student)."),
}


def check_born_again_tuned(fn: Callable) -> bool:
    """``fn(new_model, train, val_acc, candidates, generations=, alpha=) ->
    (generations, temperatures)``: every distilled generation searches the
    candidate temperatures, each with a fresh network taught by the previous
    generation's winner, and keeps the best on validation."""
    _decide(contract.exercise(4, "born_again_tuned"), fn, seeds=(0, 1, 2))
    print("✓ born_again_tuned: a fresh network per candidate T, taught by the previous generation's winner, "
          "the winner chosen on validation — for every generation")
    return True


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


_NEW_EXERCISES = [
    contract.Exercise(name="born_again_tuned", points=1.0, check=check_born_again_tuned,
                      probe=probe_born_again_tuned, reference=_recipe.born_again_tuned, variants=TUNED_VARIANTS,
                      hidden_seeds=HIDDEN_SEEDS, compare=_compare_faults(("raised",))),
    contract.Exercise(name="deep_supervision_loss", points=1.0, check=check_deep_supervision_loss,
                      probe=probe_deep_supervision_loss, reference=_recipe.deep_supervision_loss,
                      variants=DS_LOSS_VARIANTS, hidden_seeds=HIDDEN_SEEDS,
                      compare=_compare_faults(("inputs_changed_in_place", "raised"))),
    contract.Exercise(name="mutual_step_in_turn", points=1.0, check=check_mutual_step_in_turn,
                      probe=probe_mutual_step_in_turn, reference=_recipe.mutual_step_in_turn, variants=TURN_VARIANTS,
                      hidden_seeds=HIDDEN_SEEDS, compare=_compare_faults(("inputs_changed_in_place", "raised"))),
]

_NOTEBOOK_ORDER = ("born_again", "born_again_tuned", "deep_supervision_loss", "mutual_loss", "mutual_step_in_turn")
EXERCISES = sorted(EXERCISES + _NEW_EXERCISES, key=lambda e: _NOTEBOOK_ORDER.index(e.name))  # noqa: F811
