"""The `course` command, run as a user would (a subprocess)."""

import json
import os
import subprocess
import sys

import pytest


def course(*args, env=None, cwd=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "course_utils.cli", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=600)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_check_gives_a_ready_verdict(data_dir):
    result = course("check")
    assert result.returncode == 0, result.stdout
    assert "verdict: READY" in result.stdout
    assert "torch" in result.stdout and "device" in result.stdout and "budget" in result.stdout
    assert "MNIST test   found, 10,000 images" in result.stdout


def test_check_verdict_matches_what_the_budget_will_do(data_dir):
    from course_utils.data import split_available

    if split_available("train", data_dir):
        pytest.skip("the train split is here: every budget can run")
    # only the test split is here: the classroom budget would fail in mnist("train")
    result = course("check", env={"COURSE_BUDGET": "classroom", "COURSE_TEST_SPLIT": ""})
    assert result.returncode == 1, result.stdout
    assert "verdict: NOT READY" in result.stdout and "COURSE_TEST_SPLIT=1" in result.stdout
    result = course("check", env={"COURSE_BUDGET": "classroom", "COURSE_TEST_SPLIT": "1"})
    assert result.returncode == 0 and "verdict: READY" in result.stdout, result.stdout


def test_check_without_data_says_not_ready(tmp_path):
    result = course("check", "--root", str(tmp_path))
    assert result.returncode == 1
    assert "verdict: NOT READY" in result.stdout and str(tmp_path) in result.stdout


def test_data_verifies_placed_files(data_dir):
    result = course("data", "--root", str(data_dir), "--no-download")
    assert "test: ok, 10,000 images" in result.stdout
    if not (data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
        assert result.returncode == 1 and "partial" in result.stdout


def test_data_with_nothing_there_is_one_line(tmp_path):
    assert_one_line_error(course("data", "--root", str(tmp_path), "--no-download"), str(tmp_path))


def test_unknown_model_is_one_line():
    assert_one_line_error(course("train", "no-such-model", "--budget", "smoke"),
                          "no-such-model", "classifier")


def test_bad_budget_is_one_line():
    assert_one_line_error(course("train", "classifier", "--budget", "huge"),
                          "huge", "smoke, classroom, full")


def test_missing_data_root_is_one_line(tmp_path):
    assert_one_line_error(course("train", "classifier", "--budget", "smoke",
                                 "--root", str(tmp_path / "nowhere")), "nowhere")


@pytest.mark.parametrize("seconds", ["-5", "0", "nan", "inf"])
def test_bad_time_limit_is_one_line_before_any_work(seconds):
    assert_one_line_error(course("train", "classifier", "--budget", "smoke", "--max-seconds", seconds),
                          "--max-seconds")


def test_out_under_a_file_is_one_line_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    result = course("train", "classifier", "--budget", "smoke", "--out", str(tmp_path / "file" / "run"))
    assert_one_line_error(result, "is a file, not a folder")
    assert "training" not in result.stdout


def test_grade_with_nothing_to_grade_is_one_line(tmp_path):
    assert_one_line_error(course("grade", str(tmp_path)), "nothing to grade")


def test_missing_submission_is_one_line(tmp_path):
    assert_one_line_error(course("grade", str(tmp_path / "missing.ipynb")), "missing.ipynb")


def test_exercises_are_up_to_date(repo):
    result = course("exercises", "check", cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("model", ["classifier", "ae", "dae", "vae"])
def test_train_writes_checkpoint_and_metrics(model, tmp_path, data_dir):
    out = tmp_path / "run"
    result = course("train", model, "--budget", "smoke", "--max-seconds", "20",
                    "--out", str(out), "--checkpoint-dir", str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["budget"] == "smoke" and metrics["model"] == model
    assert "8,000/2,000" in metrics["train_data"]  # never reported as "MNIST train"
    assert metrics["train_seconds"] < 60
    assert 0 < metrics["train_cpu_seconds"] < 60 * os.cpu_count()  # every thread's CPU time
    checkpoints = list((tmp_path / "ckpt").glob(f"{model}-*.pt"))
    sidecars = list((tmp_path / "ckpt").glob(f"{model}-*.json"))
    assert len(checkpoints) == 1 and len(sidecars) == 1
    assert json.loads(sidecars[0].read_text())["metrics"]["budget"] == "smoke"


def test_lab_command_opens_the_first_notebook_with_the_course_settings(tmp_path, repo):
    result = course("lab", "--print-command", "--budget", "smoke", "--port", "8999", "--token", "t0k",
                    "--folder", str(repo), "--checkpoint-dir", str(tmp_path / "ckpt"),
                    env={"MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "open: http://127.0.0.1:8999/lab/tree/notebooks/00_setup_and_tour.ipynb?token=t0k" in out
    assert "budget smoke" in out and str(tmp_path / "ckpt") in out
    command = out.strip().splitlines()[-1]
    assert "jupyter lab" in command and f"--ServerApp.root_dir={repo}" in command
    assert "--IdentityProvider.token=t0k" in command and "--ServerApp.ip=127.0.0.1" in command
    assert ("--allow-root" in command) == (os.geteuid() == 0)


def test_lab_environment_shows_figures_and_uses_the_budget(tmp_path, repo, monkeypatch):
    from argparse import Namespace

    from course_utils.cli import lab_command

    args = Namespace(folder=str(repo), budget="smoke", port=8999, token="t", ip="127.0.0.1",
                     root=str(tmp_path), checkpoint_dir=str(tmp_path / "c"), test_split=True,
                     browser=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    _, env, _ = lab_command(args)
    assert "MPLBACKEND" not in env  # Agg would hide every figure in the notebooks
    assert env["COURSE_BUDGET"] == "smoke" and env["COURSE_TEST_SPLIT"] == "1"
    assert env["COURSE_DATA_DIR"] == str(tmp_path.resolve())


def test_lab_without_the_notebooks_is_one_line(tmp_path):
    assert_one_line_error(course("lab", "--print-command", "--folder", str(tmp_path)),
                          "no notebooks/00_setup_and_tour.ipynb")
