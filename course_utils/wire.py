"""Plain data across a process boundary: the only thing the grader and a student's code exchange.

When ``course grade`` scores a task, the student's function runs in a sandboxed
process and the tests run in a trusted one (see :mod:`course_utils.grading`). What
crosses between them is *data*, encoded here, never pickle or anything else that
runs code when it is read:

==========================  ==================================================
Python value                on the wire
==========================  ==================================================
None, bool, int, float, str  JSON (NaN and infinities included)
list, tuple, dict            JSON with a type tag; items encoded recursively
``torch.Tensor``             dtype, shape, flags and the raw bytes of its values
``torch.dtype/Size/device``  their names and sizes
``torch.Generator`` (CPU)    its state; the callee's new state is sent back
NumPy arrays and scalars     dtype, shape and raw bytes
``torch.nn.Module``          the class name (looked up *in torch.nn only*), its
                             plain attributes, parameters, buffers and children
other callables              a numbered *callback*: calling it on the other side
                             asks this side to run it (arguments and result are
                             data again)
==========================  ==================================================

A message is ``[4-byte length][JSON header][binary blobs]``; the reader refuses a
message over its size limit, a header nested too deep, an unknown tag, a dtype or
class outside the lists above. Decoding builds tensors with ``torch.frombuffer``
and modules with ``object.__new__`` plus ``nn.Module.__init__``: no constructor,
import or ``eval`` of anything the sender names.
"""

from __future__ import annotations

import json
import os
import queue
import re
import struct
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

MAX_MESSAGE_BYTES = 512 * 2**20  # a result larger than this is refused, not read
MAX_DEPTH = 64

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}
_NUMPY_DTYPES = {"float16", "float32", "float64", "complex64", "complex128", "uint8", "int8", "int16",
                 "int32", "int64", "uint16", "uint32", "uint64", "bool"}
_CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9_]{0,63}$")
_ATTR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")  # parameters and children ("0", "1" in nn.Sequential)
# module attributes that are machinery, not configuration: never sent
_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                     "training", "_flat_weights"}


class WireError(Exception):
    """A value that cannot be sent, or a message that must not be read."""


