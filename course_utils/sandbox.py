"""The sandbox that a student's code runs in while it is graded.

:func:`start` launches one untrusted process (``python -m
course_utils.grading_student``) with the protections this machine offers, and
returns a :class:`Sandbox` that can watch it and kill it, with everything it
started.

On **Linux with bubblewrap** (Debian/Ubuntu package ``bubblewrap``):

* new user, PID, network, IPC, UTS and cgroup namespaces: the process sees only
  its own processes, has no network, no capabilities, and runs as an
  unprivileged user id (65534) inside its namespace;
* a file system of its own: the Python installation, the ``course_utils``
  package and the MNIST folder, read-only; a fresh, size-limited ``/tmp`` and
  home. The repository (``solutions/``), the grades folder and the grader's
  files are not there to read or write. The environment is cleared;
* when the sandbox's first process dies, the kernel kills every process in its
  PID namespace, however it was started (``setsid``, double fork, orphans).

Everywhere on POSIX: resource limits (file size, core dumps, processes where it
counts only the sandbox), a memory watchdog that sums the resident memory of
the sandbox's processes, and a new session whose process group is killed at the
end. As root on Linux, a memory and a pids cgroup per sandbox as well.

Elsewhere (macOS, Windows), or on Linux without bubblewrap: the process runs as
the grader's user with those limits that exist; :func:`protections` says which
are missing. The verdicts stay trustworthy anyway: they are decided in another
process (see :mod:`course_utils.grading`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if os.name == "posix":
    import resource
if sys.platform.startswith("linux"):
    import ctypes

    _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the forked child must not load anything
else:
    _LIBC = None

SANDBOX_UID = 65534  # "nobody"
SANDBOX_HOME = "/home/student"


@dataclass
class Limits:
    """What one task's code may use."""

    memory_bytes: int = 3 * 2**30
    max_processes: int = 64
    max_file_bytes: int = 64 * 2**20   # any one file it writes
    tmp_bytes: int = 256 * 2**20       # its /tmp and home together (bubblewrap only)
    output_bytes: int = 64 * 2**10     # what is kept of what it prints


def _bwrap() -> str | None:
    if not sys.platform.startswith("linux") or os.environ.get("COURSE_SANDBOX") == "off":
        return None
    return shutil.which("bwrap")


_BWRAP_WORKS: dict[str, bool] = {}
_NOBODY_WORKS: dict[tuple, bool] = {}


def _runs_as_nobody(command: list[str]) -> bool:
    """As root: whether the sandbox can start as the unprivileged user 65534 instead.

    That user must be able to reach every folder the sandbox shows (the Python
    installation, the package, the data); where one is private to root (a
    virtual environment in a mode-700 folder), the sandbox runs as root's uid
    mapped to 65534 inside its user namespace, with no capabilities.
    """
    if os.geteuid() != 0:
        return False
    key = tuple(command)
    if key not in _NOBODY_WORKS:
        try:
            done = subprocess.run(command + ["-c", "import torch"], capture_output=True, timeout=120,
                                  preexec_fn=_limit_child(Limits(), [], SANDBOX_UID))
            _NOBODY_WORKS[key] = done.returncode == 0
        except (OSError, subprocess.SubprocessError):
            _NOBODY_WORKS[key] = False
    return _NOBODY_WORKS[key]


def bwrap_works() -> bool:
    """Whether bubblewrap is installed and can make namespaces here (tried once)."""
    path = _bwrap()
    if path is None:
        return False
    if path not in _BWRAP_WORKS:
        try:
            done = subprocess.run([path, *(_system_binds()), "--unshare-all", "--die-with-parent",
                                   "--proc", "/proc", "--dev", "/dev", "--", "/bin/true"],
                                  capture_output=True, timeout=30)
            _BWRAP_WORKS[path] = done.returncode == 0
        except (OSError, subprocess.SubprocessError):
            _BWRAP_WORKS[path] = False
    return _BWRAP_WORKS[path]


