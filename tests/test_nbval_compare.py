"""The notebook suite executes each solution once and compares its marked
cells without nbval re-running it (kdcourse.tools.notebooks). That
comparison must be exactly as strict as ``pytest --nbval-lax`` was: here it
is held to nbval's own code (``IPyNbCell.compare_outputs`` after nbval's
``coalesce_streams``; nbval's marker parsers) on outputs it must accept and
outputs it must reject."""
import copy
from types import SimpleNamespace

import nbformat
import pytest

nbval_plugin = pytest.importorskip("nbval.plugin")

from kdcourse.tools.notebooks import checked_output_differences, compare_outputs, nbval_options  # noqa: E402

# nbval 0.11's IPyNbFile.skip_compare without --nbdime (images are not compared)
NBVAL_SKIP = ("metadata", "traceback", "prompt_number", "output_type", "name", "execution_count",
              "application/vnd.jupyter.widget-view+json", "image/png", "image/jpeg")


class _NbvalCell:
    """Just enough of an ``IPyNbCell`` to call nbval's comparison on it."""

    compare_outputs = nbval_plugin.IPyNbCell.compare_outputs
    sanitize = nbval_plugin.IPyNbCell.sanitize
    colors = nbval_plugin.nocolors
    parent = SimpleNamespace(skip_compare=NBVAL_SKIP, sanitize_patterns={})

    def format_output_compare(self, key, left, right):
        self.comparison_traceback.append(f"mismatch {key!r}")


def nbval_accepts(test, ref) -> bool:
    test = nbval_plugin.coalesce_streams([nbformat.from_dict(copy.deepcopy(o)) for o in test])
    ref = nbval_plugin.coalesce_streams([nbformat.from_dict(copy.deepcopy(o)) for o in ref])
    return _NbvalCell().compare_outputs(test, ref)


def out(text, name="stdout"):
    return {"output_type": "stream", "name": name, "text": text}


def disp(data, kind="display_data", **extra):
    return {"output_type": kind, "data": data, "metadata": {}, **extra}


STORED = [out("a = 1\nb = 2\n")]
CASES = {  # name: (this run's outputs, stored outputs); each verdict must be nbval's
    "identical": (STORED, STORED),
    "one stream printed in two pieces": ([out("a = 1\n"), out("b = 2\n")], STORED),
    "one digit changed": ([out("a = 1\nb = 3\n")], STORED),
    "a line missing": ([out("a = 1\n")], STORED),
    "a trailing newline missing": ([out("a = 1\nb = 2")], STORED),
    "an extra warning on stderr": ([out("a = 1\nb = 2\n"), out("careful\n", "stderr")], STORED),
    "no output at all": ([], STORED),
    "output where none was stored": (STORED, []),
    "stdout and stderr swapped": ([out("a = 1\nb = 2\n", "stderr")], STORED),
    "progress overwritten with a carriage return": ([out("10%\r100%\n")], [out("100%\n")]),
    "backspaces (nbval leaves them in)": ([out("ab\bc\n")], [out("ac\n")]),
    "execute_result with another count": ([disp({"text/plain": "3"}, "execute_result", execution_count=7)],
                                          [disp({"text/plain": "3"}, "execute_result", execution_count=1)]),
    "execute_result with another value": ([disp({"text/plain": "4"}, "execute_result", execution_count=1)],
                                          [disp({"text/plain": "3"}, "execute_result", execution_count=1)]),
    "a figure's pixels differ": ([disp({"image/png": "AAAA", "text/plain": "<Figure>"})],
                                 [disp({"image/png": "BBBB", "text/plain": "<Figure>"})]),
    "a figure's text differs": ([disp({"image/png": "AAAA", "text/plain": "<Figure 1>"})],
                                [disp({"image/png": "AAAA", "text/plain": "<Figure 2>"})]),
    "html differs": ([disp({"text/html": "<b>1</b>", "text/plain": "x"})], [disp({"text/html": "<b>2</b>", "text/plain": "x"})]),
    "a MIME type missing": ([disp({"text/plain": "x"})], [disp({"text/html": "<b>1</b>", "text/plain": "x"})]),
    "another widget model id": ([disp({"application/vnd.jupyter.widget-view+json": {"model_id": "a"}, "text/plain": "w"})],
                                [disp({"application/vnd.jupyter.widget-view+json": {"model_id": "b"}, "text/plain": "w"})]),
    "display metadata differs": ([dict(disp({"text/plain": "x"}), metadata={"w": 1})], [disp({"text/plain": "x"})]),
    "two displays in the other order": ([disp({"text/plain": "1"}), disp({"text/plain": "2"})],
                                        [disp({"text/plain": "2"}), disp({"text/plain": "1"})]),
    "a print and a display in the other order": ([out("p\n"), disp({"text/plain": "d"})],
                                                 [disp({"text/plain": "d"}), out("p\n")]),
    "one display more": ([disp({"text/plain": "1"}), disp({"text/plain": "1"})], [disp({"text/plain": "1"})]),
    "an error with another traceback": ([{"output_type": "error", "ename": "E", "evalue": "v", "traceback": ["x"]}],
                                        [{"output_type": "error", "ename": "E", "evalue": "v", "traceback": ["y"]}]),
    "an error with another message": ([{"output_type": "error", "ename": "E", "evalue": "v", "traceback": []}],
                                      [{"output_type": "error", "ename": "E", "evalue": "w", "traceback": []}]),
}


