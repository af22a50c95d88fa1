"""Where the course runs: device, seeds and the work budget.

One code path serves a 2-core laptop and a GPU. The *budget* decides how much
work a notebook does:

=========  =====================================  ==============================
budget     who                                    goal
=========  =====================================  ==============================
smoke      CI and the test-suite                  every notebook in about a minute
classroom  default without a GPU                  at most ~10 minutes, figures that
                                                  show what the text claims
full       default with a GPU                     quality results
=========  =====================================  ==============================

Notebooks size their work from one table instead of scattered ``if`` s::

    cfg = by_budget(epochs=(1, 5, 30), subset=(1024, None, None))
    cfg.epochs  # 1 in smoke, 5 in classroom, 30 in full
"""

from __future__ import annotations

import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

BUDGETS = ("smoke", "classroom", "full")
BUDGET_ENV = "COURSE_BUDGET"


class CourseError(RuntimeError):
    """A mistake the user can fix (bad budget name, missing data, ...).

    The ``course`` command prints these as one line, without a traceback.
    """


def get_device(prefer: str | None = None) -> torch.device:
    """The best available device: CUDA, then Apple MPS, then CPU.

    ``COURSE_DEVICE`` (or ``prefer``) forces one, e.g. ``cpu`` to compare speeds.
    The first time it settles on the CPU it also chooses the number of CPU threads
    (:func:`configure_threads`).
    """
    forced = prefer or os.environ.get("COURSE_DEVICE")
    if forced:
        device = torch.device(forced)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cpu" and not _threads_chosen:
        configure_threads()
    return device


THREADS_ENV = "COURSE_THREADS"
_threads_chosen = False


def choose_threads(cores: int | None = None, load: float | None = None) -> int:
    """How many CPU threads to train with: the cores that other programs leave free.

    PyTorch's CPU threads wait for each other at every operation, so a thread whose
    core is taken by another program holds all of them back. Measured with
    ``benchmarks/threads.py`` (2 cores, the seed conv AE, batch 128): on a quiet
    machine 2 threads make 11.2 steps/s and 1 thread 7.3; with one core kept busy
    by another program, 2 threads make 3.5 steps/s and 1 thread 6.9. So: every core
    when the machine is quiet, one fewer for every core the load average says is
    busy, and never fewer than one. ``COURSE_THREADS`` overrides the choice.
    """
    override = os.environ.get(THREADS_ENV, "").strip()
    if override:
        try:
            return max(1, int(override))
        except ValueError:
            raise CourseError(f"${THREADS_ENV} must be a whole number of threads, not {override!r}") \
                from None
    cores = cores or os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        # the one-minute average lags: right after another program stops it still reads ~1.5,
        # and a process that starts then would train on one thread for its whole life. The
        # cores busy right now are a lower bound that catches that case.
        busy_now = cores_busy_now()
        if busy_now is not None:
            load = min(load, busy_now)
    busy = int(load + 0.5)  # cores other programs keep busy
    return max(1, min(cores, cores - busy))


def cores_busy_now(seconds: float = 0.25) -> float | None:
    """How many cores were busy over the next ``seconds`` (Linux ``/proc/stat``), else None."""
    def times():
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total_before, idle_before = times()
        time.sleep(seconds)
        total_after, idle_after = times()
    except (OSError, ValueError, IndexError):
        return None
    total = total_after - total_before
    if total <= 0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle_after - idle_before) / total)


def configure_threads() -> int:
    """Set torch's CPU thread count with :func:`choose_threads`, once per process.

    ``OMP_NUM_THREADS`` set by hand (or by the grader) is respected unless
    ``COURSE_THREADS`` is set too. Returns the number of threads in use.
    """
    global _threads_chosen
    _threads_chosen = True
    if os.environ.get("OMP_NUM_THREADS") and not os.environ.get(THREADS_ENV):
        return torch.get_num_threads()
    threads = choose_threads()
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int = 0) -> int:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return seed


@contextmanager
def local_seed(seed: int, device=None):
    """Seed torch for a block, then give the caller's random state back.

    For code that must be repeatable without disturbing the notebook around it
    (a model's initial weights, a training recipe). The CPU generator is seeded
    and restored, and so is ``device``'s when it is a GPU; MPS's generator cannot
    be restored, so it is only seeded.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # not torch.manual_seed: that would also reseed every GPU, and fork_rng restores one
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        elif device.type == "mps":
            torch.mps.manual_seed(seed)
        yield


def check_budget(name: str) -> str:
    """Validate a budget name, with a message that lists the valid ones."""
    name = str(name).strip().lower()
    if name not in BUDGETS:
        raise CourseError(
            f"unknown budget {name!r}: choose one of {', '.join(BUDGETS)} "
            f"(set {BUDGET_ENV} or pass --budget)"
        )
    return name


def budget(override: str | None = None) -> str:
    """The work budget: ``override``, else ``$COURSE_BUDGET``, else a default.

    The default is ``full`` when CUDA is available and ``classroom`` otherwise.
    """
    chosen = override or os.environ.get(BUDGET_ENV)
    if chosen:
        return check_budget(chosen)
    return "full" if torch.cuda.is_available() else "classroom"


def by_budget(budget_name: str | None = None, **table: tuple) -> SimpleNamespace:
    """Pick one column of a ``name=(smoke, classroom, full)`` table.

    >>> by_budget("smoke", epochs=(1, 5, 30)).epochs
    1
    """
    column = BUDGETS.index(budget(budget_name))
    picked = {}
    for key, values in table.items():
        if not isinstance(values, (tuple, list)) or len(values) != len(BUDGETS):
            raise ValueError(f"{key}: expected a (smoke, classroom, full) triple, got {values!r}")
        picked[key] = values[column]
    return SimpleNamespace(budget=BUDGETS[column], **picked)


def in_ci() -> bool:
    """True under CI (``CI=true``): progress bars and live plots stay quiet."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where live plots and widgets make sense)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"


@dataclass(frozen=True)
class Accelerator:
    """What the training loop may switch on for a device.

    bf16 autocast, ``channels_last`` and ``torch.compile`` pay off on CUDA only;
    on a CPU bf16 is emulated (about 10x slower), so the CPU stays in fp32.
    """

    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool
    can_compile: bool

    @classmethod
    def for_device(cls, device: torch.device | str) -> Accelerator:
        device = torch.device(device)
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            return cls(device, torch.bfloat16 if bf16 else torch.float16, True, True)
        return cls(device, None, False, False)


def describe_environment() -> dict:
    """Versions, device and budget, for ``course check`` and notebook 00."""
    import platform

    import matplotlib
    import torchvision

    device = get_device()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "matplotlib": matplotlib.__version__,
        "device": str(device),
        "budget": budget(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
