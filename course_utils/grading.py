"""Checks for exercise cells, and the grader that scores submitted notebooks.

Check helpers (used by visible check cells and hidden tests)
-----------------------------------------------------------
Each raises ``AssertionError`` with a message that says *what* is wrong (shape,
dtype, off by a factor, wrong dimension...), plus a hint when one is given::

    with checking("pixel_statistics"):          # prints "✓ pixel_statistics looks right"
        mean, std = pixel_statistics(images)    # NotImplementedError -> "not implemented yet"
        expect_shape(mean, (len(images),), "mean")
        expect_close(std, reference, "std",
                     hints={"divide by N, not N - 1": sample_std})

``hints`` maps a hint to a typical *wrong* answer: when the student's value
matches it, the hint is printed.

Grading
-------
The instructor's solution notebook is the single source of truth. Each task is
graded in its own fresh kernel, on a notebook made of the solution's cells up to
that task's last test cell, where

* the task's solution cell is replaced by the student's cell (found by metadata
  ``course.task``, else by cell id); every other task keeps the reference code;
* other tasks' check and hidden cells are left out, so a broken task 1 cannot
  cost task 2; cells the student added are ignored.

The task's test cells are its visible check cell(s) and hidden test cell(s):
``score = points * passed / total``. Every lost portion gets a reason.
Each kernel runs in its own temporary directory (which is also ``$HOME``), with
``COURSE_BUDGET=smoke`` unless set, a per-cell time limit and a per-task limit
after which the kernel is killed. A crash, a dead kernel, an endless loop or a
deleted file costs only the task that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import csv
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import torch

from .exercises import (
    META_KEY,
    NOT_IMPLEMENTED,
    SOURCE_PREFIX,
    STUB_COMMENT,
    ExerciseError,
    Task,
    course_meta,
    default_solutions_dir,
    load_notebook,
    parse_solution,
    read_notebook,
    source_hash,
)
from .runtime import CourseError

if TYPE_CHECKING:  # imported lazily: notebooks that only use the checks start faster
    import nbformat

__all__ = [
    "checking", "expect_close", "expect_dtype", "expect_equal", "expect_shape", "expect_true",
    "expect_type", "TaskGrade", "NotebookGrade", "Submission", "grade_notebook",
    "grade_notebooks", "grade_many", "format_report", "apply_mistake", "declared_mistakes",
    "task_notebook",
]

DEFAULT_TIMEOUT = 300.0  # seconds per task (the kernel is killed after it)


# ===================================================================================
# Check helpers
# ===================================================================================
def _fail(problem: str, hints: Iterable[str | None] = ()) -> None:
    hints = [h for h in hints if h]
    raise AssertionError(problem + (f" Hint: {' / '.join(hints)}" if hints else ""))


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if value is None:
        return "None (did you forget to `return` it?)"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None:
        _fail(f"{name} is None: did you forget to `return` it?")
    try:
        return torch.as_tensor(value)
    except Exception:
        _fail(f"{name} should be a tensor or a number, but it is {_kind(value)}")
    raise AssertionError  # unreachable, for type checkers


def _shape_text(shape) -> str:
    return str(tuple(shape))


def _shape_diagnosis(got: tuple, want: tuple) -> str:
    if len(got) == len(want) + 1 and 1 in got:
        return " (an extra dimension of size 1: squeeze it, or drop keepdim=True)"
    if len(got) + 1 == len(want):
        return " (one dimension missing: did you reduce over one dimension too many?)"
    if len(got) == 0 and len(want) > 0:
        return " (a single number: did you reduce over all dimensions instead of one?)"
    numel = lambda s: int(torch.tensor(s, dtype=torch.long).prod()) if len(s) else 1
    if len(got) == len(want) and sorted(got) == sorted(want):
        return " (the right sizes in the wrong order: transposed or permuted?)"
    if numel(got) == numel(want):
        return " (the right number of elements in the wrong shape: check your reshape/view)"
    if len(got) == len(want):
        return " (did you reduce, index or concatenate over the wrong dimension?)"
    return ""


def _value_diagnosis(a: torch.Tensor, e: torch.Tensor, rtol: float, atol: float) -> str:
    """How ``a`` differs from ``e`` (same shape): where, by how much, and any pattern."""
    if not torch.isfinite(a).all() and torch.isfinite(e).all():
        bad = int((~torch.isfinite(a)).sum())
        return f"it contains {bad} NaN or infinite value(s)"
    diff = (a - e).abs().nan_to_num(nan=float("inf"))
    flat = int(diff.argmax())
    got, want = a.reshape(-1)[flat].item(), e.reshape(-1)[flat].item()
    notes = []
    mask = e.abs() > max(atol, 1e-12)
    if mask.any():
        ratio = a[mask] / e[mask]
        mean_ratio = float(ratio.mean())
        spread = float(ratio.max() - ratio.min())
        if spread <= 1e-3 * max(abs(mean_ratio), 1e-12) and (a[~mask].abs() <= atol).all():
            if abs(mean_ratio + 1) < 1e-3:
                notes.append("the sign is flipped" if a.dim() == 0 else
                             "every value has the wrong sign")
            elif abs(mean_ratio - 1) > 1e-6:
                notes.append(f"{mean_ratio:.4g} times the expected value" if a.dim() == 0 else
                             f"every value is {mean_ratio:.4g} times the expected one "
                             "(off by a constant factor)")
    offset = a - e
    if not notes and a.numel() > 1 and float(offset.max() - offset.min()) <= max(atol, 1e-6):
        notes.append(f"every value is off by the same amount ({float(offset.mean()):+.4g})")
    if not notes and a.dim() == 2 and a.shape[0] == a.shape[1] and torch.allclose(a.T, e, atol=atol):
        notes.append("it looks transposed")
    if not notes and a.numel() > 1 and torch.allclose(a.reshape(-1).sort().values,
                                                      e.reshape(-1).sort().values, atol=atol):
        notes.append("the right values in the wrong order")
    if a.dim() == 0:
        text = f"got {got:.6g}, expected {want:.6g}"
    else:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        wrong = int((diff > atol + rtol * e.abs()).sum())
        text = (f"{wrong} of {a.numel()} values differ; the largest difference is at index "
                f"{index}: got {got:.6g}, expected {want:.6g}")
    return text + "".join(f"; {note}" for note in notes)


def _matches(a: torch.Tensor, alternative, rtol: float, atol: float) -> bool:
    try:
        alt = _tensor(alternative, "alternative")
    except AssertionError:
        return False
    return a.shape == alt.shape and torch.allclose(a.double(), alt.double(), rtol=rtol, atol=atol)


def expect_close(actual, expected, name: str = "result", *, rtol: float = 1e-4,
                 atol: float = 1e-5, hint: str | None = None,
                 hints: dict[str, object] | None = None) -> None:
    """``actual`` equals ``expected`` up to tolerance; otherwise say how it differs.

    hint:  printed whenever the check fails.
    hints: ``{hint: typical_wrong_value}``; a hint is printed when ``actual``
           matches its wrong value (e.g. the sample std where the population std
           was asked for).
    """
    a, e = _tensor(actual, name), _tensor(expected, "expected")
    matched = [msg for msg, wrong in (hints or {}).items() if _matches(a, wrong, rtol, atol)]
    chosen = matched or [hint]
    if a.shape != e.shape:
        _fail(f"{name} has shape {_shape_text(a.shape)}, expected {_shape_text(e.shape)}"
              f"{_shape_diagnosis(tuple(a.shape), tuple(e.shape))}.", chosen)
    if a.is_complex() or e.is_complex():
        close = torch.allclose(a.to(torch.complex128), e.to(torch.complex128), rtol=rtol, atol=atol)
    else:
        a, e = a.double(), e.double()
        close = torch.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if not close:
        what = "is wrong" if a.dim() == 0 else \
            f"has the right shape {_shape_text(a.shape)} but wrong values"
        _fail(f"{name} {what}: {_value_diagnosis(a, e, rtol, atol)}.", chosen)


def expect_shape(t, shape, name: str = "result", hint: str | None = None) -> None:
    """``t`` is a tensor of shape ``shape`` (``None`` or ``-1`` entries match any size)."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} should be a tensor of shape {_shape_text(shape)}, but it is {_kind(t)}.",
              [hint])
    want, got = tuple(shape), tuple(t.shape)
    wild = (None, -1)
    if len(got) == len(want) and all(w in wild or g == w for g, w in zip(got, want, strict=True)):
        return
    concrete = tuple(g if w in wild else w for g, w in zip(got, want, strict=True)) \
        if len(got) == len(want) else tuple(0 if w in wild else w for w in want)
    shown = _shape_text(tuple("*" if w in wild else w for w in want)).replace("'", "")
    _fail(f"{name} has shape {_shape_text(got)}, expected {shown}"
          f"{_shape_diagnosis(got, concrete)}.", [hint])


