"""Exercise notebooks: generated from the solution notebooks, never edited by hand.

``solutions/*.ipynb`` is the single source of truth. ``course exercises build``
turns each one into ``exercises/<same name>`` for the students, and
``course exercises check`` (run by CI) fails when an exercise is out of date.

Conventions
-----------
Cells carry their role in the metadata key ``"course"``:

* **task solution cell** ``{"course": {"task": "binarize", "points": 1, "mistakes": [...]}}``.
  The solution sits between the lines ``### BEGIN SOLUTION`` and
  ``### END SOLUTION`` (indented like the code around it, e.g. inside a ``def``
  below its signature and docstring). Every task declares at least two typical
  mistakes, each ``{"name": ..., "replace": [old, new], "hint": ...}``: replacing
  ``old`` by ``new`` in the cell gives a typical wrong implementation, and the
  hidden tests must fail on it with a message containing ``hint``.
* **visible check cell** ``{"course": {"check": "binarize"}}``: runs in the exercise
  too and explains what is wrong (see :mod:`course_utils.grading`).
* **hidden test cell** ``{"course": {"hidden": "binarize"}}``: its tests sit between
  ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``.
* anything else: narrative and set-up cells, copied as they are.

In the exercise each solution region becomes, at the marker's indentation::

    # YOUR CODE HERE
    raise NotImplementedError("binarize: not implemented yet")

hidden regions are removed (and a cell left empty is dropped), outputs and
execution counts are cleared, and ``mistakes`` is stripped from the metadata
while ``task``/``points``/``check`` and the cell ids stay, so the grader can find
the student's cells. The notebook metadata records ``course.source`` (e.g.
``"solutions/00_warmup.ipynb"``) and ``course.source_sha256``, a hash of the
solution's content (outputs excluded), so a stale exercise can be detected.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .runtime import CourseError

if TYPE_CHECKING:  # nbformat is imported where it is used: notebooks import this module fast
    import nbformat

SOLUTION_BEGIN = "### BEGIN SOLUTION"
SOLUTION_END = "### END SOLUTION"
HIDDEN_BEGIN = "### BEGIN HIDDEN TESTS"
HIDDEN_END = "### END HIDDEN TESTS"
STUB_COMMENT = "# YOUR CODE HERE"
NOT_IMPLEMENTED = "not implemented yet"  # the grader recognises a stub by this text
MARKERS = (SOLUTION_BEGIN, SOLUTION_END, HIDDEN_BEGIN, HIDDEN_END)
META_KEY = "course"
# The first code cell of every notebook of the course, lecture or exercise, so that its Colab link works.
INSTALL_CELL = """# On Colab (or any machine where the course is not installed yet) this cell installs it.
try:
    import course_utils
