"""The ``course`` command: check, data, exercises, grade, lab, train, benchmark.

User mistakes (an unknown model, a missing data root, a bad budget name) end
in one line starting with ``error:`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .runtime import BUDGET_ENV, CourseError, check_budget


# -- course check ------------------------------------------------------------------
def cmd_check(args) -> int:
    from . import data
    from .checkpoints import checkpoint_dir
    from .runtime import describe_environment
    from .sandbox import describe_protections

    info = describe_environment()
    print("Deep generative models course: environment check")
    for key, value in info.items():
        print(f"  {key:<12} {value}")
    root = data.data_root(args.root)
    print(f"  {'data root':<12} {root}")
    print(f"  {'grading':<12} {describe_protections().removeprefix('sandbox: ')}")
    problems, notes = [], []
    have_train = data.split_available("train", root)
    have_test = data.split_available("test", root)
    for split, present in (("train", have_train), ("test", have_test)):
        status = "missing"
        if present:
            try:
                ds = data.mnist(split, root=root, download=False, budget_name="full")
                status = f"found, {len(ds):,} images, verified"
            except CourseError as err:
                status = "CORRUPT"
                problems.append(str(err))
        print(f"  {'MNIST ' + split:<12} {status}")
    if not have_test:
        problems.append(f"MNIST is not in {root / 'MNIST' / 'raw'}: run `course data --root {root}` "
                        f"or set ${data.DATA_ENV}")
    elif not have_train:
        split_asked = os.environ.get(data.TEST_SPLIT_ENV, "") not in ("", "0")
        if info["budget"] == "smoke" or split_asked:
            notes.append("only the test split is here: the notebooks train on its first 8,000 images "
                         "and hold out the last 2,000 (the output says so wherever this split is used)")
        else:
            problems.append(f"the {info['budget']} budget trains on MNIST's train split, which is not in "
                            f"{root / 'MNIST' / 'raw'}: run `course data --root {root}` to download it, "
                            f"or set {data.TEST_SPLIT_ENV}=1 to train on the first 8,000 test images and "
                            "hold out the last 2,000")
    print(f"  {'checkpoints':<12} {checkpoint_dir()}")
    if info["device"] == "cpu":
        notes.append("no GPU found: the classroom budget is the default and runs every notebook "
                     "on this CPU in minutes")
    for note in notes:
        print(f"note: {note}")
    if problems:
        for problem in problems:
            print(f"problem: {problem}")
        print("verdict: NOT READY - fix the problems above")
        return 1
    print(f"verdict: READY (budget {info['budget']}, device {info['device']})")
    return 0


# -- course data -------------------------------------------------------------------
def cmd_data(args) -> int:
    from . import data

    root = data.data_root(args.root)
    print(f"MNIST in {root / 'MNIST' / 'raw'}")
    failures = 0
    for split in ("train", "test"):
        try:
            ds = data.MNIST(root, train=(split == "train"), download=not args.no_download)
            print(f"  {split}: ok, {len(ds):,} images (magic numbers and sizes verified)")
        except CourseError as err:
            failures += 1
            print(f"  {split}: {err}")
    if failures == 2:
        raise CourseError(f"no MNIST split could be found or downloaded in {root}")
    if failures:
        print("verdict: partial - see above (the test split alone is enough for the smoke budget)")
        return 1
    print("verdict: ready")
    return 0


# -- course exercises ----------------------------------------------------------------
def cmd_exercises(args) -> int:
    from . import exercises

    solutions = Path(args.solutions) if args.solutions else exercises.default_solutions_dir()
    target = Path(args.exercises) if args.exercises else exercises.default_exercises_dir()
    if not solutions.is_dir():
        raise CourseError(f"no solutions folder at {solutions}")
    if not args.solutions and not (Path.cwd() / "solutions").is_dir():
        print(f"no ./solutions here: using the installed course's {solutions} and {target} "
              "(pass --solutions and --exercises to choose)")
    if args.action == "build":
        written = exercises.build_all(solutions, target)
        for path in written:
            print(f"wrote {path}")
        print(f"built {len(written)} exercise notebook(s) from {solutions}")
        return 0
    problems = exercises.check_all(solutions, target)
    if problems:
        for problem in problems:
            print(f"stale: {problem}")
        print("exercises/ is out of date: run `course exercises build`")
        return 1
    print(f"exercises/ is up to date with {solutions}")
    return 0


# -- course grade ------------------------------------------------------------------
def cmd_grade(args) -> int:
    """Exit 0: every submission graded; 1: some could not be (each named); 2: nothing to grade."""
    from . import grading, sandbox

    missing = [p for p in args.submissions if not Path(p).exists()]
    if missing:
        raise CourseError(f"no such submission: {', '.join(missing)}")
    submissions = grading.collect_submissions(args.submissions)
    if not submissions:
        raise CourseError(f"no notebooks (*.ipynb) in {', '.join(args.submissions)}: nothing to grade")
    for value, name in ((args.timeout, "--timeout"), (args.cell_timeout, "--cell-timeout"),
                        (args.memory_gb, "--memory-gb")):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise CourseError(f"{name} must be a positive number of seconds or GB, not {value}")
    print(sandbox.describe_protections(), file=sys.stderr)
    solutions = Path(args.solutions) if args.solutions else None  # None: the course's own
    limits = grading.GradingLimits(memory_bytes=int(args.memory_gb * 2**30))
    grades = grading.grade_many(args.submissions, out_dir=args.out, solutions_dir=solutions,
                                timeout=args.timeout, cell_timeout=args.cell_timeout,
                                tasks=args.task or None, jobs=args.jobs, limits=limits)
    if args.out:
        print(f"wrote {Path(args.out) / 'grades.csv'} and {Path(args.out) / 'grades.json'}")
    failed = [g for g in grades if grading.not_graded(g)]
    if not grades or len(failed) == len(grades):
        print(f"nothing was graded: {len(failed)} submission(s) could not be read or matched")
        return 1
    if failed:
        print(f"not graded: {', '.join(f'{g.student} ({g.submission})' for g in failed)}")
        return 1
    return 0


# -- course lab --------------------------------------------------------------------
FIRST_NOTEBOOK = "notebooks/00_setup_and_tour.ipynb"


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _course_folder(folder: str | None) -> Path:
    """The folder JupyterLab serves: --folder, else ./ when it has the notebooks, else the repo."""
    from .exercises import default_solutions_dir

    if folder:
        chosen = Path(folder).expanduser().resolve()
    elif (Path.cwd() / FIRST_NOTEBOOK).is_file():
        chosen = Path.cwd()
    else:
        chosen = default_solutions_dir().parent
    if not (chosen / FIRST_NOTEBOOK).is_file():
        raise CourseError(f"no {FIRST_NOTEBOOK} in {chosen}: pass --folder, the course's checkout")
    return chosen


def lab_command(args) -> tuple[list[str], dict[str, str], str]:
    """The JupyterLab command line, its environment, and the URL a browser should open."""
    import secrets

    from . import data
    from .checkpoints import CHECKPOINT_ENV, checkpoint_dir

    folder = _course_folder(args.folder)
    budget_name = check_budget(args.budget) if args.budget else _default_budget()
    port = args.port or _free_port(args.ip)
    token = args.token or secrets.token_hex(16)
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # a non-interactive backend (Agg, set for tests) would hide every figure
    env[BUDGET_ENV] = budget_name
    env[data.DATA_ENV] = str(data.data_root(args.root))
    env[CHECKPOINT_ENV] = str(checkpoint_dir(args.checkpoint_dir))
    if args.test_split:
        env[data.TEST_SPLIT_ENV] = "1"
    command = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={folder}",
               f"--ServerApp.ip={args.ip}", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={token}", f"--LabApp.default_url=/lab/tree/{FIRST_NOTEBOOK}"]
    if not args.browser:
        command.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # containers and Colab-like images run as root
    url = f"http://{args.ip}:{port}/lab/tree/{FIRST_NOTEBOOK}?token={token}"
    return command, env, url


def cmd_lab(args) -> int:
    import subprocess

    from .checkpoints import CHECKPOINT_ENV

    command, env, url = lab_command(args)
    print(f"JupyterLab for the course (budget {env[BUDGET_ENV]}, data {env['COURSE_DATA_DIR']}, "
          f"checkpoints {env[CHECKPOINT_ENV]})")
    print(f"open: {url}", flush=True)
    if args.print_command:
        print(" ".join(command))
        return 0
    sys.stdout.flush()
    if os.name == "posix":  # become JupyterLab, so that Ctrl-C and `kill` reach it directly
        os.execve(command[0], command, env)
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


# -- course train ------------------------------------------------------------------
def _check_max_seconds(max_seconds: float | None) -> None:
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise CourseError(f"--max-seconds must be a positive number of seconds, not {max_seconds}")


def _check_folders(*folders: tuple[Path | None, str]) -> None:
    """Each ``(folder, option)`` can be created: nothing on its path is a file."""
    for folder, option in folders:
        if folder is None:
            continue
        blocked = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise CourseError(f"{option} {folder}: {blocked} is a file, not a folder")


def _apply_course_settings(args) -> str:
    """The budget, split and data root of ``args`` into the environment, where the data module and
    the models' specs read them; the budget's name. MNIST's test split must be there."""
    from . import data

    budget_name = check_budget(args.budget or os.environ.get(BUDGET_ENV) or _default_budget())
    os.environ[BUDGET_ENV] = budget_name
    if args.test_split:
        os.environ[data.TEST_SPLIT_ENV] = "1"
    if args.root:
        os.environ[data.DATA_ENV] = str(Path(args.root).expanduser().resolve())
    if not data.split_available("test"):
        raise CourseError(f"MNIST not found in {data.raw_folder()}: run `course data` or pass --root")
    return budget_name


