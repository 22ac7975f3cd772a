"""Old import path: notebook execution is :mod:`kdcourse.tools.notebooks` now."""
import sys

from .tools import notebooks as _notebooks

sys.modules[__name__] = _notebooks
