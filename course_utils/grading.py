"""The grader: scores submitted exercise notebooks, task by task, and cannot be fooled by them.

The instructor's solution notebook is the single source of truth. For each task
of each submission, two processes work together:

* a **sandboxed student process** (:mod:`course_utils.grading_student`, in the
  sandbox of :mod:`course_utils.sandbox`) runs the notebook's set-up cells and
  then the student's task cell, found by metadata ``course.task``, else by cell
  id. Nothing else of the submission runs, and no solution or test is ever
  sent to it;
* a **trusted process** (:mod:`course_utils.grading_trusted`), where no student
  code ever runs, runs the solution notebook up to the task's last test cell,
  then the task's visible check and hidden test cells with the task's functions
  replaced by stand-ins. A stand-in sends its arguments to the student process
  as plain data and gets plain data back (:mod:`course_utils.wire`); every
  comparison, hint and verdict happens on the trusted side.

So whatever the student's code does in its own process (input transformers,
patched checks, a patched ``torch``, a rewritten ``course_utils``) changes
only the data it returns. A task scores ``points * passed / total`` over its
test cells, and every lost share gets a reason. A task whose function is the
library's own implementation scores nothing. Limits per task: wall time (the
processes are killed after it), time per call, memory, processes, file sizes
and printed output. A crash, an endless loop, a flood or a malformed notebook
costs only its own student's points; grades are written atomically, once every
process of every task is gone.

The check helpers that exercise notebooks use live in :mod:`course_utils.checks`;
they are re-exported here for notebooks written before the split.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from . import sandbox
from .checks import (  # noqa: F401 - re-exported for older notebooks
    checking,
    expect_close,
    expect_dtype,
    expect_equal,
    expect_shape,
    expect_true,
    expect_type,
    with_gradients,
)
from .exercises import (
    META_KEY,
    SOURCE_PREFIX,
    ExerciseError,
    Task,
    course_meta,
    default_solutions_dir,
    load_notebook,
    parse_solution,
    read_notebook,
    source_hash,
)
from .grading_trusted import DIED, _fmt, defined_names
from .runtime import CourseError
from .wire import inherit

if TYPE_CHECKING:
    import nbformat

__all__ = [
    "checking", "expect_close", "expect_dtype", "expect_equal", "expect_shape", "expect_true",
    "expect_type", "with_gradients", "TaskGrade", "NotebookGrade", "Submission", "grade_notebook",
    "grade_notebooks", "grade_many", "format_report", "apply_mistake", "declared_mistakes",
    "task_plan", "GradingLimits",
]

DEFAULT_TIMEOUT = 300.0  # seconds per task (its processes are killed after it)
MAX_NOTEBOOK_BYTES = 50 * 2**20  # a submitted file larger than this is not read


@dataclass
class GradingLimits:
    """Limits for one task of one submission (see :class:`course_utils.sandbox.Limits`)."""

    timeout: float = DEFAULT_TIMEOUT     # seconds for the whole task
    cell_timeout: float | None = None    # seconds for one call of the student's code (default: timeout)
    memory_bytes: int = 3 * 2**30
    max_processes: int = 64
    max_file_bytes: int = 64 * 2**20
    output_bytes: int = 64 * 2**10


# ===================================================================================
# Grades
# ===================================================================================
@dataclass
class TaskGrade:
    task: str
    points: float
    max_points: int
    feedback: list[str] = field(default_factory=list)
    passed: int = 0
    total: int = 0
    seconds: float = 0.0

    @property
    def full_marks(self) -> bool:
        return self.points >= self.max_points


@dataclass
class NotebookGrade:
    student: str
    notebook: str  # the solution notebook's file name, e.g. "00_warmup.ipynb"
    submission: str
    tasks: list[TaskGrade] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    solution: str = ""

    @property
    def points(self) -> float:
        return round(sum(t.points for t in self.tasks), 2)

    @property
    def max_points(self) -> int:
        return sum(t.max_points for t in self.tasks)

    def task(self, task_id: str) -> TaskGrade:
        for grade in self.tasks:
            if grade.task == task_id:
                return grade
        raise KeyError(task_id)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(points=self.points, max_points=self.max_points)
        return data


@dataclass
class Submission:
    """One notebook to grade: a path or a ``NotebookNode``, with optional overrides."""

    source: str | Path | nbformat.NotebookNode
    student: str | None = None
    solution_path: str | Path | None = None
    tasks: list[str] | None = None


def format_report(grade: NotebookGrade) -> str:
    """A human-readable report: per-task score, the reason for every lost point, the total."""
    lines = [f"{grade.student}: {grade.notebook}  ({grade.submission})"]
    lines += [f"  note: {note}" for note in grade.notes]
    width = max([len(t.task) for t in grade.tasks] + [4])
    for t in grade.tasks:
        mark = "ok" if t.full_marks else "--"
        lines.append(f"  [{mark}] {t.task:<{width}}  {_fmt(t.points):>5} / {t.max_points}")
        lines += [f"         - {line}" for line in t.feedback]
    lines.append(f"  total: {_fmt(grade.points)} / {grade.max_points} points")
    return "\n".join(lines)


# ===================================================================================
# Mistakes: the declared typical wrong implementations
# ===================================================================================
def declared_mistakes(solution_nb) -> list[tuple[str, int, dict]]:
    """``(task, index, mistake)`` for every mistake a solution notebook declares."""
    found = []
    for task in parse_solution(solution_nb).values():
        found += [(task.task, i, mistake) for i, mistake in enumerate(task.mistakes)]
    return found


def apply_mistake(solution_nb, task: str, mistake_index: int) -> nbformat.NotebookNode:
    """A submission: the solution with one declared mistake applied to ``task``'s cell.

    The ``old`` text is replaced everywhere in the cell; it must occur there
    (this protects the declarations from drifting away from the code).
    """
    nb, name = load_notebook(solution_nb)
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        meta = course_meta(cell)
        if meta.get("task") != task:
            continue
        mistakes = meta.get("mistakes") or []
        if not 0 <= mistake_index < len(mistakes):
            raise ExerciseError(f"task {task!r} declares {len(mistakes)} mistake(s); "
                                f"there is no mistake {mistake_index}")
        old, new = mistakes[mistake_index]["replace"]
        if old not in cell.source:
            raise ExerciseError(f"task {task!r}, mistake {mistakes[mistake_index].get('name')!r}: "
                                f"{old!r} is not in the solution cell; update the declaration")
        cell.source = cell.source.replace(old, new)
        if name:
            nb.metadata.setdefault(META_KEY, {})["source"] = f"{SOURCE_PREFIX}{name}"
        return nb
    raise ExerciseError(f"no solution cell for task {task!r}")


# ===================================================================================
# Reading a submission: plain JSON, checked, never trusted
# ===================================================================================
@dataclass
class _SubmittedCell:
    cell_id: str | None
    task: str | None
    source: str
    readable: bool = True  # False: its source was not text


def read_submission(path: Path) -> tuple[list[_SubmittedCell], dict]:
    """The code cells of a submitted notebook and its ``course`` metadata; CourseError if unreadable.

    Read as plain JSON with every field checked, so that no malformed file
    (wrong types, huge, not a notebook at all) can do more than lose its own points.
    """
    try:
        size = path.stat().st_size
        if size > MAX_NOTEBOOK_BYTES:
            raise CourseError(f"the file is {size / 2**20:.0f} MB, more than the "
                              f"{MAX_NOTEBOOK_BYTES / 2**20:.0f} MB a notebook may have")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except CourseError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CourseError(f"not a notebook (invalid JSON: {str(err)[:200]})") from None
    return _cells_of(data)


def _cells_of(data) -> tuple[list[_SubmittedCell], dict]:
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise CourseError("not a notebook (no list of cells)")
    metadata = data.get("metadata")
    course = metadata.get(META_KEY) if isinstance(metadata, dict) else None
    cells = []
    for cell in data["cells"]:
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        if isinstance(source, list) and all(isinstance(s, str) for s in source):
            source = "".join(source)
        readable = isinstance(source, str)
        meta = cell.get("metadata")
        meta = meta.get(META_KEY) if isinstance(meta, dict) else None
        task = meta.get("task") if isinstance(meta, dict) else None
        cell_id = cell.get("id")
        cells.append(_SubmittedCell(cell_id if isinstance(cell_id, str) else None,
                                    task if isinstance(task, str) else None,
                                    source if readable else "", readable))
    return cells, course if isinstance(course, dict) else {}


def _student_cell(cells: list[_SubmittedCell], task: Task) -> _SubmittedCell | None:
    """The student's cell for ``task``: by metadata ``course.task``, else by cell id."""
    for cell in cells:
        if cell.task == task.task:
            return cell
    for cell in cells:
        if task.cell_id and cell.cell_id == task.cell_id:
            return cell
    return None


