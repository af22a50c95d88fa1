"""The trusted side of grading: runs the reference notebook and the tests, and decides every verdict.

``course grade`` starts this program once per task (``python -m
course_utils.grading_trusted PLAN RESULTS READ_FD WRITE_FD``). No student code ever
runs in it. It

1. tells the sandboxed student process (:mod:`course_utils.grading_student`) to
   run the notebook's set-up cells and then the student's task cell;
2. asks that process what the task's names are bound to, and looks at the task
   cell's source itself, so that the library's own implementation earns nothing;
3. runs the solution notebook's cells up to the task's last test cell, with the
   reference solution in place, then replaces the task's functions by
   :class:`RemoteFunction` stand-ins and runs the check and hidden-test cells.

A stand-in sends its arguments to the student's process as data, and gets back
data (:mod:`course_utils.wire`). Comparisons, hints and scores happen here. The
outcome of every test cell is appended to RESULTS as one JSON line as soon as it
is known, so that a task stopped by its time limit keeps what it had earned.
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import os
import sys
import time

from .exercises import NOT_IMPLEMENTED

DIED = "kernel died: the Python process that ran your code crashed or was killed"


class StudentGone(BaseException):
    """The student's process stopped answering (dead or over time): no test can catch this."""


class RemoteError(Exception):
    """An exception raised by the student's code whose type is not a Python built-in."""

    def __init__(self, remote_type: str, message: str):
        super().__init__(message)
        self.remote_type = remote_type


class StudentProcess:
    """The trusted side's end of the channel to the sandboxed student process."""

    def __init__(self, channel, deadline: float):
        self.channel = channel
        self.deadline = deadline  # time.monotonic() after which the task is over

    def _receive(self, timeout: float, what: str, started: float | None = None):
        """The next reply; waits ``timeout`` seconds from ``started`` (default: now)."""
        left = timeout - (time.monotonic() - started) if started is not None else timeout
        task_left = self.deadline - time.monotonic()
        try:
            return self.channel.receive(timeout=max(0.01, min(left, task_left)))
        except TimeoutError:
            if task_left <= left:
                raise StudentGone("timed out (the time limit for the whole task)") from None
            raise StudentGone(f"timed out after {_fmt(timeout)} s ({what})") from None
        except EOFError:
            raise StudentGone(DIED) from None
        except Exception as err:  # a refused message
            raise StudentGone(f"your code sent back something the grader cannot read: {err}") from None

    def send(self, body: dict, blobs: list[bytes] = ()) -> None:
        try:
            self.channel.send(body, blobs)
        except OSError:  # a broken pipe: the process is gone
            raise StudentGone(DIED) from None

    def send_run(self, source: str, role: str) -> None:
        """Ask for a cell to run; its reply is collected by :meth:`run_reply`, in order."""
        self.send({"op": "run", "source": source, "role": role})

    def run_reply(self, timeout: float) -> dict | None:
        reply, _ = self._receive(timeout, "an endless loop, or code far too slow?")
        return reply.get("error")

    def send_identify(self, names: list[str]) -> None:
        self.send({"op": "identify", "names": names})

    def identify_reply(self, timeout: float) -> dict:
        reply, _ = self._receive(timeout, "while looking up your functions")
        found = reply.get("names")
        return found if isinstance(found, dict) else {}

    def call(self, name: str, args, kwargs, timeout: float, wrt=None, grad_output=None):
        import torch

        from .wire import Decoder, Encoder, WireError

        encoder = Encoder(callbacks={})
        body = {"op": "call", "name": name, "args": encoder.encode(tuple(args)),
                "kwargs": encoder.encode(dict(kwargs)), "rng": encoder.encode(torch.get_rng_state())}
        if wrt is not None:
            numbers = []
            for tensor in wrt:
                number = encoder.tensor_ids.get(id(tensor))
                if number is None:
                    raise ValueError("with_gradients: every tensor in wrt must be passed to the function "
                                     "(directly or as a parameter of a module argument)")
                numbers.append(number)
            body["wrt"] = numbers
            body["grad_output"] = encoder.encode(grad_output)
        self.send(body, encoder.blobs)
        start = time.monotonic()
        while True:
            reply, blobs = self._receive(timeout, "an endless loop, or code far too slow?", start)
            if reply.get("op") == "callback":
                self._serve_callback(encoder.callbacks, reply, blobs)
                continue
            if reply.get("op") != "result":
                raise StudentGone("your code sent back something the grader did not ask for")
            break
        error = reply.get("error")
        if error:
            raise _exception(error)
        decoder = Decoder(blobs)
        try:
            value = decoder.decode(reply.get("value"))
            grads = decoder.decode(reply.get("grads"))
            torch.set_rng_state(decoder.decode(reply.get("rng")))
            states = decoder.decode(reply.get("generators"))
            for generator, state in zip(encoder.generators, states, strict=True):
                generator.set_state(state)
        except (WireError, RuntimeError, ValueError, TypeError) as err:
            raise RemoteError("WireError", f"what your function returned cannot be graded: {err}") from None
        return value if wrt is None else (value, tuple(grads))

    def _serve_callback(self, callbacks: dict, message: dict, blobs) -> None:
        from .wire import Decoder, Encoder, WireError

        try:
            function = callbacks[int(message.get("number"))]
            decoder = Decoder(blobs)
            result = function(*decoder.decode(message.get("args")), **decoder.decode(message.get("kwargs")))
            encoder = Encoder()
            self.send({"op": "callback_result", "value": encoder.encode(result), "error": None},
                      encoder.blobs)
        except StudentGone:
            raise
        except (WireError, Exception) as err:
            self.send({"op": "callback_result", "error": f"{type(err).__name__}: {err}"[:500]})


