"""Hostile submissions: a student who wants marks without solving, or wants to hurt others.

Every case is graded in one parallel run with an honest student beside it (so a
case that could sabotage other kernels would show), then each test asserts the
score it must get, the reason it must be given, that the honest student's
grade is untouched, that the instructor's files are unchanged and that no
process is left behind. The protections that need bubblewrap (a private file
system, PID namespaces) are asserted where it works; elsewhere those tests are
skipped with the reason, and the verdict tests still run.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from course_utils import sandbox
from course_utils.exercises import read_notebook, write_notebook
from course_utils.grading import GradingLimits, format_report, grade_many

REPO = Path(__file__).resolve().parents[1]
WARMUP_SOLUTION = REPO / "solutions" / "00_warmup.ipynb"
WARMUP_EXERCISE = REPO / "exercises" / "00_warmup.ipynb"
VAE_EXERCISE = REPO / "exercises" / "03_variational_autoencoders.ipynb"
MARKER = "hostile-marker-3f9c"  # in the command line of every process a case leaves behind
SANDBOXED = sandbox.bwrap_works()
needs_sandbox = pytest.mark.skipif(not SANDBOXED, reason="bubblewrap is not available here: "
                                   "install the `bubblewrap` package for the file-system and process "
                                   "protections")
LIMITS = GradingLimits(memory_bytes=int(1.5 * 2**30), max_processes=32, max_file_bytes=8 * 2**20,
                       output_bytes=16 * 2**10)


def stub(name: str, args: str = "images, threshold=0.5") -> str:
    return f"def {name}({args}):\n    raise NotImplementedError('{name}: not implemented yet')\n"


def cases(grades_dir: Path, solutions_dir: Path) -> dict[str, dict]:
    """student -> {task: source of their task cell}; the other tasks stay stubs.

    Cases that would harm this machine without a sandbox (deleting files, killing
    processes, detaching) are only run where bubblewrap works.
    """
    sleeper = f"import subprocess\nsubprocess.Popen(['sleep', '600', '{MARKER}'], start_new_session=True)\n"
    all_cases = _all_cases(grades_dir, solutions_dir, sleeper) | {
        "transformer": {"binarize": "get_ipython().input_transformers_cleanup.append("
                                    "lambda lines: ['pass\\n'])\n" + stub("binarize")},
        "patched_checks": {"binarize": (
            "import torch\nimport course_utils.checks as checks\nimport course_utils.grading as grading\n"
            "expect_close = expect_shape = expect_dtype = expect_true = lambda *a, **k: None\n"
            "checks._fail = grading._fail = lambda *a, **k: None\n"
            "checks.expect_close = checks.expect_true = checks.expect_dtype = lambda *a, **k: None\n"
            "torch.allclose = lambda *a, **k: True\ntorch.equal = lambda *a, **k: True\n"
            + stub("binarize"))},
        "reads_solutions": {"binarize": (
            "import glob, os\nimport course_utils\n"
            "root = os.path.dirname(os.path.dirname(course_utils.__file__))\n"
            f"paths = glob.glob(root + '/solutions/*.ipynb') + glob.glob('{solutions_dir}/*.ipynb')\n"
            "for pid in os.listdir('/proc'):\n"
            "    try:\n"
            "        words = open(f'/proc/{pid}/cmdline').read().split(chr(0))\n"
            "        paths += [p for p in words if p.endswith('.ipynb')]\n"
            "    except OSError:\n"
            "        pass\n"
            "import json\n"
            "for path in paths:\n"
            "    try:\n"
            "        cells = json.load(open(path))['cells']\n"
            "    except OSError:\n"
            "        continue\n"
            "    for cell in cells:\n"
            "        if cell.get('metadata', {}).get('course', {}).get('task') == 'binarize':\n"
            "            exec(''.join(cell['source']))\n"
            "            break\n"
            + "if 'binarize' not in dir():\n"
            + "\n".join("    " + line for line in stub("binarize").splitlines()) + "\n")},
    }
    harmless = {"transformer", "patched_checks", "reads_solutions", "memory_hog", "flooder"}
    return {name: sources for name, sources in all_cases.items() if SANDBOXED or name in harmless}


def _all_cases(grades_dir: Path, solutions_dir: Path, sleeper: str) -> dict[str, dict]:
    return {
        "tamperer": {"binarize": (
            "import os, shutil\n"
            f"for folder in ['{solutions_dir}', '{grades_dir}']:\n"
            "    shutil.rmtree(folder, ignore_errors=True)\n"
            f"os.makedirs('{grades_dir}', exist_ok=True)\n"
            f"open('{grades_dir}/grades.csv', 'w').write('student,points\\ntamperer,100\\n')\n"
            + stub("binarize"))},
        "late_writer": {"binarize": (
            "import subprocess\n"
            "subprocess.Popen(['sh', '-c', 'sleep 4; echo tamperer,100 > "
            f"{grades_dir}/grades.csv; echo {MARKER}'], start_new_session=True)\n" + stub("binarize"))},
        "orphans": {"binarize": sleeper + "import os\nos.setsid() if hasattr(os, 'setsid') else None\n"
                                "os._exit(0)\n",
                    "one_hot": sleeper + stub("one_hot", "labels, num_classes=10")},
        "saboteur": {"binarize": (
            "import os, signal\n"
            "for pid in os.listdir('/proc'):\n"
            "    if pid.isdigit() and int(pid) not in (os.getpid(), 1):\n"
            "        try:\n            os.kill(int(pid), signal.SIGKILL)\n        except OSError:\n"
            "            pass\n"
            "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n" + stub("binarize"))},
        "memory_hog": {"binarize": ("import torch\n\ndef binarize(images, threshold=0.5):\n"
                                    "    hoard = [torch.ones(2**28) for _ in range(8)]  # 8 GB\n"
                                    "    return (images >= threshold).float()\n")},
        "forker": {"binarize": ("import subprocess\n\ndef binarize(images, threshold=0.5):\n"
                                f"    children = [subprocess.Popen(['sleep', '60', '{MARKER}'])\n"
                                "                for _ in range(200)]\n"
                                "    return (images >= threshold).float()\n")},
        "flooder": {"binarize": ("import sys\n\ndef binarize(images, threshold=0.5):\n"
                                 "    while True:\n        sys.stdout.write('x' * 65536)\n"),
                    "one_hot": ("def one_hot(labels, num_classes=10):\n"
                                "    with open('big.bin', 'wb') as f:\n"
                                "        for _ in range(64):\n            f.write(b'0' * 2**20)\n"
                                "    raise NotImplementedError('one_hot: not implemented yet')\n")},
    }


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers() -> list[str]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if MARKER in cmdline or "course_utils.grading_student" in cmdline \
                or "course_utils.grading_trusted" in cmdline:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def write_case(folder: Path, base: Path, sources: dict[str, str]) -> None:
    nb = read_notebook(base)
    for cell in nb.cells:
        task = cell.metadata.get("course", {}).get("task")
        if task in sources:
            cell.source = sources[task]
    folder.mkdir(parents=True)
    write_notebook(nb, folder / base.name)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Every hostile case, an honest student and malformed files, graded in one run."""
    tmp = tmp_path_factory.mktemp("hostile")
    solutions = tmp / "solutions"
    solutions.mkdir()
    for name in ("00_warmup.ipynb", "03_variational_autoencoders.ipynb"):
        shutil.copy(REPO / "solutions" / name, solutions / name)
    subs, grades_dir = tmp / "submissions", tmp / "grades"
    for student, sources in cases(grades_dir, solutions).items():
        write_case(subs / student, WARMUP_EXERCISE, sources)
    (subs / "honest").mkdir()
    shutil.copy(WARMUP_SOLUTION, subs / "honest" / "00_warmup.ipynb")
    write_case(subs / "borrower", VAE_EXERCISE, {
        "gaussian_kl": "from course_utils.vae import gaussian_kl\n",
        "reparameterize": "import course_utils.vae as v\nreparameterize = v.reparameterize\n",
        "iwae_nll": ("from course_utils import vae\n\ndef iwae_nll(log_weights):\n"
                     "    return vae.iwae_nll(log_weights)\n")})
    # malformed files, and two students whose ids would collide
    bad = subs / "malformed"
    bad.mkdir()
    nb = json.loads(WARMUP_EXERCISE.read_text())
    nb["metadata"]["course"] = "not a dict"
    (bad / "00_warmup.ipynb").write_text(json.dumps(nb))
    weird = json.loads(WARMUP_SOLUTION.read_text())
    for cell in weird["cells"]:
        if cell.get("metadata", {}).get("course", {}).get("task") == "binarize":
            cell["source"] = 42
    (subs / "weird").mkdir()
    (subs / "weird" / "00_warmup.ipynb").write_text(json.dumps(weird))
    (subs / "garbage.ipynb").write_text("[1, 2, {")
    (subs / "listed.ipynb").write_text("[1, 2, 3]")
    loose = json.loads(WARMUP_SOLUTION.read_text())  # a loose file named like a student's folder
    loose["metadata"]["course"] = {"source": "solutions/00_warmup.ipynb"}  # as in an exercise
    (subs / "honest.ipynb").write_text(json.dumps(loose))
    before = {name: fingerprint(folder) for name, folder in
              (("solutions", solutions), ("repo solutions", REPO / "solutions"))}
    running_before = set(leftovers())  # graders of other runs on this machine are not this run's
    start = time.monotonic()
    grades = grade_many([subs], grades_dir, solutions_dir=solutions, timeout=90, cell_timeout=15,
                        tasks=["binarize", "one_hot", "gaussian_kl", "reparameterize", "iwae_nll"],
                        jobs=2, quiet=True, limits=LIMITS)
    seconds = time.monotonic() - start
    written = {name: (grades_dir / name).read_bytes() for name in ("grades.csv", "grades.json")}
    time.sleep(6)  # long enough for a detached process to try rewriting the grades
    after = {name: fingerprint(folder) for name, folder in
             (("solutions", solutions), ("repo solutions", REPO / "solutions"))}
    return {"grades": {g.student: g for g in grades}, "before": before, "after": after,
            "written": written, "grades_dir": grades_dir, "seconds": seconds,
            "leftovers": sorted(set(leftovers()) - running_before)}