def _cgroup_roots() -> dict[str, Path]:
    """Writable cgroup (v1 memory and pids, or v2) folders to put sandboxes in; {} if none."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return {}
    base = Path("/sys/fs/cgroup")
    roots = {}
    if (base / "cgroup.controllers").is_file():  # cgroup v2
        own = Path("/proc/self/cgroup").read_text().strip().split("::")[-1].lstrip("/")
        parent = base / own
        controllers = (parent / "cgroup.controllers").read_text().split() \
            if (parent / "cgroup.controllers").is_file() else []
        if {"memory", "pids"} <= set(controllers) and os.access(parent, os.W_OK):
            roots["v2"] = parent
        return roots
    for controller in ("memory", "pids"):
        folder = base / controller
        own = ""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and controller in parts[1].split(","):
                own = parts[2].lstrip("/")
        candidate = folder / own
        if candidate.is_dir() and os.access(candidate, os.W_OK):
            roots[controller] = candidate
    return roots if set(roots) == {"memory", "pids"} else {}


def protections() -> dict[str, bool]:
    """Which protections :func:`start` gives on this machine."""
    namespaces = bwrap_works()
    posix = os.name == "posix"
    return {
        "verdicts decided outside the student's process": True,
        "private file system (solutions, grades and the grader's files hidden)": namespaces,
        "no network": namespaces,
        "cannot see or signal other processes": namespaces,
        "every process killed at the end, setsid and orphans included": namespaces or bool(_cgroup_roots()),
        "memory limit": posix,
        "process limit": namespaces or bool(_cgroup_roots()),
        "file size limit": posix,
        "output cap": True,
    }


def describe_protections() -> str:
    missing = [name for name, ok in protections().items() if not ok]
    if not missing:
        return "sandbox: all protections active (bubblewrap namespaces, limits)"
    hint = " (install the `bubblewrap` package)" if sys.platform.startswith("linux") else ""
    return "sandbox: missing here" + hint + ": " + "; ".join(missing)


# ---------------------------------------------------------------------------------
# What the sandbox's file system holds
# ---------------------------------------------------------------------------------
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "localtime", "passwd",
              "group", "hosts", "alternatives")


def _system_binds() -> list[str]:
    args = []
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.lexists(top):
            args += ["--ro-bind", top, top] if not os.path.islink(top) else \
                ["--symlink", os.readlink(top), top]
    for name in _ETC_FILES:
        path = f"/etc/{name}"
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    return args


def _python_paths(package_dir: Path) -> list[str]:
    """Folders the student's Python needs: the interpreter's and its site-packages, nothing else.

    Not every ``sys.path`` entry: one may be the folder the grader was started from,
    which can hold anything (solutions, grades). Never the course repository.
    """
    import site

    repo = package_dir.parent
    wanted = {Path(sys.base_prefix), Path(sys.prefix), Path(sys.exec_prefix), Path(sys.base_exec_prefix),
              Path(sys.executable).resolve().parent.parent}
    wanted |= {Path(p) for p in site.getsitepackages()}
    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if user_site:
        wanted.add(Path(user_site))
    kept: list[str] = []
    for path in sorted((p.resolve() for p in wanted if p.is_dir()), key=lambda p: len(p.parts)):
        if repo.is_relative_to(path):
            continue  # the repository (with solutions/) or a folder holding it: never mounted
        # (a folder inside it, such as a .venv made in the repository, is fine)
        if str(path) in ("/", "/usr", "/lib", "/bin", "/home", "/tmp", "/root"):
            continue
        if any(path.is_relative_to(Path(k)) for k in kept):
            continue
        kept.append(str(path))
    return kept


# ---------------------------------------------------------------------------------
# One sandbox
# ---------------------------------------------------------------------------------
@dataclass
class Sandbox:
    process: subprocess.Popen
    limits: Limits
    uses_bwrap: bool
    cgroups: list[Path] = field(default_factory=list)
    scratch: str | None = None  # a folder outside the sandbox that it may write (no bubblewrap)
    killed_because: str | None = None
    output: bytearray = field(default_factory=bytearray)
    _reader: threading.Thread | None = None

    def _drain(self, stream) -> None:
        """Keep the last ``output_bytes`` of what the sandbox prints; drop the rest."""
        keep = self.limits.output_bytes
        while True:
            chunk = stream.read(65536)
            if not chunk:
                return
            self.output += chunk
            if len(self.output) > 2 * keep:
                del self.output[:-keep]

    def pids(self) -> list[int]:
        """The sandbox's processes as this machine numbers them (Linux: by walking /proc)."""
        if self.cgroups:
            for cg in self.cgroups:
                procs = cg / "cgroup.procs"
                if procs.is_file():
                    with contextlib.suppress(OSError):
                        return [int(p) for p in procs.read_text().split()]
        if not Path("/proc").is_dir():
            return [self.process.pid]
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, stack = [], [self.process.pid]
        while stack:
            pid = stack.pop()
            found.append(pid)
            stack += children.get(pid, [])
        return found

    def resident_bytes(self) -> int:
        """The memory the sandbox's processes hold: the sum of their proportional set sizes.

        PSS shares each shared page among the processes that map it, so a forked child that
        has not yet replaced itself (``exec``) by another program does not count the parent's
        memory a second time. Falls back to the resident set size where PSS is not reported.
        """
        total = 0
        page = os.sysconf("SC_PAGE_SIZE")
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
                continue
            except (OSError, ValueError, IndexError, StopIteration):
                pass
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * page
            except (OSError, ValueError, IndexError):
                continue
        return total

    def watch(self, stop: threading.Event, interval: float = 0.2) -> None:
        """Kill the sandbox when its processes are more, or hold more memory, than allowed.

        The count comes first: a fork bomb is named as one, not as the memory its copies hold.
        """
        if not Path("/proc").is_dir():
            return
        while not stop.wait(interval):
            if self.process.poll() is not None:
                return
            if len(self.pids()) > self.limits.max_processes + 2:
                self.kill(f"started more than {self.limits.max_processes} processes")
                return
            if self.resident_bytes() > self.limits.memory_bytes:
                self.kill(f"used more than the memory limit of {self.limits.memory_bytes / 2**30:.1f} GB")
                return

    def kill(self, reason: str | None = None) -> None:
        """Kill every process of the sandbox, however it was started."""
        if reason and not self.killed_because:
            self.killed_because = reason
        if os.name != "posix":
            with contextlib.suppress(OSError):
                self.process.kill()
            return
        for _ in range(3):
            pids = self.pids()
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                self.process.kill()
            if not self.cgroups or not any(self.pids()):
                break
            time.sleep(0.05)

    def close(self) -> None:
        self.limit_exceeded()  # read the cgroups' counters while they exist
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        for cg in self.cgroups:
            for _ in range(50):
                try:
                    cg.rmdir()
                    break
                except OSError:
                    self.kill()
                    time.sleep(0.1)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def startup_failure(self) -> str | None:
        """bubblewrap's own complaint, when it could not start the sandbox at all."""
        text = bytes(self.output[:4096]).decode("utf-8", "replace")
        lines = [line for line in text.splitlines() if line.startswith("bwrap:")]
        return lines[0] if lines and self.uses_bwrap else None

    def limit_exceeded(self) -> str | None:
        """Which limit the sandbox broke (memory, processes), if it broke one; kept after :meth:`close`."""
        if self.killed_because:
            return self.killed_because
        for cg in self.cgroups:  # the kernel's memory limit: the OOM killer struck inside the cgroup
            for counter in ("memory.failcnt", "memory.events"):
                with contextlib.suppress(OSError, ValueError):
                    text = (cg / counter).read_text()
                    hits = int(text) if counter == "memory.failcnt" else \
                        int(dict(line.split() for line in text.splitlines()).get("oom_kill", 0))
                    if hits:
                        self.killed_because = (f"used more than the memory limit of "
                                               f"{self.limits.memory_bytes / 2**30:.1f} GB")
        return self.killed_because


