"""Input checks shared by the transformer losses (:mod:`.transformer`,
:mod:`.distilbert`): a float tensor of the documented rank, a student and a
teacher tensor of one shape, an attention mask of the right shape holding
0/1, and a projection that makes the student's width the teacher's."""
from __future__ import annotations

import torch

from . import _validate


def _tensor(name: str, x, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return _validate.batch(name, x)


def _pair(student_name: str, student, teacher_name: str, teacher, ndim: int, shape_doc: str,
          fix="") -> tuple[int, ...]:
    """Both float tensors of shape ``shape_doc`` (rank ``ndim``, a non-empty
    batch) and equal shapes; returns that shape. ``fix`` ends the error of
    unequal shapes (what to do about it): a string, or a function of the two
    shapes giving one."""
    _tensor(student_name, student, ndim, shape_doc)
    _tensor(teacher_name, teacher, ndim, shape_doc)
    if student.shape != teacher.shape:
        fix = fix(student.shape, teacher.shape) if callable(fix) else fix
        raise ValueError(f"{student_name} {tuple(student.shape)} and {teacher_name} {tuple(teacher.shape)} must "
                         f"have the same shape {shape_doc}{fix}")
    return tuple(student.shape)


def _mask(attention_mask, batch: int, seq: int, like: torch.Tensor) -> torch.Tensor:
    """(B, S) mask as ``like``'s float dtype; all ones when ``None``."""
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=like.dtype, device=like.device)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, seq):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have shape (B, S) = ({batch}, {seq}), got {got}; "
                         f"build it as input_ids != pad_id")
    m = attention_mask.to(like.dtype)
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("attention_mask must contain only 0/1 (or False/True)")
    if not bool((m.sum(1) > 0).all()):
        raise ValueError("attention_mask has a sequence with no real token; every row needs at least one 1")
    return m


def _project(x: torch.Tensor, projection, target_width: int, what: str) -> torch.Tensor:
    if projection is not None:
        x = projection(x)
    if x.shape[-1] != target_width:
        raise ValueError(
            f"{what}: student width {x.shape[-1]} != teacher width {target_width}; pass a learned "
            f"projection, e.g. projection=nn.Linear({x.shape[-1] if projection is None else '...'}, {target_width})"
        )
    return x

