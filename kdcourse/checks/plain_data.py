"""Plain data: what a grading kernel may send the grader, and how two
such values are compared (re-exported by :mod:`kdcourse.checks.contract`,
whose docstring defines the format).

    plain(torch.ones(2))        # {"__tensor__": "float64", "shape": [2], "values": [1.0, 1.0]}
    validate(data)              # data from an untrusted process, or PlainDataError
    compare(student, reference, rtol, atol)   # None, or where they differ
"""
from __future__ import annotations

import math

import torch

MAX_DEPTH = 24
MAX_NUMBERS = 2_000_000
MAX_STRING = 2_000
MAX_KEYS = 10_000
TENSOR_KEY = "__tensor__"


class PlainDataError(ValueError):
    """A value that is not plain data (or exceeds the size caps)."""



# --------------------------------------------------------------------------
# Plain data
# --------------------------------------------------------------------------

def plain(x, _depth: int = 0):
    """``x`` as plain data: tensors become ``{"__tensor__": dtype, "shape",
    "values"}`` (values flattened, float64/int64/bool), tuples become lists,
    numbers and strings stay. Anything else raises :class:`PlainDataError`."""
    if _depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels")
    if x is None or type(x) in (bool, int, str):
        return x
    if type(x) is float:
        return x
    if isinstance(x, torch.Tensor):
        if type(x) not in (torch.Tensor, torch.nn.Parameter):
            raise PlainDataError(f"a {type(x).__name__} (a tensor subclass) is not plain data; return a torch.Tensor")
        t = x.detach().cpu()
        if t.is_complex() or t.is_quantized or t.layout != torch.strided:
            raise PlainDataError(f"a {t.dtype} tensor is not plain data")
        kind = "bool" if t.dtype == torch.bool else "float64" if t.is_floating_point() else "int64"
        conv = {"bool": torch.bool, "float64": torch.float64, "int64": torch.int64}[kind]
        return {TENSOR_KEY: kind, "shape": list(t.shape), "values": t.to(conv).reshape(-1).tolist()}
    if isinstance(x, (list, tuple)) and type(x) in (list, tuple):
        return [plain(v, _depth + 1) for v in x]
    if type(x) is dict:
        out = {}
        for k, v in x.items():
            if type(k) is not str:
                raise PlainDataError(f"dict keys must be strings, got {type(k).__name__}")
            out[k] = plain(v, _depth + 1)
        return out
    if hasattr(x, "item") and type(x).__module__ == "numpy":
        return plain(x.item(), _depth)
    raise PlainDataError(f"a {type(x).__name__} is not plain data (tensors, numbers, strings, lists, dicts)")


def validate(data, _depth: int = 0, _count: list | None = None):
    """Check data received from an untrusted process; returns it unchanged or
    raises :class:`PlainDataError`."""
    count = _count if _count is not None else [0]
    if _depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels")
    count[0] += 1
    if count[0] > MAX_NUMBERS:
        raise PlainDataError(f"more than {MAX_NUMBERS:,} values")
    if data is None or type(data) in (bool, int, float):
        if type(data) is int and abs(data) > 2 ** 63:
            raise PlainDataError("an integer beyond 64 bits")
        return data
    if type(data) is str:
        if len(data) > MAX_STRING:
            raise PlainDataError(f"a string of {len(data)} characters (cap {MAX_STRING})")
        return data
    if type(data) is list:
        for v in data:
            validate(v, _depth + 1, count)
        return data
    if type(data) is dict:
        if len(data) > MAX_KEYS:
            raise PlainDataError(f"a dict of {len(data)} keys (cap {MAX_KEYS})")
        for k, v in data.items():
            if type(k) is not str or len(k) > MAX_STRING:
                raise PlainDataError("dict keys must be short strings")
            validate(v, _depth + 1, count)
        if TENSOR_KEY in data:
            _validate_tensor(data, count)
        return data
    raise PlainDataError(f"a {type(data).__name__} is not plain data")


def _validate_tensor(d: dict, count: list) -> None:
    kind, shape, values = d.get(TENSOR_KEY), d.get("shape"), d.get("values")
    if set(d) != {TENSOR_KEY, "shape", "values"} or kind not in ("bool", "float64", "int64"):
        raise PlainDataError("a malformed tensor record")
    if type(shape) is not list or not all(type(n) is int and 0 <= n for n in shape) or len(shape) > 16:
        raise PlainDataError("a tensor record with a malformed shape")
    if type(values) is not list or len(values) != math.prod(shape):
        raise PlainDataError("a tensor record whose values do not fill its shape")
    want = {"bool": (bool,), "int64": (int,), "float64": (float, int)}[kind]
    if not all(type(v) in want for v in values):
        raise PlainDataError(f"a {kind} tensor record with values of another type")
    count[0] += len(values)


