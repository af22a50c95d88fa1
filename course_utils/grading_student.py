"""The student's side of grading: a sandboxed process that runs the student's code and serves calls.

``course grade`` starts this program (``python -m course_utils.grading_student
READ_FD WRITE_FD``) inside the sandbox of :mod:`course_utils.sandbox`, one per
task. It never sees a test, a solution or an expected value. It is told, over a
:class:`~course_utils.wire.Channel`:

* ``run``: run a cell (the notebook's set-up cells, then the student's task cell);
* ``identify``: what the task's names are bound to (the student's own function,
  or the library's);
* ``call``: call one of the student's functions with arguments sent as data, and
  send back the result as data (with gradients, when the tests ask for them);
* ``callback_result``: the answer to a callback it asked for during a call.

Anything the student's code does here, patching ``torch``, the checks or this
program included, changes only what this process sends back: plain data, which
the trusted side checks against values it computed itself.
"""

from __future__ import annotations

import io
import linecache
import sys
import traceback

STUDENT_FILE = "<your code>"
MAX_MESSAGE = 500  # characters of an exception message sent back (it ends up in the report)


def _error(err: BaseException, source_name: str = STUDENT_FILE) -> dict:
    """Type, message and the line of the student's cell where it happened (if it did)."""
    line = None
    for frame in traceback.extract_tb(err.__traceback__):
        if frame.filename == source_name:
            line = frame.lineno
    text = str(err)
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + " [...]"
    return {"type": type(err).__name__, "message": text, "line": line}


class StudentServer:
    def __init__(self, channel):
        from IPython.core.interactiveshell import InteractiveShell

        self.channel = channel
        self.shell = InteractiveShell.instance()
        self.namespace = self.shell.user_ns
        self.cells = 0

    # -- operations ------------------------------------------------------------------
    def run(self, source: str, role: str) -> dict:
        self.cells += 1
        name = STUDENT_FILE if role == "student" else f"<set-up cell {self.cells}>"
        try:
            python = self.shell.transform_cell(source)
            linecache.cache[name] = (len(python), None, python.splitlines(True), name)
            exec(compile(python, name, "exec"), self.namespace)  # noqa: S102 - the student's cell
        except BaseException as err:  # SystemExit and KeyboardInterrupt included
            return {"op": "done", "error": _error(err, name)}
        return {"op": "done", "error": None}

    def identify(self, names: list[str]) -> dict:
        found = {}
        for name in names:
            value = self.namespace.get(name)
            module = getattr(value, "__module__", None) or ""
            code = getattr(value, "__code__", None)
            found[name] = {
                "defined": name in self.namespace,
                "callable": callable(value),
                "library": f"{module}.{getattr(value, '__qualname__', name)}"
                if module.startswith("course_utils") else None,
                "in_cell": getattr(code, "co_filename", None) == STUDENT_FILE,
            }
        return {"op": "identity", "names": found}

    def call(self, message: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        import torch

        from .checks import gradients_of
        from .wire import Decoder, Encoder, WireError

        decoder = Decoder(blobs, make_callback=self._callback)
        try:
            args = decoder.decode(message.get("args"))
            kwargs = decoder.decode(message.get("kwargs"))
            rng = decoder.decode(message.get("rng"))
            wrt_numbers = message.get("wrt")
            function = self.namespace.get(message.get("name"))
            if function is None:
                raise NameError(f"name {message.get('name')!r} is not defined")
            if isinstance(rng, torch.Tensor):
                torch.set_rng_state(rng)
        except WireError as err:
            return {"op": "result", "error": {"type": "WireError", "message": str(err)}}, []
        except Exception as err:
            return {"op": "result", "error": _error(err)}, []
        try:
            result = function(*args, **kwargs)
            grads = None
            if wrt_numbers is not None:
                wrt = [decoder.tensors[n] for n in wrt_numbers]
                grad_output = decoder.decode(message.get("grad_output"))
                grads = gradients_of(result, tuple(wrt), grad_output)
        except BaseException as err:
            return {"op": "result", "error": _error(err)}, []
        encoder = Encoder()
        try:
            body = {"op": "result", "error": None,
                    "value": encoder.encode(result),
                    "grads": None if grads is None else encoder.encode(tuple(grads)),
                    "rng": encoder.encode(torch.get_rng_state()),
                    "generators": encoder.encode([g.get_state() for g in decoder.generators])}
        except WireError as err:
            return {"op": "result", "error": {"type": "WireError", "message": str(err)}}, []
        return body, encoder.blobs

    def _callback(self, number: int):
        """A stand-in for a function of the tests: calling it asks the trusted side to run it."""
        from .wire import Decoder, Encoder, WireError

        def call(*args, **kwargs):
            encoder = Encoder()
            body = {"op": "callback", "number": number, "args": encoder.encode(args),
                    "kwargs": encoder.encode(kwargs)}
            self.channel.send(body, encoder.blobs)
            reply, blobs = self.channel.receive()
            if reply.get("op") != "callback_result":
                raise WireError("the grader sent something else than a callback's result")
            if reply.get("error"):
                raise RuntimeError(f"a function the tests passed in failed: {reply['error']}")
            return Decoder(blobs).decode(reply.get("value"))

        return call

    # -- the loop --------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            try:
                message, blobs = self.channel.receive()
            except EOFError:
                return
            op = message.get("op")
            if op == "run":
                self.channel.send(self.run(str(message.get("source", "")), str(message.get("role"))))
            elif op == "identify":
                self.channel.send(self.identify([str(n) for n in message.get("names", [])]))
            elif op == "call":
                body, out = self.call(message, blobs)
                self.channel.send(body, out)
            elif op == "exit":
                return


def main(argv: list[str]) -> int:
    from .wire import Channel, open_inherited

    channel = Channel(open_inherited(argv[0], writing=False), open_inherited(argv[1], writing=True))
    sys.stdin = io.StringIO()  # input() in a task cell gets EOF instead of waiting forever
    StudentServer(channel).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
