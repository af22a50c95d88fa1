r"""Convolution and transposed convolution, by the numbers (topic 2).

A decoder has to *grow* an image from a small code. Ordinary convolutions keep
or shrink the size of their input; transposed convolutions grow it. This module
holds the arithmetic behind both, small tools to look inside them, and the deep
convolutional autoencoder of the seed lecture.

Public names
------------
=====================================  =============================================================
name                                   what it is
=====================================  =============================================================
``conv_output_size``                   :math:`o = \lfloor (n + 2p - d(k-1) - 1)/s \rfloor + 1`
``conv_transpose_output_size``         :math:`o = (n-1)s - 2p + d(k-1) + \text{output\_padding} + 1`
``output_padding_to_invert``           the ``output_padding`` that makes a transposed conv undo a conv's size
``conv1d_matrix``                      the matrix :math:`C` with ``F.conv1d(x, k) == C @ x``
``conv2d_matrix``                      the same for ``F.conv2d`` on a small image (flattened row by row)
``transposed_conv_overlap``            how many (input, kernel) pairs land on each output position
``overlap_figure``                     a figure of those counts, 1-D and 2-D (the checkerboard)
``describe_transposed_conv``           the size formulas with the numbers filled in, as text
``transposed_conv_explorer``           an ipywidgets explorer built on the three functions above
``UpsampleConv`` / ``upsample_conv``   nearest-neighbour upsampling then a size-preserving conv
``SeedConvAutoencoder``                the seed's 1x28x28 -> 8x1x1 -> 1x28x28 autoencoder
                                       (``layer_shapes``, ``shape_table``, ``init_output_bias``)
=====================================  =============================================================

Conventions
-----------
Like PyTorch, "convolution" means *cross-correlation*: the kernel is not flipped,

.. math::  y[i] = \sum_{j=0}^{k-1} w[j]\, x[i s + j d - p]   \qquad (x = 0 \text{ outside } 0..n-1)

with kernel size :math:`k`, stride :math:`s`, padding :math:`p` and dilation :math:`d`.
A convolution is linear in :math:`x`, so :math:`y = C x` for a matrix :math:`C`. The
*transposed* convolution with the same kernel is :math:`x' = C^\top y'`: every input
value stamps a scaled copy of the kernel into the output ("scatter-add"). It is also
exactly the gradient of the convolution with respect to its input, which is how
autograd computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "conv_output_size",
    "conv_transpose_output_size",
    "output_padding_to_invert",
    "conv1d_matrix",
    "conv2d_matrix",
    "transposed_conv_overlap",
    "overlap_figure",
    "describe_transposed_conv",
    "transposed_conv_explorer",
    "UpsampleConv",
    "upsample_conv",
    "SEED_ENCODER_LAYERS",
    "SEED_DECODER_LAYERS",
    "SeedConvAutoencoder",
    "init_output_bias",
    "LayerShape",
]


# -- output sizes ------------------------------------------------------------------------
def _per_axis(fn, *args):
    """Apply a one-axis size function to ints, or axis by axis to tuples (broadcasting ints)."""
    lengths = {len(a) for a in args if isinstance(a, (tuple, list))}
    if not lengths:
        return fn(*args)
    if len(lengths) > 1:
        raise ValueError(f"per-axis arguments of different lengths: {args}")
    (dims,) = lengths
    columns = [a if isinstance(a, (tuple, list)) else (a,) * dims for a in args]
    return tuple(fn(*axis) for axis in zip(*columns, strict=True))


def _check_ints(**values) -> None:
    minimum = {"n": 1, "kernel_size": 1, "stride": 1, "dilation": 1}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {value!r}")
        if value < minimum.get(name, 0):
            raise ValueError(f"{name} must be >= {minimum.get(name, 0)}, not {value}")


def _conv_size(n, kernel_size, stride, padding, dilation):
    _check_ints(n=n, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    span = dilation * (kernel_size - 1) + 1          # what a dilated kernel covers
    out = (n + 2 * padding - span) // stride + 1    # start positions 0, s, 2s, ... that fit
    if out < 1:
        raise ValueError(f"the kernel (span {span}) does not fit in the padded input "
                         f"(n + 2p = {n + 2 * padding}): PyTorch raises an error here too")
    return out


def conv_output_size(n, kernel_size, stride=1, padding=0, dilation=1):
    r"""Output length of a convolution along one axis (ints), or per axis (tuples).

    .. math::  o = \left\lfloor \frac{n + 2p - d(k-1) - 1}{s} \right\rfloor + 1

    The padded input has :math:`n + 2p` positions; a dilated kernel spans
    :math:`d(k-1) + 1` of them. The kernel may start at 0, s, 2s, ... as long as it
    fits, which gives the floor plus one (the start at 0). Same as ``nn.Conv1d/2d``.

    >>> conv_output_size(28, 5), conv_output_size(20, 4, stride=2)
    (24, 9)
    """
    return _per_axis(_conv_size, n, kernel_size, stride, padding, dilation)


def _conv_transpose_size(n, kernel_size, stride, padding, output_padding, dilation):
    _check_ints(n=n, kernel_size=kernel_size, stride=stride, padding=padding,
                output_padding=output_padding, dilation=dilation)
    if output_padding >= max(stride, dilation):
        raise ValueError(f"output_padding ({output_padding}) must be smaller than the stride "
                         f"({stride}) or the dilation ({dilation}); PyTorch rejects it too")
    out = (n - 1) * stride - 2 * padding + dilation * (kernel_size - 1) + output_padding + 1
    if out < 1:
        raise ValueError(f"padding {padding} crops away the whole output ({out + 2 * padding} "
                         "positions before cropping)")
    return out


def conv_transpose_output_size(n, kernel_size, stride=1, padding=0, output_padding=0, dilation=1):
    r"""Output length of a transposed convolution along one axis (ints), or per axis (tuples).

    .. math::  o = (n-1)s - 2p + d(k-1) + \text{output\_padding} + 1

    Read it as a scatter: input :math:`i` stamps the kernel at :math:`i s`, so the
    last stamp starts at :math:`(n-1)s` and ends :math:`d(k-1)` later, giving
    :math:`(n-1)s + d(k-1) + 1` positions. ``padding`` crops :math:`p` from both ends
    (it is the padding of the convolution this one transposes) and ``output_padding``
    adds positions at the end only, to pick one of the several input sizes that a
    strided convolution maps to the same output size. Same as ``nn.ConvTranspose1d/2d``.

    >>> conv_transpose_output_size(4, 3, stride=2), conv_transpose_output_size(9, 4, stride=2)
    (9, 20)
    """
    return _per_axis(_conv_transpose_size, n, kernel_size, stride, padding, output_padding,
                     dilation)


def output_padding_to_invert(n, kernel_size, stride=1, padding=0, dilation=1):
    r"""The ``output_padding`` for which a transposed conv maps a conv's output back to size n.

    .. math::  \text{output\_padding} = (n + 2p - d(k-1) - 1) \bmod s

    It is the remainder the floor in :func:`conv_output_size` threw away. So
    ``conv_transpose_output_size(conv_output_size(n, ...), ..., output_padding=that) == n``.
    """
    def one_axis(n, kernel_size, stride, padding, dilation):
        _conv_size(n, kernel_size, stride, padding, dilation)  # validates
        return (n + 2 * padding - dilation * (kernel_size - 1) - 1) % stride

    return _per_axis(one_axis, n, kernel_size, stride, padding, dilation)


# -- convolution as a matrix -----------------------------------------------------------
def _as_weight(kernel, dims: int) -> torch.Tensor:
    """A kernel as an (out_channels, in_channels, *k) weight; bare kernels get 1 and 1."""
    kernel = torch.as_tensor(kernel)
    if not kernel.is_floating_point():
        kernel = kernel.float()
    if kernel.dim() == dims:
        kernel = kernel.reshape(1, 1, *kernel.shape)
    if kernel.dim() != dims + 2:
        raise ValueError(f"expected a {dims}-D kernel or an (out, in, {', '.join('k' * dims)}) "
                         f"weight, got shape {tuple(kernel.shape)}")
    return kernel


def _tuple(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _conv_matrix(weight: torch.Tensor, input_shape, stride, padding, dilation) -> torch.Tensor:
    """The (out_ch * prod(o), in_ch * prod(n)) matrix of an N-d convolution (row-major flattening).

    One matrix entry per (output channel, input channel, output position, kernel tap):
    output position ``o`` reads input position ``o * s + t * d - p`` through tap ``t``,
    with weight ``w[out_ch, in_ch, t]``. Taps that read the zero padding add nothing.
    """
    dims = len(input_shape)
    stride, padding, dilation = (_tuple(v, dims) for v in (stride, padding, dilation))
    out_ch, in_ch, *ksize = weight.shape
    out_shape = [conv_output_size(*args) for args in zip(input_shape, ksize, stride, padding,
                                                          dilation, strict=True)]
    axes = [out_ch, in_ch, *out_shape, *ksize]
    grid = torch.meshgrid(*[torch.arange(a) for a in axes], indexing="ij")
    oc, ic, positions, taps = grid[0], grid[1], grid[2:2 + dims], grid[2 + dims:]
    reads = [o * s + t * d - p for o, t, s, p, d in zip(positions, taps, stride, padding,
                                                         dilation, strict=True)]
    valid = torch.ones_like(oc, dtype=torch.bool)
    for r, n in zip(reads, input_shape, strict=True):
        valid &= (r >= 0) & (r < n)
    row, col = oc, ic
    for o, size in zip(positions, out_shape, strict=True):
        row = row * size + o
    for r, size in zip(reads, input_shape, strict=True):
        col = col * size + r
    values = weight[(oc, ic, *taps)]
    matrix = weight.new_zeros(out_ch * int(torch.tensor(out_shape).prod()),
                              in_ch * int(torch.tensor(list(input_shape)).prod()))
    # index_put keeps the matrix differentiable with respect to the kernel
    return matrix.index_put((row[valid], col[valid]), values[valid], accumulate=True)


def conv1d_matrix(kernel, input_length: int, stride: int = 1, padding: int = 0,
                  dilation: int = 1) -> torch.Tensor:
    r"""The matrix :math:`C` of a 1-D convolution: ``F.conv1d(x, k, ...)`` equals ``C @ x``.

    ``kernel``: a 1-D kernel of length :math:`k` (or an ``(out, in, k)`` weight; then
    rows and columns are ordered channel by channel). Row :math:`i` of :math:`C` holds
    the kernel starting at column :math:`i s - p` (cross-correlation: not flipped),
    so :math:`C` has shape :math:`o \times n` with :math:`o` from :func:`conv_output_size`.

    Its transpose is the transposed convolution, ``F.conv_transpose1d(y, k) == C.T @ y``
    (with ``output_padding`` covering trailing all-zero columns of :math:`C`), and the
    gradient of :math:`\langle g, C x\rangle` with respect to :math:`x` is :math:`C^\top g`.

    >>> conv1d_matrix(torch.tensor([1., 2., 3.]), 5)
    tensor([[1., 2., 3., 0., 0.],
            [0., 1., 2., 3., 0.],
            [0., 0., 1., 2., 3.]])
    """
    return _conv_matrix(_as_weight(kernel, 1), (input_length,), stride, padding, dilation)


def conv2d_matrix(kernel, input_shape, stride=1, padding=0, dilation=1) -> torch.Tensor:
    r"""The matrix :math:`C` of a 2-D convolution on an ``H x W`` image, flattened row by row.

    ``F.conv2d(x, k, ...).flatten() == C @ x.flatten()``. ``kernel`` is ``(kh, kw)`` or an
    ``(out, in, kh, kw)`` weight (then ``input_shape`` is still ``(H, W)`` and the
    channels are flattened first). Meant for small images: a 4x4 input and a 3x3
    kernel give the 4x16 matrix of the classic example; :math:`C^\top` maps 2x2 back to 4x4.
    """
    if len(input_shape) != 2:
        raise ValueError(f"input_shape must be (H, W), not {input_shape!r}")
    return _conv_matrix(_as_weight(kernel, 2), tuple(input_shape), stride, padding, dilation)


# -- overlap: where the checkerboard comes from ------------------------------------------
def _overlap_1d(n, kernel_size, stride, padding, output_padding, dilation) -> torch.Tensor:
    size = _conv_transpose_size(n, kernel_size, stride, padding, output_padding, dilation)
    full = (n - 1) * stride + dilation * (kernel_size - 1) + 1 + output_padding
    counts = torch.zeros(full, dtype=torch.long)
    for i in range(n):                      # input position i ...
        for j in range(kernel_size):        # ... stamps kernel tap j at i*s + j*d
            counts[i * stride + j * dilation] += 1
    return counts[padding:padding + size]   # padding crops both ends


def transposed_conv_overlap(input_size, kernel_size, stride=1, padding=0, output_padding=0,
                            dilation=1) -> torch.Tensor:
    r"""How many (input position, kernel tap) pairs contribute to each output position.

    ``input_size`` an int gives a 1-D count vector; a pair ``(H, W)`` a 2-D count map
    (the outer product of the two axes' counts, since a 2-D tap is a pair of 1-D taps).
    Other arguments are ints or per-axis pairs, as for ``nn.ConvTranspose``.

    Away from the borders the count alternates between :math:`\lfloor k/s \rfloor` and
    :math:`\lceil k/s \rceil`: it is uniform exactly when the stride divides the kernel
    size. When it does not (e.g. k=3, s=2) some outputs receive more contributions than
    their neighbours, and in 2-D that unevenness forms a checkerboard. Without cropping
    (``padding=0``) the counts of a 1-D input add up to :math:`n k`.
    """
    if isinstance(input_size, (tuple, list)):
        dims = len(input_size)
        axes = [_overlap_1d(*args) for args in zip(
            input_size, *(_tuple(v, dims) for v in (kernel_size, stride, padding,
                                                    output_padding, dilation)), strict=True)]
        counts = axes[0]
        for axis in axes[1:]:
            counts = counts[..., None] * axis
        return counts
    return _overlap_1d(input_size, kernel_size, stride, padding, output_padding, dilation)


def describe_transposed_conv(input_size: int, kernel_size: int, stride: int = 1, padding: int = 0,
                             output_padding: int = 0, dilation: int = 1) -> str:
    """The output-size formulas with these numbers filled in, and what the overlap looks like."""
    n, k, s, p, op, d = input_size, kernel_size, stride, padding, output_padding, dilation
    lines = [f"n={n}, k={k}, s={s}, p={p}, output_padding={op}" + (f", d={d}" if d != 1 else "")]
    try:
        out = conv_transpose_output_size(n, k, s, p, op, d)
    except ValueError as err:
        return "\n".join([*lines, f"not a valid transposed convolution: {err}"])
    lines.append(f"transposed conv: o = (n-1)s - 2p + d(k-1) + output_padding + 1 "
                 f"= {n - 1}*{s} - 2*{p} + {d}*{k - 1} + {op} + 1 = {out}")
    try:
        back = conv_output_size(out, k, s, p, d)
        lines.append(f"conv with the same k, s, p maps it back: floor(({out} + 2*{p} - {d}*{k - 1}"
                     f" - 1) / {s}) + 1 = {back}" + (" = n" if back == n else f" (not n={n})"))
    except ValueError as err:
        lines.append(f"the conv with the same k, s, p is not defined on {out}: {err}")
    counts = transposed_conv_overlap(n, k, s, p, op, d)
    interior = counts[k:-k] if len(counts) > 2 * k else counts
    if interior.min() == interior.max():
        lines.append(f"overlap: uniform away from the borders ({int(interior.min())} "
                     f"contributions per output), since the stride divides the kernel size")
    else:
        lines.append(f"overlap: uneven, {int(interior.min())} to {int(interior.max())} "
                     f"contributions per output (k % s = {k % s} != 0): checkerboard in 2-D")
    return "\n".join(lines)


def overlap_figure(input_size: int, kernel_size: int, stride: int = 1, padding: int = 0,
                   output_padding: int = 0, dilation: int = 1, title: str | None = None):
    """A figure of the overlap counts: a 1-D bar chart and the 2-D (square input) count map."""
    import matplotlib.pyplot as plt

    counts_1d = transposed_conv_overlap(input_size, kernel_size, stride, padding, output_padding,
                                        dilation)
    counts_2d = transposed_conv_overlap((input_size, input_size), kernel_size, stride, padding,
                                        output_padding, dilation)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [1.4, 1]})
    ax1.bar(range(len(counts_1d)), counts_1d.tolist(), color="tab:blue")
    ax1.set(xlabel="output position", ylabel="contributions",
            title=f"1-D: n={input_size} -> {len(counts_1d)}")
    ax1.set_yticks(range(int(counts_1d.max()) + 1))
    image = ax2.imshow(counts_2d.numpy(), cmap="viridis", vmin=0)
    ax2.set(title=f"2-D: {input_size}x{input_size} -> {counts_2d.shape[0]}x{counts_2d.shape[1]}",
            xticks=[], yticks=[])
    fig.colorbar(image, ax=ax2, fraction=0.046, pad=0.04)
    fig.suptitle(title or f"overlap of a transposed conv: k={kernel_size}, s={stride}, p={padding}, "
                 f"output_padding={output_padding}")
    fig.tight_layout()
    return fig


def transposed_conv_explorer(input_size: int = 5, kernel_size: int = 3, stride: int = 2,
                             padding: int = 0, output_padding: int = 0):
    """An ipywidgets explorer: sliders for n, k, s, p and output_padding.

    It prints :func:`describe_transposed_conv` and draws :func:`overlap_figure` for the
    current values. Returns the widget (display it, or leave it last in a cell).
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    style = {"description_width": "110px"}
    sliders = {
        "input_size": widgets.IntSlider(input_size, 1, 12, description="input size n", style=style),
        "kernel_size": widgets.IntSlider(kernel_size, 1, 7, description="kernel k", style=style),
        "stride": widgets.IntSlider(stride, 1, 4, description="stride s", style=style),
        "padding": widgets.IntSlider(padding, 0, 3, description="padding p", style=style),
        "output_padding": widgets.IntSlider(output_padding, 0, 3, description="output_padding",
                                            style=style),
    }

    def show(**values):
        print(describe_transposed_conv(**values))
        try:
            fig = overlap_figure(**values)
        except ValueError:
            return                              # already explained in the text
        display(fig)
        plt.close(fig)

    out = widgets.interactive_output(show, sliders)
    controls = widgets.VBox(list(sliders.values()))
    box = widgets.VBox([controls, out])
    start = {name: slider.value for name, slider in sliders.items()}
    box.sliders, box.snapshot = sliders, lambda: explorer_snapshot(**start)
    return box


def explorer_snapshot(**values) -> bytes:
    """What :func:`transposed_conv_explorer` shows for ``values``, as one PNG picture.

    For readers without a running kernel (GitHub, nbviewer, a PDF): the notebook stores
    the picture of the widget's starting state next to the widget.
    """
    import io

    import matplotlib.pyplot as plt

    fig = overlap_figure(**values)
    fig.set_size_inches(9, 4.6)
    fig.text(0.01, 0.01, describe_transposed_conv(**values), family="monospace", fontsize=8,
             va="bottom")
    fig.subplots_adjust(bottom=0.33, top=0.85)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    plt.close(fig)
    return buffer.getvalue()


# -- the alternative to transposed convolutions ------------------------------------------
class UpsampleConv(nn.Module):
    """Upsample (nearest neighbour by default), then a size-preserving convolution.

    Output size: ``scale_factor * n``. Nearest upsampling copies each pixel into a
    ``scale x scale`` block, so every output pixel sees the same kind of
    neighbourhood: a constant input gives a constant output (away from the zero
    padding) whatever the weights. This is the usual cure for the checkerboard
    artifacts of transposed convolutions (Odena, Dumoulin & Olah, 2016).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 scale_factor: int = 2, mode: str = "nearest", bias: bool = True):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=scale_factor, mode=mode)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding="same", bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.upsample(x))


def upsample_conv(in_channels: int, out_channels: int, kernel_size: int = 3,
                  scale_factor: int = 2, mode: str = "nearest", bias: bool = True) -> UpsampleConv:
    """An :class:`UpsampleConv` layer (function-style name)."""
    return UpsampleConv(in_channels, out_channels, kernel_size, scale_factor, mode, bias)


# -- the seed's deep convolutional autoencoder --------------------------------------------
# (in_channels, out_channels, kernel_size, stride); no padding anywhere, no pooling.
SEED_ENCODER_LAYERS = ((1, 32, 5, 1), (32, 32, 5, 1), (32, 32, 4, 2), (32, 32, 3, 2), (32, 8, 4, 1))
# The decoder mirrors it. The seed's shape slide prints ConvTranspose2d(32, 8, ...) and
# ConvTranspose2d(1, 32, ...): channel arguments swapped. The first argument is always the
# number of channels coming *in*: 8 -> 32 first, 32 -> 1 last.
SEED_DECODER_LAYERS = ((8, 32, 4, 1), (32, 32, 3, 2), (32, 32, 4, 2), (32, 32, 5, 1), (32, 1, 5, 1))


class LayerShape(NamedTuple):
    part: str            # "input", "encoder" or "decoder"
    index: int | None    # position in the nn.Sequential
    layer: str           # the layer's repr
    shape: tuple         # tensor shape after the layer, without the batch dimension


@torch.no_grad()
def init_output_bias(model: nn.Module, mean_pixel: float) -> nn.Module:
    r"""Start a sigmoid decoder at the average pixel value: last bias :math:`= \log(m / (1 - m))`.

    With PyTorch's default initialisation the sigmoid starts near 0.5 everywhere, far
    from MNIST's mostly black pixels (mean about 0.13). The first updates then push
    the output towards black so hard that the sigmoid can saturate at 0 and the ReLUs
    die, and training stalls (the seed's conv AE does this under Adam at lr 1e-3 to 3e-3).
    Starting from the mean pixel value avoids that. ``model.decoder``'s last linear or
    transposed-convolution layer gets the bias. Returns the model.
    """
    if not 0 < mean_pixel < 1:
        raise ValueError(f"mean_pixel must be in (0, 1), not {mean_pixel}")
    last = [m for m in model.decoder.modules() if isinstance(m, (nn.Linear, nn.ConvTranspose2d))][-1]
    last.bias.fill_(float(torch.logit(torch.tensor(float(mean_pixel)))))
    return model


class SeedConvAutoencoder(nn.Module):
    r"""The deep convolutional autoencoder of the seed lecture: 1x28x28 -> 8x1x1 -> 1x28x28.

    The size reduction comes from kernel sizes and strides alone (no padding, no pooling):

    =========================================  ============  =================================
    layer                                      shape out     formula
    =========================================  ============  =================================
    input                                      1 x 28 x 28
    Conv2d(1, 32, 5, stride 1)                 32 x 24 x 24  (28 - 5)/1 + 1 = 24
    Conv2d(32, 32, 5, stride 1)                32 x 20 x 20  (24 - 5)/1 + 1 = 20
    Conv2d(32, 32, 4, stride 2)                32 x 9 x 9    floor((20 - 4)/2) + 1 = 9
    Conv2d(32, 32, 3, stride 2)                32 x 4 x 4    floor((9 - 3)/2) + 1 = 4
    Conv2d(32, 8, 4, stride 1)                 8 x 1 x 1     (4 - 4)/1 + 1 = 1
    ConvTranspose2d(8, 32, 4, stride 1)        32 x 4 x 4    (1 - 1)*1 + 4 = 4
    ConvTranspose2d(32, 32, 3, stride 2)       32 x 9 x 9    (4 - 1)*2 + 3 = 9
    ConvTranspose2d(32, 32, 4, stride 2)       32 x 20 x 20  (9 - 1)*2 + 4 = 20
    ConvTranspose2d(32, 32, 5, stride 1)       32 x 24 x 24  (20 - 1)*1 + 5 = 24
    ConvTranspose2d(32, 1, 5, stride 1)        1 x 28 x 28   (24 - 1)*1 + 5 = 28
    =========================================  ============  =================================

    ReLU follows every layer except the last of the encoder (the code is unconstrained)
    and the last of the decoder. Both strided divisions are exact, so the decoder needs
    no ``output_padding`` to land on 28x28 again.

    ``output="sigmoid"`` (default) ends the decoder with a sigmoid, so reconstructions
    are images in [0, 1], directly comparable with the inputs under the L2 loss;
    ``output="logits"`` leaves the last layer raw (for ``F.binary_cross_entropy_with_logits``).
    ``encode`` returns the code as an (N, 8, 1, 1) tensor; ``decode`` takes (N, 8, 1, 1) or (N, 8).
    Call :meth:`init_output_bias` with the mean pixel value before training with a sigmoid
    output: from PyTorch's default initialisation, training on MNIST can stall (see there).
    """

    def __init__(self, output: str = "sigmoid"):
        super().__init__()
        if output not in ("sigmoid", "logits"):
            raise ValueError(f"output must be 'sigmoid' or 'logits', not {output!r}")
        self.output = output
        self.latent_shape = (SEED_ENCODER_LAYERS[-1][1], 1, 1)
        self.encoder = self._stack(nn.Conv2d, SEED_ENCODER_LAYERS)
        self.decoder = self._stack(nn.ConvTranspose2d, SEED_DECODER_LAYERS)
        if output == "sigmoid":
            self.decoder.append(nn.Sigmoid())

    @staticmethod
    def _stack(layer, spec) -> nn.Sequential:
        modules: list[nn.Module] = []
        for number, (c_in, c_out, k, s) in enumerate(spec):
            if number:
                modules.append(nn.ReLU())
            modules.append(layer(c_in, c_out, kernel_size=k, stride=s))
        return nn.Sequential(*modules)

    def init_output_bias(self, mean_pixel: float) -> SeedConvAutoencoder:
        """Start the output at the average pixel value (see :func:`init_output_bias`). Returns self."""
        return init_output_bias(self, mean_pixel)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) images -> (N, 8, 1, 1) codes."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, 8, 1, 1) or (N, 8) codes -> (N, 1, 28, 28) images (or logits)."""
        if z.dim() == 2:
            z = z.reshape(len(z), *self.latent_shape)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def layer_shapes(self, input_shape: Sequence[int] = (1, 28, 28),
                     all_layers: bool = False) -> list[LayerShape]:
        """The shape after every convolution, traced with a real tensor (batch dimension dropped).

        ``all_layers=True`` lists the activations too (they do not change shapes).
        """
        rows = [LayerShape("input", None, "", tuple(input_shape))]
        x = torch.zeros(1, *input_shape, device=next(self.parameters()).device)
        for part, stack in (("encoder", self.encoder), ("decoder", self.decoder)):
            for index, module in enumerate(stack):
                x = module(x)
                if all_layers or isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                    rows.append(LayerShape(part, index, repr(module), tuple(x.shape[1:])))
        return rows

    def shape_table(self, input_shape: Sequence[int] = (1, 28, 28)) -> str:
        """:meth:`layer_shapes` as a printable table."""
        lines = []
        for row in self.layer_shapes(input_shape):
            where = row.part if row.index is None else f"{row.part}[{row.index}]"
            shape = " x ".join(str(v) for v in row.shape)
            lines.append(f"{where:<11} {row.layer:<62} -> {shape}")
        return "\n".join(lines)