# ---------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------
@dataclass
class Encoder:
    """Turns a value into ``(header, blobs)``; remembers tensors, generators and callbacks."""

    callbacks: dict[int, object] | None = None  # None: callables are refused
    blobs: list[bytes] = field(default_factory=list)
    tensor_ids: dict[int, int] = field(default_factory=dict)  # id(tensor) -> number in this message
    generators: list[torch.Generator] = field(default_factory=list)

    def blob(self, data: bytes) -> int:
        self.blobs.append(data)
        return len(self.blobs) - 1

    def encode(self, value, depth: int = 0):
        if depth > MAX_DEPTH:
            raise WireError("the value is nested too deeply")
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float):
            return value
        if isinstance(value, complex):
            return {"$": "complex", "re": value.real, "im": value.imag}
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if isinstance(value, np.ndarray) or isinstance(value, np.generic):
            return self.numpy(value)
        if isinstance(value, torch.dtype):
            return {"$": "dtype", "name": str(value).removeprefix("torch.")}
        if isinstance(value, torch.Size):
            return {"$": "size", "items": list(value)}
        if isinstance(value, torch.device):
            return {"$": "device", "type": value.type}
        if isinstance(value, torch.Generator):
            if value.device.type != "cpu":
                raise WireError("only CPU generators can be sent")
            self.generators.append(value)
            return {"$": "generator", "blob": self.blob(bytes(value.get_state().numpy().tobytes())),
                    "number": len(self.generators) - 1}
        if isinstance(value, list):
            return [self.encode(v, depth + 1) for v in value]
        if isinstance(value, tuple):
            return {"$": "tuple", "items": [self.encode(v, depth + 1) for v in value]}
        if isinstance(value, dict):
            return {"$": "dict", "items": [[self.encode(k, depth + 1), self.encode(v, depth + 1)]
                                          for k, v in value.items()]}
        if isinstance(value, nn.Module) and plain_module(value):
            return self.module(value, depth)
        if callable(value) and self.callbacks is not None:
            number = len(self.callbacks)
            self.callbacks[number] = value
            return {"$": "callback", "number": number}
        raise WireError(f"an object of type {type(value).__name__} cannot be sent: only tensors, "
                        "numbers, strings, lists, tuples, dicts and torch.nn modules can")

    def tensor(self, t: torch.Tensor) -> dict:
        if t.layout != torch.strided or t.is_quantized:
            raise WireError("only dense tensors can be sent")
        key = id(t)
        data = t.detach().to("cpu").contiguous()
        name = str(data.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise WireError(f"tensors of dtype {data.dtype} cannot be sent")
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        number = self.tensor_ids.setdefault(key, len(self.tensor_ids))
        return {"$": "tensor", "blob": self.blob(raw), "dtype": name, "shape": list(data.shape),
                "requires_grad": bool(t.requires_grad), "grad_fn": t.grad_fn is not None,
                "number": number}

    def numpy(self, a) -> dict:
        array = np.ascontiguousarray(a)
        if array.dtype.name not in _NUMPY_DTYPES:
            raise WireError(f"NumPy values of dtype {array.dtype} cannot be sent")
        return {"$": "numpy", "scalar": isinstance(a, np.generic), "dtype": array.dtype.name,
                "shape": list(array.shape), "blob": self.blob(array.tobytes())}

    def module(self, m: nn.Module, depth: int) -> dict:
        attrs = {}
        for key, value in vars(m).items():
            if key in _MODULE_INTERNALS or "hook" in key or not _ATTR_NAME.match(key):
                continue
            if _plain(value):
                attrs[key] = self.encode(value, depth + 1)
        return {"$": "module", "class": type(m).__name__, "training": m.training, "attrs": attrs,
                "params": [[k, None if p is None else self.tensor(p)] for k, p in m._parameters.items()],
                "buffers": [[k, None if b is None else self.tensor(b)] for k, b in m._buffers.items()],
                "children": [[k, None if c is None else self.encode(c, depth + 1)]
                             for k, c in m._modules.items()]}


def plain_module(m: nn.Module) -> bool:
    """Whether ``m`` and all its submodules are torch.nn's own classes (so can travel as data)."""
    return all(getattr(nn, type(sub).__name__, None) is type(sub) for sub in m.modules())


def _plain(value, depth: int = 0) -> bool:
    if depth > 4:
        return False
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return len(value) <= 64 and all(_plain(v, depth + 1) for v in value)
    return False


# ---------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------
@dataclass
class Decoder:
    """Rebuilds a value from ``(header, blobs)``; never runs code that the sender names."""

    blobs: list[bytes]
    make_callback: object = None  # number -> a callable; None: callbacks are refused
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    generators: list[torch.Generator] = field(default_factory=list)

    def decode(self, item, depth: int = 0):
        if depth > MAX_DEPTH:
            raise WireError("the message is nested too deeply")
        if item is None or isinstance(item, (bool, int, float, str)):
            return item
        if isinstance(item, list):
            return [self.decode(v, depth + 1) for v in item]
        if not isinstance(item, dict):
            raise WireError("malformed message")
        tag = item.get("$")
        if tag == "tuple":
            return tuple(self.decode(v, depth + 1) for v in _list(item, "items"))
        if tag == "dict":
            pairs = _list(item, "items")
            if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise WireError("malformed dict")
            return {_hashable(self.decode(k, depth + 1)): self.decode(v, depth + 1) for k, v in pairs}
        if tag == "complex":
            return complex(float(item["re"]), float(item["im"]))
        if tag == "tensor":
            return self.tensor(item)
        if tag == "numpy":
            return self.numpy(item)
        if tag == "dtype":
            name = item.get("name")
            if name not in _DTYPES:
                raise WireError(f"unknown dtype {name!r}")
            return _DTYPES[name]
        if tag == "size":
            return torch.Size([int(v) for v in _list(item, "items")])
        if tag == "device":
            if item.get("type") != "cpu":
                raise WireError("only the CPU device can be named")
            return torch.device("cpu")
        if tag == "generator":
            generator = torch.Generator()
            state = torch.frombuffer(bytearray(self.raw(item)), dtype=torch.uint8)
            try:
                generator.set_state(state)
            except RuntimeError as err:
                raise WireError(f"bad generator state: {err}") from None
            self.generators.append(generator)
            return generator
        if tag == "module":
            return self.module(item, depth)
        if tag == "callback":
            if self.make_callback is None:
                raise WireError("a function cannot be returned here: return tensors or numbers")
            return self.make_callback(int(item["number"]))
        raise WireError(f"unknown tag {tag!r}")

    def raw(self, item) -> bytes:
        index = item.get("blob")
        if not isinstance(index, int) or not 0 <= index < len(self.blobs):
            raise WireError("malformed blob reference")
        return self.blobs[index]

    def tensor(self, item) -> torch.Tensor:
        dtype = _DTYPES.get(item.get("dtype"))
        shape = [int(s) for s in _list(item, "shape")]
        if dtype is None or any(s < 0 for s in shape):
            raise WireError("malformed tensor")
        raw = self.raw(item)
        count = int(np.prod(shape)) if shape else 1
        if len(raw) != count * torch.empty((), dtype=dtype).element_size():
            raise WireError("a tensor's bytes do not match its shape")
        if count == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
        if item.get("requires_grad") and (t.is_floating_point() or t.is_complex()):
            leaf = t.requires_grad_(True)
            t = leaf.clone() if item.get("grad_fn") else leaf  # keep "has a grad_fn" true
        number = item.get("number")
        if isinstance(number, int):
            self.tensors.setdefault(number, t)
        return t

    def numpy(self, item):
        name = item.get("dtype")
        if name not in _NUMPY_DTYPES:
            raise WireError(f"unknown NumPy dtype {name!r}")
        shape = [int(s) for s in _list(item, "shape")]
        array = np.frombuffer(self.raw(item), dtype=np.dtype(name))
        if array.size != (int(np.prod(shape)) if shape else 1):
            raise WireError("a NumPy array's bytes do not match its shape")
        array = array.reshape(shape).copy()
        return array[()] if item.get("scalar") else array

    def module(self, item, depth: int) -> nn.Module:
        name = item.get("class")
        cls = getattr(nn, name, None) if isinstance(name, str) and _CLASS_NAME.match(name) else None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise WireError(f"{name!r} is not a torch.nn module class")
        module = object.__new__(cls)
        nn.Module.__init__(module)
        attrs = item.get("attrs")
        if not isinstance(attrs, dict):
            raise WireError("malformed module")
        for key, value in attrs.items():
            if not _ATTR_NAME.match(key) or key in _MODULE_INTERNALS or key.startswith("__"):
                raise WireError(f"bad module attribute {key!r}")
            decoded = self.decode(value, depth + 1)
            if not _plain(decoded):
                raise WireError(f"module attribute {key!r} is not plain data")
            object.__setattr__(module, key, decoded)
        module.training = bool(item.get("training", True))
        for key, value in _pairs(item, "params"):
            module._parameters[key] = None if value is None else \
                nn.Parameter(self.tensor(value).detach(), requires_grad=bool(value.get("requires_grad")))
            if value is not None:
                self.tensors[value.get("number")] = module._parameters[key]
        for key, value in _pairs(item, "buffers"):
            module._buffers[key] = None if value is None else self.tensor(value).detach()
        for key, value in _pairs(item, "children"):
            child = None if value is None else self.decode(value, depth + 1)
            if child is not None and not isinstance(child, nn.Module):
                raise WireError("a module's child is not a module")
            module._modules[key] = child
        if hasattr(module, "_flat_weights_names"):  # RNN-type modules rebuild their weight list
            try:
                module._init_flat_weights()
            except Exception as err:
                raise WireError(f"cannot rebuild a {name}: {err}") from None
        return module


def _list(item: dict, key: str) -> list:
    value = item.get(key)
    if not isinstance(value, list):
        raise WireError(f"malformed message: {key!r} is not a list")
    return value


def _pairs(item: dict, key: str) -> list:
    pairs = _list(item, key)
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                and _MEMBER_NAME.match(pair[0])):
            raise WireError(f"malformed module {key}")
    return pairs


