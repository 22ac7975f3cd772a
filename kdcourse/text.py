"""Old import path of the reviews task: it is :mod:`kdcourse.data.reviews` now.

``kdcourse.text`` *is* that module (the same object), so attributes set on one
are seen through the other.
"""
import sys

from .data import reviews as _reviews

sys.modules[__name__] = _reviews
