import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_ruff_is_clean_notebooks_included(repo):
    # the interpreter's own scripts folder first: the venv need not be activated
    scripts = Path(sys.executable).parent
    ruff = shutil.which("ruff", path=str(scripts)) or shutil.which("ruff")
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