_DTYPE_GROUPS = {
    "float": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "integer": (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64),
}


def expect_dtype(t, dtype, name: str = "result", hint: str | None = None) -> None:
    """``t`` has ``dtype``: a ``torch.dtype``, a tuple of them, ``"float"`` or ``"integer"``."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} should be a tensor, but it is {_kind(t)}.", [hint])
    allowed = _DTYPE_GROUPS.get(dtype, dtype) if isinstance(dtype, str) else dtype
    allowed = allowed if isinstance(allowed, tuple) else (allowed,)
    if t.dtype not in allowed:
        want = dtype if isinstance(dtype, str) else " or ".join(str(d) for d in allowed)
        extra = " (a comparison gives bool: convert it, e.g. with .float())" \
            if t.dtype == torch.bool else ""
        _fail(f"{name} has dtype {t.dtype}, expected {want}{extra}.", [hint])


def expect_equal(actual, expected, name: str = "result", hint: str | None = None) -> None:
    """Exact equality (tensors: same shape and values, any dtype; other values: ``==``)."""
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        a, e = _tensor(actual, name), _tensor(expected, "expected")
        if a.shape != e.shape:
            _fail(f"{name} has shape {_shape_text(a.shape)}, expected {_shape_text(e.shape)}"
                  f"{_shape_diagnosis(tuple(a.shape), tuple(e.shape))}.", [hint])
        if not torch.equal(a.to(torch.float64), e.to(torch.float64)):
            _fail(f"{name} has wrong values: {_value_diagnosis(a.double(), e.double(), 0.0, 0.0)}.",
                  [hint])
        return
    if actual != expected:
        _fail(f"{name} is {actual!r}, expected {expected!r}.", [hint])


def expect_type(value, types, name: str = "result", hint: str | None = None) -> None:
    """``isinstance(value, types)``, e.g. a Python ``float`` rather than a tensor."""
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        _fail(f"{name} should be a {names}, but it is {_kind(value)}.", [hint])


def expect_true(condition, message: str, hint: str | None = None) -> None:
    """A condition with its own message."""
    if not bool(condition):
        _fail(message, [hint])


@contextlib.contextmanager
def checking(task: str):
    """Wrap a check cell: friendly messages for a stub or a crash, a ✓ when all passes."""
    try:
        yield
    except NotImplementedError:
        raise AssertionError(
            f"{task}: {NOT_IMPLEMENTED}. Write your code where it says `{STUB_COMMENT}`, "
            "delete the `raise NotImplementedError(...)` line, run that cell, then this one."
        ) from None
    except AssertionError:
        raise
    except Exception as err:
        raise AssertionError(f"{task}: your code raised {type(err).__name__}: {err}") from err
    print(f"✓ {task} looks right")


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


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


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
# Building the notebook that grades one task
# ===================================================================================
@dataclass
class _Cell:
    role: str  # "before", "student", "after", "check", "hidden"
    label: str
    source: str


def _student_cell(submission: nbformat.NotebookNode, task: Task):
    """The student's cell for ``task``: by metadata ``course.task``, else by cell id."""
    for cell in submission.cells:
        if course_meta(cell).get("task") == task.task:
            return cell
    for cell in submission.cells:
        if task.cell_id and cell.get("id") == task.cell_id:
            return cell
    return None


