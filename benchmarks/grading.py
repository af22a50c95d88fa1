"""Benchmark: the time ``course grade`` takes for one full submission of each exercise notebook.

Grades each solution notebook (a full-marks submission, every task) the way
``course grade`` does, with its default number of parallel jobs, and prints the
wall-clock time per notebook, the score (it must be full marks), the sandbox's
protections and the machine's load average (other programs slow a shared
machine down).

    COURSE_DATA_DIR=/path/to/data python benchmarks/grading.py
    python benchmarks/grading.py --jobs 1 solutions/00_warmup.ipynb
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="solution notebooks (default: all)")
    parser.add_argument("--jobs", type=int, default=None, help="tasks graded at once")
    args = parser.parse_args()
    os.environ.setdefault("COURSE_BUDGET", "smoke")
    from course_utils import sandbox
    from course_utils.grading import grade_notebook

    root = Path(__file__).resolve().parents[1]
    paths = [Path(p) for p in args.notebooks] or sorted((root / "solutions").glob("*.ipynb"))
    print(sandbox.describe_protections())
    print(f"{'notebook':<36} {'tasks':>5} {'points':>9} {'seconds':>8}  load average")
    for path in paths:
        before = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        start = time.monotonic()
        grade = grade_notebook(path, solutions_dir=path.parent, jobs=args.jobs)
        seconds = time.monotonic() - start
        after = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        print(f"{path.name:<36} {len(grade.tasks):>5} {grade.points:>4g} / {grade.max_points:<3} "
              f"{seconds:>8.1f}  {before[0]:.2f} -> {after[0]:.2f}")
        if grade.points != grade.max_points:
            print("  not full marks:", *(f"{t.task}: {t.feedback}" for t in grade.tasks if t.feedback))


if __name__ == "__main__":
    main()