def is_tensor(d) -> bool:
    return type(d) is dict and TENSOR_KEY in d


def as_tensor(d) -> torch.Tensor:
    """A tensor record back as a tensor (in the grader's process)."""
    dtype = {"bool": torch.bool, "int64": torch.int64, "float64": torch.float64}[d[TENSOR_KEY]]
    return torch.tensor(d["values"], dtype=dtype).reshape(d["shape"])


# --------------------------------------------------------------------------
# Comparing plain data, and naming the mistake
# --------------------------------------------------------------------------

def _fmt(x) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."


def compare(a, b, rtol: float = 1e-6, atol: float = 1e-9, path: str = "") -> str | None:
    """``None`` when plain data ``a`` (the student's) agree with ``b``
    (numbers within ``atol + rtol*|b|``, NaN only with NaN, everything else
    equal); otherwise where and how they differ."""
    where = path or "the result"
    if is_tensor(a) or is_tensor(b):
        if not (is_tensor(a) and is_tensor(b)):
            return f"{where}: got {_kind(a)}, expected a tensor"
        if a["shape"] != b["shape"]:
            return f"{where}: shape {tuple(a['shape'])}, expected {tuple(b['shape'])}"
        if (a[TENSOR_KEY] == "bool") != (b[TENSOR_KEY] == "bool"):
            return f"{where}: dtype {a[TENSOR_KEY]}, expected {b[TENSOR_KEY]}"
        ta, tb = as_tensor(a).double(), as_tensor(b).double()
        if torch.allclose(ta, tb, rtol=rtol, atol=atol, equal_nan=True):
            return None
        bad = ~torch.isclose(ta, tb, rtol=rtol, atol=atol, equal_nan=True)
        i = int(bad.reshape(-1).nonzero()[0])
        finite = torch.isfinite(ta) & torch.isfinite(tb)
        worst = float((ta - tb)[finite].abs().max()) if bool(finite.any()) else float("nan")
        return (f"{where}: element {i} is {ta.reshape(-1)[i].item():.6g}, expected {tb.reshape(-1)[i].item():.6g} "
                f"({int(bad.sum())} of {bad.numel()} elements differ; largest finite difference {worst:.3g})")
    if type(b) is bool or type(a) is bool:
        return None if a is b else f"{where}: got {_fmt(a)}, expected {_fmt(b)}"
    if type(b) in (int, float) and type(a) in (int, float):
        if math.isnan(b) or math.isnan(a):
            return None if (math.isnan(a) and math.isnan(b)) else f"{where}: got {a!r}, expected {b!r}"
        if math.isinf(a) or math.isinf(b):
            return None if a == b else f"{where}: got {a!r}, expected {b!r}"
        return None if abs(a - b) <= atol + rtol * abs(b) else f"{where}: got {a:.6g}, expected {b:.6g}"
    if type(a) is dict and "raised" in a and not (type(b) is dict and "raised" in b):
        return f"{where}: raised {_fmt(a['raised'])} where the reference returns a result"
    if type(b) is dict and "raised" in b and not (type(a) is dict and "raised" in a):
        return f"{where}: returned a result where the reference raises {_fmt(b['raised'])}"
    if type(a) is not type(b):
        return f"{where}: got {_kind(a)}, expected {_kind(b)}"
    if type(b) is list:
        if len(a) != len(b):
            return f"{where}: {len(a)} items, expected {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = compare(x, y, rtol, atol, f"{path}[{i}]")
            if d:
                return d
        return None
    if type(b) is dict:
        if set(a) != set(b):
            return f"{where}: keys {sorted(a)}, expected {sorted(b)}"
        for k in b:
            d = compare(a[k], b[k], rtol, atol, f"{path}[{k!r}]")
            if d:
                return d
        return None
    return None if a == b else f"{where}: got {_fmt(a)}, expected {_fmt(b)}"


def _kind(x) -> str:
    if is_tensor(x):
        return f"a tensor of shape {tuple(x['shape'])}"
    return {dict: "a dict", list: "a list", str: "a string", type(None): "None"}.get(type(x), type(x).__name__)
