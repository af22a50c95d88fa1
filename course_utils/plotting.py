"""Figures for the course: image grids, loss curves, latent scatters.

Every function *returns* its matplotlib ``Figure`` and never calls
``plt.show()``, so the same code works in a notebook, in a script (save it with
:func:`save_figure`) and under the headless ``Agg`` backend used by the tests.
Images may be torch tensors (on any device) or NumPy arrays, shaped::

    N x 1 x H x W    grey images (the course's MNIST layout)
    N x H x W        grey images
    N x 3 x H x W    colour images
    N x 784          flattened 28 x 28 images (what an MLP decoder returns)

with values in ``[vmin, vmax]`` (``[0, 1]`` by default).

In a notebook, either assign the result (``fig = image_grid(x)``) or end the
line with ``;``: a figure that is both open in pyplot and the value of the
cell's last line is drawn twice.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = [
    "image_grid",
    "loss_curves",
    "latent_scatter",
    "interpolation_strip",
    "reconstruction_pairs",
    "save_figure",
]


# -- converting inputs -------------------------------------------------------------
def _to_numpy(x) -> np.ndarray:
    """A tensor (any device, any dtype, with or without grad), array or list -> float array."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def _as_image_array(images) -> np.ndarray:
    """Images in any supported layout -> ``N x H x W`` (grey) or ``N x H x W x 3`` (colour)."""
    x = _to_numpy(images)
    if x.ndim == 2:  # N x D flattened: square images
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(f"cannot show flattened images of length {x.shape[1]} "
                             "(not a square number); pass N x 1 x H x W instead")
        return x.reshape(len(x), side, side)
    if x.ndim == 3:  # N x H x W (a single C x H x W image must be passed as x[None])
        return x
    if x.ndim == 4:
        if x.shape[1] == 1:
            return x[:, 0]
        if x.shape[1] == 3:
            return x.transpose(0, 2, 3, 1)
        if x.shape[-1] in (1, 3):  # N x H x W x C (channels last)
            return x[..., 0] if x.shape[-1] == 1 else x
    raise ValueError(f"expected images shaped N x 1 x H x W, N x H x W, N x 3 x H x W or "
                     f"N x H*W, got {tuple(x.shape)}")


