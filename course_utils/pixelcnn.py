r"""Topic 5: autoregressive models, from MADE to the gated PixelCNN and WaveNet.

An autoregressive model writes the density of an image ``x`` with ``D`` pixels, taken in a fixed
order, as a product of one-dimensional conditionals (the chain rule of probability):

.. math::  p(x) = \prod_{i=1}^{D} p(x_i \mid x_1, \dots, x_{i-1})

Each factor is a categorical distribution (one logit for a binary pixel, ``L`` logits for ``L``
grey levels), so ``log p(x)`` is a sum of ``D`` cross-entropies: an **exact** likelihood, where
a VAE only has a bound. The whole difficulty is the word *given*: the network that computes
factor ``i`` must not see pixels ``i, i+1, ...``. Everything in this module enforces that with
masks:

1. MADE: masked fully connected layers, the masks built from an ordering of the pixels;
2. masked convolutions, type A (the first layer: the centre pixel hidden) and type B (later
   layers: the centre visible, since its features only hold the past), and the plain PixelCNN;
3. the gated PixelCNN: a vertical and a horizontal stack, which removes the plain PixelCNN's
   blind spot, with ``tanh * sigmoid`` gates, residual and skip connections and an optional class;
4. dilated causal 1-D convolutions (WaveNet), whose receptive field doubles with every layer;
5. sampling one pixel at a time, completion of occluded images, and unit conversions
   (nats per image to bits per dimension).

Causality is checked, never assumed: :func:`dependency_map` differentiates one output with
respect to the input, and the tests assert that no future pixel has a non-zero gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


# --------------------------------------------------------------------------------------
# 0. Units
# --------------------------------------------------------------------------------------
def bits_per_dim(nll_nats, num_dims: int):
    r"""Negative log-likelihood per image in nats -> bits per dimension.

    .. math:: \text{bits/dim} = \frac{\text{NLL}_\text{nats}}{D \,\ln 2}

    (1 nat = 1/ln 2 ≈ 1.443 bits.) For binarized MNIST, ``D = 784``: 80 nats is 0.147 bits/dim.
    """
    if num_dims <= 0:
        raise ValueError(f"num_dims must be positive, got {num_dims}")
    return nll_nats / (num_dims * math.log(2.0))


def nats_per_image(bits_per_dimension, num_dims: int):
    """The inverse of :func:`bits_per_dim`."""
    return bits_per_dimension * num_dims * math.log(2.0)


def quantize(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Grey levels in [0, 1] -> integer classes ``0 .. levels-1`` (e.g. 16 levels = 4 bits)."""
    return (images.clamp(0, 1) * levels).floor().clamp(max=levels - 1).long()


