"""Checks for exercise cells: what visible check cells and hidden tests call.

Each check raises ``AssertionError`` with a message that says *what* is wrong
(shape, dtype, off by a factor, wrong dimension...), plus a hint when one is given::

    with checking("pixel_statistics"):          # prints "✓ pixel_statistics looks right"
        mean, std = pixel_statistics(images)    # NotImplementedError -> "not implemented yet"
        expect_shape(mean, (len(images),), "mean")
        expect_close(std, reference, "std",
                     hints={"divide by N, not N - 1": sample_std})

``hints`` maps a hint to a typical *wrong* answer: when the student's value
matches it, the hint is printed.

The same cells run in two places. In a student's notebook the function under
test is the student's own, in the same process. When ``course grade`` scores a
task, these cells run in a trusted process where no student code has ever run,
and the function under test is a stand-in that calls the student's function in
a sandbox and brings back plain data (see :mod:`course_utils.remote`).
:func:`with_gradients` is how a test asks for gradients in both places.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from .exercises import NOT_IMPLEMENTED, STUB_COMMENT

__all__ = [
    "CheckFailed", "checking", "expect_close", "expect_dtype", "expect_equal", "expect_shape", "expect_true",
    "expect_type", "with_gradients",
]


class CheckFailed(AssertionError):
    """A check that did not pass. Jupyter shows its message alone, not a traceback through the
    course's code: the message already says what is wrong and what to do."""

    def _render_traceback_(self) -> list[str]:  # IPython's hook for displaying an exception
        return [f"\x1b[31m✗ {self}\x1b[0m"]


def _fail(problem: str, hints: Iterable[str | None] = ()) -> None:
    hints = [h for h in hints if h]
    raise CheckFailed(problem + (f" Hint: {' / '.join(hints)}" if hints else ""))


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if value is None:
        return "None (did you forget to `return` it?)"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None:
        _fail(f"{name} is None: did you forget to `return` it?")
    try:
        return torch.as_tensor(value)
    except Exception:
        _fail(f"{name} should be a tensor or a number, but it is {_kind(value)}")
    raise AssertionError  # unreachable, for type checkers


def _shape_text(shape) -> str:
    return str(tuple(shape))


def _shape_diagnosis(got: tuple, want: tuple) -> str:
    if len(got) == len(want) + 1 and 1 in got:
        return " (an extra dimension of size 1: squeeze it, or drop keepdim=True)"
    if len(got) + 1 == len(want):
        return " (one dimension missing: did you reduce over one dimension too many?)"
    if len(got) == 0 and len(want) > 0:
        return " (a single number: did you reduce over all dimensions instead of one?)"
    numel = lambda s: int(torch.tensor(s, dtype=torch.long).prod()) if len(s) else 1
    if len(got) == len(want) and sorted(got) == sorted(want):
        return " (the right sizes in the wrong order: transposed or permuted?)"
    if numel(got) == numel(want):
        return " (the right number of elements in the wrong shape: check your reshape/view)"
    if len(got) == len(want):
        return " (did you reduce, index or concatenate over the wrong dimension?)"
    return ""