# ===================================================================================
# What runs where for one task
# ===================================================================================
@dataclass
class _Cell:
    role: str  # "before", "reference", "after", "check", "hidden"
    label: str
    source: str


def task_plan(solution_nb, tasks: dict[str, Task], task_id: str) -> dict:
    """What grades ``task_id``: the trusted side's cells, the student's set-up cells, the task's names.

    * ``cells``: the solution's code cells up to the task's last test cell, other
      tasks' test cells left out; the task's own solution cell is ``reference``
      (after it, the task's names become stand-ins for the student's functions);
    * ``student_setup``: what the student process runs before the student's cell:
      the code cells before the first task, and later cells marked
      ``{"course": {"setup": true}}``; never a solution or a test;
    * ``names``: the functions and classes the task's solution cell defines;
    * ``prefix``: how many of ``cells`` are the notebook's shared set-up (the same for
      every task: a fork server runs them once).
    """
    task = tasks[task_id]
    test_cells = {i for t in tasks.values() for i in t.test_cells}
    task_cells = {t.cell for t in tasks.values()}
    first_task = min(task_cells)
    hidden_number = {index: n for n, index in enumerate(task.hidden, 1)}
    cells, setup = [], []
    for index, cell in enumerate(solution_nb.cells[: max(task.test_cells) + 1]):
        if cell.cell_type != "code":
            continue
        source = cell.source if isinstance(cell.source, str) else "".join(cell.source)
        if index not in test_cells and index not in task_cells and index < task.cell and \
                (index < first_task or course_meta(cell).get("setup") is True):
            setup.append(source)
        if index in test_cells and index not in task.test_cells:
            continue
        if index == task.cell:
            cells.append(_Cell("reference", "the reference solution", source))
        elif index in task.checks:
            cells.append(_Cell("check", "check cell", source))
        elif index in task.hidden:
            label = "hidden tests" + (f" {hidden_number[index]}" if len(task.hidden) > 1 else "")
            cells.append(_Cell("hidden", label, source))
        else:
            cells.append(_Cell("before" if index < task.cell else "after", f"cell {index + 1}", source))
    names = defined_names(cells[[c.role for c in cells].index("reference")].source)
    prefix = sum(1 for index, cell in enumerate(solution_nb.cells[:first_task])
                 if cell.cell_type == "code" and index not in test_cells)
    return {"task": task_id, "cells": [asdict(c) for c in cells], "student_setup": setup, "names": names,
            "prefix": prefix}