def dequantize(classes: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer classes -> the centre of each grey-level bin, in [0, 1] (for display)."""
    return (classes.float() + 0.5) / levels


# --------------------------------------------------------------------------------------
# 1. MADE: masks from an ordering
# --------------------------------------------------------------------------------------
def made_masks(ordering: torch.Tensor, hidden_sizes: Sequence[int],
               generator: torch.Generator | None = None) -> list[torch.Tensor]:
    r"""The masks of a MADE (Germain et al., 2015) with the given input ordering.

    Every unit gets a *degree*: input ``d`` has degree ``m(d) = ordering[d]`` in ``1..D`` (its
    position in the order), each hidden unit a degree drawn from ``1..D-1``. A hidden unit of
    degree ``m`` may only depend on inputs of degree ``<= m``; output ``d`` only on units of
    degree ``< m(d)``:

    .. math::  M^{hidden}_{k,j} = [\,m(k) \ge m(j)\,], \qquad M^{out}_{d,k} = [\,m(d) > m(k)\,]

    The strict ``>`` at the output is what leaves out ``x_d`` itself. Returns one ``out x in``
    float mask per layer (``len(hidden_sizes) + 1`` of them).
    """
    ordering = torch.as_tensor(ordering, dtype=torch.long)
    num_inputs = len(ordering)
    if num_inputs < 2 or sorted(ordering.tolist()) != list(range(1, num_inputs + 1)):
        raise ValueError("ordering must be a permutation of 1..D, D >= 2 (each input's position)")
    degrees = [ordering]
    for size in hidden_sizes:
        # from the previous layer's smallest degree, so that no unit is cut off from all inputs
        low = int(degrees[-1].min())
        degrees.append(torch.randint(low, num_inputs, (size,), generator=generator))
    masks = [(later[:, None] >= earlier[None, :]).float()
             for earlier, later in zip(degrees[:-1], degrees[1:], strict=True)]
    masks.append((ordering[:, None] > degrees[-1][None, :]).float())
    return masks


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (``out x in``)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        if mask.shape != (out_features, in_features):
            raise ValueError(f"mask shape {tuple(mask.shape)} != {(out_features, in_features)}")
        self.register_buffer("mask", mask.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """A masked autoencoder for binary vectors: one logit of ``p(x_d = 1 | x_<d)`` per input.

    ``ordering`` (default: the raster order 1..D) fixes which inputs each output may see. One
    forward pass gives all ``D`` conditionals at once; sampling still needs ``D`` passes.
    """

    def __init__(self, num_inputs: int = 784, hidden_sizes: Sequence[int] = (500,),
                 ordering: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        self.num_inputs = num_inputs
        ordering = torch.arange(1, num_inputs + 1) if ordering is None else torch.as_tensor(ordering)
        self.register_buffer("ordering", ordering.long())
        masks = made_masks(ordering, hidden_sizes, torch.Generator().manual_seed(seed))
        sizes = [num_inputs, *hidden_sizes, num_inputs]
        layers: list[nn.Module] = []
        for i, mask in enumerate(masks):
            layers.append(MaskedLinear(sizes[i], sizes[i + 1], mask))
            if i < len(masks) - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    @property
    def masks(self) -> list[torch.Tensor]:
        """The layers' 0/1 masks, input to output (``out x in`` each)."""
        return [layer.mask for layer in self.net if isinstance(layer, MaskedLinear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, the shape of ``x`` (images ``B x 1 x 28 x 28`` or vectors ``B x D``)."""
        return self.net(x.flatten(1)).reshape(x.shape)


# --------------------------------------------------------------------------------------
# 2. Masked convolutions and the plain PixelCNN
# --------------------------------------------------------------------------------------
def causal_mask(kernel_size: int, mask_type: str) -> torch.Tensor:
    """The ``k x k`` 0/1 mask of a PixelCNN convolution in raster order.

    Every row above the centre is visible, and the centre row left of the centre. Type **A**
    hides the centre itself (the first layer: pixel ``i`` must not see ``x_i``); type **B** shows
    it (later layers: the centre's features were computed from pixels before ``i`` only).
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', not {mask_type!r}")
    if kernel_size % 2 == 0:
        raise ValueError("use an odd kernel size, so that the kernel has a centre")
    mask = torch.zeros(kernel_size, kernel_size)
    centre = kernel_size // 2
    mask[:centre, :] = 1
    mask[centre, :centre] = 1
    if mask_type == "B":
        mask[centre, centre] = 1
    return mask


class MaskedConv2d(nn.Conv2d):
    """A same-size convolution whose kernel is masked by :func:`causal_mask` (type A or B)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, mask_type: str = "A",
                 bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.mask_type = mask_type
        self.register_buffer("mask", causal_mask(kernel_size, mask_type)[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def _class_bias(num_classes: int | None, channels: int) -> nn.Embedding | None:
    return nn.Embedding(num_classes, channels) if num_classes else None


class PixelCNN(nn.Module):
    """The plain PixelCNN (van den Oord et al., 2016): a type-A conv, then type-B residual blocks.

    ``levels=2`` models binary pixels with **one** logit each (a Bernoulli); ``levels=L > 2``
    gives ``L`` logits per pixel (a softmax over grey levels). ``num_classes`` adds a learned
    per-class bias to every block (a class-conditional model).
    """

    def __init__(self, channels: int = 64, num_blocks: int = 6, kernel_size: int = 7,
                 block_kernel_size: int = 3, levels: int = 2, num_classes: int | None = None):
        super().__init__()
        self.levels, self.num_classes = levels, num_classes
        self.input = MaskedConv2d(1, channels, kernel_size, "A")
        self.blocks = nn.ModuleList(
            MaskedConv2d(channels, channels, block_kernel_size, "B") for _ in range(num_blocks))
        self.class_bias = nn.ModuleList(
            _class_bias(num_classes, channels) or nn.Identity() for _ in range(num_blocks))
        out = 1 if levels == 2 else levels
        # 1x1 convolutions: each position on its own. ELU rather than ReLU: a ReLU that is off
        # for every input at some position would cut that output off from the image entirely
        self.head = nn.Sequential(nn.ELU(), nn.Conv2d(channels, channels, 1), nn.ELU(),
                                  nn.Conv2d(channels, out, 1))

    @property
    def rows_above(self) -> int:
        """How many rows above its own an output can see: ``k//2`` for the first layer, then
        ``k//2`` per block. Rows further up cannot matter (used to crop when sampling)."""
        return self.input.kernel_size[0] // 2 + sum(b.kernel_size[0] // 2 for b in self.blocks)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Logits: ``B x 1 x H x W`` (binary) or ``B x L x H x W`` (grey levels)."""
        h = self.input(_network_input(x, self.levels))
        for block, class_bias in zip(self.blocks, self.class_bias, strict=True):
            update = block(F.relu(h))
            if self.num_classes:
                update = update + class_bias(y)[:, :, None, None]
            h = h + update  # residual: the sum keeps every position's past-only dependence
        return self.head(h)


def _network_input(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Pixel values as the network sees them: 0/1 for binary, centred grey levels otherwise."""
    if levels == 2:
        return x.float()
    if x.dtype == torch.long:
        x = dequantize(x, levels)
    return x.float() * 2 - 1


# --------------------------------------------------------------------------------------
# 3. The gated PixelCNN: two stacks, no blind spot
# --------------------------------------------------------------------------------------
def _down(v: torch.Tensor) -> torch.Tensor:
    """Shift a feature map down one row (zeros on top): row i then holds rows <= i - 1."""
    return F.pad(v, (0, 0, 1, 0))[:, :, :-1, :]


def _right(h: torch.Tensor) -> torch.Tensor:
    """Shift a feature map right one column (zeros on the left)."""
    return F.pad(h, (1, 0))[:, :, :, :-1]


class GatedLayer(nn.Module):
    r"""One layer of the gated PixelCNN (van den Oord et al., 2016, "Conditional image generation").

    * **vertical stack** ``v``: a ``(k//2 + 1) x k`` convolution that sees the rows *up to and
      including* the current one; shifted down by one row it tells the horizontal stack about
      every pixel strictly above, the whole width of the kernel (no blind spot);
    * **horizontal stack** ``h``: a ``1 x (k//2 + 1)`` convolution along the current row, up to
      the current pixel (the first layer shifts it right by one: "type A");
    * the gate, on each stack: :math:`y = \tanh(W_f * x + V_f c) \odot \sigma(W_g * x + V_g c)`,
      with ``c`` the class embedding when there is one;
    * residual (``h + 1x1(gate)``) on the horizontal stack, and a skip output.
    """

    def __init__(self, in_channels: int, channels: int, kernel_size: int, first: bool = False,
                 num_classes: int | None = None):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError("use an odd kernel size")
        self.first, self.kernel_size, self.channels = first, kernel_size, channels
        half = kernel_size // 2
        # no padding here: forward pads only above and on the left, so that no output is computed
        # only to be cropped away (on a CPU the extra rows and copies cost more than the masks)
        self.vertical = nn.Conv2d(in_channels, 2 * channels, (half + 1, kernel_size))
        self.horizontal = nn.Conv2d(in_channels, 2 * channels, (1, half + 1))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.skip = nn.Conv2d(channels, channels, 1)
        self.class_bias = _class_bias(num_classes, 2 * channels)

    @staticmethod
    def _gate(pre: torch.Tensor) -> torch.Tensor:
        value, gate = pre.chunk(2, dim=1)
        return torch.tanh(value) * torch.sigmoid(gate)

    def vertical_step(self, v, y=None):
        """The vertical stack: its gated output, and what it passes to the horizontal stack.

        The link is ``1x1(v_pre)`` shifted down one row, so at row ``i`` it holds rows
        ``<= i - 1`` only: it does not change while row ``i`` is being drawn.
        """
        half = self.kernel_size // 2
        v_pre = self.vertical(F.pad(v, (half, half, half, 0)))  # row i sees rows i - k//2 .. i
        link = self.vertical_to_horizontal(_down(v_pre))       # everything strictly above
        if self.class_bias is not None:
            v_pre = v_pre + self.class_bias(y)[:, :, None, None]
        # v keeps rows up to the current one (the whole row): it only ever reaches the
        # horizontal stack shifted down, as "strictly above"
        return self._gate(v_pre), link

    def horizontal_step(self, h, link, y=None):
        """The horizontal stack, given the vertical stack's ``link``: ``(h_out, skip)``.

        Every operation here works along a row (a ``1 x (k//2+1)`` convolution, ``1x1``
        convolutions, gates), so it can run on a single row of ``h`` and ``link``.
        """
        half = self.kernel_size // 2
        h_pre = self.horizontal(F.pad(h, (half, 0)))  # column j sees columns j - k//2 .. j
        if self.first:                                # type A: the current pixel is hidden
            h_pre = _right(h_pre)
        h_pre = h_pre + link
        if self.class_bias is not None:
            h_pre = h_pre + self.class_bias(y)[:, :, None, None]
        gated = self._gate(h_pre)
        h_out = self.horizontal_out(gated)
        if not self.first:
            h_out = h_out + h                         # residual
        return h_out, self.skip(gated)

    def forward(self, v, h, y=None):
        v_out, link = self.vertical_step(v, y)
        h_out, skip = self.horizontal_step(h, link, y)
        return v_out, h_out, skip


class GatedPixelCNN(nn.Module):
    """A stack of :class:`GatedLayer` s, then a small head on the sum of the skip outputs.

    ``levels`` and ``num_classes`` as in :class:`PixelCNN`.
    """

    def __init__(self, channels: int = 64, num_layers: int = 8, kernel_size: int = 7,
                 layer_kernel_size: int = 3, levels: int = 2, num_classes: int | None = None):
        super().__init__()
        self.levels, self.num_classes = levels, num_classes
        self.layers = nn.ModuleList(
            [GatedLayer(1, channels, kernel_size, first=True, num_classes=num_classes)]
            + [GatedLayer(channels, channels, layer_kernel_size, num_classes=num_classes)
               for _ in range(num_layers - 1)])
        out = 1 if levels == 2 else levels
        self.head = nn.Sequential(nn.ELU(), nn.Conv2d(channels, channels, 1), nn.ELU(),
                                  nn.Conv2d(channels, out, 1))  # ELU: as in PixelCNN's head

    @property
    def rows_above(self) -> int:
        """How many rows above its own an output can see: the first vertical kernel's ``k//2``,
        ``k//2`` more per later layer, and one for the shift into the horizontal stack."""
        return sum(layer.kernel_size // 2 for layer in self.layers) + 1

    def vertical_links(self, x: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every layer's link from the vertical to the horizontal stack (row ``i``: rows < ``i``)."""
        v, links = _network_input(x, self.levels), []
        for layer in self.layers:
            v, link = layer.vertical_step(v, y)
            links.append(link)
        return links

    def horizontal_logits(self, x: torch.Tensor, links: list[torch.Tensor],
                          y: torch.Tensor | None = None) -> torch.Tensor:
        """The logits from the horizontal stacks, given the links: works on any rows of ``x``
        (with the same rows of every link), a single row included."""
        h, skips = _network_input(x, self.levels), 0
        for layer, link in zip(self.layers, links, strict=True):
            h, skip = layer.horizontal_step(h, link, y)
            skips = skips + skip
        return self.head(skips)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.horizontal_logits(x, self.vertical_links(x, y), y)


# --------------------------------------------------------------------------------------
# 4. Likelihoods, causality checks
# --------------------------------------------------------------------------------------
def log_likelihood(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    r"""``log p(x)`` per image, in nats: the sum over pixels of the conditionals' log-probabilities.

    Binary pixels (``levels == 2``, ``x`` in {0, 1}): :math:`\sum_i x_i\log\sigma(l_i) +
    (1-x_i)\log\sigma(-l_i)`. Grey levels: ``x`` holds the classes (``long``), and the sum is
    of ``log softmax`` at the observed class.
    """
    logits = model(x, y) if getattr(model, "num_classes", None) else model(x)
    if getattr(model, "levels", 2) == 2:
        return -F.binary_cross_entropy_with_logits(logits, x.float(), reduction="none").flatten(1).sum(1)
    return -F.cross_entropy(logits, x[:, 0], reduction="none").flatten(1).sum(1)


def dependency_map(model, shape, position, y=None, draws: int = 8) -> torch.Tensor:
    """``|d output[position] / d input|``, summed over channels and ``draws`` random inputs: ``H x W``.

    Non-zero exactly where the output at ``position = (row, col)`` depends on the input: for a
    causal model only at earlier pixels in raster order (the receptive field, blind spot
    included). Random inputs, several of them, so that no dependence hides behind a zero input
    or a ReLU that happens to be off.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(draws, *shape, generator=generator)
    x.requires_grad_(True)
    if y is not None:
        y = torch.as_tensor(y).reshape(-1).expand(draws)
    was_training = getattr(model, "training", False)  # any callable works, not only modules
    if was_training:
        model.eval()
    try:
        out = model(x, y) if y is not None else model(x)  # grey levels: floats in [0, 1] work too
        row, col = position
        out[:, :, row, col].sum().backward()  # each draw's output depends on its own input only
    finally:
        if was_training:
            model.train()
    return x.grad.abs().sum((0, 1))


def future_mask(height: int, width: int, position) -> torch.Tensor:
    """True at the pixels that come at or after ``position`` in raster order (must not be seen)."""
    row, col = position
    index = torch.arange(height * width).reshape(height, width)
    return index >= row * width + col


# --------------------------------------------------------------------------------------
# 5. Sampling and completion
# --------------------------------------------------------------------------------------
def _draw(logits: torch.Tensor, levels: int, generator: torch.Generator | None,
          temperature: float = 1.0) -> torch.Tensor:
    """One draw per image from a pixel's conditional: ``logits`` is ``B x 1`` or ``B x L``."""
    if levels == 2:
        probs = torch.sigmoid(logits[:, 0] / temperature)
        return torch.bernoulli(probs, generator=generator)
    probs = torch.softmax(logits / temperature, dim=1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(torch.float32)


@torch.no_grad()
def sample(model: nn.Module, n: int | None = None, shape=(1, 28, 28), y: torch.Tensor | None = None,
           generator: torch.Generator | None = None, start: torch.Tensor | None = None,
           known: torch.Tensor | None = None, crop_rows: bool = True, device=None,
           temperature: float = 1.0, reuse_vertical: bool = True) -> torch.Tensor:
    """Draw images pixel by pixel in raster order: ``H * W`` forward passes.

    * ``y``: labels for a class-conditional model (``n`` defaults to ``len(y)``);
    * ``start`` and ``known`` (a boolean ``H x W`` or ``B x 1 x H x W`` mask): pixels that are
      given and kept (completion of an occluded image); only the others are drawn;
    * ``crop_rows``: for pixel row ``i``, run the network on rows ``i - rows_above .. i`` only.
      Rows below cannot influence row ``i`` in a causal model, nor rows beyond the receptive
      field above it, so the result is the same for a fraction of the work (the speed-up the
      lecture measures);
    * ``reuse_vertical`` (gated PixelCNN): run the vertical stacks once per row, and for each
      pixel of the row only the horizontal stacks, on that one row. The vertical stacks'
      links into row ``i`` hold rows ``< i`` only (:meth:`GatedLayer.vertical_step`), which do
      not change while row ``i`` is drawn, and every horizontal operation works along a row:
      the same numbers for about ``1 / (rows_above + 1)`` of the work per pixel;
    * ``generator``: a CPU generator; the same seed gives the same images.

    Returns binary images (levels 2) or classes as floats ``0..L-1`` (grey levels),
    ``n x 1 x H x W``.
    """
    levels = getattr(model, "levels", 2)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if n is None:
        n = len(y) if y is not None else (len(start) if start is not None else 1)
    channels, height, width = shape
    x = torch.zeros(n, channels, height, width, device=device)
    if start is not None:
        x.copy_(start.to(device).float())
    given = torch.zeros(n, 1, height, width, dtype=torch.bool, device=device)
    if known is not None:
        given |= known.to(device).bool().expand_as(given)
    was_training = model.training
    model.eval()
    conditional = bool(getattr(model, "num_classes", None))
    y = y.to(device) if y is not None else None
    row_by_row = reuse_vertical and isinstance(model, GatedPixelCNN)

    def as_input(part):
        return part.long() if levels > 2 and not isinstance(model, MADE) else part

    try:
        for row in range(height):
            if bool(given[:, :, row].all()):
                continue
            top = max(0, row - getattr(model, "rows_above", height)) if crop_rows else 0
            bottom = row + 1 if crop_rows else height
            if row_by_row:  # row `row` of every link: computed from the rows above, once
                links = [link[:, :, row - top:row - top + 1]
                         for link in model.vertical_links(as_input(x[:, :, top:bottom]), y)]
            for col in range(width):
                if bool(given[:, :, row, col].all()):
                    continue
                if isinstance(model, MADE):
                    logits = model(x)[:, :, row, col]
                elif row_by_row:
                    logits = model.horizontal_logits(as_input(x[:, :, row:row + 1]), links, y)[:, :, 0, col]
                else:
                    model_input = as_input(x[:, :, top:bottom])
                    out = model(model_input, y) if conditional else model(model_input)
                    logits = out[:, :, row - top, col]
                value = _draw(logits.float().cpu(), levels, generator, temperature).to(device)
                keep = given[:, 0, row, col]
                x[:, 0, row, col] = torch.where(keep, x[:, 0, row, col], value)
    finally:
        model.train(was_training)
    return x


def complete(model: nn.Module, images: torch.Tensor, rows_given: int = 14, y=None,
             generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """Keep the top ``rows_given`` rows of each image and sample the rest."""
    height, width = images.shape[-2:]
    known = torch.zeros(height, width, dtype=torch.bool)
    known[:rows_given] = True
    return sample(model, len(images), tuple(images.shape[1:]), y=y, generator=generator,
                  start=images, known=known, **kwargs)


# --------------------------------------------------------------------------------------
# 6. WaveNet: dilated causal 1-D convolutions
# --------------------------------------------------------------------------------------
def receptive_field(kernel_size: int, dilations: Sequence[int]) -> int:
    r"""How many past samples (the current one included) a stack of causal convolutions sees.

    .. math:: r = 1 + \sum_\ell (k - 1)\, d_\ell

    With ``k = 2`` and dilations ``1, 2, 4, ..., 2^{L-1}``: ``r = 2^L``.
    """
    return 1 + sum((kernel_size - 1) * d for d in dilations)


class CausalConv1d(nn.Conv1d):
    """A 1-D convolution that only looks back: ``(k - 1) * dilation`` zeros padded on the left.

    ``shift=True`` (the first layer) also moves the output one step later, so that output ``t``
    sees inputs ``< t`` only (like a type-A mask).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2,
                 dilation: int = 1, shift: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.left_padding, self.shift = (kernel_size - 1) * dilation, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(F.pad(x, (self.left_padding, 0)))
        return F.pad(out, (1, 0))[..., :-1] if self.shift else out


class WaveNet(nn.Module):
    """A tiny WaveNet: a shifted causal input conv, gated residual blocks with dilations
    ``1, 2, 4, ...`` (repeated ``stacks`` times), skip connections, a softmax over ``levels``."""

    def __init__(self, levels: int = 64, channels: int = 32, layers_per_stack: int = 6,
                 stacks: int = 1, kernel_size: int = 2):
        super().__init__()
        self.levels = levels
        self.dilations = [2 ** i for i in range(layers_per_stack)] * stacks
        self.input = CausalConv1d(levels, channels, kernel_size, shift=True)
        self.filters = nn.ModuleList(CausalConv1d(channels, 2 * channels, kernel_size, d)
                                     for d in self.dilations)
        self.residual = nn.ModuleList(nn.Conv1d(channels, channels, 1) for _ in self.dilations)
        self.skip = nn.ModuleList(nn.Conv1d(channels, channels, 1) for _ in self.dilations)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv1d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv1d(channels, levels, 1))
        self.kernel_size = kernel_size

    @property
    def receptive_field(self) -> int:
        """How many inputs before ``t`` output ``t`` sees: the shifted input conv's ``k`` taps,
        then ``(k - 1) d`` more per dilated layer."""
        return receptive_field(self.kernel_size, [1, *self.dilations])

    def forward(self, classes: torch.Tensor) -> torch.Tensor:
        """``classes``: ``B x T`` integers in ``0..levels-1``; returns ``B x levels x T`` logits
        for each step given the steps before it."""
        return self.from_one_hot(F.one_hot(classes, self.levels).transpose(1, 2).float())

    def from_one_hot(self, one_hot: torch.Tensor) -> torch.Tensor:
        """The same on a ``B x levels x T`` float input (differentiable: causality checks)."""
        h = self.input(one_hot)
        skips = 0
        for filters, residual, skip in zip(self.filters, self.residual, self.skip, strict=True):
            value, gate = filters(h).chunk(2, dim=1)
            gated = torch.tanh(value) * torch.sigmoid(gate)
            skips = skips + skip(gated)
            h = h + residual(gated)
        return self.head(skips)

    @torch.no_grad()
    def generate(self, steps: int, prompt: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``steps`` new values after ``prompt`` (``B x T0`` classes), one at a time."""
        sequence = prompt.clone() if prompt is not None else torch.zeros(1, 1, dtype=torch.long)
        for _ in range(steps):
            window = sequence[:, -self.receptive_field:]
            logits = self(torch.cat([window, window[:, -1:]], 1))[:, :, -1]  # predicts the next
            probs = torch.softmax(logits, dim=1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            sequence = torch.cat([sequence, nxt], 1)
        return sequence


def mu_law_encode(x: torch.Tensor, levels: int = 256) -> torch.Tensor:
    r"""Signal in [-1, 1] -> classes: :math:`\text{sign}(x)\,\ln(1+\mu|x|)/\ln(1+\mu)`, μ = L − 1."""
    mu = levels - 1
    companded = torch.sign(x) * torch.log1p(mu * x.abs().clamp(max=1)) / math.log1p(mu)
    return ((companded + 1) / 2 * mu + 0.5).floor().long().clamp(0, mu)


def mu_law_decode(classes: torch.Tensor, levels: int = 256) -> torch.Tensor:
    """The inverse of :func:`mu_law_encode` (up to the quantization)."""
    mu = levels - 1
    companded = classes.float() / mu * 2 - 1
    return torch.sign(companded) * ((1 + mu) ** companded.abs() - 1) / mu




# --------------------------------------------------------------------------------------
# 7. The models behind `course train made / pixelcnn / gated-pixelcnn`
# --------------------------------------------------------------------------------------
VARIANTS = ("made", "pixelcnn", "gated-pixelcnn")  # binary pixels, NLL in nats
GREY_VARIANT = "gated-pixelcnn-grey"                # 16 grey levels (4 bits), NLL in bits/dim
GREY_LEVELS = 16


def pixelcnn_config(budget_name: str | None = None, variant: str = "gated-pixelcnn") -> dict:
    """The autoregressive model ``course train VARIANT`` trains, sized for a budget (JSON-able).

    Binarized MNIST with dynamic binarization for training (a fresh draw of the bits at every
    epoch, like the VAE), and the held-out NLL on the VAE's fixed, seeded binarization of the
    held-out digits, so the numbers of topics 3 and 5 compare. One logit per binary pixel.
    Sized for a 2-core CPU in ``classroom``: few channels at 28x28, where every layer costs.
    """
    from .runtime import by_budget

    if variant not in (*VARIANTS, GREY_VARIANT):
        raise ValueError(f"variant must be one of {(*VARIANTS, GREY_VARIANT)}, not {variant!r}")
    grey = variant == GREY_VARIANT
    gated = variant in ("gated-pixelcnn", GREY_VARIANT)
    cfg = by_budget(
        budget_name,
        # Measured on the 2-core CPU at an equal 150 s of training (held-out nats): the gated
        # layer's extra element-wise work (two gates, the shifts) makes channels dear, and a
        # tall receptive field pays most. 16 channels beat 24 and 32 (94.8 vs 96.7); 7x7 later
        # layers (a 4x7 vertical and a 1x4 horizontal kernel, 25 rows in reach) beat 5x5 and 3x3
        # (87.3, 88.9, 92.2 at 8 layers; 3x3 in 12 layers: 91.1). The plain model's 5x5 blocks
        # beat its 3x3 ones too (91.6 vs 93.8), and stay behind the gated model
        channels=(8, 16, 64) if gated else (8, 32, 96),
        layers=(2, 8, 12) if gated else (2, 7, 12),
        made_hidden=([128], [512, 512], [1024, 1024]),
        # short runs want large steps: at 150 s, lr 8e-3 gave 92.2 nats where 2e-3 gave 94.8 (gated)
        # and 93.8 vs 95.3 (plain); full keeps a conservative rate for its larger networks
        lr=(8e-3, 8e-3, 2e-3) if variant != "made" else (3e-3, 3e-3, 1e-3),
        epochs=(1, 60, 200),
        train_images=(1_000, None, None),
        time_limit=(20, 330, 3600),
        eval_images=(100, 2_000, None),
        samples=(8, 64, 1_000),
    )
    return {
        "model": "gated-pixelcnn" if grey else variant, "channels": cfg.channels, "layers": cfg.layers,
        "kernel_size": 7, "layer_kernel_size": 7 if gated else 5, "made_hidden": cfg.made_hidden,
        "levels": GREY_LEVELS if grey else 2,
        "batch_size": 64, "lr": cfg.lr, "lr_warmup": 0.02,
        "final_lr_factor": 0.02, "epochs": cfg.epochs, "time_limit": cfg.time_limit,
        "train_images": cfg.train_images, "binarize": "none, 16 levels" if grey else "dynamic",
        "eval_binarize_seed": 0,
        "eval_images": cfg.eval_images, "samples": cfg.samples, "budget": cfg.budget,
    }


def course_train_config(budget_name: str | None = None, variant: str = "gated-pixelcnn",
                        seed: int = 0, max_seconds: float | None = None) -> dict:
    """The config exactly as ``course train VARIANT`` completes and caches it (see the VAE's)."""
    from .checkpoints import training_config

    return training_config(pixelcnn_config(budget_name, variant), budget_name, seed=seed,
                           max_seconds=max_seconds)


def build_pixelcnn(config: dict) -> nn.Module:
    """A fresh model from a config, seeded by ``config['seed']``."""
    from .runtime import local_seed

    with local_seed(int(config.get("seed", 0))):
        if config["model"] == "made":
            return MADE(784, tuple(config["made_hidden"]), seed=int(config.get("seed", 0)))
        if config["model"] == "pixelcnn":
            return PixelCNN(config["channels"], config["layers"] - 1, config["kernel_size"],
                            config["layer_kernel_size"], levels=config["levels"],
                            num_classes=config.get("num_classes"))
        return GatedPixelCNN(config["channels"], config["layers"], config["kernel_size"],
                             config["layer_kernel_size"], levels=config["levels"],
                             num_classes=config.get("num_classes"))


def nll_loss(model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
    """``loss_fn`` for :func:`course_utils.training.fit`: the mean NLL in nats per image."""
    x, y = batch
    nll = -log_likelihood(model, x, y if getattr(model, "num_classes", None) else None)
    return nll.mean(), {"bits_per_dim": bits_per_dim(nll.mean().detach(), x[0].numel())}


def train_pixelcnn(model: nn.Module, config: dict, device=None, max_seconds: float | None = None,
                   images=None, labels=None, **fit_kwargs) -> dict:
    """Train with the config's recipe (Adam, warm-up and cosine decay following step and clock)."""
    from .data import BatchLoader, training_tensors
    from .runtime import get_device
    from .training import fit
    from .vae import Progress, lr_factor

    device = torch.device(device) if device is not None else get_device()
    images, labels, description = training_tensors(device, config.get("train_images"), images, labels)
    levels = config.get("levels", 2)
    if levels > 2:  # the classes themselves, no binarization
        images = quantize(images, levels)
    loader = BatchLoader(images.to(device), labels.to(device), batch_size=config["batch_size"],
                         shuffle=True, binarize=levels == 2, seed=config.get("seed", 0))
    limit = max_seconds if max_seconds is not None else config.get("time_limit")
    progress = Progress(config["epochs"] * len(loader), limit)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _: lr_factor(progress(), config["lr_warmup"], config["final_lr_factor"]))
    user_on_step = fit_kwargs.pop("on_step", None)

    def on_step(step, value):
        progress.step = step
        if user_on_step is not None:
            user_on_step(step, value)

    fit_kwargs.setdefault("desc", config["model"])
    result = fit(model, nll_loss, loader, optimizer=optimizer, scheduler=scheduler,
                 epochs=config["epochs"], max_seconds=limit, device=device, on_step=on_step,
                 clip_grad_norm=100.0, **fit_kwargs)
    model.history = result.history
    tail = result.history.losses[-max(1, len(loader)):]
    return {"train_steps": result.step, "train_epochs": round(result.step / len(loader), 2),
            "train_nll_last_epoch": round(sum(tail) / len(tail), 2),
            "train_seconds_fit": round(result.history.seconds, 1),
            "stopped_by": result.history.stopped_by, "train_data": description}


@torch.no_grad()
def held_out_nll(model: nn.Module, images: torch.Tensor, labels=None, batch_size: int = 50) -> float:
    """The mean exact NLL in nats per image over ``images``: binary pixels, or grey-level classes
    (``long``) for a model with ``levels > 2``. Small batches: on a CPU, memory traffic, not
    arithmetic, limits a large batch of 28 x 28 feature maps."""
    total = 0.0
    model.eval()
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        y = labels[start:start + batch_size] if labels is not None else None
        total += float(-log_likelihood(model, x, y).sum())
    return total / len(images)


def evaluate_pixelcnn(model: nn.Module, config: dict, device=None, classifier=None) -> dict:
    """Held-out NLL (nats, and bits/dim) on the VAE's fixed binarization; samples: quality, time.

    ``sample_seconds_64`` times 64 digits drawn the default way (rows cropped; for the gated model
    its vertical stacks once per row) on this machine.
    """
    import time

    from .data import as_tensors, describe, mnist
    from .metrics import load_feature_net, sample_quality
    from .runtime import get_device

    device = torch.device(device) if device is not None else get_device()
    model.to(device).eval()
    levels = config.get("levels", 2)
    if levels > 2:  # grey levels: the held-out digits' classes, nothing drawn
        test_set = mnist("test")
        images, labels = as_tensors(test_set, device, limit=config.get("eval_images"))
        images = quantize(images, levels)
    else:
        test_set = mnist("test", binarize="fixed", binarize_seed=config.get("eval_binarize_seed", 0))
        images, labels = as_tensors(test_set, device, limit=config.get("eval_images"))
    nll = held_out_nll(model, images)
    n = config.get("samples", 64)
    generator = torch.Generator().manual_seed(config.get("seed", 0))
    start = time.perf_counter()
    samples = sample(model, n, generator=generator)
    seconds = time.perf_counter() - start
    if levels > 2:
        samples = dequantize(samples.long(), levels)  # the classifier reads grey levels in [0, 1]
    classifier = classifier or load_feature_net(device=device)
    grey, _ = as_tensors(mnist("test"), device, limit=config.get("eval_images"))
    quality = sample_quality(classifier, samples, grey, kid_subset_size=min(n, len(grey), 1000))
    return {
        "test_nll": round(nll, 2), "test_bits_per_dim": round(bits_per_dim(nll, 784), 4),
        "test_images": len(images),
        "test_data": describe(test_set) + (
            f", {levels} grey levels" if levels > 2
            else f", fixed binarization (seed {config.get('eval_binarize_seed', 0)})"),
        "samples": n, "sample_seconds": round(seconds, 2),
        "sample_seconds_64": round(seconds * 64 / n, 2),
        "confident_fraction": round(quality["confident_fraction"], 4),
        "class_entropy": round(quality["class_entropy"], 4),
        "fid": round(quality["fid"], 2), "kid": round(quality["kid"], 4),
    }


__all__ = [
    "GREY_LEVELS", "GREY_VARIANT", "MADE", "VARIANTS", "CausalConv1d", "GatedLayer", "GatedPixelCNN",
    "MaskedConv2d",    "MaskedLinear", "PixelCNN", "WaveNet", "bits_per_dim", "build_pixelcnn", "causal_mask",
    "complete", "course_train_config", "dependency_map", "dequantize", "evaluate_pixelcnn",
    "future_mask", "held_out_nll", "log_likelihood", "made_masks", "mu_law_decode",
    "mu_law_encode", "nats_per_image", "nll_loss", "pixelcnn_config", "quantize",
    "receptive_field", "sample", "train_pixelcnn",
]