def cmd_train(args) -> int:
    from . import registry
    from .checkpoints import save_checkpoint
    from .runtime import get_device, seed_everything

    spec = registry.get(args.model)
    _check_max_seconds(args.max_seconds)
    _check_folders((Path(args.out or Path("runs") / f"{spec.name}-{args.budget or 'default'}"), "--out"),
                   (Path(args.checkpoint_dir) if args.checkpoint_dir else None, "--checkpoint-dir"))
    budget_name = _apply_course_settings(args)
    device = get_device(args.device)
    seed_everything(args.seed)
    config = registry.training_config(spec.name, budget_name, args.seed, args.max_seconds)
    print(f"training {spec.name} ({spec.description}) | budget {budget_name} | device {device} | "
          f"data: {config['data']}")
    model = spec.build(config)
    start, cpu_start = time.monotonic(), time.process_time()
    train_info = spec.train(model, config, device, args.max_seconds) or {}
    seconds, cpu_seconds = time.monotonic() - start, time.process_time() - cpu_start
    metrics = dict(spec.evaluate(model, config, device))
    metrics.update(train_info)
    metrics.update(model=spec.name, budget=budget_name, device=str(device), seed=args.seed,
                   max_seconds=args.max_seconds, train_seconds=round(seconds, 1),
                   train_cpu_seconds=round(cpu_seconds, 1), train_data=config["data"],
                   parameters=sum(p.numel() for p in model.parameters()))
    path = save_checkpoint(spec.name, model, config, metrics, directory=args.checkpoint_dir)
    out = Path(args.out or Path("runs") / f"{spec.name}-{budget_name}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    for key, value in metrics.items():
        print(f"  {key:<22} {value}")
    print(f"checkpoint: {path}")
    print(f"metrics:    {out / 'metrics.json'}")
    return 0


# -- course benchmark --------------------------------------------------------------
def cmd_benchmark(args) -> int:
    from . import benchmark
    from .runtime import get_device

    _check_max_seconds(args.max_seconds)
    if args.samples is not None and args.samples < 10:
        raise CourseError(f"--samples must be at least 10, not {args.samples}")
    out = Path(args.out) if args.out else None
    _check_folders((out, "--out"))
    if args.checkpoint_dir:
        from .checkpoints import CHECKPOINT_ENV

        os.environ[CHECKPOINT_ENV] = str(Path(args.checkpoint_dir).expanduser().resolve())
    budget_name = _apply_course_settings(args)
    names = benchmark.BENCHMARKABLE if args.all else benchmark.LINEUP
    if args.only:
        names = tuple(name.strip() for part in args.only for name in part.split(",") if name.strip())
    table = benchmark.run_benchmark(names, budget_name, out, max_seconds=args.max_seconds,
                                    samples=args.samples, seed=args.seed, device=get_device(args.device))
    print()
    print(benchmark.format_table(table))
    return 0


def _default_budget() -> str:
    from .runtime import budget

    return budget()


def _add_course_settings(p: argparse.ArgumentParser) -> None:
    """The settings `course train` and `course lab` share: budget, data, checkpoints, split."""
    p.add_argument("--budget", help="smoke, classroom or full (default: $COURSE_BUDGET or by device)")
    p.add_argument("--root", help="data root (default: $COURSE_DATA_DIR or the cache)")
    p.add_argument("--checkpoint-dir", help="checkpoint cache (default: see course_utils.checkpoints)")
    p.add_argument("--test-split", action="store_true",
                   help="train on the first 8,000 MNIST test images, hold out the last 2,000")


def _add_benchmark_parser(sub) -> None:
    from .benchmark import BENCHMARKABLE, LINEUP

    p = sub.add_parser("benchmark", help="train or load every model family, measure them the same way, "
                                          "write benchmark.json/.md and figures")
    _add_course_settings(p)
    p.add_argument("--only", action="append",
                   help=f"models to run, comma-separated (default: {','.join(LINEUP)}; any of "
                        f"{','.join(BENCHMARKABLE)})")
    p.add_argument("--all", action="store_true", help="every benchmarkable model, not only the lineup")
    p.add_argument("--out", help="folder for the table and figures (default: CHECKPOINTS/benchmark-BUDGET)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="train each missing model for at most this long (default: its budget's time)")
    p.add_argument("--samples", type=int, default=None, help="samples per model (default: by budget)")
    p.add_argument("--device", help="force a device, e.g. cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_benchmark)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="course", description="The deep generative models course: check the set-up, get the "
        "data, build and grade exercises, train models. `course COMMAND --help` says more.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="versions, device, budget and data, with a verdict")
    p.add_argument("--root", help="data root (default: $COURSE_DATA_DIR or the cache)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("data", help="download MNIST, or verify files placed by hand")
    p.add_argument("--root", help="data root (default: $COURSE_DATA_DIR or the cache)")
    p.add_argument("--no-download", action="store_true", help="only verify what is there")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("exercises", help="build exercises/ from solutions/, or check it is fresh")
    p.add_argument("action", choices=["build", "check"])
    p.add_argument("--solutions",
                   help="solutions folder (default: ./solutions, else the installed course's)")
    p.add_argument("--exercises",
                   help="exercises folder (default: ./exercises, else the installed course's)")
    p.set_defaults(func=cmd_exercises)

    p = sub.add_parser("grade", help="grade submissions (files or folders) against solutions/")
    p.add_argument("submissions", nargs="+", help="notebooks, or folders of notebooks")
    p.add_argument("--solutions",
                   help="solutions folder (default: ./solutions, else the installed course's)")
    p.add_argument("--out", help="write grades.csv, grades.json and report.txt here")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per task")
    p.add_argument("--cell-timeout", type=float, default=None,
                   help="seconds allowed for one call of the student's code (default: --timeout)")
    p.add_argument("--memory-gb", type=float, default=3.0, help="memory allowed per task, in GB")
    p.add_argument("--jobs", type=int, default=None,
                   help="tasks graded at once (default: CPU count, at most 4)")
    p.add_argument("--task", action="append", help="grade only this task (repeatable)")
    p.set_defaults(func=cmd_grade)

    p = sub.add_parser("lab", help="start JupyterLab at the first notebook, with the course's settings")
    _add_course_settings(p)
    p.add_argument("--folder", help="the course's checkout (default: ./ or the installed course)")
    p.add_argument("--ip", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--token", help="access token (default: a random one, shown in the URL)")
    p.add_argument("--browser", action="store_true", help="also open a web browser")
    p.add_argument("--print-command", action="store_true",
                   help="print the JupyterLab command and URL, start nothing")
    p.set_defaults(func=cmd_lab)

    p = sub.add_parser("train", help="train a registered model; write its checkpoint and metrics.json")
    p.add_argument("model", help="a registered model, e.g. classifier")
    _add_course_settings(p)
    p.add_argument("--max-seconds", type=float, default=None, help="wall-clock limit for training")
    p.add_argument("--out", help="folder for metrics.json (default: runs/MODEL-BUDGET)")
    p.add_argument("--device", help="force a device, e.g. cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    _add_benchmark_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CourseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