def _mosaic(images: np.ndarray, nrow: int, pad: int, band: int, fill: float) -> np.ndarray:
    """Tile ``N`` images into rows of ``nrow``, ``pad`` pixels apart, with a caption band."""
    n, h, w = images.shape[:3]
    ncol = max(1, min(nrow, n))
    rows = max(1, -(-n // ncol))
    cell_h, cell_w = h + pad + band, w + pad
    shape = (rows * cell_h + pad, ncol * cell_w + pad) + images.shape[3:]
    canvas = np.full(shape, fill, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = pad + band + r * cell_h, pad + c * cell_w
        canvas[top:top + h, left:left + w] = images[i]
    return canvas


def _caption(value) -> str:
    """A label as text: ``3`` for integers (also 0-d tensors), ``0.123`` for floats."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        value = value.item()
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.3g}"
    return str(value)


def _new_axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    return plt.subplots(figsize=figsize)


# -- images --------------------------------------------------------------------------
def image_grid(images, nrow: int = 8, title: str | None = None, labels=None, vmin: float = 0,
               vmax: float = 1, figsize=None, ax=None, cmap: str = "gray"):
    """Show a batch of images as one mosaic; returns the Figure.

    images: N x 1 x H x W, N x H x W, N x 3 x H x W or N x H*W; tensor or array.
    nrow:   images per row (the grid has ``ceil(N / nrow)`` rows).
    labels: optional caption per image (ints, strings or a tensor), drawn above it.
    vmin, vmax: the value range shown black-to-white (values outside are clipped).
    ax:     draw into this Axes instead of a new figure.

    The mosaic is a single ``imshow`` on a single Axes (fast even for 100s of
    images), with white gaps between the tiles.
    """
    x = _as_image_array(images)
    n, h, w = x.shape[:3]
    if n == 0:
        raise ValueError("image_grid: no images to show")
    if labels is not None:
        labels = [_caption(v) for v in labels]
        if len(labels) != n:
            raise ValueError(f"image_grid: {len(labels)} labels for {n} images")
    colour = x.ndim == 4
    if colour:  # RGB: imshow has no vmin/vmax, so normalise and clip by hand
        x = np.clip((x - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    pad = max(1, h // 14)
    band = max(6, h // 3) if labels is not None else 0
    ncol = max(1, min(nrow, n))
    rows = -(-n // ncol)
    canvas = _mosaic(x, ncol, pad, band, 1.0 if colour else vmax)
    if figsize is None:
        scale = 0.7 * max(h, w) / 28
        figsize = (max(2.0, ncol * scale + 0.3),
                   max(1.2, rows * scale * (1 + band / h) + (0.4 if title else 0.1)))
    own = ax is None
    fig, ax = _new_axes(ax, figsize)
    if colour:
        ax.imshow(canvas, interpolation="nearest")
    else:
        ax.imshow(canvas, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if labels is not None:
        fontsize = max(5, min(9, int(70 / ncol) + 3))
        for i, text in enumerate(labels):
            r, c = divmod(i, ncol)
            ax.text(pad + c * (w + pad) + w / 2, pad + r * (h + pad + band) + band / 2, text,
                    ha="center", va="center", fontsize=fontsize)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    if own and fig.get_layout_engine() is None:
        fig.tight_layout(pad=0.2)
    return fig


def interpolation_strip(images, alphas=None, title: str | None = "interpolation", figsize=None,
                        ax=None):
    """One row of images with an ``α = ...`` caption each; returns the Figure.

    ``alphas`` defaults to ``linspace(0, 1, N)``, the mixing weights of
    ``g((1 - α) f(x) + α f(x'))``.
    """
    n = len(_as_image_array(images))
    alphas = np.linspace(0, 1, n) if alphas is None else _to_numpy(alphas).reshape(-1)
    if len(alphas) != n:
        raise ValueError(f"interpolation_strip: {len(alphas)} alphas for {n} images")
    captions = [f"α={a:.2f}" for a in alphas]
    return image_grid(images, nrow=n, title=title, labels=captions, figsize=figsize, ax=ax)


def reconstruction_pairs(originals, reconstructions, n: int = 8, title: str | None = None,
                         figsize=None, ax=None):
    """Two rows: the first ``n`` originals above their reconstructions; returns the Figure."""
    top, bottom = _as_image_array(originals)[:n], _as_image_array(reconstructions)[:n]
    if len(top) != len(bottom) or top.shape[1:] != bottom.shape[1:]:
        raise ValueError(f"reconstruction_pairs: {top.shape} originals vs {bottom.shape} "
                         "reconstructions")
    k = len(top)
    own = ax is None
    fig = image_grid(np.concatenate([top, bottom]), nrow=k, title=title, figsize=figsize, ax=ax)
    ax = fig.axes[0] if own else ax
    h = top.shape[1]
    pad = max(1, h // 14)
    ax.set_axis_on()
    ax.set_xticks([])
    ax.set_yticks([pad + h / 2, 2 * pad + h + h / 2], ["original", "reconstruction"])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if own and fig.get_layout_engine() is None:
        fig.tight_layout(pad=0.2)
    return fig


# -- training curves -------------------------------------------------------------------
def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Running mean over the last ``window`` values (shorter at the start)."""
    if window <= 1 or len(values) < 2:
        return values
    csum = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def _plot_series(ax, x, y, label, smooth, color):
    y = np.asarray(y, dtype=np.float64)
    if smooth and smooth > 1 and len(y) > 2 * smooth:
        ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(x, _smooth(y, smooth), color=color, linewidth=1.6,
                label=f"{label} (mean of {smooth})")
    else:
        ax.plot(x, y, color=color, linewidth=1.4, marker="o" if len(y) <= 30 else None,
                markersize=3, label=label)


def _set_yscale(ax, values, logy):
    if not logy:
        return
    finite = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values])
    ax.set_yscale("log" if finite.size and np.all(finite > 0) else "symlog")


def loss_curves(history_or_dict, title: str = "training loss", smooth: int = 20,
                logy: bool = False, figsize=None, ax=None):
    """Loss curves; returns the Figure.

    ``history_or_dict`` may be:

    * a training ``History`` (or the ``TrainResult`` that ``fit`` returns): the raw
      loss (faint) and its running mean over ``smooth`` steps, against the step,
      with dotted vertical lines at epoch ends. Every other logged series
      (``history.logs``) gets an axes of its own to the right (all together in one
      extra axes when there are more than three);
    * a dict ``name -> list/array/tensor`` (e.g. ``{"train": [...], "test": [...]}``):
      all series on one axes against their index;
    * a single list/array/tensor of values.

    ``logy`` uses a log scale (symlog when a value is <= 0).
    """
    history = getattr(history_or_dict, "history", history_or_dict)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if hasattr(history, "losses") and hasattr(history, "steps"):
        logs = dict(getattr(history, "logs", {}) or {})
        panels = [] if ax is not None else ([[k] for k in logs] if len(logs) <= 3
                                            else [list(logs)])
        if ax is None:
            ncols = 1 + len(panels)
            fig, axes = plt.subplots(1, ncols, figsize=figsize or (4.2 * ncols + 0.6, 3.2),
                                     squeeze=False)
            axes = list(axes[0])
        else:
            fig, axes = ax.figure, [ax]
        steps = np.asarray(history.steps if len(history.steps) == len(history.losses)
                           else np.arange(1, len(history.losses) + 1))
        main = axes[0]
        _plot_series(main, steps, history.losses, "loss", smooth, colors[0])
        if ax is not None:  # everything on the one given axes
            for i, (name, values) in enumerate(logs.items()):
                _plot_series(main, steps[:len(values)], values, name, smooth,
                             colors[(i + 1) % len(colors)])
        ends = list(getattr(history, "epoch_ends", []) or [])
        if 0 < len(ends) <= 60:
            for i, end in enumerate(ends):
                for a in axes:
                    a.axvline(end, color="0.5", linestyle=":", linewidth=0.8,
                              label="epoch end" if (i == 0 and a is main) else None)
        _set_yscale(main, [history.losses], logy)
        main.set_xlabel("step")
        main.set_ylabel("loss")
        main.set_title(title)
        for panel, a in zip(panels, axes[1:], strict=True):
            for j, name in enumerate(panel):
                values = logs[name]
                _plot_series(a, steps[:len(values)], values, name, smooth,
                             colors[(j + 1) % len(colors)])
            _set_yscale(a, [logs[name] for name in panel], logy)
            a.set_xlabel("step")
            a.set_title(panel[0] if len(panel) == 1 else "logged values")
        for a in axes:
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=8)
            a.grid(alpha=0.3)
    else:
        if isinstance(history, dict):
            series = {str(k): _to_numpy(v).reshape(-1) for k, v in history.items()}
        else:
            series = {"loss": _to_numpy(history).reshape(-1)}
        fig, main = _new_axes(ax, figsize or (5.0, 3.4))
        for i, (name, values) in enumerate(series.items()):
            _plot_series(main, np.arange(1, len(values) + 1), values, name, smooth,
                         colors[i % len(colors)])
        _set_yscale(main, list(series.values()), logy)
        main.set_xlabel("step")
        main.set_ylabel("value")
        main.set_title(title)
        main.grid(alpha=0.3)
        if len(series) > 1 or smooth:
            main.legend(fontsize=8)
    if ax is None:
        fig.tight_layout()
    return fig


# -- latent spaces -----------------------------------------------------------------------
def pca_2d(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project ``N x D`` points on their first two principal components.

    Returns ``(projected N x 2, explained variance ratio of the 2 components)``.
    Computed with an SVD of the centred data: ``Z - mean = U S V^T``, the
    projection is ``(Z - mean) V[:, :2]`` and component ``i`` explains
    ``S_i^2 / sum_j S_j^2`` of the variance.
    """
    z = z.to(torch.float64)
    centred = z - z.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    # fix the sign of each component so the plot does not flip between runs
    signs = torch.sign(vh[:2].sum(1))
    signs[signs == 0] = 1
    components = vh[:2] * signs[:, None]
    ratio = s[:2] ** 2 / (s ** 2).sum().clamp_min(1e-300)
    return centred @ components.T, ratio


def latent_scatter(z, labels=None, title: str = "latent space", max_points: int = 5000,
                   figsize=None, ax=None, point_size: float = 6, seed: int = 0):
    """Scatter plot of latent codes, coloured by digit label; returns the Figure.

    z:      N x D codes (tensor or array). With D > 2 the points are projected on
            their first two principal components (PCA, via an SVD) and the axis
            labels say so, with the share of variance each component explains.
    labels: N integer labels (0-9) for the colours and the colour bar; optional.
    max_points: at most this many points are drawn (a fixed random subset).
    """
    codes = torch.as_tensor(_to_numpy(z))
    if codes.ndim == 1:
        codes = codes[:, None]
    if codes.ndim != 2:
        raise ValueError(f"latent_scatter: expected N x D codes, got {tuple(codes.shape)}")
    lab = None if labels is None else _to_numpy(labels).reshape(-1).astype(int)
    if lab is not None and len(lab) != len(codes):
        raise ValueError(f"latent_scatter: {len(lab)} labels for {len(codes)} points")
    if len(codes) > max_points:
        keep = torch.randperm(len(codes), generator=torch.Generator().manual_seed(seed))[:max_points]
        codes = codes[keep]
        lab = None if lab is None else lab[keep.numpy()]
    d = codes.shape[1]
    if d > 2:
        xy, ratio = pca_2d(codes)
        xy = xy.numpy()
        xlabel = f"PC 1 of the {d}-d codes ({100 * ratio[0]:.0f} % of variance)"
        ylabel = f"PC 2 ({100 * ratio[1]:.0f} % of variance)"
        title = f"{title} (PCA projection)"
    elif d == 2:
        xy = codes.numpy()
        xlabel, ylabel = "$z_1$", "$z_2$"
    else:  # 1-d codes: spread the points vertically so they can be seen
        jitter = torch.rand(len(codes), generator=torch.Generator().manual_seed(seed)).numpy()
        xy = np.stack([codes[:, 0].numpy(), jitter], 1)
        xlabel, ylabel = "$z$ (1-d latent)", "random jitter"
    fig, ax = _new_axes(ax, figsize or ((6.0, 4.8) if lab is not None else (5.0, 4.6)))
    if lab is not None:
        classes = int(max(10, lab.max() + 1))
        cmap = plt.get_cmap("tab10" if classes <= 10 else "tab20", classes)
        points = ax.scatter(xy[:, 0], xy[:, 1], c=lab, cmap=cmap, vmin=-0.5, vmax=classes - 0.5,
                            s=point_size, alpha=0.8, linewidths=0)
        bar = ax.figure.colorbar(points, ax=ax, ticks=range(classes))
        bar.set_label("label")
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=point_size, alpha=0.6, linewidths=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


# -- saving ---------------------------------------------------------------------------------
def save_figure(fig, path, dpi: int = 150, close: bool = False) -> Path:
    """Save ``fig`` to ``path`` (folders created; format from the suffix). Returns the path.

    ``close=True`` also closes it (useful in scripts that make many figures).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    if close:
        plt.close(fig)
    return path