def _value_diagnosis(a: torch.Tensor, e: torch.Tensor, rtol: float, atol: float) -> str:
    """How ``a`` differs from ``e`` (same shape): where, by how much, and any pattern."""
    if not torch.isfinite(a).all() and torch.isfinite(e).all():
        bad = int((~torch.isfinite(a)).sum())
        return f"it contains {bad} NaN or infinite value(s)"
    diff = (a - e).abs().nan_to_num(nan=float("inf"))
    flat = int(diff.argmax())
    got, want = a.reshape(-1)[flat].item(), e.reshape(-1)[flat].item()
    notes = []
    mask = e.abs() > max(atol, 1e-12)
    if mask.any():
        ratio = a[mask] / e[mask]
        mean_ratio = float(ratio.mean())
        spread = float(ratio.max() - ratio.min())
        if spread <= 1e-3 * max(abs(mean_ratio), 1e-12) and (a[~mask].abs() <= atol).all():
            if abs(mean_ratio + 1) < 1e-3:
                notes.append("the sign is flipped" if a.dim() == 0 else
                             "every value has the wrong sign")
            elif abs(mean_ratio - 1) > 1e-6:
                notes.append(f"{mean_ratio:.4g} times the expected value" if a.dim() == 0 else
                             f"every value is {mean_ratio:.4g} times the expected one "
                             "(off by a constant factor)")
    offset = a - e
    if not notes and a.numel() > 1 and float(offset.max() - offset.min()) <= max(atol, 1e-6):
        notes.append(f"every value is off by the same amount ({float(offset.mean()):+.4g})")
    if not notes and a.dim() == 2 and a.shape[0] == a.shape[1] and torch.allclose(a.T, e, atol=atol):
        notes.append("it looks transposed")
    if not notes and a.numel() > 1 and torch.allclose(a.reshape(-1).sort().values,
                                                      e.reshape(-1).sort().values, atol=atol):
        notes.append("the right values in the wrong order")
    if a.dim() == 0:
        text = f"got {got:.6g}, expected {want:.6g}"
    else:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        wrong = int((diff > atol + rtol * e.abs()).sum())
        text = (f"{wrong} of {a.numel()} values differ; the largest difference is at index "
                f"{index}: got {got:.6g}, expected {want:.6g}")
    return text + "".join(f"; {note}" for note in notes)


def _matches(a: torch.Tensor, alternative, rtol: float, atol: float) -> bool:
    try:
        alt = _tensor(alternative, "alternative")
    except AssertionError:
        return False
    return a.shape == alt.shape and torch.allclose(a.double(), alt.double(), rtol=rtol, atol=atol)


def expect_close(actual, expected, name: str = "result", *, rtol: float = 1e-4,
                 atol: float = 1e-5, hint: str | None = None,
                 hints: dict[str, object] | None = None) -> None:
    """``actual`` equals ``expected`` up to tolerance; otherwise say how it differs.

    hint:  printed whenever the check fails.
    hints: ``{hint: typical_wrong_value}``; a hint is printed when ``actual``
           matches its wrong value (e.g. the sample std where the population std
           was asked for).
    """
    a, e = _tensor(actual, name), _tensor(expected, "expected")
    matched = [msg for msg, wrong in (hints or {}).items() if _matches(a, wrong, rtol, atol)]
    chosen = matched or [hint]
    if a.shape != e.shape:
        _fail(f"{name} has shape {_shape_text(a.shape)}, expected {_shape_text(e.shape)}"
              f"{_shape_diagnosis(tuple(a.shape), tuple(e.shape))}.", chosen)
    if a.is_complex() or e.is_complex():
        close = torch.allclose(a.to(torch.complex128), e.to(torch.complex128), rtol=rtol, atol=atol)
    else:
        a, e = a.double(), e.double()
        close = torch.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if not close:
        what = "is wrong" if a.dim() == 0 else \
            f"has the right shape {_shape_text(a.shape)} but wrong values"
        _fail(f"{name} {what}: {_value_diagnosis(a, e, rtol, atol)}.", chosen)


def expect_shape(t, shape, name: str = "result", hint: str | None = None) -> None:
    """``t`` is a tensor of shape ``shape`` (``None`` or ``-1`` entries match any size)."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} should be a tensor of shape {_shape_text(shape)}, but it is {_kind(t)}.",
              [hint])
    want, got = tuple(shape), tuple(t.shape)
    wild = (None, -1)
    if len(got) == len(want) and all(w in wild or g == w for g, w in zip(got, want, strict=True)):
        return
    concrete = tuple(g if w in wild else w for g, w in zip(got, want, strict=True)) \
        if len(got) == len(want) else tuple(0 if w in wild else w for w in want)
    shown = _shape_text(tuple("*" if w in wild else w for w in want)).replace("'", "")
    _fail(f"{name} has shape {_shape_text(got)}, expected {shown}"
          f"{_shape_diagnosis(got, concrete)}.", [hint])


_DTYPE_GROUPS = {
    "float": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "integer": (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64),
}


def expect_dtype(t, dtype, name: str = "result", hint: str | None = None) -> None:
    """``t`` has ``dtype``: a ``torch.dtype``, a tuple of them, ``"float"`` or ``"integer"``."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} should be a tensor, but it is {_kind(t)}.", [hint])
    allowed = _DTYPE_GROUPS.get(dtype, dtype) if isinstance(dtype, str) else dtype
    allowed = allowed if isinstance(allowed, tuple) else (allowed,)
    if t.dtype not in allowed:
        want = dtype if isinstance(dtype, str) else " or ".join(str(d) for d in allowed)
        extra = " (a comparison gives bool: convert it, e.g. with .float())" \
            if t.dtype == torch.bool else ""
        _fail(f"{name} has dtype {t.dtype}, expected {want}{extra}.", [hint])