def _exception(error: dict) -> BaseException:
    """The student's exception, rebuilt as a built-in type where it is one (tests may catch it)."""
    kind, message = str(error.get("type", "Exception")), str(error.get("message", ""))
    cls = getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and cls is not AssertionError:
        try:
            err = cls(message)
        except Exception:
            err = RemoteError(kind, message)
    else:
        err = RemoteError(kind, message)
    err.student_line = error.get("line")
    return err


class RemoteFunction:
    """Stands for one of the student's functions inside the trusted process."""

    def __init__(self, student: StudentProcess, name: str, timeout: float):
        self.student, self.__name__, self.timeout = student, name, timeout

    def __call__(self, *args, **kwargs):
        return self.student.call(self.__name__, args, kwargs, self.timeout)

    def call_with_gradients(self, args, kwargs, wrt, grad_output):
        return self.student.call(self.__name__, args, kwargs, self.timeout, wrt, grad_output)

    def __repr__(self) -> str:
        return f"<your function {self.__name__}>"


# ---------------------------------------------------------------------------------
# What a task cell defines, and whether it is the library's
# ---------------------------------------------------------------------------------
def defined_names(source: str) -> list[str]:
    """The functions and classes a (solution) cell defines at its top level."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def library_imports(source: str, names: list[str]) -> list[str]:
    """How the cell takes one of ``names`` from the library (``from course_utils.vae import gaussian_kl``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "course_utils":
            for alias in node.names:
                if alias.name == "*" or alias.name in names:
                    found.append(f"from {node.module} import {alias.name}")
                elif alias.name not in names:
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "course_utils":
                    aliases.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in names:
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in aliases:
                found.append(ast.unparse(node))
    return found


# ---------------------------------------------------------------------------------
# Running the plan
# ---------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _error_text(err: BaseException, student_source: str) -> str:
    """``Type: message`` (a failed check's message speaks for itself) and the student's line."""
    if isinstance(err, AssertionError) and str(err):
        text = str(err)
    else:
        kind = err.remote_type if isinstance(err, RemoteError) else type(err).__name__
        text = f"{kind}: {err}" if str(err) else kind
    if len(text) > 2000:
        text = text[:2000] + " [...]"
    chain, line = err, None
    while chain is not None and line is None:
        line = getattr(chain, "student_line", None)
        chain = chain.__cause__ or chain.__context__
    if line and "in your code, line" not in text:
        lines = student_source.split("\n")
        code = lines[line - 1].strip() if 0 < line <= len(lines) else ""
        text += f" (in your code, line {line}: `{code}`)" if code else f" (in your code, line {line})"
    return text


def _is_not_implemented(err: BaseException) -> bool:
    chain = err
    while chain is not None:
        if isinstance(chain, NotImplementedError) or NOT_IMPLEMENTED in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def make_shell():
    """An IPython shell for running notebook cells, without a history thread or database."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    return InteractiveShell.instance(config=config)


class Evaluator:
    """Runs one task's plan. ``done`` cells (the shared set-up) already ran in this process."""

    def __init__(self, plan: dict, results_path: str, channel, done: int = 0,
                 setup_error: BaseException | None = None):
        self.plan = plan
        self.results = open(results_path, "a", encoding="utf-8")  # noqa: SIM115 - kept for the run
        self.student = StudentProcess(channel, time.monotonic() + float(plan["timeout"]))
        self.shell = make_shell()
        self.done, self.setup_error = done, setup_error
        self.tests = [i for i, c in enumerate(plan["cells"]) if c["role"] in ("check", "hidden")]
        self.decided: set[int] = set()
        self.ready = False  # the student's cells have run and its functions are its own

    def record(self, index: int, outcome: str | None) -> None:
        if index in self.decided:
            return
        self.decided.add(index)
        self.results.write(json.dumps({"index": index, "outcome": outcome}) + "\n")
        self.results.flush()

    def lose_rest(self, reason: str) -> None:
        for index in self.tests:
            self.record(index, reason)

    def run_trusted(self, source: str):
        """Run a cell of the reference notebook or a test cell here; the exception, if any."""
        result = self.shell.run_cell(source, store_history=False, silent=False)
        return result.error_before_exec or result.error_in_exec

    def send_student_cells(self) -> None:
        """Queue the student's set-up cells, task cell and the identity question (no waiting)."""
        for source in self.plan["student_setup"]:
            self.student.send_run(source, "setup")
        self.student.send_run(self.plan["student_source"], "student")
        self.student.send_identify(self.plan["names"])

    def student_ready(self) -> bool:
        """Collect the replies to :meth:`send_student_cells`; False (every test lost) on a problem."""
        plan, student = self.plan, self.student
        for number, _ in enumerate(plan["student_setup"], 1):
            error = student.run_reply(float(plan["timeout"]))
            if error:
                self.lose_rest(f"the notebook's set-up (set-up cell {number}) failed in the process that "
                               f"runs your code: {error.get('type')}: {error.get('message')}. This is not "
                               "your fault: tell your instructor.")
                return False
        error = student.run_reply(float(plan["cell_timeout"]))
        if error:
            err = _exception(error)
            if _is_not_implemented(err):
                self.lose_rest(f"{NOT_IMPLEMENTED} (NotImplementedError)")
            else:
                self.lose_rest(f"your code raised {_error_text(err, plan['student_source'])} "
                               "before the tests ran")
            return False
        names = plan["names"]
        imports = library_imports(plan["student_source"], names)
        identity = student.identify_reply(float(plan["cell_timeout"]))
        borrowed = imports + [info["library"] for info in identity.values()
                              if isinstance(info, dict) and info.get("library")]
        if borrowed:
            self.lose_rest(f"your answer is the course library's own implementation ({borrowed[0]}), "
                           "not your code: write the function yourself")
            return False
        return True

    def run(self) -> None:
        plan = self.plan
        try:
            # the student's process runs its cells while this one runs the reference notebook
            self.send_student_cells()
            if self.setup_error is not None:
                self.lose_rest(self.reason_before_tests(self.setup_error, "the set-up"))
                return
            for index, cell in enumerate(plan["cells"]):
                if index < self.done:
                    continue
                if cell["role"] in ("after", "check", "hidden") and not self.ready:
                    self.ready = self.student_ready()
                    if not self.ready:
                        return
                error = self.run_trusted(cell["source"])
                if isinstance(error, StudentGone):
                    raise error
                if cell["role"] in ("check", "hidden"):
                    if error is None:
                        self.record(index, None)
                    elif _is_not_implemented(error):
                        self.record(index, f"{cell['label']}: {NOT_IMPLEMENTED} (NotImplementedError)")
                    else:
                        self.record(index, f"{cell['label']}: {_error_text(error, plan['student_source'])}")
                    continue
                if error is not None:
                    self.lose_rest(self.reason_before_tests(error, cell["label"]))
                    return
                if cell["role"] == "reference":  # from here on, the task's names are the student's
                    for name in plan["names"]:
                        self.shell.user_ns[name] = RemoteFunction(self.student, name,
                                                                  float(plan["cell_timeout"]))
        except StudentGone as gone:
            self.lose_rest(str(gone))
        finally:
            self.lose_rest("did not run")
            self.results.close()

    def reason_before_tests(self, error: BaseException, label: str) -> str:
        """Why every test is lost when a cell before them failed: the student's code, or the set-up."""
        if _is_not_implemented(error):
            return f"{NOT_IMPLEMENTED} (NotImplementedError)"
        if hasattr(error, "student_line") or isinstance(error, RemoteError):
            return (f"your code raised {_error_text(error, self.plan['student_source'])} in {label}, "
                    "before the tests ran")
        return (f"the notebook's set-up ({label}) failed: {_error_text(error, '')}. This is not your "
                "fault: tell your instructor.")


def run_one(plan_path: str, results_path: str, read_fd: int, write_fd: int, done: int = 0,
            setup_error: BaseException | None = None) -> None:
    from .wire import Channel

    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    channel = Channel(read_fd, write_fd)
    Evaluator(plan, results_path, channel, done, setup_error).run()
    try:
        channel.send({"op": "exit"})
    except OSError:
        pass


def serve_forks(control_fd: int, setup_path: str) -> None:
    """A fork server: run the notebook's shared set-up once, then fork one evaluator per task.

    The grader sends, over the Unix socket ``control_fd``, one JSON request per
    task with three file descriptors (the channel's two ends and a pipe whose end
    of file tells the grader that the task is over); the answer is the child's
    process id. Importing torch and running the set-up once per notebook, not
    once per task, is what makes grading a folder of submissions fast.
    """
    import signal
    import socket

    with open(setup_path, encoding="utf-8") as f:
        setup = json.load(f)
    shell = make_shell()
    setup_error = None
    for source in setup:
        result = shell.run_cell(source, store_history=False)
        setup_error = result.error_before_exec or result.error_in_exec
        if setup_error is not None:
            break
    control = socket.socket(fileno=control_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the children are reaped by the kernel
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 65536, 3)
        except OSError:
            return
        if not message:
            return
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.setsid()
            os.chdir(os.path.dirname(request["plan"]))
            try:
                run_one(request["plan"], request["results"], fds[0], fds[1], len(setup), setup_error)
            finally:
                os._exit(0)  # fds[2] closes with this process: the grader sees that the task is over
        for fd in fds:
            os.close(fd)
        control.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def main(argv: list[str]) -> int:
    from .wire import open_inherited

    sys.stdin = io.StringIO()
    if argv[0] == "--fork-server":
        serve_forks(int(argv[1]), argv[2])
        return 0
    plan_path, results_path, read_arg, write_arg = argv
    run_one(plan_path, results_path, open_inherited(read_arg, writing=False),
            open_inherited(write_arg, writing=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