def _make_cgroups(roots: dict[str, Path], name: str, limits: Limits) -> list[Path]:
    made = []
    try:
        if "v2" in roots:
            folder = roots["v2"] / name
            folder.mkdir()
            made.append(folder)
            (folder / "memory.max").write_text(str(limits.memory_bytes))
            (folder / "pids.max").write_text(str(limits.max_processes))
            with contextlib.suppress(OSError):
                (folder / "memory.swap.max").write_text("0")
        else:
            memory = roots["memory"] / name
            memory.mkdir()
            made.append(memory)
            (memory / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            pids = roots["pids"] / name
            pids.mkdir()
            made.append(pids)
            (pids / "pids.max").write_text(str(limits.max_processes))
    except OSError:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        return []
    return made


def _limit_child(limits: Limits, cgroups: list[Path], drop_to: int | None = None):
    """The function the child runs before exec: cgroups, resource limits, the unprivileged
    user (when the grader is root), and death with the grader."""

    def prepare() -> None:
        for cg in cgroups:
            with open(cg / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
        if drop_to is not None:
            os.setgroups([])
            os.setresgid(drop_to, drop_to, drop_to)
            os.setresuid(drop_to, drop_to, drop_to)
        if _LIBC is not None:  # after the user change, which clears it
            _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the grader

    return prepare


def start(argv: list[str], *, popen_options: dict, env: dict[str, str], package_dir: Path,
          read_only: list[str], limits: Limits, name: str,
          files: dict[str, str] | None = None) -> Sandbox:
    """Start ``argv`` (a Python module run by this interpreter) in a sandbox.

    ``popen_options``: how it inherits its pipes (:func:`course_utils.wire.inherit`);
    ``read_only``: extra folders it may read (the data root); ``files``: single
    files to show it read-only, ``{path inside: path outside}`` (bubblewrap only);
    ``env``: its whole environment (HOME, TMPDIR and PYTHONPATH are set here).
    """
    package_dir = package_dir.resolve()
    env = dict(env)
    drop_to = None
    roots = _cgroup_roots()
    cgroups = _make_cgroups(roots, name, limits) if roots else []
    scratch = None
    if bwrap_works():
        binds = _system_binds()
        for path in _python_paths(package_dir) + [str(package_dir)]:
            binds += ["--ro-bind", path, path]
        for path in read_only:
            if path and os.path.isdir(path):
                binds += ["--ro-bind", path, path]
        env.update(HOME=SANDBOX_HOME, TMPDIR="/tmp", PYTHONPATH=str(package_dir.parent))
        mounts = ["--size", str(limits.tmp_bytes), "--tmpfs", "/tmp",
                  "--size", str(limits.tmp_bytes), "--tmpfs", "/home", "--dir", SANDBOX_HOME]
        for inside, outside in (files or {}).items():
            if os.path.isfile(outside):
                mounts += ["--ro-bind", outside, inside]
        env["MPLCONFIGDIR"] = "/tmp/matplotlib"
        # the fresh /tmp and /home first: a folder bound from under /tmp (a virtual environment
        # made by mktemp, say) must lie on top of the empty /tmp, not under it
        command = [_bwrap(), *mounts, *binds,
                   "--proc", "/proc", "--dev", "/dev", "--chdir", SANDBOX_HOME,
                   "--unshare-all", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
                   "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv",
                   "--cap-drop", "ALL"]
        for key, value in env.items():
            command += ["--setenv", key, value]
        command += ["--", sys.executable]
        if _runs_as_nobody(command):
            drop_to = SANDBOX_UID
        command += argv
        cwd, popen_env = None, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    else:
        scratch = tempfile.mkdtemp(prefix="course-grade-")
        env.update(HOME=scratch, USERPROFILE=scratch, TMPDIR=scratch, TEMP=scratch, TMP=scratch,
                   PYTHONPATH=str(package_dir.parent))
        command, cwd, popen_env = [sys.executable, *argv], scratch, env
    kwargs: dict = dict(popen_options)
    if os.name == "posix":
        kwargs.update(start_new_session=True, preexec_fn=_limit_child(limits, cgroups, drop_to))
    process = subprocess.Popen(command, env=popen_env, cwd=cwd,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, **kwargs)
    sandbox = Sandbox(process, limits, uses_bwrap=scratch is None, cgroups=cgroups, scratch=scratch)
    sandbox._reader = threading.Thread(target=sandbox._drain, args=(process.stdout,), daemon=True)
    sandbox._reader.start()
    return sandbox