def task_notebook(solution_nb, tasks: dict[str, Task], task_id: str,
                  student_source: str) -> tuple[nbformat.NotebookNode, list[_Cell]]:
    """The notebook that grades ``task_id``, and the role of each of its cells."""
    task = tasks[task_id]
    other_tests = {i for t in tasks.values() if t.task != task_id for i in t.test_cells}
    hidden_number = {index: n for n, index in enumerate(task.hidden, 1)}
    plan = []
    for index, cell in enumerate(solution_nb.cells[: max(task.test_cells) + 1]):
        if cell.cell_type != "code" or index in other_tests:
            continue
        if index == task.cell:
            plan.append(_Cell("student", "your code", student_source))
        elif index in task.checks:
            plan.append(_Cell("check", "check cell", cell.source))
        elif index in task.hidden:
            label = "hidden tests" + (f" {hidden_number[index]}" if len(task.hidden) > 1 else "")
            plan.append(_Cell("hidden", label, cell.source))
        else:
            plan.append(_Cell("before" if index < task.cell else "after", f"cell {index + 1}",
                              cell.source))
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(metadata=copy.deepcopy(solution_nb.metadata))
    nb.metadata.pop(META_KEY, None)
    nb.cells = [new_code_cell(c.source) for c in plan]
    for number, cell in enumerate(nb.cells):
        cell.id = f"cell-{number}"
    return nb, plan


