"""While a probe runs a student's exercise, the course's checks are not the
student's to call (used by :mod:`kdcourse.grading.runner`).

``kdcourse.checks`` holds code that computes right answers: the probes'
private copies of earlier exercises (Lab 2's ``_extract``, ``_probe_hint``),
the factories of the known-wrong variants (Lab 4's ``_born_again_with()``
with its defaults *is* a correct ``born_again``), the variants' private
formulas. The probes need some of it in the grading kernel, so it cannot be
refused like the package's reference answers. Instead, while a probe runs,
a profile function (:func:`sys.setprofile`, also for threads started
meanwhile) sees every Python call, and a call into a *helper* — the code of
any module-level function of a ``kdcourse.checks`` module, or code nested
in one (closures, lambdas, classes built inside it), except code nested in
the exercise's declared probe — is a **delegation** unless it is the
probe's own:

* walking up from the helper's frame through library frames (code running
  in an installed module's own namespace: torch, the package outside
  ``checks``), the first other frame is checks code that is itself allowed
  (ultimately the probe, started by :func:`Guard.run`);
* or the helper was handed to the student by the probe: a function passed
  as an argument to the student's function, or bound in the notebook's
  namespace by the probe while it runs (Lab 2's probe of the FitNets class
  gives it correct ``hint_loss`` and ``extract_features``).

The student's function is called through a wrapper of this module, so an
exercise that *is* a helper (``born_again = lab4._born_again_with()``,
``functools.partial(helper)``, a decorated helper) is caught too; a class
exercise that inherits from, or holds, checks code is caught before the
probe. Turning the profile function off (``sys.setprofile``) is a
delegation as well. The probe's reply then says ``"delegated"``, and the
grader scores the exercise 0 with a note when its answers would otherwise
pass (delegating to a known-wrong variant only gets that variant's hint:
the release tests plant variants this way).

What this does not stop: the grading kernel belongs to the submission, so
code determined to defeat the grader can still reach the guard's own state
(``gc``), the interpreter (``ctypes``), or run code in a library module's
namespace; and copying the package's source into the notebook is writing
it, which no grader can tell from writing it oneself. It makes delegating
a deliberate attack on the grader instead of a one-line import.
"""
from __future__ import annotations

import functools
import sys
import threading
import types

_MISSING = object()


def _nested(code: types.CodeType, out: set) -> None:
    stack = [code]
    while stack:
        c = stack.pop()
        if c in out:
            continue
        out.add(c)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))


def checks_modules() -> dict:
    """The ``kdcourse.checks`` modules imported so far."""
    return {n: m for n, m in list(sys.modules.items())
            if isinstance(m, types.ModuleType) and (n == "kdcourse.checks" or n.startswith("kdcourse.checks."))}