def _hashable(key):
    try:
        hash(key)
    except TypeError:
        raise WireError("a dict key is not hashable") from None
    return key


# ---------------------------------------------------------------------------------
# Messages over a pair of pipes
# ---------------------------------------------------------------------------------
def inherit(fds: tuple[int, ...]) -> tuple[list[str], dict]:
    """How a child process gets these pipe ends: its command-line arguments and Popen options.

    POSIX passes the file descriptors themselves; Windows passes the pipes' handles
    (made inheritable for this child only) and the child opens them with
    :func:`open_inherited`.
    """
    if os.name != "nt":
        return [str(fd) for fd in fds], {"pass_fds": tuple(fds)}
    import msvcrt
    import subprocess

    handles = [msvcrt.get_osfhandle(fd) for fd in fds]
    for handle in handles:
        os.set_handle_inheritable(handle, True)
    info = subprocess.STARTUPINFO(lpAttributeList={"handle_list": handles})
    return [f"h{handle}" for handle in handles], {"startupinfo": info, "close_fds": True}


def open_inherited(argument: str, writing: bool) -> int:
    """The file descriptor for an argument made by :func:`inherit`."""
    if argument.startswith("h"):
        import msvcrt

        return msvcrt.open_osfhandle(int(argument[1:]), os.O_WRONLY if writing else os.O_RDONLY)
    return int(argument)


