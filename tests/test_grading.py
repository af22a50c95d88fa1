"""The grader and the check helpers.

Grading starts one kernel per task (a few seconds each), so the notebooks are
graded once per module, all in one parallel batch: every solution notebook
(full marks), every exercise notebook (zero, "not implemented yet") and every
declared mistake of every task (that task only). Later topics are covered
automatically: tasks and mistakes are discovered from ``solutions/``.
"""

import copy
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from course_utils.exercises import ExerciseError, read_notebook, write_notebook
from course_utils.grading import (
    Submission,
    apply_mistake,
    checking,
    declared_mistakes,
    expect_close,
    expect_dtype,
    expect_equal,
    expect_shape,
    expect_type,
    format_report,
    grade_many,
    grade_notebook,
    grade_notebooks,
)

REPO = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((REPO / "solutions").glob("*.ipynb"))
MISTAKES = [(path, task, index, mistake)
            for path in SOLUTIONS for task, index, mistake in declared_mistakes(path)]
WARMUP = REPO / "solutions" / "00_warmup.ipynb"
TIMEOUT = 180  # seconds per task: generous, for a busy 2-core CI machine


def mistake_id(case):
    path, task, _, mistake = case
    return f"{path.stem}:{task}:{mistake['name']}"


@pytest.fixture(scope="module")
def batch():
    """Everything graded once, in parallel: {(kind, notebook, task, index): NotebookGrade}."""
    keys, subs = [], []
    for path in SOLUTIONS:
        keys.append(("solution", path.name))
        subs.append(Submission(path, "solution"))
        if (REPO / "exercises" / path.name).is_file():
            keys.append(("exercise", path.name))
            subs.append(Submission(REPO / "exercises" / path.name, "exercise"))
    for path, task, index, _ in MISTAKES:
        keys.append(("mistake", path.name, task, index))
        subs.append(Submission(apply_mistake(path, task, index), f"mistake-{task}-{index}",
                               solution_path=path, tasks=[task]))
    grades = grade_notebooks(subs, solutions_dir=REPO / "solutions", timeout=TIMEOUT)
    return dict(zip(keys, grades, strict=True))


# -- full marks, zero marks ------------------------------------------------------------------
@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solution_gets_full_marks(batch, path):
    grade = batch[("solution", path.name)]
    assert grade.tasks, "no task was graded"
    for task in grade.tasks:
        assert task.points == task.max_points, format_report(grade)
        assert task.feedback == [] and task.passed == task.total >= 2
    assert grade.points == grade.max_points > 0


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_exercise_gets_zero_with_not_implemented(batch, path):
    if ("exercise", path.name) not in batch:
        pytest.fail(f"exercises/{path.name} is missing: run `course exercises build`")
    grade = batch[("exercise", path.name)]
    report = format_report(grade)
    assert grade.notebook == path.name and not grade.notes, report
    for task in grade.tasks:
        assert task.points == 0, report
        assert task.feedback, report
        assert all("not implemented yet (NotImplementedError)" in line for line in task.feedback), \
            report
    assert grade.points == 0


def test_warmup_declares_the_promised_tasks():
    # the warm-up exists and declares what the course promises
    tasks = {task for task, _, _ in declared_mistakes(WARMUP)}
    assert {"pixel_statistics", "binarize", "one_hot", "accuracy", "class_histogram"} <= tasks


# -- every declared mistake of every task ----------------------------------------------------
@pytest.mark.parametrize("case", MISTAKES, ids=[mistake_id(c) for c in MISTAKES])
def test_declared_mistake_loses_points_with_its_hint(batch, case):
    path, task, index, mistake = case
    grade = batch[("mistake", path.name, task, index)]
    report = format_report(grade)
    assert [t.task for t in grade.tasks] == [task]
    graded = grade.task(task)
    assert graded.points < graded.max_points, f"mistake {mistake['name']!r} was not caught\n{report}"
    assert mistake["hint"] in report, f"the hint is not printed\n{report}"
    # the student sees it before handing in: the visible check cell fails too
    assert any(line.startswith("check cell") for line in graded.feedback), \
        f"the visible check cell lets mistake {mistake['name']!r} pass\n{report}"


def test_apply_mistake_refuses_drifted_declarations():
    nb = read_notebook(WARMUP)
    task, index, mistake = declared_mistakes(nb)[0]
    assert apply_mistake(nb, task, index) is not nb
    drifted = copy.deepcopy(nb)
    for cell in drifted.cells:
        if cell.metadata.get("course", {}).get("task") == task:
            cell.source = cell.source.replace(mistake["replace"][0], "# rewritten")
    with pytest.raises(ExerciseError, match="is not in the solution cell"):
        apply_mistake(drifted, task, index)
    with pytest.raises(ExerciseError, match="no solution cell"):
        apply_mistake(nb, "no_such_task", 0)
    with pytest.raises(ExerciseError, match="there is no mistake 99"):
        apply_mistake(nb, task, 99)