# ===================================================================================
# Running one task in a fresh kernel
# ===================================================================================
def _kernel_manager_class():
    from jupyter_client.manager import AsyncKernelManager

    class CurrentPythonKernelManager(AsyncKernelManager):
        """The ``python3`` kernel, always on this interpreter (``sys.executable``)."""

        def format_kernel_cmd(self, extra_arguments=None):
            return [sys.executable, "-m", "ipykernel_launcher", "-f",
                    os.path.realpath(self.connection_file), *(extra_arguments or [])]

    return CurrentPythonKernelManager


_QUIET_LOG = logging.getLogger("course_utils.grading.nbclient")
_QUIET_LOG.setLevel(logging.CRITICAL)  # timeouts and errors are reported in the feedback instead
_QUIET_LOG.propagate = False
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _your_line(traceback: str, count: int, source: str) -> str:
    """`` (your code, line 3: `...`)`` when the traceback passes through the student's cell."""
    found = re.findall(rf"Cell In\[{count}\], line (\d+)", _ANSI.sub("", traceback or ""))
    if not found:
        return ""
    number = int(found[-1])
    lines = source.split("\n")
    text = lines[number - 1].strip() if 0 < number <= len(lines) else ""
    return f" (in your code, line {number}: `{text}`)" if text else f" (in your code, line {number})"


def _error_text(ename: str, evalue: str, limit: int = 2000) -> str:
    """``Type: message``; a failed assertion's message speaks for itself."""
    evalue = (evalue or "").strip()
    if len(evalue) > limit:
        evalue = evalue[:limit] + " [...]"
    if ename == "AssertionError" and evalue:
        return evalue
    return f"{ename}: {evalue}" if evalue else ename


def _is_not_implemented(ename: str, evalue: str) -> bool:
    return ename == "NotImplementedError" or NOT_IMPLEMENTED in (evalue or "")


@dataclass
class _Job:
    grade: TaskGrade
    nb: nbformat.NotebookNode | None = None
    plan: list[_Cell] = field(default_factory=list)
    # per test cell (in plan order): None = passed, str = the reason it was lost
    outcomes: dict[int, str | None] = field(default_factory=dict)
    student_count: int = 0  # the kernel's execution count of the student's cell
    student_src: str = ""
    expired: str = ""  # set when the task's total time limit is reached: the reason


