"""Test-suite defaults for everything pytest collects (unit tests and nbval notebooks).

Set before any kernel starts, so the notebooks that nbval runs see them too: the smoke
budget, the shared MNIST files when they sit beside the checkout, a throw-away checkpoint
cache, and quiet progress bars.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("COURSE_BUDGET", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CI", "true")
_shared = Path(__file__).resolve().parent.parent / "shared" / "data"
if "COURSE_DATA_DIR" not in os.environ and (_shared / "MNIST" / "raw").is_dir():
    os.environ["COURSE_DATA_DIR"] = str(_shared)
if "COURSE_CHECKPOINT_DIR" not in os.environ:
    os.environ["COURSE_CHECKPOINT_DIR"] = tempfile.mkdtemp(prefix="course-checkpoints-")
    atexit.register(shutil.rmtree, os.environ["COURSE_CHECKPOINT_DIR"], ignore_errors=True)
