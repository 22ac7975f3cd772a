"""The benchmark commands' shared pieces (the figures themselves are printed
by ``python -m kdcourse bench labN``, never asserted here)."""
import importlib
import inspect
import sys

import nbformat
import pytest

from kdcourse.benchmarks import common


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_every_lab_benchmark_takes_profile_repeats_only(n):
    mod = importlib.import_module(f"kdcourse.benchmarks.lab{n}")
    params = inspect.signature(mod.main).parameters
    assert {"profile", "repeats", "only"} <= set(params)
    assert "notebook" in getattr(mod, "ALL_PARTS", mod.PARTS)


def test_cli_rejects_an_unknown_part(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lab", "--only", "epoch,nope"])
    with pytest.raises(SystemExit) as exc:
        common.cli(lambda *a, **k: 0, ("epoch", "accuracy"), "doc")
    assert exc.value.code == 2
    assert "--only: unknown part(s) nope" in capsys.readouterr().err


def test_cli_passes_parts_and_extras(monkeypatch):
    seen = {}

    def main(profile, repeats, only, T=None):
        seen.update(profile=profile, repeats=repeats, only=only, T=T)
        return 0

    monkeypatch.setattr(sys, "argv", ["lab", "--profile", "smoke", "--repeats", "2", "--only", "accuracy", "--T", "3"])
    with pytest.raises(SystemExit) as exc:
        common.cli(main, ("epoch", "accuracy"), "doc", extras={"T": dict(type=float, default=1.0)})
    assert exc.value.code == 0
    assert seen == {"profile": "smoke", "repeats": 2, "only": ("accuracy",), "T": 3.0}


def test_run_all_times_a_notebook_and_raises_on_a_failing_cell(tmp_path, capsys):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("PROFILE = 'smoke'"), nbformat.v4.new_code_cell("x = 1 + 1")]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    good = tmp_path / "09_ok.ipynb"
    nbformat.write(nb, good)
    seconds = common.run_all(str(good), "smoke", cache=str(tmp_path / "cache"), label="test")
    assert seconds > 0
    out = capsys.readouterr().out
    assert "Lab 9 Run All, profile smoke, test:" in out and "slowest cells: #" in out
    nb.cells.append(nbformat.v4.new_code_cell("raise RuntimeError('boom')"))
    bad = tmp_path / "09_bad.ipynb"
    nbformat.write(nb, bad)
    with pytest.raises(Exception, match="boom"):
        common.run_all(str(bad), "smoke")


def test_slowest_cells_names_the_cell_and_its_heading():
    nb = {"cells": [
        {"cell_type": "markdown", "source": "## 1. Setup"},
        {"cell_type": "code", "source": "a", "metadata": {"papermill": {"duration": 0.5}}},
        {"cell_type": "markdown", "source": ["## 2. Train\n", "text"]},
        {"cell_type": "code", "source": "b", "metadata": {"papermill": {"duration": 30.2}}},
        {"cell_type": "code", "source": "c", "metadata": {}},
    ]}
    assert common.slowest_cells(nb, n=2) == "#3 (2. Train) 30 s, #1 (1. Setup) 0 s"
    assert common.slowest_cells({"cells": []}) == "no cell timings"
