"""The one place that chooses the device, seeds the random generators and
sets the number of CPU threads.

A GPU is used when present (``KDCOURSE_DEVICE`` can force ``cpu``); nothing in
the course requires one.
"""
from __future__ import annotations

import contextlib
import os
import random
from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=None)
def device() -> torch.device:
    """CUDA when available (or ``$KDCOURSE_DEVICE``), else CPU. Chosen once."""
    forced = os.environ.get("KDCOURSE_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a fresh CPU generator for shuffling.

    Called explicitly at the start of every run (never on import), so one run
    with the same seed gives the same numbers on the same machine.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def device_of(model) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without
    parameters, or a plain callable)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def num_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``; restore the old value after."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
