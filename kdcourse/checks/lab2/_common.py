"""Shared by Lab 2's checks: seeded inputs, inputs left alone, gradients compared with the
reference's, and the probes' plain-data helpers."""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Callable, Sequence
import torch
import torch.nn as nn

from .. import CheckFailed, contract


def _randn(*shape, seed: int, relu: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=contract.generator(seed), dtype=torch.float64)
    return x.clamp_min(0) if relu else x


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------
# Shared by every Lab 2 check: inputs left alone, gradients like the reference's
# --------------------------------------------------------------------------

def _clone_args(args):
    return tuple(copy.deepcopy(a) if isinstance(a, nn.Module) else
                 (a.detach().clone() if isinstance(a, torch.Tensor) else a) for a in args)


def check_inputs_untouched(name: str, fn: Callable, args: tuple, arg_names: Sequence[str]) -> None:
    """Call ``fn(*args)`` on copies and raise if it changed an input tensor
    (or a module's weights) in place — named as such, not as a wrong value."""
    before = _clone_args(args)
    given = _clone_args(args)
    try:
        fn(*given)
    except NotImplementedError:
        raise
    except Exception as exc:
        raise CheckFailed(f"{name} raised {type(exc).__name__}: {exc} (inputs of shapes "
                          f"{[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]})") from exc
    for a0, a1, label in zip(before, given, arg_names):
        if isinstance(a0, torch.Tensor) and not torch.equal(a0, a1.detach()):
            raise CheckFailed(f"{name} changed its input `{label}` in place (largest change "
                              f"{float((a0 - a1.detach()).abs().max()):.3g}): an in-place operation (x.relu_(), "
                              f"x.pow_(2), x += ..., x[...] = ..., x.data = ...) overwrote the caller's tensor — the "
                              f"training loop and the other loss terms read it afterwards. Compute on new tensors "
                              f"(x.relu(), x.pow(2), x = x + ...).")
        if isinstance(a0, nn.Module):
            for (k, v0), v1 in zip(a0.state_dict().items(), a1.state_dict().values()):
                if not torch.equal(v0, v1):
                    raise CheckFailed(f"{name} changed `{label}.{k}` in place: a loss must not modify the "
                                      f"module's weights (only the optimiser does)")


def check_gradients(name: str, fn: Callable, reference: Callable, args: tuple, student: int = 0, teacher: int = 1,
                    rtol: float = 1e-5, atol: float = 1e-9, label: str = "") -> None:
    """The gradient of ``fn(*args)`` w.r.t. the student input (and any module
    argument's parameters) must equal the reference's; none may reach the
    teacher input. A loss that detaches the wrong side, or leaves autograd
    (``.item()``, ``.numpy()``, ``.data``), fails here even with the right value."""
    def run(f):
        a = list(_clone_args(args))
        a[student] = a[student].requires_grad_(True)
        a[teacher] = a[teacher].requires_grad_(True)
        return f(*a), a

    out, a = run(fn)
    ref, r = run(reference)
    where = f" (on {label})" if label else ""
    if not isinstance(out, torch.Tensor) or out.ndim != 0:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckFailed(f"{name} must return a scalar tensor (a 0-d loss), got {shape}{where}")
    if not out.requires_grad:
        raise CheckFailed(f"{name}'s result carries no gradient{where}: the student's side is detached, computed "
                          f"under torch.no_grad(), or rebuilt from numbers (.item(), .numpy(), torch.tensor(...)) — "
                          f"detach the teacher only")
    mods = [i for i, x in enumerate(a) if isinstance(x, nn.Module)]
    out.backward()
    ref.backward()
    t_grad = a[teacher].grad
    if t_grad is not None and float(t_grad.abs().max()) > 0:
        raise CheckFailed(f"{name} sends gradients into the teacher's features{where}: use teacher.detach() — the "
                          f"teacher is frozen; only the student (and a regressor) learn")
    s_grad, s_ref = a[student].grad, r[student].grad
    if s_grad is None or (float(s_grad.abs().max()) == 0 and float(s_ref.abs().max()) > 0):
        raise CheckFailed(f"no gradient reaches the student's features{where}: did you detach the student's side "
                          f"(or the wrong side)? Only the teacher is a constant.")
    if not torch.allclose(s_grad.double(), s_ref.double(), rtol=rtol, atol=atol):
        raise CheckFailed(f"{name} has the right value but the wrong gradient with respect to the student's "
                          f"features{where} (largest difference {float((s_grad - s_ref).abs().max()):.3g}): part of "
                          f"the student's computation is detached or done outside autograd (.detach(), .item(), "
                          f".data, a NumPy detour)")
    for i in mods:
        for (pname, p), q in zip(a[i].named_parameters(), r[i].parameters()):
            if q.grad is None:
                continue
            if p.grad is None or float(p.grad.abs().max()) == 0 and float(q.grad.abs().max()) > 0:
                raise CheckFailed(f"no gradient reaches the regressor ({pname}){where}: it must be applied to the "
                                  f"student's features inside the graph, so the optimiser can train it")
            if not torch.allclose(p.grad.double(), q.grad.double(), rtol=rtol, atol=atol):
                raise CheckFailed(f"{name}: the regressor's gradient ({pname}) differs from the reference's{where} "
                                  f"(largest difference {float((p.grad - q.grad).abs().max()):.3g})")


class _Counting(nn.Module):
    """A module (a probe's regressor) that counts how often it is called."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _loss_data(name, out, grads_of: dict, seed: int) -> dict:
    data = {"loss": contract.scalar(out, name)}
    items = list(grads_of.items())
    gs = contract.grad(out, [t for _, t in items], seed) if out.requires_grad else "no graph"
    data["grads"] = gs if isinstance(gs, str) else {k: g for (k, _), g in zip(items, gs)}
    return data


def _pair_probe(name: str, cases, seed: int, fn: Callable) -> dict:
    g = contract.generator(seed)
    make_s, make_t = cases[seed % len(cases)]
    s = make_s(g).requires_grad_(True)
    t = make_t(g).requires_grad_(True)
    out, raised = contract.attempt(fn, s, t)
    if raised:
        return raised
    return _loss_data(name, out, {"student": s, "teacher": t}, seed)


def _r(*shape, scale=1.0, relu=False, offset=0.0):
    def make(g):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset
        return x.clamp_min(0) if relu else x
    return make