# ===================================================================================
# Running one task: a trusted process and a sandboxed student process
# ===================================================================================
@dataclass
class _Job:
    grade: TaskGrade
    plan: dict
    student_source: str
    number: int = 0


def _common_env(cpu_share: int) -> dict[str, str]:
    from .data import data_root

    return {
        "COURSE_BUDGET": os.environ.get("COURSE_BUDGET", "smoke"),
        "COURSE_DATA_DIR": str(data_root()),  # resolved before HOME changes
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": str(max(1, cpu_share)),
        "MKL_NUM_THREADS": str(max(1, cpu_share)),
        "TQDM_DISABLE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        "LANG": "C.UTF-8",
    }


def _matplotlib_cache() -> str | None:
    with contextlib.suppress(Exception):
        import matplotlib

        return matplotlib.get_cachedir()
    return None


class _ForkServer:
    """A trusted process that ran one solution notebook's set-up and forks an evaluator per task."""

    def __init__(self, setup: list[str], env: dict[str, str]):
        import socket

        self.folder = tempfile.mkdtemp(prefix="course-grade-server-")
        setup_path = Path(self.folder) / "setup.json"
        setup_path.write_text(json.dumps(setup), encoding="utf-8")
        self.socket, theirs = socket.socketpair()
        self.lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "course_utils.grading_trusted", "--fork-server", str(theirs.fileno()),
             str(setup_path)], pass_fds=(theirs.fileno(),), env=dict(env, HOME=self.folder),
            cwd=self.folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self.replies = self.socket.makefile("rb")

    def start(self, plan_path: Path, results_path: Path, fds: list[int]) -> int:
        """Fork an evaluator for one task; its process id (it leads its own process group)."""
        import socket

        message = json.dumps({"plan": str(plan_path), "results": str(results_path)}).encode()
        with self.lock:
            socket.send_fds(self.socket, [message], fds)
            line = self.replies.readline()
        if not line:
            raise OSError("the grader's fork server stopped")
        return int(json.loads(line)["pid"])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.close()
        _kill_group(self.process)
        shutil.rmtree(self.folder, ignore_errors=True)


