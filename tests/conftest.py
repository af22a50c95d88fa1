"""Shared fixtures; the environment defaults live in the root conftest.py."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The data root, with at least the MNIST test split (downloaded if need be)."""
    from course_utils.data import data_root, mnist

    mnist("test")  # raises one clear error naming the folder when it cannot be had
    return data_root()
