"""Intermediate features by forward hooks on named modules (no model edits).

    with FeatureExtractor(model, ["layer2", "layer3", "fc:input"]) as fx:
        logits = model(x)
    fx.features            # {"layer2": (B, C, H, W), "layer3": ..., "fc:input": (B, D)}

    logits, features = extract(model, x, ["layer2", "layer3"])   # one shot

A *name* is a module name as listed by ``model.named_modules()`` (``"layer2"``,
``"layer2.0.conv1"``, ...). By default the module's **output** is captured
(``register_forward_hook``); a name ending in ``":input"`` captures the first
positional **input** instead (``register_forward_pre_hook``) — e.g.
``"fc:input"`` is the pooled embedding a classifier head receives, which no
module outputs when the pooling is a function call.

Hooks are removed when the ``with`` block ends, also when it ends with an
exception, so the model is left exactly as it was. The captured tensors keep
their autograd graph (the student's features must pass gradients back);
pass ``detach=True`` for a frozen teacher.

One trap is checked: a module followed by an in-place operation (e.g.
``nn.ReLU(inplace=True)`` applied to a conv's output) overwrites the tensor
the hook stored. The extractor records each tensor's version counter and
raises if it changed by the time you read the features; ``clone=True``
stores copies instead.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Sequence

import torch
import torch.nn as nn

INPUT_SUFFIX = ":input"


def module_names(model: nn.Module, leaf_only: bool = False) -> list[str]:
    """Names that :class:`FeatureExtractor` accepts (without ``":input"``).

    ``leaf_only`` keeps modules without children (convolutions, ReLUs, ...).
    """
    return [n for n, m in model.named_modules() if n and (not leaf_only or not any(True for _ in m.children()))]


def _first_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]  # e.g. (hidden_states, attentions) from a transformer block
    raise TypeError(f"module {name!r} produced {type(value).__name__}, not a tensor; hook a module that returns one")


class FeatureExtractor:
    """Context manager capturing the outputs (or inputs) of named modules.

    Args:
        model: any ``nn.Module``; it is not modified (hooks only, removed on exit).
        names: module names from ``model.named_modules()``; append
            ``":input"`` to capture a module's first input instead of its output.
        detach: store ``tensor.detach()`` (for a teacher: no graph kept).
        clone: store ``tensor.clone()`` (safe against later in-place ops).

    Attributes:
        features: ``dict`` name -> tensor, filled by every forward pass inside
            the block (a later pass overwrites an earlier one).
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | str, detach: bool = False, clone: bool = False):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(names, str):
            names = [names]
        names = list(names)
        if not names:
            raise ValueError("names is empty: pass at least one module name, e.g. ['layer2']")
        if len(set(names)) != len(names):
            raise ValueError(f"names contains duplicates: {names}")
        modules = dict(model.named_modules())
        for name in names:
            base = name[: -len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name
            if base not in modules or base == "":
                close = difflib.get_close_matches(base, [n for n in modules if n], n=3)
                hint = f"; did you mean {close}?" if close else ""
                raise ValueError(
                    f"names: {base!r} is not a module of {type(model).__name__}{hint} "
                    f"(list them with kdcourse.features.module_names(model))"
                )
        self.model, self.names, self.detach, self.clone = model, names, detach, clone
        self._modules = modules
        self.features: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}
        self._handles: list = []

    # -- hooks ---------------------------------------------------------------
    def _store(self, name: str, value) -> None:
        t = _first_tensor(value, name)
        if self.detach:
            t = t.detach()
        if self.clone:
            t = t.clone()
        self.features[name] = t
        self._versions[name] = t._version

    def _make_hook(self, name: str):
        # A factory gives each hook its own ``name`` (a lambda in a loop would
        # see only the loop variable's last value).
        if name.endswith(INPUT_SUFFIX):
            def pre_hook(module, inputs):
                self._store(name, inputs)
            return pre_hook

        def hook(module, inputs, output):
            self._store(name, output)
        return hook

    def attach(self) -> "FeatureExtractor":
        if self._handles:
            raise RuntimeError("hooks are already attached; use the extractor in one `with` block at a time")
        for name in self.names:
            if name.endswith(INPUT_SUFFIX):
                module = self._modules[name[: -len(INPUT_SUFFIX)]]
                self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
            else:
                self._handles.append(self._modules[name].register_forward_hook(self._make_hook(name)))
        return self

    def remove(self) -> None:
        """Remove every hook this extractor registered (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "FeatureExtractor":
        self.features = {}
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- reading -------------------------------------------------------------
    def collect(self) -> dict[str, torch.Tensor]:
        """The captured features, checked: every name present and no tensor
        modified in place after it was captured."""
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise RuntimeError(f"no forward pass reached {missing}; run the model inside the `with` block")
        for name in self.names:
            if self.features[name]._version != self._versions[name]:
                raise RuntimeError(
                    f"the captured output of {name!r} was modified in place after the hook ran "
                    f"(an in-place op such as ReLU(inplace=True) follows it); use clone=True or hook a later module"
                )
        return dict(self.features)

    def __call__(self, x, *args, **kwargs):
        """``(model output, features)`` for one forward pass, hooks attached
        only for its duration."""
        with self:
            out = self.model(x, *args, **kwargs)
            feats = self.collect()
        return out, feats


def extract(model: nn.Module, x: torch.Tensor, names: Iterable[str] | str, detach: bool = False,
            clone: bool = False):
    """One forward pass: ``(model(x), {name: tensor})``; no hook survives it."""
    return FeatureExtractor(model, list([names] if isinstance(names, str) else names), detach, clone)(x)


def hook_count(model: nn.Module) -> int:
    """Number of forward (pre-)hooks registered on ``model`` and its submodules
    (0 for a clean model; used to prove an extractor cleaned up)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
