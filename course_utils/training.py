"""One small training loop for every topic.

``fit`` runs ``loss_fn(model, batch)`` over a loader and steps the optimizer,
until the first of three limits: ``epochs``, ``steps`` or ``max_seconds``.

* A progress bar (``tqdm.auto``: a widget in Jupyter, text in a terminal, off
  under ``CI=true``) and, in notebooks, a live loss plot.
* Gradient clipping and an exponential moving average (EMA) of the weights::

      theta_ema <- decay * theta_ema + (1 - decay) * theta

* Checkpoint save and resume of the whole training state.
* On CUDA: bf16 autocast, ``channels_last`` and optional ``torch.compile``.
  On a CPU: plain fp32 (bf16 is emulated there and about 10x slower).

``loss_fn`` returns either a scalar loss or ``(loss, {"name": value, ...})``;
the extra values are logged alongside the loss.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .runtime import Accelerator, get_device, in_ci, in_notebook


@dataclass
class History:
    """What happened during training: one entry per optimizer step."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    logs: dict[str, list[float]] = field(default_factory=dict)
    epoch_ends: list[int] = field(default_factory=list)
    seconds: float = 0.0
    stopped_by: str = ""

    def record(self, step: int, loss: float, extra: dict[str, float]) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        for key, value in extra.items():
            self.logs.setdefault(key, []).append(float(value))

    def smoothed(self, window: int = 20) -> list[float]:
        """Running mean of the loss, for plots that are not drowned in noise."""
        out, total = [], 0.0
        for i, value in enumerate(self.losses):
            total += value
            if i >= window:
                total -= self.losses[i - window]
            out.append(total / min(i + 1, window))
        return out

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(copy.deepcopy(state))

    def plot(self, title: str = "training loss"):
        from .plotting import loss_curves

        return loss_curves(self, title=title)


