"""Lab 2, Exercise 1: the hook-based feature extractor — its check, known-wrong variants and probe."""
from __future__ import annotations

from typing import Callable
import torch
import torch.nn as nn
from ..contract import draw_int
from ... import features as fx
from ...models import ResNet, SmallCNN
from .. import CheckFailed, contract


# --------------------------------------------------------------------------
# Exercise 1: features by forward hooks
# --------------------------------------------------------------------------

class _Boom(nn.Module):
    """A model whose forward fails after its first stage ran (hooks fired)."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        self.layer2(self.layer1(x))
        raise RuntimeError("forward failed on purpose (the check tests clean-up)")


def check_feature_extractor(fn: Callable) -> bool:
    """``fn(model, x, names)`` must return ``(model(x), {name: output of the
    module called name})`` using forward hooks, and leave no hook behind."""
    torch.manual_seed(0)
    models_ = [("SmallCNN", SmallCNN((4, 8, 16)).eval()), ("ResNet-8", ResNet(8, 4).eval())]
    x = torch.randn(3, 3, 32, 32, generator=contract.generator(1))
    for label, model in models_:
        names = ["layer1", "layer2", "layer3"]
        with torch.no_grad():
            ref_logits, ref = model(x, return_features=True)
        try:
            out = fn(model, x, names)
        except NotImplementedError:
            raise
        except Exception as exc:
            raise CheckFailed(f"extract_features raised {type(exc).__name__}: {exc} (on {label}, names={names})") from exc
        if fx.hook_count(model):
            raise CheckFailed("hooks are left on the model after the call: keep the handles that "
                              "register_forward_hook returns and call handle.remove() on each (in a `finally:` block)")
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise CheckFailed("extract_features must return a pair (model output, dict name -> tensor)")
        logits, feats = out
        if not torch.allclose(logits, ref_logits, atol=1e-6):
            raise CheckFailed("the first element must be the model's output model(x) (the logits)")
        if sorted(feats) != sorted(names):
            raise CheckFailed(f"the dict must have exactly the requested names as keys: got {sorted(feats)}, expected {names}")
        last = feats.get(names[-1])
        if isinstance(last, torch.Tensor) and all(isinstance(feats[n], torch.Tensor) and feats[n].shape == last.shape
                                                  and torch.equal(feats[n], last) for n in names[:-1]):
            raise CheckFailed("every name holds the same tensor: the hooks share one variable. A function defined in "
                              "a loop sees the loop variable's *last* value — build each hook in a helper function "
                              "that takes the name as an argument (or bind it: lambda m, i, o, name=name: ...)")
        for n in names:
            f = feats[n]
            if not isinstance(f, torch.Tensor):
                raise CheckFailed(f"features[{n!r}] must be a tensor, got {type(f).__name__}")
            if f.shape != ref[n].shape:
                raise CheckFailed(f"features[{n!r}] has shape {tuple(f.shape)}, expected {tuple(ref[n].shape)} — "
                                  f"a forward hook is called as hook(module, inputs, output): store `output`, not the inputs")
            if not torch.allclose(f, ref[n], atol=1e-6):
                raise CheckFailed(f"features[{n!r}] differs from the module's output (max difference "
                                  f"{(f - ref[n]).abs().max():.3g}); store the hook's `output` argument")
    # dotted names reach nested modules
    model = ResNet(8, 4).eval()
    with torch.no_grad():
        ref = fx.extract(model, x, ["layer2.0.conv1"])[1]["layer2.0.conv1"]
        try:
            got = fn(model, x, ["layer2.0.conv1"])[1]["layer2.0.conv1"]
        except (AttributeError, KeyError) as exc:
            raise CheckFailed("nested names such as 'layer2.0.conv1' must work: look modules up in "
                              "dict(model.named_modules()) instead of getattr(model, name)") from exc
    if not torch.allclose(got, ref, atol=1e-6):
        raise CheckFailed("features['layer2.0.conv1'] differs from that module's output")
    # gradients must flow through the student's features
    model = SmallCNN((4, 8, 16)).train()
    _, feats = fn(model, x, ["layer2"])
    if fx.hook_count(model):
        raise CheckFailed("hooks are left on the model after the call: remove every handle")
    if not feats["layer2"].requires_grad:
        raise CheckFailed("the features carry no gradient: do not detach them (or run under torch.no_grad) — "
                          "a feature loss must train the student's layers through them")
    # hooks removed even when the forward pass fails
    boom = _Boom()
    try:
        fn(boom, x, ["layer1"])
    except NotImplementedError:
        raise
    except Exception:
        pass
    if fx.hook_count(boom):
        raise CheckFailed("after a forward pass that raised, the hooks were still registered: remove them in a "
                          "`finally:` block (or use a context manager) so an error cannot leave them behind")
    print("✓ extract_features returns the outputs of the named modules (ResNet, SmallCNN, nested names), "
          "keeps gradients and removes its hooks, also after an error")
    return True

# --------------------------------------------------------------------------
# Declarations (kdcourse.checks.contract): what the grader probes
# --------------------------------------------------------------------------

def _extract_hooks_left(model, x, names):
    modules, feats = dict(model.named_modules()), {}
    for n in names:
        modules[n].register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o))
    return model(x), feats


def _extract_with(store=lambda i, o: o, bind_late=False, lookup=None, cleanup="finally"):
    def extract(model, x, names):
        modules, feats, handles = dict(model.named_modules()), {}, []
        get = (lambda n: lookup(model, n)) if lookup else modules.__getitem__
        if cleanup == "finally":
            try:
                for n in names:
                    hook = (lambda m, i, o: feats.__setitem__(n, store(i, o))) if bind_late else \
                        (lambda m, i, o, n=n: feats.__setitem__(n, store(i, o)))
                    handles.append(get(n).register_forward_hook(hook))
                out = model(x)
            finally:
                for h in handles:
                    h.remove()
            if bind_late:  # every hook wrote under the last name: all names hold the last output
                feats = {n: feats[names[-1]] for n in names}
            return out, feats
        for n in names:
            handles.append(get(n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, store(i, o))))
        out = model(x)
        for h in handles:
            h.remove()
        return out, feats
    return extract


EXTRACT_VARIANTS = {
    "hooks_left": (_extract_hooks_left,
                   "hooks are left on the model after the call: keep the handles that register_forward_hook returns "
                   "and call handle.remove() on each (in a `finally:` block)"),
    "late_binding": (_extract_with(bind_late=True),
                     "every name holds the same tensor: the hooks share one variable. A function defined in a loop "
                     "sees the loop variable's *last* value — build each hook in a helper function that takes the "
                     "name as an argument (or bind it: lambda m, i, o, name=name: ...)"),
    "inputs": (_extract_with(store=lambda i, o: i[0]),
               "the features are the modules' *inputs*: a forward hook is called as hook(module, inputs, output); "
               "store `output`"),
    "getattr": (_extract_with(lookup=getattr),
                "nested names such as 'layer2.0.conv1' must work: look modules up in dict(model.named_modules()) "
                "instead of getattr(model, name)"),
    "detached": (_extract_with(store=lambda i, o: o.detach()),
                 "the features carry no gradient: do not detach them (or run under torch.no_grad) — a feature loss "
                 "must train the student's layers through them"),
    "no_finally": (_extract_with(cleanup="after"),
                   "after a forward pass that raised, the hooks were still registered: remove them in a `finally:` "
                   "block (or use a context manager) so an error cannot leave them behind"),
}

_NESTED = {"ResNet": ["layer2.0.conv1", "layer1.0", "layer3.0.bn2"], "SmallCNN": []}


def probe_extract_features(fn: Callable, seed: int) -> dict:
    """A seeded SmallCNN or ResNet-8, 1-3 images, a random choice and order
    of stage names (nested names on the ResNet): the logits, each feature,
    the gradient of the features w.r.t. the input, hooks left behind, and
    hooks left after a forward pass that raises."""
    g = contract.generator(seed)
    torch.manual_seed(seed)
    model = (ResNet(8, 4) if seed % 2 else SmallCNN((4, 8, 16))).double().eval()
    kind = type(model).__name__
    pool = ["layer1", "layer2", "layer3"] + _NESTED.get(kind, [])
    k = 1 + draw_int(g, 0, len(pool))
    names = [pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()]
    x = torch.randn(1 + seed % 3, 3, 16, 16, generator=g, dtype=torch.float64).requires_grad_(True)
    out, raised = contract.attempt(fn, model, x, names)
    data = {"hooks_left": fx.hook_count(model)}
    if raised:
        data["call"] = raised
    else:
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict)):
            raise contract.PlainDataError("extract_features must return a pair (model output, dict name -> tensor)")
        logits, feats = out
        data["logits"] = contract.plain(logits)
        data["features"] = {str(n): contract.plain(v) for n, v in feats.items()}
        wanted = [v for n, v in sorted(feats.items()) if isinstance(v, torch.Tensor)]
        if wanted and all(v.requires_grad for v in wanted):
            total = sum((v * torch.randn(v.shape, generator=contract.generator(seed + i), dtype=v.dtype)).sum()
                        for i, v in enumerate(wanted))
            data["grad_input"] = contract.plain(torch.autograd.grad(total, x, allow_unused=True)[0]
                                                if total.requires_grad else None)
        else:
            data["grad_input"] = "no graph"
    boom = _Boom()
    contract.attempt(fn, boom, x.detach().float(), ["layer1"])
    data["hooks_left_after_error"] = fx.hook_count(boom)
    return data
