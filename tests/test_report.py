"""The course report (``kdcourse report``, the other instructor tool): a tiny
notebook, smoke profile. (Moved from the old grader's tests.)"""
from __future__ import annotations

import json

import nbformat
import pytest

from kdcourse import cli
from grading_notebooks import code_cell as _code, write


# --------------------------------------------------------------------------
# The course report (the other instructor tool): a tiny notebook, smoke profile
# --------------------------------------------------------------------------

def report_fixture(folder) -> None:
    ok = nbformat.v4.new_notebook()
    ok.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    ok.cells = [
        nbformat.v4.new_markdown_cell("# Tiny\n\n## 1. Measured things"),
        _code("PROFILE = None", tags=["parameters"]),
        _code("import os\nprint(f'profile={PROFILE} env={os.environ[\"KDCOURSE_PROFILE\"]}')\nprint('test accuracy: 93.50%')"),
        _code("from IPython.display import Markdown, display\n"
              "display(Markdown('| model | acc |\\n|---|---|\\n| student | 91.2 |'))\n42"),
        nbformat.v4.new_markdown_cell("## 2. A plot"),
        _code("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2, 3]);"),
        _code("import sys\nprint('a warning', file=sys.stderr)"),
    ]
    write(ok, folder / "01_tiny.ipynb")
    broken = nbformat.v4.new_notebook()
    broken.metadata["kernelspec"] = ok.metadata["kernelspec"]
    broken.cells = [_code("PROFILE = None", tags=["parameters"]), _code("print('before')\nraise ValueError('no data here')")]
    write(broken, folder / "02_broken.ipynb")
    write(broken, folder / "scratch.ipynb")  # not NN_name: not a course notebook


@pytest.mark.notebooks
def test_report_runs_every_solution_and_keeps_figures_tables_and_runtimes(tmp_path, capsys):
    report_fixture(tmp_path / "solutions")
    out = tmp_path / "report"
    rc = cli.main(["report", "--profile", "smoke", "--solutions", str(tmp_path / "solutions"), "--out", str(out)])
    assert rc == 1  # 02_broken failed, and says so
    assert "FAILED: 02_broken" in capsys.readouterr().out
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| [01_tiny](#01_tiny) | ok |" in md and "| [02_broken](#02_broken) | failed |" in md
    assert "profile `smoke`" in md and "scratch" not in md
    assert "profile=smoke env=smoke" in md and "test accuracy: 93.50%" in md  # stdout, in the chosen profile
    assert "| student | 91.2 |" in md and "\n42\n" in md  # Markdown tables inline, plain results fenced
    assert "### 1. Measured things" in md and "### 2. A plot" in md
    assert "![cell 5](figures/01_tiny/cell05-1.png)" in md
    assert (out / "figures" / "01_tiny" / "cell05-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "a warning" not in md and "<Figure size" not in md
    assert "ValueError: no data here" in md
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    runtimes = {nb["name"]: nb["seconds"] for nb in results["notebooks"]}
    assert set(runtimes) == {"01_tiny", "02_broken"} and all(s > 0 for s in runtimes.values())
    assert f"{runtimes['01_tiny']:.1f}" in md
    slowest = {nb["name"]: nb["slowest"] for nb in results["notebooks"]}
    assert slowest["01_tiny"].startswith("#") and "(1. Measured things)" in slowest["01_tiny"] and slowest["02_broken"] is None
    assert f"Slowest cells: {slowest['01_tiny']}." in md


def test_report_rejects_bad_arguments(tmp_path, capsys):
    assert cli.main(["report", "--profile", "huge", "--out", str(tmp_path)]) == 2
    assert "not known" in capsys.readouterr().out
    assert cli.main(["report", "--solutions", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", "--solutions", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
