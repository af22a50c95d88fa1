"""The exercise generator: stubs, hidden tests, metadata, determinism, staleness, validation."""

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from course_utils import exercises
from course_utils.exercises import ExerciseError, build_all, build_exercise, check_all, read_notebook

REPO = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((REPO / "solutions").glob("*.ipynb"))

TASK_SOURCE = '''def double(x):
    """Twice x.

    Keep this docstring.
    """
    ### BEGIN SOLUTION
    result = 2 * x
    return result
    ### END SOLUTION'''

MISTAKES = [
    {"name": "triple", "replace": ["2 * x", "3 * x"], "hint": "twice, not three times"},
    {"name": "forgot return", "replace": ["return result", "pass"], "hint": "return the result"},
]


def make_solution(**changes) -> nbformat.NotebookNode:
    """A small valid solution notebook; ``changes`` replace cells by id."""
    cells = {
        "intro": new_markdown_cell("# A tiny exercise", id="intro"),
        "setup": new_code_cell("import math", id="setup"),
        "task": new_code_cell(TASK_SOURCE, id="task", metadata={
            "course": {"task": "double", "points": 2, "mistakes": MISTAKES}}),
        "check": new_code_cell("assert double(2) == 4\nprint('ok')", id="check",
                               metadata={"course": {"check": "double"}}),
        "hidden": new_code_cell("### BEGIN HIDDEN TESTS\nassert double(-1) == -2, 'twice, not "
                                "three times'\n### END HIDDEN TESTS", id="hidden",
                                metadata={"course": {"hidden": "double"}}),
        "top": new_code_cell("### BEGIN SOLUTION\nanswer = 42\n### END SOLUTION", id="top",
                             metadata={"course": {"task": "answer", "points": 1, "mistakes": [
                                 {"name": "a", "replace": ["42", "41"], "hint": "h1"},
                                 {"name": "b", "replace": ["answer = ", "answer = -"],
                                  "hint": "h2"}]}}),
        "top-check": new_code_cell("assert answer == 42", id="top-check",
                                   metadata={"course": {"check": "answer"}}),
        "top-hidden": new_code_cell("print('visible part')\n### BEGIN HIDDEN TESTS\n"
                                    "assert answer > 0\n### END HIDDEN TESTS", id="top-hidden",
                                    metadata={"course": {"hidden": "answer"}}),
    }
    cells.update(changes)
    nb = new_notebook(cells=[c for c in cells.values() if c is not None],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})
    return nb


def cell(nb, cell_id):
    return next(c for c in nb.cells if c.get("id") == cell_id)


# -- the stub --------------------------------------------------------------------------------
def test_stub_keeps_signature_and_docstring_and_raises():
    ex = build_exercise(make_solution(), name="toy.ipynb")
    source = cell(ex, "task").source
    assert "BEGIN SOLUTION" not in source and "2 * x" not in source
    assert source.startswith('def double(x):\n    """Twice x.')
    assert '    # YOUR CODE HERE\n    raise NotImplementedError("double: not implemented yet")' in source
    namespace = {}
    exec(source, namespace)
    assert namespace["double"].__doc__.strip().startswith("Twice x.")
    with pytest.raises(NotImplementedError, match="double: not implemented yet"):
        namespace["double"](3)


def test_top_level_region_becomes_a_raising_stub():
    ex = build_exercise(make_solution(), name="toy.ipynb")
    assert cell(ex, "top").source == ('# YOUR CODE HERE\n'
                                      'raise NotImplementedError("answer: not implemented yet")')


def test_several_regions_in_one_cell():
    source = ("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\n\n\n"
              "def g():\n    ### BEGIN SOLUTION\n    return 2\n    ### END SOLUTION\n")
    stub = exercises.stub_solution(source, "two")
    assert stub.count("raise NotImplementedError") == 2 and "return" not in stub
    assert stub.endswith("\n")


# -- hidden tests, outputs, metadata ---------------------------------------------------------
def test_hidden_tests_removed_and_empty_hidden_cells_dropped():
    ex = build_exercise(make_solution(), name="toy.ipynb")
    ids = [c.id for c in ex.cells]
    assert "hidden" not in ids  # nothing but hidden tests: dropped
    assert cell(ex, "top-hidden").source == "print('visible part')"
    assert not any("HIDDEN" in c.source or "double(-1)" in c.source for c in ex.cells)


def test_outputs_and_execution_counts_cleared():
    nb = make_solution()
    for c in nb.cells:
        if c.cell_type == "code":
            c.execution_count = 3
            c.outputs = [new_output("stream", name="stdout", text="hello\n")]
            c.metadata["execution"] = {"iopub.status.idle": "2024-01-01T00:00:00Z"}
    ex = build_exercise(nb, name="toy.ipynb")
    for c in ex.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None
            assert "execution" not in c.metadata


