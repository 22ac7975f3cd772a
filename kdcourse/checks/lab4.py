"""Lab 4 checks: the born-again loop (here), and the declarations of every Lab 4 exercise.

The other checks live in ``lab4_exits`` (deep supervision, a temperature per
generation), ``lab4_mutual`` (DML) and ``lab4_ensemble`` (the ensemble, the
MDD); their names are re-exported here.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .. import models
from ..data import Split
from ..losses import mutual
from ..train import Distill, Objective, fit
from . import CheckFailed, contract


# --------------------------------------------------------------------------
# The born-again loop
# --------------------------------------------------------------------------

class _Recorder:
    """``new_model`` and ``train`` for the check: tiny networks, tiny data,
    every call recorded."""

    def __init__(self):
        g = contract.generator(7)
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


# The other exercises (deep supervision, a temperature per generation, DML's
# loss and its update in turn, the ensemble, the MDD) live in their own
# modules; their names are re-exported here, where the lab and the tests
# import them.
from ..recipes import lab4 as _recipe  # noqa: E402  (the reference answers)
from ..recipes.lab4 import born_again as _born_again_reference  # noqa: E402  (the reference answer)
from .lab4_common import HIDDEN_SEEDS, INPLACE_HINT, _compare_faults, _decide  # noqa: E402,F401
from .lab4_exits import (DS_LOSS_VARIANTS, TUNED_VARIANTS, _ds_case, check_born_again_tuned,  # noqa: E402,F401
                         check_deep_supervision_loss, probe_born_again_tuned, probe_deep_supervision_loss)
from .lab4_ensemble import (ENSEMBLE_VARIANTS, MDD_VARIANTS, PAIRED_VARIANTS, check_ensemble_logits,  # noqa: E402,F401
                            check_mdd, check_paired_t, probe_ensemble_logits, probe_mdd, probe_paired_t)
from .lab4_ensemble import EXERCISES as _ENSEMBLE_EXERCISES  # noqa: E402
from .lab4_mutual import (MUTUAL_GRAD_VARIANTS, MUTUAL_LOSS_VARIANTS, TURN_VARIANTS,  # noqa: E402,F401
                          check_mutual_loss, check_mutual_step_in_turn, probe_mutual_loss, probe_mutual_step_in_turn)

EXERCISES = [
    contract.Exercise(name="born_again", points=1.0, check=check_born_again, probe=probe_born_again,
                      reference=_born_again_reference, variants=BORN_AGAIN_VARIANTS, hidden_seeds=(0, 1, 2),
                      rtol=1e-5, atol=1e-6, timeout=120.0),
    contract.Exercise(name="mutual_loss", points=1.0, check=check_mutual_loss, probe=probe_mutual_loss,
                      reference=mutual.mutual_learning_loss,
                      variants={**MUTUAL_LOSS_VARIANTS, **MUTUAL_GRAD_VARIANTS}, hidden_seeds=tuple(range(6)),
                      rtol=1e-6, atol=1e-9),
]

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

_NOTEBOOK_ORDER = ("mdd", "born_again", "born_again_tuned", "paired_t", "ensemble_logits", "deep_supervision_loss", "mutual_loss",
                   "mutual_step_in_turn")
EXERCISES = sorted(EXERCISES + _NEW_EXERCISES + _ENSEMBLE_EXERCISES, key=lambda e: _NOTEBOOK_ORDER.index(e.name))  # noqa: F811