def pack(header: dict, blobs: list[bytes]) -> bytes:
    head = json.dumps({"body": header, "blobs": [len(b) for b in blobs]}).encode("utf-8")
    return struct.pack(">I", len(head)) + head + b"".join(blobs)


class Channel:
    """Framed messages: writes to one file descriptor, reads from another.

    Reading happens in a background thread, so that ``receive`` can wait with a
    time limit on every operating system. A message over ``max_bytes`` closes the
    channel instead of being read.
    """

    def __init__(self, read_fd: int, write_fd: int, max_bytes: int = MAX_MESSAGE_BYTES):
        self.write_file = os.fdopen(write_fd, "wb", buffering=0)
        self.read_file = os.fdopen(read_fd, "rb", buffering=0)
        self.max_bytes = max_bytes
        self.inbox: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._read_loop, daemon=True)
        self.reader.start()

    def send(self, header: dict, blobs: list[bytes] = ()) -> None:
        data = pack(header, list(blobs))
        view = memoryview(data)
        while view:
            written = self.write_file.write(view)
            view = view[written:]

    def _read_exact(self, size: int) -> bytes:
        chunks, left = [], size
        while left:
            chunk = self.read_file.read(min(left, 1 << 20))
            if not chunk:
                raise EOFError("the other side closed the channel")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _read_loop(self) -> None:
        try:
            while True:
                (size,) = struct.unpack(">I", self._read_exact(4))
                if size > min(self.max_bytes, 64 * 2**20):
                    raise WireError(f"a message header of {size} bytes is too large")
                head = json.loads(self._read_exact(size).decode("utf-8"))
                sizes = head.get("blobs") if isinstance(head, dict) else None
                if not (isinstance(sizes, list) and all(isinstance(s, int) and s >= 0 for s in sizes)):
                    raise WireError("malformed message header")
                if sum(sizes) > self.max_bytes:
                    raise WireError(f"a message of {sum(sizes) / 2**20:.0f} MB is larger than the "
                                    f"limit of {self.max_bytes / 2**20:.0f} MB")
                blobs = [self._read_exact(s) for s in sizes]
                self.inbox.put((head.get("body"), blobs))
        except (WireError, ValueError, RecursionError) as err:
            self.inbox.put(WireError(str(err)))
        except (EOFError, OSError) as err:
            self.inbox.put(EOFError(str(err)))

    def receive(self, timeout: float | None = None) -> tuple[dict, list[bytes]]:
        """The next message; raises TimeoutError, EOFError (closed) or WireError (refused)."""
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if isinstance(item, Exception):
            self.inbox.put(item)  # every later receive sees the same end
            raise item
        body, blobs = item
        if not isinstance(body, dict):
            raise WireError("malformed message")
        return body, blobs

    def close(self) -> None:
        for f in (self.write_file, self.read_file):
            try:
                f.close()
            except OSError:
                pass
