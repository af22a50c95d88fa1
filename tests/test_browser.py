"""The course as a student sees it: JupyterLab in a real (headless) browser.

nbval proves that the notebooks' code runs; these tests prove that a student who types
``course lab`` gets a JupyterLab that opens the notebooks, runs them without an error, draws their
figures and widgets, and shows an exercise's feedback. They start ``course lab`` (on a free
loopback port, with a token, over a fresh copy of the notebooks) and drive Debian's Chromium
through Playwright for Python.

Without Chromium or Playwright (a student's laptop) the tests are skipped and say why; with
``COURSE_BROWSER_TESTS=required`` (set by ``.ci/run``, which installs both) they fail instead.
Screenshots of every step go to the folder printed at the start (``COURSE_SCREENSHOT_DIR`` to
choose it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "course-browser-test"
CHROMIUM = (os.environ.get("COURSE_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser"))


def _missing() -> str | None:
    if not CHROMIUM:
        return "no Chromium (Debian: apt install chromium; or set COURSE_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright)"
    return None


def _require_browser():
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("COURSE_BROWSER_TESTS") == "required":
        pytest.fail(f"browser tests are required here but cannot run: {reason}")
    pytest.skip(reason)


# -- the notebooks served ---------------------------------------------------------------
LATENT_EXPLORER_NOTEBOOK = {
    "cells": [
        {"cell_type": "markdown", "metadata": {}, "source": ["# The 2-D latent explorer (topic 3)"]},
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": [
            "import torch\n",
            "\n",
            "from course_utils.autoencoders import latent_explorer\n",
            "\n",
            "rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing='ij')\n",
            "\n",
            "\n",
            "def decoder(z):  # a stand-in for a trained decoder: a blob that z moves around\n",
            "    centre_x, centre_y = 14 + 4 * z[:, :1, None], 14 - 4 * z[:, 1:, None]\n",
            "    return torch.exp(-((cols - centre_x) ** 2 + (rows - centre_y) ** 2) / 18)[:, None]\n",
            "\n",
            "\n",
            "explorer = latent_explorer(decoder, z_range=(-3, 3))\n",
            "explorer"]},
    ],
    "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}

# JupyterLab settings: keep every cell in the page (no virtual scrolling), no news pop-up.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def screenshots(pytestconfig):
    folder = Path(os.environ.get("COURSE_SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="course-browser-"))
    folder.mkdir(parents=True, exist_ok=True)
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"browser tests: screenshots in {folder}")
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``course lab`` over a fresh copy of the course; yields (base URL, folder)."""
    _require_browser()
    folder = tmp_path_factory.mktemp("course")
    (folder / "notebooks").mkdir()
    (folder / "exercises").mkdir()
    for name in ["00_setup_and_tour.ipynb", "02_transposed_convolution.ipynb"]:
        shutil.copy(ROOT / "notebooks" / name, folder / "notebooks" / name)
    shutil.copy(ROOT / "exercises" / "00_warmup.ipynb", folder / "exercises" / "00_warmup.ipynb")
    (folder / "notebooks" / "latent_explorer.ipynb").write_text(json.dumps(LATENT_EXPLORER_NOTEBOOK))
    settings = tmp_path_factory.mktemp("lab-settings")
    for name, values in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), CI="true",
               JUPYTER_RUNTIME_DIR=str(tmp_path_factory.mktemp("runtime")))
    port = _free_port()
    log = open(folder / "lab.log", "w")  # noqa: SIM115 (kept open for the server's lifetime)
    server = subprocess.Popen(
        [sys.executable, "-m", "course_utils.cli", "lab", "--folder", str(folder), "--port", str(port),
         "--token", TOKEN, "--budget", "smoke"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("course lab did not start:\n"
                                       + (folder / "lab.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield base, folder
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield chromium
        chromium.close()


# -- driving JupyterLab ------------------------------------------------------------------
def open_notebook(browser, lab, relative: str):
    base, _ = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    page.set_default_timeout(90_000)
    workspace = Path(relative).stem.replace("_", "-")  # one notebook per workspace: no restored tabs
    page.goto(f"{base}/lab/workspaces/{workspace}/tree/{relative}?token={TOKEN}&reset")
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for()
    return page


def run_all(page, timeout_s: float = 240):
    page.locator(".jp-Notebook").first.click()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_timeout(1000)
    wait_until_idle(page, timeout_s)


def wait_until_idle(page, timeout_s: float):
    # idle kernel and no cell still waiting ("[*]")
    page.wait_for_function(
        """() => document.body.innerText.includes('Python 3 (ipykernel) | Idle')
                 && ![...document.querySelectorAll('.jp-InputPrompt')]
                        .some(p => p.textContent.includes('*'))""",
        timeout=timeout_s * 1000, polling=500)


def save_and_read(page, lab, relative: str) -> dict:
    page.keyboard.press("Control+s")
    page.get_by_text("Saving completed").wait_for()
    return json.loads((lab[1] / relative).read_text())


def cell(page, index: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def error_outputs(notebook: dict) -> list[str]:
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}"
            for i, c in enumerate(notebook["cells"]) for o in c.get("outputs", [])
            if o["output_type"] == "error"]


def code_cell_index(relative_path: Path, marker: str) -> int:
    cells = json.loads(relative_path.read_text())["cells"]
    return next(i for i, c in enumerate(cells) if marker in "".join(c["source"]))


# -- the tests ------------------------------------------------------------------------------
def test_notebook_00_runs_without_errors_and_draws_the_data_grid(browser, lab, screenshots):
    page = open_notebook(browser, lab, "notebooks/00_setup_and_tour.ipynb")
    page.screenshot(path=screenshots / "00-opened.png")
    run_all(page)
    saved = save_and_read(page, lab, "notebooks/00_setup_and_tour.ipynb")
    page.screenshot(path=screenshots / "00-ran.png")
    assert not error_outputs(saved), error_outputs(saved)
    code_cells = [c for c in saved["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] for c in code_cells), "some code cells did not run"
    grid = code_cell_index(lab[1] / "notebooks/00_setup_and_tour.ipynb",
                           'title="The first 32 training digits"')
    image = cell(page, grid).locator(".jp-OutputArea-output img").first
    image.scroll_into_view_if_needed()
    image.screenshot(path=screenshots / "00-data-grid.png")
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert width > 300 and height > 150, (width, height)
    page.close()


def test_transposed_convolution_explorer_follows_its_slider(browser, lab, screenshots):
    relative = "notebooks/02_transposed_convolution.ipynb"
    page = open_notebook(browser, lab, relative)
    run_all(page)
    saved = save_and_read(page, lab, relative)
    assert not error_outputs(saved), error_outputs(saved)
    widget = cell(page, code_cell_index(lab[1] / relative, "explorer = transposed_conv_explorer()"))
    output = widget.locator(".widget-output")
    output.get_by_text("n=5, k=3, s=2").wait_for()
    widget.scroll_into_view_if_needed()
    widget.screenshot(path=screenshots / "02-explorer-before.png")
    assert "= 11" in output.inner_text()  # (5 - 1) * 2 + 3 = 11
    slider = widget.locator(".widget-slider").filter(has_text="input size n")
    slider.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    output.get_by_text("n=6, k=3, s=2").wait_for()
    assert "= 13" in output.inner_text()  # (6 - 1) * 2 + 3 = 13
    widget.screenshot(path=screenshots / "02-explorer-after.png")
    page.close()


def test_latent_explorer_redraws_the_decoded_digit(browser, lab, screenshots):
    page = open_notebook(browser, lab, "notebooks/latent_explorer.ipynb")
    run_all(page, timeout_s=120)
    widget = cell(page, 1)
    image = widget.locator(".jp-OutputArea-output img.widget-image, .jp-OutputArea-output img").first
    image.wait_for()
    image.scroll_into_view_if_needed()
    before_src = image.get_attribute("src")
    before = image.screenshot(path=screenshots / "03-explorer-before.png")
    slider = widget.locator(".widget-slider").filter(has_text="h1")
    slider.locator(".noUi-handle").focus()
    for _ in range(10):
        page.keyboard.press("ArrowRight")
    page.wait_for_function("([img, old]) => img.getAttribute('src') !== old",
                           arg=[image.element_handle(), before_src])
    page.wait_for_timeout(300)
    image.scroll_into_view_if_needed()
    after = image.screenshot(path=screenshots / "03-explorer-after.png")
    assert after != before, "the decoded digit did not change when h1 moved"
    readout = slider.locator(".widget-readout").inner_text()
    assert float(readout) > 0.5, readout
    page.close()


def test_exercise_check_cell_tells_a_student_what_to_do(browser, lab, screenshots):
    relative = "exercises/00_warmup.ipynb"
    page = open_notebook(browser, lab, relative)
    run_all(page, timeout_s=120)  # stops at the first check cell: its function is a stub
    feedback = page.locator(".jp-OutputArea-output").filter(has_text="not implemented yet").first
    feedback.wait_for()
    feedback.scroll_into_view_if_needed()
    page.screenshot(path=screenshots / "exercise-feedback.png")
    text = feedback.inner_text()
    assert "pixel_statistics: not implemented yet" in text
    assert "Write your code where it says" in text
    assert "Traceback" not in text  # the message alone, not a trip through the course's code
    page.close()
