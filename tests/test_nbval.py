"""nbval's check of the marked outputs, on the execution the notebook test
already made: the cells marked ``# NBVAL_CHECK_OUTPUT`` must print what is
stored in the notebook (``python -m kdcourse record`` stores it), compared as
``pytest --nbval-lax`` compares (:func:`kdcourse.tools.notebooks.checked_output_differences`;
tests/test_nbval_compare.py holds it to nbval's own comparison)."""
import glob
import os

import pytest

from kdcourse import labgen
from kdcourse.tools.notebooks import checked_output_differences, nbval_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLUTIONS = sorted(glob.glob(os.path.join(ROOT, "solutions", "*.ipynb")))

pytestmark = pytest.mark.notebooks


@pytest.mark.parametrize("path", SOLUTIONS, ids=os.path.basename)
def test_nbval_marked_outputs(path, executed_solution):
    nb = labgen.read(path)
    marked = [c for c in nb["cells"] if c["cell_type"] == "code" and nbval_options(c)["check"]]
    if not marked:
        pytest.skip("no cells marked for nbval in this notebook")
    assert all(c.get("outputs") for c in marked), f"marked cells without stored outputs: run `python -m kdcourse record {path}`"
    compared, problems = checked_output_differences(executed_solution(path), nb)
    assert not problems, "\n\n".join(problems) + f"\n(if the change is intended: `python -m kdcourse record {path}`)"
    assert compared == len(marked)