def test_mistakes_stripped_but_roles_and_ids_kept():
    nb = make_solution()
    ex = build_exercise(nb, name="toy.ipynb")
    assert cell(ex, "task").metadata["course"] == {"task": "double", "points": 2}
    assert cell(ex, "check").metadata["course"] == {"check": "double"}
    assert [c.id for c in ex.cells] == [c.id for c in nb.cells if c.id != "hidden"]
    text = exercises.notebook_text(ex)
    assert "mistakes" not in text and "three times" not in text
    meta = ex.metadata["course"]
    assert meta["source"] == "solutions/toy.ipynb"
    assert meta["source_sha256"] == exercises.source_hash(nb)
    # the input is left alone
    assert cell(nb, "task").metadata["course"]["mistakes"] == MISTAKES


def test_source_hash_ignores_outputs_but_not_code():
    nb = make_solution()
    ran = make_solution()
    cell(ran, "setup").outputs = [new_output("stream", name="stdout", text="x\n")]
    cell(ran, "setup").execution_count = 1
    assert exercises.source_hash(ran) == exercises.source_hash(nb)
    changed = make_solution()
    cell(changed, "check").source += "\nassert double(0) == 0"
    assert exercises.source_hash(changed) != exercises.source_hash(nb)


def test_build_is_deterministic(tmp_path):
    solutions, out1, out2 = tmp_path / "solutions", tmp_path / "ex1", tmp_path / "ex2"
    solutions.mkdir()
    exercises.write_notebook(make_solution(), solutions / "toy.ipynb")
    assert build_all(solutions, out1) == [out1 / "toy.ipynb"]
    build_all(solutions, out2)
    data = (out1 / "toy.ipynb").read_bytes()
    assert data == (out2 / "toy.ipynb").read_bytes()
    assert data.endswith(b"}\n") and data.startswith(b'{\n "cells": [\n  {\n')  # Jupyter's layout
    mtime = (out1 / "toy.ipynb").stat().st_mtime_ns
    build_all(solutions, out1)  # nothing changed: the file is not rewritten
    assert (out1 / "toy.ipynb").stat().st_mtime_ns == mtime
    nbformat.validate(nbformat.reads(data.decode(), as_version=4))


# -- check_all -------------------------------------------------------------------------------
@pytest.fixture
def folders(tmp_path):
    solutions, target = tmp_path / "solutions", tmp_path / "exercises"
    solutions.mkdir()
    exercises.write_notebook(make_solution(), solutions / "toy.ipynb")
    build_all(solutions, target)
    assert check_all(solutions, target) == []
    return solutions, target


def test_check_all_detects_stale_solution(folders):
    solutions, target = folders
    nb = exercises.read_notebook(solutions / "toy.ipynb")
    cell(nb, "check").source += "\nassert double(5) == 10"
    exercises.write_notebook(nb, solutions / "toy.ipynb")
    problems = check_all(solutions, target)
    assert len(problems) == 1
    assert "toy.ipynb is stale" in problems[0] and "changed since it was built" in problems[0]
    assert "course exercises build" in problems[0]
    build_all(solutions, target)
    assert check_all(solutions, target) == []


def test_check_all_detects_hand_edits_leftovers_and_outputs(folders):
    solutions, target = folders
    path = target / "toy.ipynb"
    nb = exercises.read_notebook(path)
    cell(nb, "task").source += "\n    ### BEGIN SOLUTION"
    cell(nb, "setup").outputs = [new_output("stream", name="stdout", text="x\n")]
    exercises.write_notebook(nb, path)
    problems = "\n".join(check_all(solutions, target))
    assert "edited by hand" in problems
    assert "still contains '### BEGIN SOLUTION'" in problems
    assert "has outputs" in problems


def test_check_all_detects_missing_and_extra(folders):
    solutions, target = folders
    shutil.copy(solutions / "toy.ipynb", solutions / "other.ipynb")
    shutil.copy(target / "toy.ipynb", target / "orphan.ipynb")
    problems = check_all(solutions, target)
    assert any("exercises/other.ipynb is missing" in p for p in problems)
    assert any("exercises/orphan.ipynb has no source" in p for p in problems)


def test_check_all_reports_invalid_solutions(folders):
    solutions, target = folders
    broken = make_solution(check=None)
    exercises.write_notebook(broken, solutions / "toy.ipynb")
    problems = check_all(solutions, target)
    assert len(problems) == 1 and "not a valid solution notebook" in problems[0]
    assert "no visible check cell" in problems[0]