except ImportError:
    %pip install -q "git+https://github.com/deep-generative-course/course.git"
    import course_utils"""
MIN_MISTAKES = 2
SOURCE_PREFIX = "solutions/"

_TASK_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
# anything that looks like a marker; a line matching this but not exactly a marker is malformed
_MARKER_LIKE = re.compile(r"^\s*#+\s*(BEGIN|END)\s+(SOLUTION|HIDDEN)", re.IGNORECASE)
# cell metadata that only records a run (timings), never content
_RUN_METADATA = ("execution", "ExecuteTime")


class ExerciseError(CourseError):
    """A solution notebook breaks the conventions (markers, metadata)."""


# -- reading and writing ------------------------------------------------------------
def read_notebook(path: str | Path) -> nbformat.NotebookNode:
    import nbformat

    path = Path(path)
    try:
        return nbformat.read(str(path), as_version=4)
    except Exception as err:  # invalid JSON, unknown format
        raise ExerciseError(f"{path}: not a readable notebook ({err})") from err


def notebook_text(nb: nbformat.NotebookNode) -> str:
    """The notebook as Jupyter writes it: sorted keys, 1-space indent, trailing newline."""
    import nbformat

    text = nbformat.writes(nb, version=4)
    return text if text.endswith("\n") else text + "\n"


def write_notebook(nb: nbformat.NotebookNode, path: str | Path) -> bool:
    """Write ``nb`` deterministically; return False when the file already had that content."""
    path = Path(path)
    data = notebook_text(nb).encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


def load_notebook(nb_or_path) -> tuple[nbformat.NotebookNode, str | None]:
    """``(notebook, file name)`` from a path, or ``(notebook, None)`` from a notebook already read."""
    if isinstance(nb_or_path, (str, Path)):
        return read_notebook(nb_or_path), Path(nb_or_path).name
    return nb_or_path, None


# -- where things are ---------------------------------------------------------------
def find_repo_root() -> Path:
    """The course repository: the working directory if it has ``solutions/``, else beside the package."""
    cwd = Path.cwd()
    if (cwd / "solutions").is_dir():
        return cwd
    return Path(__file__).resolve().parent.parent


def default_solutions_dir() -> Path:
    return find_repo_root() / "solutions"


def default_exercises_dir() -> Path:
    return find_repo_root() / "exercises"


def solution_paths(solutions_dir: str | Path | None = None) -> list[Path]:
    """The solution notebooks, sorted by name (checkpoint folders ignored)."""
    folder = Path(solutions_dir) if solutions_dir else default_solutions_dir()
    return sorted(p for p in folder.glob("*.ipynb") if p.is_file())


# -- cell roles ---------------------------------------------------------------------
def course_meta(cell) -> dict:
    meta = cell.get("metadata", {}).get(META_KEY, {})
    return meta if isinstance(meta, dict) else {}


def where(name: str | None, index: int, cell) -> str:
    """``solutions/x.ipynb, cell 4 (id 'setup')``: how errors name a cell (1-based)."""
    cell_id = cell.get("id")
    ident = f" (id {cell_id!r})" if cell_id else ""
    return f"{name or '<notebook>'}, cell {index + 1}{ident}"


@dataclass
class Task:
    """One graded task of a solution notebook (indices are cell positions)."""

    task: str
    points: int
    cell: int
    cell_id: str | None
    mistakes: list[dict] = field(default_factory=list)
    checks: list[int] = field(default_factory=list)
    hidden: list[int] = field(default_factory=list)

    @property
    def test_cells(self) -> list[int]:
        """The cells that score the task: its visible check(s) then hidden test(s), in order."""
        return sorted(self.checks + self.hidden)


def _source(cell) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _scan_markers(source: str, begin: str, end: str, label: str) -> list[tuple[int, int, str]]:
    """The ``(begin_line, end_line, indent)`` regions of ``source``; raises ValueError if unbalanced."""
    regions, start, indent = [], None, ""
    for number, line in enumerate(source.split("\n")):
        stripped = line.strip()
        if stripped == begin:
            if start is not None:
                raise ValueError(f"{begin!r} on line {number + 1} inside an open {label} "
                                 f"region (opened on line {start + 1}); close it with {end!r} first")
            start, indent = number, line[: len(line) - len(line.lstrip())]
        elif stripped == end:
            if start is None:
                raise ValueError(f"{end!r} on line {number + 1} without a matching {begin!r}")
            regions.append((start, number, indent))
            start = None
    if start is not None:
        raise ValueError(f"{begin!r} on line {start + 1} is never closed with {end!r}")
    return regions


def _malformed_markers(source: str) -> list[str]:
    bad = []
    for number, line in enumerate(source.split("\n")):
        if _MARKER_LIKE.match(line) and line.strip() not in MARKERS:
            bad.append(f"line {number + 1}: {line.strip()!r} looks like a marker but is not one of "
                       f"{', '.join(repr(m) for m in MARKERS)}")
    return bad


def parse_solution(nb, name: str | None = None) -> dict[str, Task]:
    """Validate a solution notebook and return its tasks, in notebook order.

    Raises :class:`ExerciseError` naming the notebook and the cell for: unbalanced
    or malformed markers, a solution region in a cell without ``task`` metadata,
    hidden-test markers outside a ``hidden`` cell, a task without solution region,
    check cell or hidden cell, duplicate task ids, bad points, fewer than two
    declared mistakes, or a mistake whose ``old`` text is not in the cell.
    """
    nb, path_name = load_notebook(nb)
    name = name or path_name
    tasks: dict[str, Task] = {}
    pending: list[tuple[str, str, int, object]] = []  # (kind, task, index, cell)
    for index, cell in enumerate(nb.cells):
        here = where(name, index, cell)
        meta = course_meta(cell)
        source = _source(cell)
        roles = [key for key in ("task", "check", "hidden") if key in meta]
        if len(roles) > 1:
            raise ExerciseError(f"{here}: metadata 'course' has both {roles[0]!r} and {roles[1]!r}; "
                                "a cell has one role")
        if cell.cell_type != "code":
            if roles:
                raise ExerciseError(f"{here}: a {cell.cell_type} cell cannot have course.{roles[0]}")
            continue
        if not cell.get("id"):
            raise ExerciseError(f"{here}: the cell has no id; save the notebook with a recent "
                                "Jupyter (nbformat 4.5 or later) so that every cell gets one")
        malformed = _malformed_markers(source)
        if malformed:
            raise ExerciseError(f"{here}: {malformed[0]}")
        try:
            solution = _scan_markers(source, SOLUTION_BEGIN, SOLUTION_END, "solution")
            hidden = _scan_markers(source, HIDDEN_BEGIN, HIDDEN_END, "hidden-test")
        except ValueError as err:
            raise ExerciseError(f"{here}: {err}") from None
        role = roles[0] if roles else None
        if solution and role != "task":
            raise ExerciseError(f"{here}: has a {SOLUTION_BEGIN!r} region but no task metadata; "
                                'add {"course": {"task": "<task_id>", "points": <int>, '
                                '"mistakes": [...]}} to the cell metadata')
        if hidden and role != "hidden":
            raise ExerciseError(f"{here}: has a {HIDDEN_BEGIN!r} region but no hidden metadata; "
                                'add {"course": {"hidden": "<task_id>"}} to the cell metadata')
        if role is None:
            continue
        task_id = meta[role]
        if not isinstance(task_id, str) or not _TASK_ID.match(task_id):
            raise ExerciseError(f"{here}: course.{role} must be a task id like 'pixel_statistics', "
                                f"not {task_id!r}")
        if role == "task":
            if task_id in tasks:
                raise ExerciseError(f"{here}: task {task_id!r} already has a solution cell "
                                    f"(cell {tasks[task_id].cell + 1})")
            if not solution:
                raise ExerciseError(f"{here}: task {task_id!r} has no {SOLUTION_BEGIN!r} ... "
                                    f"{SOLUTION_END!r} region, so the exercise would show the solution")
            points = meta.get("points")
            if isinstance(points, bool) or not isinstance(points, int) or points <= 0:
                raise ExerciseError(f"{here}: task {task_id!r} needs integer points > 0, "
                                    f"not {points!r}")
            mistakes = _check_mistakes(meta.get("mistakes"), source, task_id, here)
            tasks[task_id] = Task(task_id, points, index, cell.get("id"), mistakes)
        else:
            if role == "hidden" and not hidden:
                raise ExerciseError(f"{here}: hidden cell for {task_id!r} has no {HIDDEN_BEGIN!r} ... "
                                    f"{HIDDEN_END!r} region, so students would see its tests")
            pending.append((role, task_id, index, cell))
    for role, task_id, index, cell in pending:
        here = where(name, index, cell)
        task = tasks.get(task_id)
        if task is None:
            raise ExerciseError(f"{here}: {role} cell for unknown task {task_id!r} "
                                f"(known: {', '.join(tasks) or 'none'})")
        if index < task.cell:
            raise ExerciseError(f"{here}: {role} cell for {task_id!r} comes before the task's "
                                f"solution cell (cell {task.cell + 1})")
        (task.checks if role == "check" else task.hidden).append(index)
    for task in tasks.values():
        here = where(name, task.cell, nb.cells[task.cell])
        if not task.checks:
            raise ExerciseError(f"{here}: task {task.task!r} has no visible check cell "
                                f'(metadata {{"course": {{"check": "{task.task}"}}}})')
        if not task.hidden:
            raise ExerciseError(f"{here}: task {task.task!r} has no hidden test cell "
                                f'(metadata {{"course": {{"hidden": "{task.task}"}}}})')
    return tasks


def _check_mistakes(mistakes, source: str, task_id: str, here: str) -> list[dict]:
    if not isinstance(mistakes, list) or len(mistakes) < MIN_MISTAKES:
        count = len(mistakes) if isinstance(mistakes, list) else 0
        raise ExerciseError(f"{here}: task {task_id!r} declares {count} mistake(s); declare at "
                            f"least {MIN_MISTAKES} typical mistakes in course.mistakes, each "
                            '{"name": ..., "replace": [old, new], "hint": ...}')
    names = set()
    for number, mistake in enumerate(mistakes):
        label = f"{here}: task {task_id!r}, mistake {number}"
        if not isinstance(mistake, dict):
            raise ExerciseError(f"{label}: must be an object with name, replace and hint")
        name, replace, hint = mistake.get("name"), mistake.get("replace"), mistake.get("hint")
        if not isinstance(name, str) or not name:
            raise ExerciseError(f"{label}: needs a non-empty 'name'")
        if name in names:
            raise ExerciseError(f"{label}: the name {name!r} is used twice")
        names.add(name)
        if (not isinstance(replace, list) or len(replace) != 2
                or not all(isinstance(text, str) for text in replace)
                or not replace[0] or replace[0] == replace[1]):
            raise ExerciseError(f"{label} ({name!r}): 'replace' must be [old, new], two different "
                                "strings with old not empty")
        if replace[0] not in source:
            raise ExerciseError(f"{label} ({name!r}): the text to replace, {replace[0]!r}, is not "
                                "in the solution cell; update the declaration to match the code")
        if not isinstance(hint, str) or not hint.strip():
            raise ExerciseError(f"{label} ({name!r}): needs a non-empty 'hint', the text the "
                                "hidden tests print when this mistake is made")
    return mistakes


# -- transforming sources -----------------------------------------------------------
def stub_solution(source: str, task_id: str) -> str:
    """Replace every solution region of ``source`` by the not-implemented stub."""
    lines = source.split("\n")
    out, last = [], 0
    for begin, end, indent in _scan_markers(source, SOLUTION_BEGIN, SOLUTION_END, "solution"):
        out.extend(lines[last:begin])
        out.append(indent + STUB_COMMENT)
        out.append(f'{indent}raise NotImplementedError("{task_id}: {NOT_IMPLEMENTED}")')
        last = end + 1
    out.extend(lines[last:])
    return "\n".join(out)


def strip_hidden(source: str) -> str:
    """Remove the hidden-test regions (markers included) from ``source``."""
    lines = source.split("\n")
    out, last = [], 0
    for begin, end, _ in _scan_markers(source, HIDDEN_BEGIN, HIDDEN_END, "hidden-test"):
        out.extend(lines[last:begin])
        last = end + 1
    out.extend(lines[last:])
    return "\n".join(out).strip("\n")


def _without_run_metadata(cell) -> None:
    for key in _RUN_METADATA:
        cell.metadata.pop(key, None)


def normalized_solution(nb) -> nbformat.NotebookNode:
    """The solution without what a run adds (outputs, counts, timings): what the hash covers."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        _without_run_metadata(cell)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("widgets", None)
    return nb