@pytest.mark.parametrize("name", CASES)
def test_comparison_agrees_with_nbval(name):
    test, ref = CASES[name]
    ours = compare_outputs(copy.deepcopy(test), copy.deepcopy(ref))
    assert (ours is None) == nbval_accepts(test, ref), ours


def test_cases_cover_both_verdicts():
    verdicts = [nbval_accepts(*CASES[name]) for name in CASES]
    assert 6 <= sum(verdicts) <= len(verdicts) - 10  # a suite of both, so agreeing is no accident


def test_text_stored_as_a_list_of_lines_is_the_same_text():
    assert compare_outputs([out("a = 1\nb = 2\n")], [out(["a = 1\n", "b = 2\n"])]) is None
    assert compare_outputs([disp({"text/plain": "x\ny"})], [disp({"text/plain": ["x\n", "y"]})]) is None


MARKER_SOURCES = ["# NBVAL_CHECK_OUTPUT\nprint(1)", "print(1)  # NBVAL_CHECK_OUTPUT", "  ## NBVAL_CHECK_OUTPUT\nx",
                  "# NBVAL_IGNORE_OUTPUT\nx", "# NBVAL_SKIP\nx", "# NBVAL_RAISES_EXCEPTION\nx", "x = 1",
                  "# NBVAL_CHECK_OUTPUT\n# NBVAL_IGNORE_OUTPUT\nx", "#NBVAL_CHECK_OUTPUT and more\nx"]
MARKER_TAGS = [[], ["nbval-ignore-output"], ["nbval-check-output"], ["nbval-skip"], ["raises-exception"],
               ["parameters", "widget"]]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("tags", MARKER_TAGS, ids=str)
def test_markers_read_as_nbval_reads_them(tags):
    for src in MARKER_SOURCES:
        expected = {"check": False, "skip": False, "check_exception": False}  # --nbval-lax: unmarked cells unchecked
        expected.update(dict(nbval_plugin.find_metadata_tags({"tags": tags})))
        expected.update(dict(nbval_plugin.find_comment_markers(src)))
        assert nbval_options({"cell_type": "code", "source": src, "metadata": {"tags": tags}}) == expected, (src, tags)


def code(src, outputs=(), count=1, tags=()):
    return {"cell_type": "code", "source": src, "outputs": list(outputs), "execution_count": count,
            "metadata": {"tags": list(tags)}}


def notebook(*cells):
    return {"cells": [{"cell_type": "markdown", "source": "# title", "metadata": {}}, *cells], "metadata": {}}


STORED_NB = notebook(code("PROFILE = None", count=None, tags=["parameters"]),
                     code("# NBVAL_CHECK_OUTPUT\nprint(2)", [out("2\n")]),
                     code("print(3)", count=None),
                     code("print(4)", count=None, tags=["nbval-ignore-output"]))


def executed(*prints):
    return notebook(code("PROFILE = None", count=1, tags=["parameters"]),
                    code('PROFILE = "smoke"', count=2, tags=["injected-parameters"]),
                    code("# NBVAL_CHECK_OUTPUT\nprint(2)", [out(prints[0])], count=3),
                    code("print(3)", [out("3\n")], count=4),
                    code("print(4)", [out("whatever\n")], count=5))


def test_notebook_comparison_compares_marked_cells_only():
    assert checked_output_differences(executed("2\n"), STORED_NB) == (1, [])
    compared, problems = checked_output_differences(executed("two\n"), STORED_NB)
    assert compared == 1 and len(problems) == 1 and "outputs differ" in problems[0] and "print(2)" in problems[0]


def test_notebook_comparison_refuses_what_it_cannot_pair_or_honour():
    run = executed("2\n")
    fewer = copy.deepcopy(run)
    del fewer["cells"][-1]
    assert "code cells" in checked_output_differences(fewer, STORED_NB)[1][0]
    edited = copy.deepcopy(run)
    edited["cells"][3]["source"] = "# NBVAL_CHECK_OUTPUT\nprint(22)"
    assert "source differs" in checked_output_differences(edited, STORED_NB)[1][0]
    for marker in ("# NBVAL_SKIP", "# NBVAL_RAISES_EXCEPTION"):
        stored = copy.deepcopy(STORED_NB)
        stored["cells"][3]["source"] = run["cells"][4]["source"] = f"{marker}\nprint(3)"
        assert "not supported" in " ".join(checked_output_differences(run, stored)[1])
    unrun = copy.deepcopy(STORED_NB)
    unrun["cells"][2]["execution_count"] = None  # what nbval rejects: "Unrun reference cell has outputs"
    assert "unrun reference cell has outputs" in checked_output_differences(run, unrun)[1][0]