# -- the real course -------------------------------------------------------------------------
def test_repository_exercises_are_up_to_date():
    """What CI relies on: exercises/ is exactly what `course exercises build` writes."""
    problems = check_all(REPO / "solutions", REPO / "exercises")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solution_notebooks_follow_the_conventions(path):
    tasks = exercises.parse_solution(path)
    assert tasks, f"{path.name} declares no graded task"
    target = REPO / "exercises" / path.name
    assert target.is_file(), f"exercises/{path.name} is missing: run `course exercises build`"
    ex = json.loads(target.read_text())
    assert ex["metadata"]["course"]["source"] == f"solutions/{path.name}"
    ex_nb = nbformat.reads(json.dumps(ex), as_version=4)
    assert exercises.leftover_problems(ex_nb, path.name) == []
    for task in tasks.values():
        assert len(task.mistakes) >= 2 and task.checks and task.hidden
        stub = next(c for c in ex_nb.cells if c.metadata.get("course", {}).get("task") == task.task)
        assert f'raise NotImplementedError("{task.task}: not implemented yet")' in stub.source


# -- validation: clear errors ----------------------------------------------------------------
def code(source, cell_id="bad", **course):
    return new_code_cell(source, id=cell_id, metadata={"course": course} if course else {})


BAD = {
    "unclosed": (dict(task=code("### BEGIN SOLUTION\nx = 1", "task", task="double", points=2,
                                mistakes=MISTAKES)),
                 "is never closed"),
    "end without begin": (dict(setup=code("x = 1\n### END SOLUTION")),
                          "without a matching '### BEGIN SOLUTION'"),
    "nested": (dict(task=code(TASK_SOURCE.replace("    result", "    ### BEGIN SOLUTION\n    result"),
                              "task", task="double", points=2, mistakes=MISTAKES)),
               "inside an open solution region"),
    "solution without task metadata": (
        dict(setup=code("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")), "no task metadata"),
    "hidden markers outside a hidden cell": (
        dict(setup=code("### BEGIN HIDDEN TESTS\nx = 1\n### END HIDDEN TESTS")),
        "no hidden metadata"),
    "malformed marker": (dict(setup=code("## BEGIN SOLUTION\nx = 1")), "looks like a marker"),
    "task without region": (dict(task=code("def double(x):\n    return 2 * x", "task",
                                           task="double", points=2, mistakes=MISTAKES)),
                            "would show the solution"),
    "hidden cell without region": (dict(hidden=code("assert double(1) == 2", "hidden",
                                                    hidden="double")),
                                   "students would see its tests"),
    "one mistake only": (dict(task=code(TASK_SOURCE, "task", task="double", points=2,
                                        mistakes=MISTAKES[:1])),
                         "declares 1 mistake"),
    "mistake text not in the cell": (
        dict(task=code(TASK_SOURCE, "task", task="double", points=2, mistakes=[
            MISTAKES[0], {"name": "x", "replace": ["4 * x", "5 * x"], "hint": "h"}])),
        "is not in the solution cell"),
    "bad points": (dict(task=code(TASK_SOURCE, "task", task="double", points=0,
                                  mistakes=MISTAKES)), "integer points > 0"),
    "check for an unknown task": (dict(check=code("pass", "check", check="triple")),
                                  "unknown task 'triple'"),
    "no check cell": (dict(check=None), "no visible check cell"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_malformed_solutions_give_clear_errors(case):
    changes, message = BAD[case]
    nb = make_solution(**changes)
    with pytest.raises(ExerciseError) as info:
        build_exercise(nb, name="toy.ipynb")
    text = str(info.value)
    assert message in text
    assert "solutions/toy.ipynb, cell " in text  # names the notebook and the cell


def test_duplicate_task_and_missing_ids_are_errors():
    nb = make_solution()
    nb.cells.insert(3, code(TASK_SOURCE, "task2", task="double", points=1, mistakes=MISTAKES))
    with pytest.raises(ExerciseError, match="already has a solution cell"):
        build_exercise(nb, name="toy.ipynb")
    nb = make_solution()
    del cell(nb, "setup")["id"]
    with pytest.raises(ExerciseError, match="has no id"):
        build_exercise(nb, name="toy.ipynb")


@pytest.mark.parametrize("path", sorted((REPO / "notebooks").glob("*.ipynb")) + sorted(
    (REPO / "solutions").glob("*.ipynb")) + sorted((REPO / "exercises").glob("*.ipynb")),
    ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_notebook_starts_with_the_install_cell(path):
    from course_utils.exercises import INSTALL_CELL

    code = [c for c in read_notebook(path).cells if c.cell_type == "code"]
    assert code and code[0].source == INSTALL_CELL, f"{path.name}: the first code cell must be the " \
        "course's install cell (course_utils.exercises.INSTALL_CELL), or its Colab link fails"