def source_hash(nb) -> str:
    """sha256 of the solution's content, ignoring outputs: changes exactly when the exercise must."""
    nb, _ = load_notebook(nb)
    return hashlib.sha256(notebook_text(normalized_solution(nb)).encode("utf-8")).hexdigest()


def build_exercise(solution_nb, name: str | None = None) -> nbformat.NotebookNode:
    """The student version of a solution notebook (a path or a ``NotebookNode``).

    ``name`` is the notebook's file name (taken from the path when one is given);
    it is recorded as ``course.source = "solutions/<name>"``.
    """
    solution_nb, path_name = load_notebook(solution_nb)
    name = name or path_name
    label = f"{SOURCE_PREFIX}{name}" if name else None
    tasks = parse_solution(solution_nb, label)
    task_cells = {task.cell: task.task for task in tasks.values()}
    nb = normalized_solution(solution_nb)
    cells = []
    for index, cell in enumerate(nb.cells):
        meta = course_meta(cell)
        if index in task_cells:
            cell.source = stub_solution(_source(cell), task_cells[index])
            cell.metadata[META_KEY] = {k: v for k, v in meta.items() if k != "mistakes"}
        elif "hidden" in meta:
            cell.source = strip_hidden(_source(cell))
            if not cell.source.strip():
                continue
        cells.append(cell)
    nb.cells = cells
    course = {"generated": "do not edit: built from the solution by `course exercises build`",
              "source_sha256": source_hash(solution_nb)}
    if label:
        course["source"] = label
    nb.metadata[META_KEY] = course
    return nb


