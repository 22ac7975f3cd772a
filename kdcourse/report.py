"""Old import path: the course report is :mod:`kdcourse.tools.report` now."""
import sys

from .tools import report as _report

sys.modules[__name__] = _report
