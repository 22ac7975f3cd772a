import os

import pytest
import torch

# Tests never download and never touch a user's cache.
os.environ.setdefault("KDCOURSE_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCOURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KDCOURSE_DATA", str(tmp_path / "data"))
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def notebook_env(tmp_path_factory):
    """The environment every notebook of this run executes in: the smoke
    profile and ONE teacher cache for the whole session (empty at its start,
    never a student's), so a teacher the first notebook trains is reused by
    every later one, as in a class that runs the labs in order."""
    return {"KDCOURSE_PROFILE": "smoke", "KDCOURSE_CACHE": str(tmp_path_factory.mktemp("teacher-cache")),
            "MPLBACKEND": "Agg"}


@pytest.fixture(scope="session")
def notebook_runs(request, tmp_path_factory, notebook_env):
    """The session's notebook executions (tests/notebook_runs.py): every
    notebook the selected tests name is executed once, two at a time."""
    from notebook_runs import NotebookRuns

    wanted = []
    for item in request.session.items:
        path = getattr(item, "callspec", None) and item.callspec.params.get("path")
        for fixture, kind in (("executed_solution", "solution"), ("executed_lab", "lab")):
            if path and fixture in item.fixturenames and (kind, path) not in wanted:
                wanted.append((kind, path))
    runs = NotebookRuns(wanted, notebook_env, tmp_path_factory.mktemp)
    yield runs
    runs.close()


def _result(runs, kind: str, path: str):
    result, error = runs.get(kind, path)
    if error is not None:
        what = "did not execute in the smoke profile" if kind == "solution" else "could not be run cell by cell"
        pytest.fail(f"{os.path.basename(path)} {what}:\n{error[-6000:]}", pytrace=False)
    return result


@pytest.fixture(scope="session")
def executed_solution(notebook_runs):
    """``executed_solution(path)``: the solution notebook at ``path`` executed
    once per session (papermill, smoke profile), shared by the notebook test
    and the nbval comparison. A failed execution fails every test that asks
    for it, with the error and the outputs up to it."""
    return lambda path: _result(notebook_runs, "solution", path)


@pytest.fixture(scope="session")
def executed_lab(notebook_runs):
    """``executed_lab(path)``: the untouched lab at ``path`` executed once per
    session, every cell past errors; ``[{"index", "error", "value"}]`` of the
    cells that raised."""
    return lambda path: _result(notebook_runs, "lab", path)
