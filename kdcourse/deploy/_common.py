"""What the deployment modules share: the default thread count, and how an
example input and a model are handled."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

DEFAULT_THREADS = 2


def _as_args(example) -> tuple:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _batch_size(args: tuple) -> int:
    for a in args:
        if isinstance(a, (torch.Tensor, np.ndarray)) and a.ndim > 0:
            return int(a.shape[0])
    return 1


def _eval(model) -> None:
    """Eval mode for an ``nn.Module``; modules captured by ``torch.export``
    refuse ``.eval()`` (they were captured in eval mode already)."""
    if isinstance(model, nn.Module):
        try:
            model.eval()
        except NotImplementedError:
            pass
