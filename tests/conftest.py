"""Test-suite defaults: smoke budget, the shared MNIST files, a throw-away checkpoint cache.

Set before any kernel starts, so the notebooks that nbval runs see them too.
"""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("COURSE_BUDGET", "smoke")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CI", "true")  # quiet progress bars and live plots
_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
if "COURSE_DATA_DIR" not in os.environ and (_shared / "MNIST" / "raw").is_dir():
    os.environ["COURSE_DATA_DIR"] = str(_shared)
if "COURSE_CHECKPOINT_DIR" not in os.environ:
    os.environ["COURSE_CHECKPOINT_DIR"] = tempfile.mkdtemp(prefix="course-checkpoints-")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def data_dir() -> Path:
    """The data root, with at least the MNIST test split (downloaded if need be)."""
    from course_utils.data import data_root, mnist

    mnist("test")  # raises one clear error naming the folder when it cannot be had
    return data_root()