class _ForkServers:
    """One :class:`_ForkServer` per solution notebook, started when first needed (Linux only)."""

    def __init__(self, env: dict[str, str]):
        self.env, self.servers, self.lock = env, {}, threading.Lock()

    def get(self, key, setup: list[str]) -> _ForkServer | None:
        if not sys.platform.startswith("linux"):  # fork after importing torch is only safe there
            return None
        with self.lock:
            server = self.servers.get(key)
            if server is None or server.process.poll() is not None:
                server = self.servers[key] = _ForkServer(setup, self.env)
            return server

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


def _trusted_env(cpu_share: int, home: str) -> dict[str, str]:
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, **_common_env(cpu_share), HOME=home, USERPROFILE=home,
               PYTHONPATH=os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p))
    env.pop("JPY_PARENT_PID", None)
    mpl_cache = _matplotlib_cache()
    if mpl_cache:
        env.setdefault("MPLCONFIGDIR", mpl_cache)
    return env


def _wait_for_end(done_fd: int, seconds: float) -> bool:
    """Whether the pipe's writer (a forked evaluator) went away within ``seconds``."""
    import select

    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        readable, _, _ = select.select([done_fd], [], [], left)
        if readable and not os.read(done_fd, 4096):
            return True


def _run_job(job: _Job, limits: GradingLimits, cpu_share: int,
             servers: _ForkServers | None = None) -> TaskGrade:
    """Grade one task: start the sandboxed student process and a trusted evaluator joined by
    two pipes, wait for the evaluator (at most the task's time limit), then kill both."""
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="course-grade-trusted-")
    plan = dict(job.plan, student_source=job.student_source, timeout=limits.timeout,
                cell_timeout=limits.cell_timeout or limits.timeout)
    plan_path, results_path = Path(workdir) / "plan.json", Path(workdir) / "results.jsonl"
    plan_path.write_text(json.dumps(plan), encoding="utf-8")
    results_path.touch()
    student_reads, trusted_writes = os.pipe()
    trusted_reads, student_writes = os.pipe()
    open_fds = {student_reads, trusted_writes, trusted_reads, student_writes}

    def close(*fds: int) -> None:
        for fd in fds:
            if fd in open_fds:
                open_fds.discard(fd)
                os.close(fd)

    box = trusted = None
    expired = ""
    limit = f"timed out after {_fmt(limits.timeout)} s (the time limit for the whole task)"
    left = lambda: max(0.1, limits.timeout - (time.monotonic() - start))
    try:
        box = _start_student(job, limits, cpu_share, (student_reads, student_writes))
        close(student_reads, student_writes)
        stop = threading.Event()
        watcher = threading.Thread(target=box.watch, args=(stop,), daemon=True)
        server = servers.get(job.plan["solution"], [c["source"] for c in job.plan["cells"]]
                             [:job.plan["prefix"]]) if servers is not None else None
        if server is not None:
            done_read, done_write = os.pipe()
            open_fds |= {done_read, done_write}
            forked = server.start(plan_path, results_path, [trusted_reads, trusted_writes, done_write])
            close(trusted_reads, trusted_writes, done_write)
            watcher.start()
            try:
                if not _wait_for_end(done_read, left()):
                    expired = limit
            finally:
                with contextlib.suppress(OSError):
                    os.killpg(forked, 9)
        else:
            trusted_args, trusted_options = inherit((trusted_reads, trusted_writes))
            with open(Path(workdir) / "trusted.log", "wb") as log:
                trusted = subprocess.Popen(
                    [sys.executable, "-m", "course_utils.grading_trusted", str(plan_path),
                     str(results_path), *trusted_args], **trusted_options,
                    env=_trusted_env(cpu_share, workdir), cwd=workdir, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=os.name == "posix")
            close(trusted_reads, trusted_writes)
            watcher.start()
            try:
                trusted.wait(timeout=left())
            except subprocess.TimeoutExpired:
                expired = limit
        stop.set()
        watcher.join(timeout=5)
    except OSError as err:
        expired = f"the grader could not run this task ({err}); tell your instructor"
    finally:
        close(*list(open_fds))
        if trusted is not None:
            _kill_group(trusted)
        if box is not None:
            box.close()
    outcomes = _read_results(results_path)
    log_path = Path(workdir) / "trusted.log"
    trusted_log = log_path.read_bytes()[-4000:].decode("utf-8", "replace") if log_path.is_file() else ""
    shutil.rmtree(workdir, ignore_errors=True)
    broken = box.limit_exceeded() if box is not None else None
    failed_start = box.startup_failure() if box is not None else None
    if failed_start:  # not the student's doing: say so in every test's place
        outcomes = {i: f"the grader could not start the sandbox ({failed_start}); tell your instructor"
                    for i, c in enumerate(plan["cells"]) if c["role"] in ("check", "hidden")}
    return _score(job.grade, plan, outcomes, expired or _trusted_failure(trusted_log), limit,
                  broken, time.monotonic() - start)


