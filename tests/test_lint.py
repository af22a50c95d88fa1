import shutil
import subprocess
import sys

import pytest


def test_ruff_is_clean_notebooks_included(repo):
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(repo / ".venv" / "bin"))
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    result = subprocess.run([ruff, "check", "."], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_has_no_framework_beyond_pytorch(repo):
    forbidden = ("lightning", "keras", "tensorflow", "jax", "fastai", "ignite")
    for path in (repo / "course_utils").glob("*.py"):
        text = path.read_text()
        for name in forbidden:
            assert f"import {name}" not in text and f"from {name}" not in text, (path, name)
    assert sys.version_info >= (3, 10)