def _kernel_env(workdir: str, cpu_share: int) -> dict:
    from .data import data_root

    env = dict(os.environ)
    env.setdefault("COURSE_BUDGET", "smoke")
    env.setdefault("COURSE_DATA_DIR", str(data_root()))  # resolve before $HOME changes
    env.setdefault("TORCH_HOME", str(Path.home() / ".cache" / "torch"))
    env.setdefault("MPLBACKEND", "Agg")
    if "MPLCONFIGDIR" not in env:  # keep matplotlib's font cache: no rebuild per task
        with contextlib.suppress(Exception):
            import matplotlib

            env["MPLCONFIGDIR"] = matplotlib.get_configdir()
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_share)))
    package_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    env["HOME"] = workdir
    env["USERPROFILE"] = workdir
    env["IPYTHONDIR"] = str(Path(workdir) / ".ipython")
    env.pop("JPY_PARENT_PID", None)
    return env


async def _execute(job: _Job, workdir: str, cell_timeout: float, total_timeout: float,
                   env: dict) -> None:
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    tests = [i for i, c in enumerate(job.plan) if c.role in ("check", "hidden")]

    def lose_rest(reason: str, start: int = 0) -> None:
        if job.expired:  # nbclient reports the cancellation at the time limit as a dead kernel
            reason = job.expired
        for i in tests:
            if i >= start and i not in job.outcomes:
                job.outcomes[i] = reason

    # the per-cell limit is for the student's code and the tests; the reference set-up cells
    # before the student's cell only have the task's total limit
    limits = {cell.id: total_timeout if role.role == "before" else cell_timeout
              for cell, role in zip(job.nb.cells, job.plan, strict=True)}
    client = NotebookClient(
        job.nb, timeout_func=lambda cell: int(max(1, limits[cell.id])), allow_errors=False,
        kernel_name="python3", kernel_manager_class=_kernel_manager_class(),
        shutdown_kernel="immediate", resources={"metadata": {"path": workdir}},
        startup_timeout=120, record_timing=False, log=_QUIET_LOG,
    )
    log = tempfile.TemporaryFile()  # the kernel's own stdout/stderr (not the cells' output)
    try:
        async with client.async_setup_kernel(env=env, cwd=workdir, stdout=log, stderr=log):
            count = 0
            for index, cell in enumerate(job.nb.cells):
                role = job.plan[index]
                if not cell.source.strip():
                    continue
                count += 1
                if role.role == "student":
                    job.student_count = count
                try:
                    await client.async_execute_cell(cell, index, execution_count=count)
                except CellTimeoutError:
                    if role.role == "before":
                        lose_rest(f"the notebook's set-up ({role.label}) timed out after "
                                  f"{_fmt(total_timeout)} s before your code ran. This is not your "
                                  "fault: tell your instructor.")
                    else:
                        lose_rest(f"timed out after {_fmt(cell_timeout)} s (an endless loop, or "
                                  "code far too slow?)", index)
                    return
                except DeadKernelError:
                    lose_rest("kernel died: the Python process crashed or was killed (os._exit, "
                              "a segfault, or running out of memory?)", index)
                    return
                except CellExecutionError as err:
                    if _is_not_implemented(err.ename, err.evalue):
                        what = f"{NOT_IMPLEMENTED} (NotImplementedError)"
                    else:
                        what = _error_text(err.ename, err.evalue)
                    if role.role in ("check", "hidden"):
                        if not _is_not_implemented(err.ename, err.evalue):
                            what += _your_line(err.traceback, job.student_count, job.student_src)
                        job.outcomes[index] = f"{role.label}: {what}"
                        continue
                    if role.role == "before":
                        lose_rest(f"the notebook's set-up ({role.label}) failed before your code "
                                  f"ran: {what}. This is not your fault: tell your instructor.")
                    elif _is_not_implemented(err.ename, err.evalue):
                        lose_rest(what)
                    else:
                        line = _your_line(err.traceback, job.student_count, job.student_src)
                        lose_rest(f"your code raised {what}{line} before the tests ran")
                    return
                else:
                    if role.role in ("check", "hidden"):
                        job.outcomes[index] = None
    except DeadKernelError:
        lose_rest("kernel died: the Python process crashed or was killed")
    except Exception as err:  # the kernel could not start, or the connection broke
        log.seek(0)
        tail = log.read().decode("utf-8", "replace").strip().splitlines()[-5:]
        detail = f"; the kernel said: {' / '.join(tail)}" if tail else ""
        lose_rest(f"the grader could not run this task ({type(err).__name__}: {err}{detail}); "
                  "tell your instructor")
    finally:
        km = client.km  # still set when stopped before nbclient could clean up (time limit)
        if km is not None and km.has_kernel:
            with contextlib.suppress(Exception):
                await km.shutdown_kernel(now=True)
        log.close()