# -- isolation: crashes, dead kernels, endless loops, deleted files --------------------------
SABOTAGE = {
    "binarize": "def binarize(images, threshold=0.5):\n    while True:\n        pass\n",
    "one_hot": "import os\n\nos._exit(1)\n",
    "class_histogram": (
        "import os\nimport shutil\n\nimport torch\n\n"
        "torch.save(torch.arange(3), 'cache.pt')\n"
        "shutil.rmtree(os.getcwd())  # 'cleaning up', a little too well\n"
        "shutil.rmtree(os.path.expanduser('~'), ignore_errors=True)\n\n\n"
        "def class_histogram(labels, num_classes=10):\n"
        "    torch.load('cache.pt')\n"
        "    return torch.bincount(labels, minlength=num_classes)\n"),
    "accuracy": "x = 1\ny = x / 0\n",
}


def test_sabotage_costs_only_the_sabotaged_tasks(tmp_path):
    nb = read_notebook(WARMUP)
    for cell in nb.cells:
        task = cell.metadata.get("course", {}).get("task")
        if task in SABOTAGE:
            cell.source = SABOTAGE[task]
        elif task == "pixel_statistics":
            del cell.metadata["course"]  # metadata lost (some front-ends): matched by cell id
    from nbformat.v4 import new_code_cell

    nb.cells.insert(0, new_code_cell("raise RuntimeError('my scratch cell')", id="scratch"))
    path = tmp_path / "00_warmup.ipynb"
    write_notebook(nb, path)
    grade = grade_notebook(path, timeout=TIMEOUT, cell_timeout=8)
    report = format_report(grade)
    assert grade.task("pixel_statistics").points == 2, report
    assert grade.task("binarize").points == 0 and "timed out after 8 s" in report, report
    assert grade.task("one_hot").points == 0 and "kernel died" in report, report
    histogram = grade.task("class_histogram")
    assert histogram.points == 0 and "FileNotFoundError" in " ".join(histogram.feedback), report
    accuracy = grade.task("accuracy")
    assert accuracy.points == 0, report
    assert accuracy.feedback == ["check cell, hidden tests: your code raised ZeroDivisionError: "
                                 "division by zero (in your code, line 2: `y = x / 0`) before "
                                 "the tests ran"], report
    assert WARMUP.is_file()  # nothing outside the temporary folders was touched


def _grading_processes() -> set[str]:
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"course_utils.grading_student" in cmdline or b"course_utils.grading_trusted" in cmdline:
            found.add(proc.name)
    return found


def test_task_time_limit_kills_the_kernel():
    # graders that other runs on this machine have going are theirs, not leftovers of this one
    before = _grading_processes()
    grade = grade_notebook(WARMUP, timeout=2, tasks=["one_hot"])
    assert grade.task("one_hot").points == 0
    assert grade.task("one_hot").feedback == [
        "check cell, hidden tests: timed out after 2 s (the time limit for the whole task)"]
    leftovers = sorted(_grading_processes() - before)
    assert leftovers == [], "processes left running after the time limit"