def _start_student(job: _Job, limits: GradingLimits, cpu_share: int, fds: tuple[int, int]):
    """The sandboxed process that runs the student's cell and answers the evaluator's calls."""
    common = _common_env(cpu_share)
    mpl_cache = _matplotlib_cache()
    env = dict(common, PATH="/usr/local/bin:/usr/bin:/bin", MPLCONFIGDIR=mpl_cache or "")
    args, options = inherit(fds)
    return sandbox.start(
        ["-m", "course_utils.grading_student", *args], popen_options=options, env=env,
        package_dir=Path(__file__).resolve().parent, read_only=[common["COURSE_DATA_DIR"]],
        files=_font_cache_files(mpl_cache),
        limits=sandbox.Limits(memory_bytes=limits.memory_bytes, max_processes=limits.max_processes,
                              max_file_bytes=limits.max_file_bytes, output_bytes=limits.output_bytes),
        name=f"course-grade-{os.getpid()}-{job.number}")


def _score(grade: TaskGrade, plan: dict, outcomes: dict, missing: str, limit: str,
           broken: str | None, seconds: float) -> TaskGrade:
    """The task's points from its test cells' outcomes; one line per reason for what was lost.

    ``broken``: the limit the student's code broke (memory, processes), which voids the
    whole task, the cells that passed before included.
    """
    tests = [i for i, c in enumerate(plan["cells"]) if c["role"] in ("check", "hidden")]
    for i in tests:
        if broken:
            outcomes[i] = f"kernel died: your code {broken}"
            continue
        reason = outcomes.get(i, "missing")
        if reason == "missing" or (reason == "did not run" and missing == limit):
            reason = missing
        if isinstance(reason, str) and reason.startswith("timed out (the time limit for the whole task)"):
            reason = limit
        if isinstance(reason, str) and reason.startswith(DIED):
            reason = f"{DIED} (os._exit, a segfault, or running out of memory?)"
        outcomes[i] = reason
    passed = sum(outcomes[i] is None for i in tests)
    grade.passed, grade.total = passed, len(tests)
    grade.points = round(grade.max_points * passed / len(tests), 2) if tests else 0.0
    labels = [plan["cells"][i]["label"] for i in tests]
    grade.feedback += _group_reasons(labels, [outcomes[i] for i in tests])
    grade.seconds = round(seconds, 2)
    return grade


def _font_cache_files(cache: str | None) -> dict[str, str]:
    """Matplotlib's font list, copied read-only into the sandbox: no 5-second rebuild per task."""
    if not cache or not os.path.isdir(cache):
        return {}
    return {f"/tmp/matplotlib/{p.name}": str(p) for p in Path(cache).glob("fontlist-*.json")}


def _kill_group(process: subprocess.Popen) -> None:
    if os.name == "posix":
        with contextlib.suppress(OSError):
            os.killpg(process.pid, 9)
    with contextlib.suppress(OSError):
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _read_results(path: Path) -> dict[int, str | None]:
    """The evaluator's verdict for each test cell it reached: None (passed) or the reason."""
    outcomes: dict[int, str | None] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and isinstance(item.get("index"), int):
                outcome = item.get("outcome")
                outcomes.setdefault(item["index"], outcome if isinstance(outcome, str) or outcome is None
                                    else str(outcome))
    return outcomes