class EMA:
    """Exponential moving average of a model's weights (a frozen copy).

    After each step: ``theta_ema = decay * theta_ema + (1 - decay) * theta``.
    Early steps use ``min(decay, (1 + n) / (10 + n))`` so the average does not
    stay stuck near the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.model.load_state_dict(state["model"])


@dataclass
class TrainResult:
    model: nn.Module
    history: History
    ema: EMA | None
    step: int
    epoch: int

    @property
    def final_loss(self) -> float:
        tail = self.history.losses[-20:]
        return sum(tail) / max(len(tail), 1)


class LivePlot:
    """A loss plot redrawn in place in a notebook, at most every ``every`` seconds."""

    def __init__(self, title: str, every: float = 2.0):
        self.title, self.every, self.last, self.handle = title, every, 0.0, None

    def update(self, history: History, force: bool = False) -> None:
        now = time.monotonic()
        if not history.losses or (not force and now - self.last < self.every):
            return
        self.last = now
        import matplotlib.pyplot as plt
        from IPython.display import display

        fig = history.plot(self.title)
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        plt.close(fig)


def stop_reason(step: int, max_steps: int, start: float, max_seconds: float | None) -> str:
    """Why a training loop stops after ``step`` steps: ``"steps"``, ``"max_seconds"`` (measured
    from ``start``, a ``time.monotonic()``), or ``""`` to go on."""
    if step >= max_steps:
        return "steps"
    if max_seconds is not None and time.monotonic() - start >= max_seconds:
        return "max_seconds"
    return ""


def _to_device(batch, device, channels_last: bool):
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def save_state(path, model, optimizer=None, scheduler=None, ema=None, history=None,
               step=0, epoch=0) -> Path:
    """Save everything needed to resume training (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer else None,
        "scheduler": scheduler.state_dict() if scheduler else None,
        "ema": ema.state_dict() if ema else None,
        "history": history.state_dict() if history else None,
        "step": step,
        "epoch": epoch,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


def fit(model: nn.Module, loss_fn, loader, *, optimizer=None, lr: float = 1e-3,
        epochs: int | None = None, steps: int | None = None, max_seconds: float | None = None,
        scheduler=None, clip_grad_norm: float | None = None, ema_decay: float | None = None,
        device=None, compile: bool = False, live_plot: bool | None = None,
        progress: bool | None = None, checkpoint: str | Path | None = None,
        checkpoint_every: int = 0, resume: bool = False, desc: str = "train",
        on_step=None) -> TrainResult:
    """Train ``model`` by minimising ``loss_fn(model, batch)`` over ``loader``.

    Stops at the first of ``epochs``, ``steps`` (optimizer steps, counted across
    resumes) or ``max_seconds``; at least one limit is required. ``scheduler``
    is stepped after every optimizer step. With ``checkpoint`` the full state
    is written at the end (and every ``checkpoint_every`` steps); ``resume``
    continues from it when it exists. Returns a :class:`TrainResult`.
    """
    if epochs is None and steps is None and max_seconds is None:
        raise ValueError("give at least one limit: epochs, steps or max_seconds")
    device = torch.device(device) if device is not None else get_device()
    accel = Accelerator.for_device(device)
    model.to(device)
    if accel.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    ema = EMA(model, ema_decay) if ema_decay else None
    history = History()
    step = epoch = 0

    if checkpoint is not None and resume and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        if state["optimizer"]:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"]:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state["ema"]:
            ema.load_state_dict(state["ema"])
        if state["history"]:
            history.load_state_dict(state["history"])
        step, epoch = state["step"], state["epoch"]

    step_fn = torch.compile(model) if (compile and accel.can_compile) else model
    show_progress = (not in_ci()) if progress is None else progress
    plotter = LivePlot(desc) if (live_plot if live_plot is not None
                                 else (in_notebook() and not in_ci())) else None
    try:
        total = (steps - step) if steps is not None else (
            len(loader) * (epochs - epoch) if epochs is not None and hasattr(loader, "__len__")
            else None)
    except TypeError:
        total = None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not show_progress, leave=False)
    start = time.monotonic() - history.seconds
    model.train()
    stopped_by = ""
    while not stopped_by:
        if epochs is not None and epoch >= epochs:
            stopped_by = "epochs"
            break
        for batch in loader:
            batch = _to_device(batch, device, accel.channels_last)
            with torch.autocast(device.type, dtype=accel.autocast_dtype,
                                 enabled=accel.autocast_dtype is not None):
                out = loss_fn(step_fn, batch)
            loss, extra = (out if isinstance(out, tuple) else (out, {}))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; "
                                         "try a smaller learning rate or gradient clipping")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update(model)
            step += 1
            value = float(loss.detach())
            history.record(step, value, {k: float(torch.as_tensor(v).detach())
                                         for k, v in extra.items()})
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{value:.4g}")
            if on_step is not None:
                on_step(step, value)
            if plotter is not None:
                plotter.update(history)
            if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                history.seconds = time.monotonic() - start
                save_state(checkpoint, model, optimizer, scheduler, ema, history, step, epoch)
            if steps is not None and step >= steps:
                stopped_by = "steps"
                break
            if max_seconds is not None and time.monotonic() - start >= max_seconds:
                stopped_by = "max_seconds"
                break
        else:
            if step == 0 and not history.losses:
                raise ValueError("the loader yielded no batches: is the dataset empty?")
            epoch += 1
            history.epoch_ends.append(step)
            continue
        if stopped_by:
            break
    bar.close()
    history.seconds = time.monotonic() - start
    history.stopped_by = stopped_by
    if plotter is not None:
        plotter.update(history, force=True)
    if checkpoint is not None:
        save_state(checkpoint, model, optimizer, scheduler, ema, history, step, epoch)
    model.eval()
    if not math.isfinite(history.losses[-1] if history.losses else 0.0):
        raise FloatingPointError("training diverged")
    return TrainResult(model, history, ema, step, epoch)


# A shorter alias: the loop is "the course's train function".
train = fit