# -- grade_many ------------------------------------------------------------------------------
def test_grade_many_writes_csv_json_and_report(tmp_path, capsys):
    subs = tmp_path / "submissions"
    (subs / "alice").mkdir(parents=True)
    (subs / "bob").mkdir()
    shutil.copy(WARMUP, subs / "alice" / "00_warmup.ipynb")
    shutil.copy(REPO / "exercises" / "00_warmup.ipynb", subs / "bob" / "00_warmup.ipynb")
    (subs / "carol.ipynb").write_text("not a notebook")
    tasks = ["binarize", "class_histogram"]
    grades = grade_many([subs], tmp_path / "out", solutions_dir=REPO / "solutions",
                        timeout=TIMEOUT, tasks=tasks)
    assert [g.student for g in grades] == ["alice", "bob", "carol"]
    with open(tmp_path / "out" / "grades.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["student", "notebook", "task", "points", "max_points", "feedback"]
    assert [(r["student"], r["task"]) for r in rows] == [
        ("alice", "binarize"), ("alice", "class_histogram"),
        ("bob", "binarize"), ("bob", "class_histogram"), ("carol", "")]
    assert [float(r["points"]) for r in rows[:4]] == [1, 1, 0, 0]
    assert "not implemented yet" in rows[2]["feedback"]
    assert "not graded" in rows[4]["feedback"]
    data = json.loads((tmp_path / "out" / "grades.json").read_text())
    assert [d["student"] for d in data] == ["alice", "bob", "carol"]
    assert data[0]["points"] == 2 and data[0]["max_points"] == 2
    printed = capsys.readouterr().out
    assert "alice: 00_warmup.ipynb" in printed and "total: 0 / 2 points" in printed
    assert "Totals:" in printed
    assert (tmp_path / "out" / "report.txt").read_text().strip() == printed.strip()


def test_unknown_task_and_unmatched_notebook_are_clear_errors(tmp_path):
    with pytest.raises(Exception, match="unknown task"):
        grade_notebook(WARMUP, tasks=["no_such_task"])
    stray = tmp_path / "homework.ipynb"
    shutil.copy(WARMUP, stray)
    with pytest.raises(Exception, match="cannot tell which solution notebook"):
        grade_notebook(stray, solutions_dir=REPO / "solutions")


# -- the check helpers -----------------------------------------------------------------------
def message(fn, *args, **kwargs) -> str:
    with pytest.raises(AssertionError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_expect_close_explains_the_difference():
    x = torch.tensor([1.0, 2.0, 4.0])
    expect_close(x + 1e-7, x, "x")
    assert "2 times the expected one" in message(expect_close, 2 * x, x, "x")
    assert "wrong sign" in message(expect_close, -x, x, "x")
    assert "has shape (3, 1), expected (3,)" in message(expect_close, x[:, None], x, "x")
    text = message(expect_close, x * 1.5, x, "std", hints={"use N, not N - 1": x * 1.5, "unrelated": x})
    assert text.endswith("Hint: use N, not N - 1") and "unrelated" not in text
    assert "is None: did you forget to `return` it?" in message(expect_close, None, x, "x")
    assert "NaN" in message(expect_close, torch.tensor([float("nan"), 1.0, 1.0]), x, "x")


def test_shape_dtype_type_and_equal_messages():
    t = torch.zeros(4, 3)
    expect_shape(t, (4, None), "t")
    assert "wrong order" in message(expect_shape, t, (3, 4), "t")
    assert "wrong dimension" in message(expect_shape, torch.zeros(784), (512,), "mean", hint="h")
    assert "should be a tensor" in message(expect_shape, [1, 2], (2,), "t")
    assert "dtype torch.bool, expected torch.float32" in message(
        expect_dtype, t > 0, torch.float32, "b")
    expect_dtype(t, "float", "t")
    assert "should be a float" in message(expect_type, torch.tensor(0.5), float, "acc")
    assert "is 3, expected 4" in message(expect_equal, 3, 4, "n")
    expect_equal(torch.tensor([1, 2]), torch.tensor([1, 2]), "v")


def test_checking_wraps_stubs_and_crashes(capsys):
    with checking("demo"):
        pass
    assert "✓ demo looks right" in capsys.readouterr().out

    def stub():
        raise NotImplementedError("demo: not implemented yet")

    with pytest.raises(AssertionError, match="demo: not implemented yet"):
        with checking("demo"):
            stub()
    with pytest.raises(AssertionError, match="your code raised ValueError: bad"):
        with checking("demo"):
            raise ValueError("bad")
    assert capsys.readouterr().out == ""


def test_the_student_process_gets_set_up_cells_only():
    from course_utils.exercises import parse_solution
    from course_utils.grading import task_plan

    nb = read_notebook(REPO / "solutions" / "01_autoencoders.ipynb")
    tasks = parse_solution(nb)
    last = tasks["anomaly_scores"].cell
    between = [i for i, c in enumerate(nb.cells) if tasks["corruption"].cell < i < last
               and c.cell_type == "code" and not c.metadata.get("course")]
    assert between, "the notebook has a plain code cell between its tasks"
    plan = task_plan(nb, tasks, "anomaly_scores")
    assert nb.cells[between[0]].source not in plan["student_setup"]  # not marked: trusted side only
    nb.cells[between[0]].metadata["course"] = {"setup": True}       # marked: the students' too
    plan = task_plan(nb, tasks, "anomaly_scores")
    sources = plan["student_setup"]
    assert nb.cells[between[0]].source in sources
    assert all("BEGIN SOLUTION" not in s and "BEGIN HIDDEN" not in s for s in sources)
    assert [c["role"] for c in plan["cells"]].count("reference") == 1
    assert plan["names"] == ["anomaly_scores"]
    assert plan["cells"][0]["source"] == sources[0]  # the shared prefix comes first on both sides


def test_a_failed_check_shows_its_message_without_a_traceback():
    from course_utils.checks import CheckFailed, expect_close

    with pytest.raises(CheckFailed) as info:
        expect_close(torch.zeros(3), torch.ones(3), "mean")
    shown = "".join(info.value._render_traceback_())  # what Jupyter displays
    assert "✗ mean has the right shape (3,) but wrong values" in shown
    assert "Traceback" not in shown and "checks.py" not in shown
    assert isinstance(info.value, AssertionError)  # graders and tests still catch it as one