def task(run, student, name):
    grade = run["grades"][student]
    return grade.task(name), format_report(grade)


# -- verdicts: no cheat earns a point -------------------------------------------------------------
@pytest.mark.parametrize("student", [
    "transformer", "patched_checks", "reads_solutions",
    pytest.param("tamperer", marks=needs_sandbox), pytest.param("late_writer", marks=needs_sandbox),
    pytest.param("saboteur", marks=needs_sandbox)])
def test_cheats_on_a_stub_earn_nothing(run, student):
    graded, report = task(run, student, "binarize")
    assert graded.points == 0, report
    assert graded.feedback, report


def test_the_honest_student_beside_them_gets_full_marks(run):
    grade = next(g for g in run["grades"].values() if g.submission.endswith("honest/00_warmup.ipynb"))
    assert [t.task for t in grade.tasks] == ["binarize", "one_hot"]
    assert grade.points == grade.max_points == 3, format_report(grade)


def test_library_implementations_earn_nothing_and_say_why(run):
    for name in ("gaussian_kl", "reparameterize", "iwae_nll"):
        graded, report = task(run, "borrower", name)
        assert graded.points == 0, report
        assert "the course library's own implementation" in report, report


def test_reading_the_solutions_finds_nothing(run):
    graded, report = task(run, "reads_solutions", "binarize")
    assert "not implemented yet" in report, report