async def _run_job(job: _Job, timeout: float, cell_timeout: float, cpu_share: int) -> TaskGrade:
    grade = job.grade
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix=f"course-grade-{grade.task}-")
    job.student_src = next((c.source for c in job.plan if c.role == "student"), "")
    env = _kernel_env(workdir, cpu_share)
    running = asyncio.ensure_future(
        _execute(job, workdir, min(cell_timeout, timeout), timeout, env))
    try:
        done, _ = await asyncio.wait({running}, timeout=timeout)
        if not done:  # the task's time limit: stop it; leaving the kernel's context kills it
            job.expired = f"timed out after {_fmt(timeout)} s (the time limit for the whole task)"
            running.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await running
            tests = [i for i, c in enumerate(job.plan) if c.role in ("check", "hidden")]
            for i in tests:
                job.outcomes.setdefault(i, job.expired)
    finally:
        if not running.done():
            running.cancel()
        shutil.rmtree(workdir, ignore_errors=True)
    tests = [i for i, c in enumerate(job.plan) if c.role in ("check", "hidden")]
    for i in tests:  # a cell that never ran (should not happen): say so
        job.outcomes.setdefault(i, f"{job.plan[i].label}: did not run")
    passed = sum(job.outcomes[i] is None for i in tests)
    grade.passed, grade.total = passed, len(tests)
    grade.points = round(grade.max_points * passed / len(tests), 2) if tests else 0.0
    grade.feedback += _group_reasons([job.plan[i].label for i in tests],
                                     [job.outcomes[i] for i in tests])
    grade.seconds = round(time.monotonic() - start, 2)
    return grade


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
def _find_solution(nb, path: Path | None, solutions_dir: Path) -> Path:
    available = sorted(p for p in solutions_dir.glob("*.ipynb") if p.is_file())
    source = nb.metadata.get(META_KEY, {}).get("source") if nb is not None else None
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
    nb, read_error = None, None
    if path is None:
        nb = sub.source
    else:
        try:
            nb = read_notebook(path)
        except CourseError as err:
            read_error = err
    solution_path = Path(sub.solution_path) if sub.solution_path else \
        _find_solution(nb, path, solutions_dir)
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
    elif nb.metadata.get(META_KEY, {}).get("source_sha256", digest) != digest:
        grade.notes.append("your exercise was built from an older version of the solution "
                           "notebook; it was graded against the current one")
    jobs = []
    for task in selected:
        task_grade = TaskGrade(task.task, 0.0, task.points)
        grade.tasks.append(task_grade)
        cell = _student_cell(nb, task) if nb is not None else None
        if cell is None:
            task_grade.total = len(task.test_cells)
            task_grade.feedback.append(
                "could not read your notebook" if nb is None else
                f"your cell for task {task.task!r} is missing (no cell with metadata course.task "
                f"= {task.task!r} or id {task.cell_id!r}): copy it back from the exercise")
            continue
        task_nb, plan = task_notebook(solution, tasks, task.task, cell.source)
        jobs.append(_Job(task_grade, task_nb, plan))
    return grade, jobs


