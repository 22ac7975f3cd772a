"""nbval (--nbval-lax) re-executes each solution in the smoke profile and
compares the outputs of the cells marked ``# NBVAL_CHECK_OUTPUT`` with the
outputs stored in the notebook."""
import glob
import os
import subprocess
import sys

import pytest

from kdcourse import labgen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLUTIONS = sorted(glob.glob(os.path.join(ROOT, "solutions", "*.ipynb")))

pytestmark = pytest.mark.notebooks


@pytest.mark.parametrize("path", SOLUTIONS, ids=os.path.basename)
def test_nbval_marked_outputs(path, tmp_path):
    nb = labgen.read(path)
    marked = [c for c in nb["cells"] if c["cell_type"] == "code" and labgen.CHECK_MARK in labgen.source(c)]
    if not marked:
        pytest.skip("no cells marked for nbval in this notebook")
    assert all(c.get("outputs") for c in marked), f"marked cells without stored outputs: run `python -m kdcourse record {path}`"
    env = dict(os.environ, KDCOURSE_PROFILE="smoke", KDCOURSE_CACHE=str(tmp_path / "cache"), MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
         "--nbval-cell-timeout=900", path],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