# -- the instructor's files and the grades --------------------------------------------------------
@needs_sandbox
def test_instructor_files_are_unchanged(run):
    assert run["after"] == run["before"]


@needs_sandbox
def test_grades_are_not_rewritten_after_the_run(run):
    for name, data in run["written"].items():
        assert (run["grades_dir"] / name).read_bytes() == data, f"{name} changed after grading"
    rows = (run["grades_dir"] / "grades.csv").read_text()
    assert "tamperer,100" not in rows


@needs_sandbox
def test_no_process_is_left(run):
    assert run["leftovers"] == []


# -- limits --------------------------------------------------------------------------------------
def test_memory_hog_is_stopped(run):
    graded, report = task(run, "memory_hog", "binarize")
    assert graded.points == 0, report
    assert "memory limit" in report, report


@needs_sandbox
def test_fork_bomb_is_stopped(run):
    graded, report = task(run, "forker", "binarize")
    assert graded.points == 0, report  # a process limit (cgroup), or the whole task voided (watchdog)
    assert "Resource temporarily unavailable" in report or "more than 32 processes" in report, report


def test_floods_of_output_and_files_cost_only_their_task(run):
    graded, report = task(run, "flooder", "binarize")
    assert graded.points == 0 and "timed out" in report, report
    graded, report = task(run, "flooder", "one_hot")
    assert graded.points == 0, report
    assert "larger than" in report or "File too large" in report or "Errno 27" in report, report