# -- the whole folder ---------------------------------------------------------------
def _folders(solutions_dir, exercises_dir) -> tuple[Path, Path]:
    solutions = Path(solutions_dir) if solutions_dir else default_solutions_dir()
    exercises = Path(exercises_dir) if exercises_dir else solutions.parent / "exercises"
    return solutions, exercises


def build_all(solutions_dir: str | Path | None = None,
              exercises_dir: str | Path | None = None) -> list[Path]:
    """Build ``exercises_dir/<name>`` from every ``solutions_dir/<name>``; return the paths.

    Every solution is validated before anything is written. Files whose content
    would not change are left untouched (their mtime too).
    """
    solutions, exercises = _folders(solutions_dir, exercises_dir)
    built = [(exercises / path.name, build_exercise(path)) for path in solution_paths(solutions)]
    for path, nb in built:
        write_notebook(nb, path)
    return [path for path, _ in built]


def leftover_problems(nb, label: str) -> list[str]:
    """What must never be in an exercise: markers, outputs, declared mistakes."""
    problems = []
    for index, cell in enumerate(nb.cells):
        here = where(label, index, cell)
        if cell.cell_type != "code":
            continue
        source = _source(cell)
        found = [marker for marker in MARKERS if marker in source]
        if found:
            problems.append(f"{here} still contains {found[0]!r}: solution or hidden code leaked")
        if cell.get("outputs") or cell.get("execution_count") is not None:
            problems.append(f"{here} has outputs or an execution count; exercises must be clean")
        if "mistakes" in course_meta(cell):
            problems.append(f"{here} carries the declared mistakes in its metadata")
    return problems