def _run(coroutine_factory):
    """Run an async function to completion, also from inside a running event loop (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine_factory())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coroutine_factory())).result()


def _default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def grade_notebooks(submissions: Iterable, *, solutions_dir: str | Path | None = None,
                    timeout: float = DEFAULT_TIMEOUT, cell_timeout: float | None = None,
                    tasks: list[str] | None = None, jobs: int | None = None,
                    on_error: str = "raise") -> list[NotebookGrade]:
    """Grade several submissions (paths, notebooks or :class:`Submission`), tasks in parallel.

    timeout:      seconds per task; the kernel is killed after it.
    cell_timeout: seconds per cell (default: ``timeout``).
    tasks:        grade only these tasks (default: all).
    jobs:         kernels running at once (default: CPU count, at most 4).
    on_error:     ``"raise"``, or ``"record"`` to turn an unreadable or unmatched
                  submission into a grade with a note instead of an exception.
    """
    solutions = Path(solutions_dir) if solutions_dir else default_solutions_dir()
    jobs = jobs or _default_jobs()
    cell_timeout = cell_timeout or timeout
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
        known = {t for _, parsed, _ in cache.values() for t in parsed}
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise CourseError(f"unknown task(s) {', '.join(unknown)} (tasks: {', '.join(sorted(known))})")
    cpu_share = max(1, (os.cpu_count() or 1) // jobs)

    async def run_all():
        limit = asyncio.Semaphore(jobs)

        async def one(job):
            async with limit:
                return await _run_job(job, timeout, cell_timeout, cpu_share)

        return await asyncio.gather(*(one(job) for job in all_jobs))

    if all_jobs:
        _run(run_all)
    return grades


def grade_notebook(submission_path, solution_path=None, timeout: float = DEFAULT_TIMEOUT,
                   tasks: list[str] | None = None, *, cell_timeout: float | None = None,
                   solutions_dir: str | Path | None = None, student: str | None = None,
                   jobs: int | None = None) -> NotebookGrade:
    """Grade one submitted notebook (a path or a ``NotebookNode``) task by task.

    The solution is ``solution_path``, else the one named by the submission's
    metadata ``course.source``, else the one with the same file name in
    ``solutions_dir`` (default: the repository's ``solutions/``).
    """
    sub = Submission(submission_path, student, solution_path, tasks)
    return grade_notebooks([sub], solutions_dir=solutions_dir, timeout=timeout,
                           cell_timeout=cell_timeout, jobs=jobs)[0]


def _collect(paths_or_dirs) -> list[Submission]:
    if isinstance(paths_or_dirs, (str, Path)):
        paths_or_dirs = [paths_or_dirs]
    found = []
    for item in paths_or_dirs:
        item = Path(item)
        if item.is_dir():
            for path in sorted(item.rglob("*.ipynb")):
                rel = path.relative_to(item)
                if ".ipynb_checkpoints" in rel.parts:
                    continue
                student = rel.parts[0] if len(rel.parts) > 1 else path.stem
                found.append(Submission(path, student))
        elif item.is_file():
            found.append(Submission(item, item.stem))
        else:
            raise CourseError(f"no such submission: {item}")
    return found


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


def grade_many(paths_or_dirs, out_dir: str | Path | None = None, *,
               solutions_dir: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT,
               cell_timeout: float | None = None, tasks: list[str] | None = None,
               jobs: int | None = None, quiet: bool = False) -> list[NotebookGrade]:
    """Grade notebooks and folders of notebooks (searched recursively).

    The student id is the first folder under the given folder (``subs/alice/...``
    gives ``alice``), or the file stem for a notebook given directly or lying at
    the top of the folder. Prints a report per student; with ``out_dir`` writes
    ``grades.csv`` (one row per task per student), ``grades.json`` and ``report.txt``.
    A submission that cannot be read or matched is recorded, not fatal.
    """
    submissions = _collect(paths_or_dirs)
    grades = grade_notebooks(submissions, solutions_dir=solutions_dir, timeout=timeout,
                             cell_timeout=cell_timeout, tasks=tasks, jobs=jobs,
                             on_error="record")
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
        (out / "grades.csv").write_text(buffer.getvalue(), encoding="utf-8")
        (out / "grades.json").write_text(
            json.dumps([g.to_dict() for g in grades], indent=1, ensure_ascii=False) + "\n",
            encoding="utf-8")
        (out / "report.txt").write_text(report + "\n", encoding="utf-8")
    return grades


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