def _unwrap(obj, depth: int = 0):
    """Functions an object stands for: itself, a method's function, a
    partial's, a decorator's ``__wrapped__``, functions in its closure and
    defaults."""
    if depth > 4:
        return
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        for f in (obj.fget, obj.fset, obj.fdel):
            if f is not None:
                yield from _unwrap(f, depth + 1)
        return
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    if isinstance(obj, functools.partial):
        yield from _unwrap(obj.func, depth + 1)
        return
    if isinstance(obj, types.FunctionType):
        yield obj
        for cell in obj.__closure__ or ():
            try:
                yield from _unwrap(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                pass
        for d in (obj.__defaults__ or ()) + tuple((obj.__kwdefaults__ or {}).values()):
            if callable(d):
                yield from _unwrap(d, depth + 1)
    wrapped = getattr(obj, "__wrapped__", None) if not isinstance(obj, type) else None
    if wrapped is not None and wrapped is not obj:
        yield from _unwrap(wrapped, depth + 1)


class Guard:
    """Made in the kernel before any student code runs (it notes the checks'
    code then); :meth:`run` runs one probe under the profile function."""

    def __init__(self, user_ns: dict, exercises=()):
        self.user_ns = user_ns
        self.probes = [e.probe for e in exercises if isinstance(getattr(e, "probe", None), types.FunctionType)]
        self.helpers: set = set()  # code of module-level checks functions and code nested in them
        self.checks: set = set()  # all code of the checks modules (methods of their classes too)
        self.dicts: set = set()
        self.classes: set = set()
        self._seen: set = set()
        self.violation = ""
        self.refresh()

    def refresh(self) -> None:
        """Note the code of checks modules imported since (by a probe or by
        the notebook: the modules noted first are not re-read, so a notebook
        that rebinds a module's names does not shrink what is noted)."""
        for name, m in checks_modules().items():
            if name in self._seen or not getattr(m, "__file__", None):
                continue
            self._seen.add(name)
            self.dicts.add(id(vars(m)))
            for v in list(vars(m).values()):
                f = getattr(v, "__func__", v)
                if isinstance(f, types.FunctionType) and f.__module__ == name:
                    _nested(f.__code__, self.helpers)
                elif isinstance(v, type) and v.__module__ == name:
                    self.classes.add(v)
                    for attr in vars(v).values():
                        for g in _unwrap(attr):
                            if g.__module__ == name:
                                _nested(g.__code__, self.checks)
        self.checks |= self.helpers
        for probe in self.probes:  # what a probe builds for the student's function (lambdas, classes) is the probe's
            inner: set = set()
            _nested(probe.__code__, inner)
            inner.discard(probe.__code__)
            self.helpers -= inner

    # ------------------------------------------------------------------
    def _kind(self, frame) -> str:
        code = frame.f_code
        if code is _DRIVER:
            return "driver"
        if code is _ENTRY:
            return "entry"
        if code in self.checks:
            return "checks"
        if id(frame.f_globals) in self.dicts:  # code written into a checks module's namespace is not the checks'
            return "student"
        name = frame.f_globals.get("__name__")
        mod = sys.modules.get(name) if isinstance(name, str) else None
        if mod is not None and name != "__main__" and getattr(mod, "__dict__", None) is frame.f_globals \
                and getattr(mod, "__file__", None):
            return "lib"
        return "student"

    def _allowed(self, frame) -> bool:
        key = id(frame)
        hit = self._memo.get(key)
        if hit is not None and hit[0] is frame:
            return hit[1]
        ok = self._walk(frame.f_back) or self._injected(frame.f_code)
        self._memo[key] = (frame, ok)
        return ok

    def _walk(self, g) -> bool:
        while g is not None:
            kind = self._kind(g)
            if kind == "driver":
                return True
            if kind == "checks":
                return self._allowed(g) if g.f_code in self.helpers else True
            if kind != "lib":
                return False
            g = g.f_back
        return False

    def _injected(self, code) -> bool:
        if code in self._given:
            return True
        for name, v in list(self.user_ns.items()):
            if v is not self._before.get(name, _MISSING) and any(f.__code__ is code for f in _unwrap(v)):
                return True
        return False

    def _profile(self, frame, event, arg):
        if event == "call":
            code = frame.f_code
            hit = self._cache.get(id(code))
            if hit is None or hit[0] is not code:
                hit = (code, code in self.helpers)
                self._cache[id(code)] = hit
            if hit[1] and not self._allowed(frame):
                self._flag(code)
        elif event in ("c_call", "c_return") and arg is sys.setprofile and frame.f_code is not _RUN:
            self._flag(None)

    def _flag(self, code) -> None:
        if not self.violations:
            self.violations.append("sys.setprofile (the grader's guard)" if code is None else
                                   f"{code.co_filename.rsplit('/kdcourse/', 1)[-1]}: {code.co_qualname}")

    def _static(self, fn) -> None:
        """A class exercise built on checks code: an ancestor from a checks
        module, or checks code among its attributes."""
        if not isinstance(fn, type):
            return
        for cls in fn.__mro__:
            if cls in self.classes or (cls.__module__ or "").startswith("kdcourse.checks"):
                self._flag_text(f"{cls.__module__}.{cls.__qualname__} (a class of the course's checks)")
                return
            for attr in list(vars(cls).values()):
                for f in _unwrap(attr):
                    if f.__code__ in self.checks:
                        self._flag(f.__code__)
                        return

    def _flag_text(self, text: str) -> None:
        if not self.violations:
            self.violations.append(text)

    def run(self, run_probe, exercise, fn, seed):
        """``run_probe(exercise, <fn, guarded>, seed)``; afterwards
        :attr:`violation` names the helper the student's code called ("" if none)."""
        self.refresh()
        self.violations, self._memo, self._cache = [], {}, {}
        self._before, self._given = dict(self.user_ns), set()
        self._static(fn)
        target = fn if isinstance(fn, type) or not callable(fn) else _entry(fn, self)
        old_thread = threading.getprofile() if hasattr(threading, "getprofile") else None
        hook = self._profile
        threading.setprofile(hook)
        sys.setprofile(hook)
        try:
            return _drive(run_probe, exercise, target, seed)
        finally:
            still = sys.getprofile() is hook
            sys.setprofile(None)
            threading.setprofile(old_thread)
            if not still:
                self._flag(None)
            self._memo, self._cache, self._before = {}, {}, {}
            self.violation = self.violations[0] if self.violations else ""


def _entry(fn, guard: Guard):
    def entry(*args, **kwargs):
        for a in list(args) + list(kwargs.values()):  # what the probe hands the student's function is the probe's
            for f in _unwrap(a):
                guard._given.add(f.__code__)
        return fn(*args, **kwargs)
    if fn is not None:
        try:
            functools.update_wrapper(entry, fn)
        except Exception:  # a callable without the usual attributes
            pass
    return entry


def _drive(run_probe, exercise, fn, seed):
    return run_probe(exercise, fn, seed)


_ENTRY = _entry(None, None).__code__
_DRIVER = _drive.__code__
_RUN = Guard.run.__code__