@needs_sandbox
def test_processes_of_a_task_die_with_it(run):
    graded, report = task(run, "orphans", "binarize")
    assert graded.points == 0 and "kernel died" in report, report


# -- a run that survives anything -----------------------------------------------------------------
def test_malformed_notebooks_cost_only_their_student(run):
    grades = run["grades"]
    assert grades["malformed"].points == 0 and grades["malformed"].tasks
    weird = grades["weird"]
    assert weird.task("binarize").points == 0 and weird.task("one_hot").points == 2, format_report(weird)
    assert "could not be read (its source is not text)" in format_report(weird)
    for student in ("garbage", "listed"):
        assert grades[student].notes and "not a notebook" in " ".join(grades[student].notes)


def test_students_with_the_same_name_are_kept_apart(run):
    honest = [s for s in run["grades"] if s.startswith("honest")]
    assert len(honest) == 2, honest
    assert all(run["grades"][s].points == 3 for s in honest)


# -- the sandbox itself ---------------------------------------------------------------------------
@needs_sandbox
def test_sandbox_hides_files_network_and_other_processes(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the answer")
    probe = ("import os, socket\n"
             f"print('secret', os.path.exists({str(secret)!r}))\n"
             f"print('repo', os.path.exists({str(REPO / 'solutions')!r}))\n"
             "print('pids', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
             "print('uid', os.getuid())\n"
             "try:\n    socket.create_connection(('127.0.0.1', 22), timeout=2)\n    print('net yes')\n"
             "except OSError:\n    print('net no')\n"
             "print('env', sorted(os.environ))\n")
    box = sandbox.start(["-c", probe], popen_options={}, env={"PATH": "/usr/bin:/bin"},
                        package_dir=REPO / "course_utils", read_only=[], limits=sandbox.Limits(),
                        name=f"course-test-{os.getpid()}")
    box.process.wait(timeout=60)
    box.close()
    out = bytes(box.output).decode()
    assert "secret False" in out and "repo False" in out, out
    assert "net no" in out and f"uid {sandbox.SANDBOX_UID}" in out, out
    pids = eval(out.split("pids ")[1].splitlines()[0])
    assert len(pids) <= 3, out  # bubblewrap's init, python, maybe a thread leader: nothing else
    assert "HOSTNAME" not in out and "COURSE" not in out.split("env ")[1], out


def test_course_grade_exit_codes(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "course_utils.cli", "grade", str(empty)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert len((done.stdout + done.stderr).strip().splitlines()) == 1, done.stdout + done.stderr
    assert "no notebooks" in (done.stdout + done.stderr)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.ipynb").write_text("{")
    done = subprocess.run([sys.executable, "-m", "course_utils.cli", "grade", str(bad), "--task", "binarize"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not graded" in done.stdout


def test_protections_are_reported():
    text = sandbox.describe_protections()
    assert text.startswith("sandbox:")
    assert sandbox.protections()["verdicts decided outside the student's process"]
    if SANDBOXED:
        assert "all protections active" in text or "missing" in text


def test_without_the_sandbox_verdicts_still_hold(tmp_path, monkeypatch):
    # macOS, Windows, or Linux without bubblewrap: the cheats that need no OS support still fail
    monkeypatch.setenv("COURSE_SANDBOX", "off")
    assert not sandbox.bwrap_works()
    assert "missing" in sandbox.describe_protections()
    for student in ("transformer", "patched_checks"):
        write_case(tmp_path / student, WARMUP_EXERCISE, cases(tmp_path, tmp_path)[student])
    (tmp_path / "honest").mkdir()
    shutil.copy(WARMUP_SOLUTION, tmp_path / "honest" / "00_warmup.ipynb")
    grades = grade_many([tmp_path], solutions_dir=REPO / "solutions", timeout=90, tasks=["binarize"],
                        quiet=True, limits=LIMITS)
    points = {g.student: g.points for g in grades}
    assert points == {"honest": 1, "patched_checks": 0, "transformer": 0}, points