def check_all(solutions_dir: str | Path | None = None,
              exercises_dir: str | Path | None = None) -> list[str]:
    """Problems that make ``exercises_dir`` differ from what ``build_all`` would write.

    Empty when everything is up to date. Reports: a solution without its
    exercise, an exercise that is stale or edited by hand, an exercise without a
    solution, leftover markers, outputs or mistakes, and invalid solutions.
    """
    solutions, exercises = _folders(solutions_dir, exercises_dir)
    problems = []
    sources = solution_paths(solutions)
    ex_label, sol_label = f"{exercises.name}/", f"{solutions.name}/"
    names = {path.name for path in sources}
    for path in sources:
        target = exercises / path.name
        try:
            expected = build_exercise(path)
        except CourseError as err:
            problems.append(f"{sol_label}{path.name} is not a valid solution notebook: {err}")
            continue
        if not target.is_file():
            problems.append(f"{ex_label}{path.name} is missing (run `course exercises build`)")
            continue
        actual_bytes = target.read_bytes()
        if actual_bytes == notebook_text(expected).encode("utf-8"):
            continue
        try:
            actual = read_notebook(target)
        except CourseError as err:
            problems.append(f"{ex_label}{path.name} cannot be read ({err}); run `course exercises build`")
            continue
        problems.extend(leftover_problems(actual, f"{ex_label}{path.name}"))
        recorded = actual.metadata.get(META_KEY, {}).get("source_sha256")
        if recorded != expected.metadata[META_KEY]["source_sha256"]:
            why = f"{sol_label}{path.name} changed since it was built"
        else:
            why = "it was edited by hand (exercises are generated, never edited)"
        problems.append(f"{ex_label}{path.name} is stale: {why}; run `course exercises build`")
    for path in sorted(exercises.glob("*.ipynb")):
        if path.name not in names:
            problems.append(f"{ex_label}{path.name} has no source {sol_label}{path.name}: "
                            "delete it, or add the solution notebook it should be built from")
    return problems