def expect_equal(actual, expected, name: str = "result", hint: str | None = None) -> None:
    """Exact equality (tensors: same shape and values, any dtype; other values: ``==``)."""
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        a, e = _tensor(actual, name), _tensor(expected, "expected")
        if a.shape != e.shape:
            _fail(f"{name} has shape {_shape_text(a.shape)}, expected {_shape_text(e.shape)}"
                  f"{_shape_diagnosis(tuple(a.shape), tuple(e.shape))}.", [hint])
        if not torch.equal(a.to(torch.float64), e.to(torch.float64)):
            _fail(f"{name} has wrong values: {_value_diagnosis(a.double(), e.double(), 0.0, 0.0)}.",
                  [hint])
        return
    if actual != expected:
        _fail(f"{name} is {actual!r}, expected {expected!r}.", [hint])


def expect_type(value, types, name: str = "result", hint: str | None = None) -> None:
    """``isinstance(value, types)``, e.g. a Python ``float`` rather than a tensor."""
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        _fail(f"{name} should be a {names}, but it is {_kind(value)}.", [hint])


def expect_true(condition, message: str, hint: str | None = None) -> None:
    """A condition with its own message."""
    if not bool(condition):
        _fail(message, [hint])


@contextlib.contextmanager
def checking(task: str):
    """Wrap a check cell: friendly messages for a stub or a crash, a ✓ when all passes."""
    try:
        yield
    except NotImplementedError:
        raise CheckFailed(
            f"{task}: {NOT_IMPLEMENTED}. Write your code where it says `{STUB_COMMENT}`, "
            "delete the `raise NotImplementedError(...)` line, run that cell, then this one."
        ) from None
    except AssertionError:
        raise
    except Exception as err:
        raise AssertionError(f"{task}: your code raised {type(err).__name__}: {err}") from err
    print(f"✓ {task} looks right")



def with_gradients(function, *args, wrt, grad_output=None, **kwargs):
    """Call ``function(*args, **kwargs)`` and differentiate its tensor result.

    Returns ``(output, grads)``: ``grads[i]`` is the gradient of
    ``(output * grad_output).sum()`` with respect to ``wrt[i]`` (``grad_output``
    defaults to ones), or ``None`` where the output does not depend on it through
    autograd. ``wrt`` holds tensors (with ``requires_grad=True``) or parameters
    passed to the function, directly or inside an ``nn.Module`` argument.

    Tests use this instead of calling ``.backward()`` on a result: during grading
    the student's function runs in another process, and the gradients are
    computed there, next to the graph, and come back as plain tensors.
    """
    remote = getattr(function, "call_with_gradients", None)
    if remote is not None:
        return remote(args, kwargs, tuple(wrt), grad_output)
    output = function(*args, **kwargs)
    return output, gradients_of(output, tuple(wrt), grad_output)


def gradients_of(output, wrt: tuple, grad_output=None) -> tuple:
    """The gradients of ``(output * grad_output).sum()`` w.r.t. ``wrt`` (``None`` if unused)."""
    if not isinstance(output, torch.Tensor) or not output.requires_grad:
        return tuple(None for _ in wrt)
    weights = torch.ones_like(output) if grad_output is None else \
        torch.as_tensor(grad_output, dtype=output.dtype).expand_as(output)
    tracked = [i for i, t in enumerate(wrt) if isinstance(t, torch.Tensor) and t.requires_grad]
    found = torch.autograd.grad(output, [wrt[i] for i in tracked], grad_outputs=weights,
                                allow_unused=True) if tracked else ()
    grads = [None] * len(wrt)
    for i, grad in zip(tracked, found, strict=True):
        grads[i] = grad
    return tuple(grads)