def _trusted_failure(log: str) -> str:
    tail = " / ".join(log.strip().splitlines()[-3:])
    detail = f": {tail}" if tail else ""
    return f"the grader could not run this task{detail}; tell your instructor"


def _group_reasons(labels: list[str], reasons: list[str | None]) -> list[str]:
    """One line per distinct reason; a reason shared by several cells names them all."""
    grouped: dict[str, list[str]] = {}
    for label, reason in zip(labels, reasons, strict=True):
        if reason is None:
            continue
        if reason.startswith(f"{label}: "):
            grouped.setdefault(reason[len(label) + 2:], []).append(label)
        else:
            grouped.setdefault(reason, []).append(label)
    return [f"{', '.join(cells)}: {reason}" for reason, cells in grouped.items()]




# ===================================================================================
# Public entry points
# ===================================================================================
def _find_solution(course: dict, path: Path | None, solutions_dir: Path) -> Path:
    available = sorted(p for p in solutions_dir.glob("*.ipynb") if p.is_file())
    source = course.get("source")
    candidates = []
    if isinstance(source, str) and source:
        candidates.append(solutions_dir / PurePosixPath(source).name)
    if path is not None:
        candidates.append(solutions_dir / path.name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if path is not None:  # "00_warmup-alice.ipynb", "00_warmup (1).ipynb": longest matching prefix
        prefixed = [p for p in available if path.stem.startswith(p.stem)]
        if prefixed:
            return max(prefixed, key=lambda p: len(p.stem))
    names = ", ".join(p.name for p in available) or "none"
    what = f"{path.name}" if path is not None else "the submission"
    raise CourseError(f"cannot tell which solution notebook {what} belongs to: its metadata has "
                      f"no course.source and its name matches none in {solutions_dir} "
                      f"(available: {names}); rename it after its exercise")


def _jobs_for(sub: Submission, solutions_dir: Path, cache: dict,
              tasks_filter: list[str] | None) -> tuple[NotebookGrade, list[_Job]]:
    path = None if not isinstance(sub.source, (str, Path)) else Path(sub.source)
    student = sub.student or (path.stem if path is not None else "submission")
    grade = NotebookGrade(student=student, notebook="", submission=str(path or "<notebook>"))
    cells, course, read_error = None, {}, None
    try:
        cells, course = read_submission(path) if path is not None else _cells_of(sub.source)
    except CourseError as err:
        read_error = err
    try:
        solution_path = Path(sub.solution_path) if sub.solution_path else \
            _find_solution(course, path, solutions_dir)
    except CourseError:
        if read_error is not None:  # the real problem: say that one
            raise CourseError(f"your notebook could not be read: {read_error}") from None
        raise
    solution_path = solution_path.resolve()
    if solution_path not in cache:
        solution = read_notebook(solution_path)
        cache[solution_path] = (solution, parse_solution(solution, solution_path.name),
                                source_hash(solution))
    solution, tasks, digest = cache[solution_path]
    grade.notebook, grade.solution = solution_path.name, str(solution_path)
    wanted = sub.tasks if sub.tasks is not None else tasks_filter
    if wanted is not None and sub.tasks is not None:
        unknown = [t for t in wanted if t not in tasks]
        if unknown:
            raise CourseError(f"unknown task(s) {', '.join(unknown)} in {solution_path.name} "
                              f"(tasks: {', '.join(tasks)})")
    selected = [t for t in tasks.values() if wanted is None or t.task in wanted]
    if read_error is not None:
        grade.notes.append(f"your notebook could not be read: {read_error}")
    elif course.get("source_sha256", digest) != digest:
        grade.notes.append("your exercise was built from an older version of the solution "
                           "notebook; it was graded against the current one")
    jobs = []
    for task in selected:
        task_grade = TaskGrade(task.task, 0.0, task.points)
        grade.tasks.append(task_grade)
        cell = _student_cell(cells, task) if cells is not None else None
        if cell is not None and not cell.readable:
            task_grade.total = len(task.test_cells)
            task_grade.feedback.append(f"your cell for task {task.task!r} could not be read (its source "
                                       "is not text): copy it back from the exercise")
            continue
        if cell is None:
            task_grade.total = len(task.test_cells)
            task_grade.feedback.append(
                "could not read your notebook" if cells is None else
                f"your cell for task {task.task!r} is missing (no cell with metadata course.task "
                f"= {task.task!r} or id {task.cell_id!r}): copy it back from the exercise")
            continue
        key = (solution_path, task.task)
        if key not in cache:
            cache[key] = dict(task_plan(solution, tasks, task.task), solution=str(solution_path))
        jobs.append(_Job(task_grade, cache[key], cell.source))
    return grade, jobs


def _default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def grade_notebooks(submissions: Iterable, *, solutions_dir: str | Path | None = None,
                    timeout: float = DEFAULT_TIMEOUT, cell_timeout: float | None = None,
                    tasks: list[str] | None = None, jobs: int | None = None,
                    on_error: str = "raise", limits: GradingLimits | None = None) -> list[NotebookGrade]:
    """Grade several submissions (paths, notebooks or :class:`Submission`), tasks in parallel.

    timeout:      seconds per task; its processes are killed after it.
    cell_timeout: seconds per call of the student's code (default: ``timeout``).
    tasks:        grade only these tasks (default: all).
    jobs:         tasks graded at once (default: CPU count, at most 4).
    on_error:     ``"raise"``, or ``"record"`` to turn an unreadable or unmatched
                  submission into a grade with a note instead of an exception.
    limits:       memory, processes, file sizes, output (timeouts from the arguments).
    """
    solutions = Path(solutions_dir) if solutions_dir else default_solutions_dir()
    jobs = jobs or _default_jobs()
    limits = replace(limits or GradingLimits(), timeout=timeout, cell_timeout=cell_timeout or timeout)
    cache: dict = {}
    grades, all_jobs = [], []
    for item in submissions:
        sub = item if isinstance(item, Submission) else Submission(item)
        try:
            grade, task_jobs = _jobs_for(sub, solutions, cache, tasks)
        except CourseError as err:
            if on_error != "record":
                raise
            path = None if not isinstance(sub.source, (str, Path)) else Path(sub.source)
            grade = NotebookGrade(sub.student or (path.stem if path else "submission"),
                                  path.name if path else "", str(path or "<notebook>"),
                                  notes=[f"not graded: {err}"])
            task_jobs = []
        grades.append(grade)
        all_jobs += task_jobs
    if tasks is not None and cache:
        known = {t for value in cache.values() if isinstance(value, tuple) for t in value[1]}
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise CourseError(f"unknown task(s) {', '.join(unknown)} (tasks: {', '.join(sorted(known))})")
    cpu_share = max(1, (os.cpu_count() or 1) // jobs)
    for number, job in enumerate(all_jobs):
        job.number = number

    servers = _ForkServers(_trusted_env(cpu_share, tempfile.gettempdir()))

    def one(job: _Job) -> None:
        try:
            _run_job(job, limits, cpu_share, servers)
        except Exception as err:  # the grader's own failure costs this task, never the run
            job.grade.points, job.grade.total = 0.0, job.grade.total or 1
            job.grade.feedback.append(f"the grader failed on this task ({type(err).__name__}: {err}); "
                                      "tell your instructor")

    try:
        if all_jobs:
            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(one, all_jobs))
    finally:
        servers.close()
    return grades


def grade_notebook(submission_path, solution_path=None, timeout: float = DEFAULT_TIMEOUT,
                   tasks: list[str] | None = None, *, cell_timeout: float | None = None,
                   solutions_dir: str | Path | None = None, student: str | None = None,
                   jobs: int | None = None, limits: GradingLimits | None = None) -> NotebookGrade:
    """Grade one submitted notebook (a path or a ``NotebookNode``) task by task.

    The solution is ``solution_path``, else the one named by the submission's
    metadata ``course.source``, else the one with the same file name in
    ``solutions_dir`` (default: the repository's ``solutions/``).
    """
    sub = Submission(submission_path, student, solution_path, tasks)
    return grade_notebooks([sub], solutions_dir=solutions_dir, timeout=timeout,
                           cell_timeout=cell_timeout, jobs=jobs, limits=limits)[0]


def collect_submissions(paths_or_dirs) -> list[Submission]:
    """Every notebook to grade, each with a student id that no other submission shares.

    In a folder, the student is the first folder under it (``subs/alice/...`` is
    ``alice``); a notebook at the top of a folder, or given directly, is its own
    student, named by its file name (``alice.ipynb`` is ``alice``). Two
    submissions that would get the same id from different places (two folders
    named alike, a folder and a file) keep them apart with their paths.
    """
    if isinstance(paths_or_dirs, (str, Path)):
        paths_or_dirs = [paths_or_dirs]
    found: list[tuple[Submission, str]] = []  # (submission, where this student comes from)
    for item in paths_or_dirs:
        item = Path(item)
        if item.is_dir():
            for path in sorted(item.rglob("*.ipynb")):
                rel = path.relative_to(item)
                if ".ipynb_checkpoints" in rel.parts or not path.is_file():
                    continue
                if len(rel.parts) > 1:
                    found.append((Submission(path, rel.parts[0]), str(item / rel.parts[0])))
                else:
                    found.append((Submission(path, path.stem), str(path)))
        elif item.is_file():
            found.append((Submission(item, item.stem), str(item)))
        else:
            raise CourseError(f"no such submission: {item}")
    origins: dict[str, set[str]] = {}
    for sub, origin in found:
        origins.setdefault(sub.student, set()).add(origin)
    for sub, origin in found:
        if len(origins[sub.student]) > 1:
            sub.student = f"{sub.student} ({origin})"
    return [sub for sub, _ in found]


CSV_COLUMNS = ("student", "notebook", "task", "points", "max_points", "feedback")


def grades_table(grades: list[NotebookGrade]) -> list[dict]:
    """One row per task per student (a submission that could not be graded: one row)."""
    rows = []
    for grade in grades:
        for t in grade.tasks:
            rows.append(dict(student=grade.student, notebook=grade.notebook, task=t.task,
                             points=t.points, max_points=t.max_points,
                             feedback=" | ".join(grade.notes + t.feedback)))
        if not grade.tasks:
            rows.append(dict(student=grade.student, notebook=grade.notebook, task="",
                             points=0, max_points=0, feedback=" | ".join(grade.notes)))
    return rows


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` in one step: a reader sees the old file or the new one, never half."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def grade_many(paths_or_dirs, out_dir: str | Path | None = None, *,
               solutions_dir: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT,
               cell_timeout: float | None = None, tasks: list[str] | None = None,
               jobs: int | None = None, quiet: bool = False,
               limits: GradingLimits | None = None) -> list[NotebookGrade]:
    """Grade notebooks and folders of notebooks (searched recursively).

    Student ids: see :func:`collect_submissions`. Prints a report per student;
    with ``out_dir`` writes ``grades.csv`` (one row per task per student),
    ``grades.json`` and ``report.txt``, each atomically, after every task's
    processes are gone. A submission that cannot be read or matched is
    recorded with its reason, never fatal.
    """
    submissions = collect_submissions(paths_or_dirs)
    grades = grade_notebooks(submissions, solutions_dir=solutions_dir, timeout=timeout,
                             cell_timeout=cell_timeout, tasks=tasks, jobs=jobs,
                             on_error="record", limits=limits)
    grades = [g for g in grades if g.tasks or g.notes]  # notebooks without any selected task
    grades.sort(key=lambda g: (g.student, g.notebook, g.submission))
    report = _many_report(grades)
    if not quiet:
        print(report)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(grades_table(grades))
        _write_atomically(out / "grades.csv", buffer.getvalue())
        _write_atomically(out / "grades.json",
                          json.dumps([g.to_dict() for g in grades], indent=1, ensure_ascii=False) + "\n")
        _write_atomically(out / "report.txt", report + "\n")
    return grades


def not_graded(grade: NotebookGrade) -> bool:
    """Whether a submission could not be graded at all (unreadable, or no matching solution)."""
    return not grade.tasks or any(note.startswith(("not graded", "your notebook could not be read"))
                                  for note in grade.notes)


def _many_report(grades: list[NotebookGrade]) -> str:
    parts, totals = [], {}
    for grade in grades:
        parts.append(format_report(grade))
        got, most = totals.get(grade.student, (0.0, 0))
        totals[grade.student] = (got + grade.points, most + grade.max_points)
    if len(grades) > 1:
        width = max(len(s) for s in totals)
        parts.append("Totals:\n" + "\n".join(f"  {s:<{width}}  {_fmt(round(p, 2))} / {m}"
                                             for s, (p, m) in totals.items()))
    return "\n\n".join(parts)
