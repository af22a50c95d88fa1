r"""Topic 6: diffusion models, from DDPM to DDIM, guidance and latent diffusion.

A diffusion model learns to undo a fixed, gradual corruption. The **forward process** adds a
little Gaussian noise at each of ``T`` steps,

.. math::  q(x_t \mid x_{t-1}) = \mathcal N\big(x_t;\ \sqrt{1-\beta_t}\,x_{t-1},\ \beta_t I\big),

with a *schedule* of small variances :math:`\beta_1, \dots, \beta_T`. The seeds never name the
products that everything below uses, so the course defines them once:

.. math::  \alpha_t = 1 - \beta_t, \qquad \bar\alpha_t = \prod_{s=1}^{t} \alpha_s,
           \qquad \sigma_t^2 = \text{the variance of the reverse step } t \to t-1.

Because Gaussians compose, any step is reachable in one jump (the closed form):

.. math::  q(x_t \mid x_0) = \mathcal N\big(x_t;\ \sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t) I\big),
           \qquad x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon.

A network :math:`\varepsilon_\theta(x_t, t)` learns to predict the noise :math:`\varepsilon`
(``L_simple``, Algorithm 1); sampling runs the learned reverse chain from pure noise (Algorithm 2,
DDPM) or a deterministic shortcut through a few of the steps (DDIM).

**Time index.** Papers count ``t = 1..T``; tensors count from 0. Everywhere in this module a
time ``t`` is a *tensor index*: ``t = 0`` is the paper's step 1 (the least noise), ``t = T-1``
the paper's step ``T``. So ``schedule.alpha_bars[t]`` is :math:`\bar\alpha_{t+1}` of the paper,
and "the step before ``t = 0``" is the clean image, with :math:`\bar\alpha = 1`.

Sections: 1. schedules; 2. the forward process and its posterior; 3. parameterizations and
losses; 4. the U-Net; 5. samplers (DDPM, DDIM and its inversion); 6. guidance (classifier and
classifier-free); 7. exact denoisers for known distributions (the samplers' oracle tests);
8. latent diffusion; 9. the registered models ``ddpm`` and ``latent-ddpm``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


# --------------------------------------------------------------------------------------
# 1. Noise schedules
# --------------------------------------------------------------------------------------
class NoiseSchedule:
    r"""The variances :math:`\beta_t` of the forward process and everything derived from them.

    ``kind="linear"`` (DDPM, Ho et al. 2020): :math:`\beta` rises linearly from ``1e-4`` to
    ``0.02`` over 1,000 steps (rescaled by ``1000 / num_steps`` so that any ``T`` destroys the
    signal about as much). ``kind="cosine"`` (Nichol & Dhariwal 2021) defines
    :math:`\bar\alpha` instead,

    .. math::  \bar\alpha_t = f(t)/f(0), \quad f(t) = \cos^2\!\Big(\frac{t/T + s}{1 + s}\,\frac{\pi}{2}\Big),
               \quad s = 0.008,

    and reads :math:`\beta_t = 1 - \bar\alpha_t/\bar\alpha_{t-1}` off it (clipped at 0.999), so
    that the log signal-to-noise ratio falls almost linearly instead of spending the last
    third of the steps on images that are already pure noise.

    Tensors (length ``num_steps``, float64 for exact products; ``.to()`` moves and casts them):
    ``betas``, ``alphas = 1 - betas``, ``alpha_bars = cumprod(alphas)``,
    ``alpha_bars_prev`` (:math:`\bar\alpha_{t-1}`, with 1 before the first step),
    ``posterior_variances`` (:math:`\tilde\beta_t`, see :func:`posterior_mean_variance`).
    """

    def __init__(self, num_steps: int = 1000, kind: str = "linear", *, beta_start: float = 1e-4,
                 beta_end: float = 0.02, cosine_offset: float = 0.008):
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        if kind == "linear":
            scale = 1000 / num_steps
            betas = torch.linspace(beta_start * scale, beta_end * scale, num_steps, dtype=torch.float64)
        elif kind == "cosine":
            steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
            f = torch.cos((steps + cosine_offset) / (1 + cosine_offset) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"kind must be 'linear' or 'cosine', not {kind!r}")
        self.kind, self.num_steps = kind, num_steps
        self._set(betas)

    def _set(self, betas: torch.Tensor) -> None:
        self.betas = betas
        self.alphas = 1 - betas
        self.alpha_bars = torch.cumprod(self.alphas, 0)
        self.alpha_bars_prev = torch.cat([torch.ones_like(betas[:1]), self.alpha_bars[:-1]])
        self.posterior_variances = (1 - self.alpha_bars_prev) / (1 - self.alpha_bars) * betas

    @classmethod
    def from_betas(cls, betas) -> NoiseSchedule:
        """A schedule with the given variances (any kind: the exercises build their own)."""
        schedule = cls.__new__(cls)
        schedule.kind, schedule.num_steps = "custom", len(betas)
        schedule._set(torch.as_tensor(betas, dtype=torch.float64))
        return schedule

    def to(self, device=None, dtype=None) -> NoiseSchedule:
        moved = copy.copy(self)
        for name in ("betas", "alphas", "alpha_bars", "alpha_bars_prev", "posterior_variances"):
            setattr(moved, name, getattr(self, name).to(device=device, dtype=dtype))
        return moved

    def log_snr(self) -> torch.Tensor:
        r"""The log signal-to-noise ratio of :math:`x_t`: :math:`\log \bar\alpha_t / (1 - \bar\alpha_t)`."""
        return torch.log(self.alpha_bars) - torch.log1p(-self.alpha_bars)

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return (f"NoiseSchedule({self.num_steps}, kind={self.kind!r}: alpha_bar from "
                f"{float(self.alpha_bars[0]):.4f} to {float(self.alpha_bars[-1]):.2e})")


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` for a batch of times, shaped to broadcast against ``like`` (B x ...)."""
    t = torch.as_tensor(t, device=values.device).long()
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    out = values[t].to(device=like.device, dtype=like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


# --------------------------------------------------------------------------------------
# 2. The forward process and its posterior
# --------------------------------------------------------------------------------------
def q_sample(x0: torch.Tensor, t, noise: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    r"""Draw :math:`x_t \sim q(x_t \mid x_0)` in one jump:
    :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon`.

    ``t``: a tensor index per image (``B``, long) or one int for all; ``noise``: the
    :math:`\varepsilon` to use, a standard normal tensor shaped like ``x0``.
    """
    alpha_bar = _at(schedule.alpha_bars, t, x0)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def posterior_mean_variance(x0: torch.Tensor, xt: torch.Tensor, t, schedule: NoiseSchedule):
    r"""The reverse step when the clean image is known: :math:`q(x_{t-1} \mid x_t, x_0)`.

    Bayes' rule with two Gaussians, :math:`q(x_t \mid x_{t-1})` and :math:`q(x_{t-1} \mid x_0)`,
    gives another Gaussian (complete the square in :math:`x_{t-1}`):

    .. math::  \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1-\bar\alpha_t}\,x_0
               + \frac{\sqrt{\alpha_t}\,(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}\,x_t, \qquad
               \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\,\beta_t.

    Returns ``(mean, variance)``, the variance shaped to broadcast (B x 1 x ...). At ``t = 0``
    (the paper's step 1) :math:`\bar\alpha_{t-1} = 1`: the mean is ``x0`` and the variance 0.
    """
    beta = _at(schedule.betas, t, xt)
    alpha = _at(schedule.alphas, t, xt)
    alpha_bar = _at(schedule.alpha_bars, t, xt)
    alpha_bar_prev = _at(schedule.alpha_bars_prev, t, xt)
    mean = (alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)) * x0 \
        + (alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)) * xt
    return mean, _at(schedule.posterior_variances, t, xt)


# --------------------------------------------------------------------------------------
# 3. What the network predicts, and the losses
# --------------------------------------------------------------------------------------
def predict_x0(xt: torch.Tensor, t, eps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    r"""Invert the closed form for the clean image:
    :math:`\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}`."""
    alpha_bar = _at(schedule.alpha_bars, t, xt)
    return (xt - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def predict_eps(xt: torch.Tensor, t, x0: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    r"""The noise that takes ``x0`` to ``xt``:
    :math:`(x_t - \sqrt{\bar\alpha_t}\,x_0)/\sqrt{1-\bar\alpha_t}`."""
    alpha_bar = _at(schedule.alpha_bars, t, xt)
    return (xt - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def velocity(x0: torch.Tensor, t, eps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    r"""The v-parameterization (Salimans & Ho 2022): :math:`v = \sqrt{\bar\alpha_t}\,\varepsilon
    - \sqrt{1-\bar\alpha_t}\,x_0`, the velocity of :math:`x_t` on the circle
    :math:`(\sqrt{\bar\alpha_t}, \sqrt{1-\bar\alpha_t})`."""
    alpha_bar = _at(schedule.alpha_bars, t, x0)
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


def x0_eps_from_velocity(xt: torch.Tensor, t, v: torch.Tensor, schedule: NoiseSchedule):
    r"""Back from ``v``: :math:`x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,v` and
    :math:`\varepsilon = \sqrt{1-\bar\alpha_t}\,x_t + \sqrt{\bar\alpha_t}\,v` (a rotation)."""
    alpha_bar = _at(schedule.alpha_bars, t, xt)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return a * xt - s * v, s * xt + a * v


def model_mean(xt: torch.Tensor, t, eps: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    r"""The ε-parameterization of the reverse mean (seed 002):
    :math:`\mu_\theta = \frac{1}{\sqrt{\alpha_t}}\big(x_t
    - \frac{1-\alpha_t}{\sqrt{1-\bar\alpha_t}}\,\hat\varepsilon\big)`,
    which equals :math:`\tilde\mu_t(\hat x_0, x_t)` with :math:`\hat x_0` from :func:`predict_x0`."""
    alpha = _at(schedule.alphas, t, xt)
    alpha_bar = _at(schedule.alpha_bars, t, xt)
    return (xt - (1 - alpha) / (1 - alpha_bar).sqrt() * eps) / alpha.sqrt()


def vlb_weights(schedule: NoiseSchedule, variance: str = "posterior") -> torch.Tensor:
    r"""The weight of :math:`\|\varepsilon - \varepsilon_\theta\|^2` in the bound's term :math:`L_{t-1}`:

    .. math::  L_{t-1} = \frac{\beta_t^2}{2\,\sigma_t^2\,\alpha_t\,(1-\bar\alpha_t)}\;
               \mathbb E\,\|\varepsilon
               - \varepsilon_\theta(\sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\varepsilon, t)\|^2

    (the KL between two Gaussians of equal variance is the squared distance of their means over
    :math:`2\sigma_t^2`; seed 002 writes :math:`(1-\alpha_t)^2` for :math:`\beta_t^2`, and one of its
    slides drops the bars inside :math:`\varepsilon_\theta`: they belong there). ``L_simple`` sets
    every weight to 1. With ``variance="posterior"`` the first weight (:math:`\tilde\beta = 0`)
    is replaced by the second: that term is the decoder :math:`L_0`, not a KL. With the cosine
    schedule the last step's :math:`\beta` is clipped at 0.999, and its weight dwarfs all others
    (about 97 % of the total for T = 1000) on a step whose input is pure noise: one more reason
    to train with ``L_simple``.
    """
    sigma2 = schedule.posterior_variances if variance == "posterior" else schedule.betas
    denominator = 2 * sigma2.clamp(min=1e-20) * schedule.alphas * (1 - schedule.alpha_bars)
    weights = schedule.betas ** 2 / denominator
    if variance == "posterior" and len(weights) > 1:
        weights = weights.clone()
        weights[0] = weights[1]
    return weights


def _discretised_gaussian_log_prob(x0: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                                   levels: int) -> torch.Tensor:
    """``log P(pixel = x0)`` when the pixel is ``N(mean, std^2)`` rounded to the nearest of ``levels``
    evenly spaced values in [-1, 1]: the Gaussian's mass over the pixel's bin, the outer bins open."""
    half_bin = 1.0 / (levels - 1)
    upper = torch.where(x0 > 1 - half_bin, torch.full_like(x0, float("inf")), x0 + half_bin)
    lower = torch.where(x0 < -1 + half_bin, torch.full_like(x0, float("-inf")), x0 - half_bin)
    normal = torch.distributions.Normal(mean.double(), std.double())
    # the larger tail is subtracted from 1 in the complementary form: no cancellation far out
    mass = torch.where(mean.double() < x0.double(),
                       normal.cdf(upper.double()) - normal.cdf(lower.double()),
                       (1 - normal.cdf(lower.double())) - (1 - normal.cdf(upper.double())))
    return mass.clamp(min=1e-30).log().to(x0.dtype)


def nll_bound(eps_model: Callable, x0: torch.Tensor, schedule: NoiseSchedule, *, levels: int = 2,
              t_samples: int | None = None, generator: torch.Generator | None = None) -> dict:
    r"""The variational bound on :math:`-\log p_\theta(x_0)`, in nats per example.

    For data on ``levels`` evenly spaced values in [-1, 1] (2: binarized pixels as -1 and +1),
    the ancestral sampler with :math:`\sigma_t^2 = \tilde\beta_t` defines a likelihood whose
    negative log is bounded by (the paper's indices; the code's index is one less)

    .. math::  L_T + \sum_{t=2}^{T} L_{t-1} + L_0, \qquad
               L_T = \mathrm{KL}\big(q(x_T \mid x_0)\,\|\,\mathcal N(0, I)\big),\quad
               L_{t-1} = \frac{\|\tilde\mu_t(x_t, x_0) - \mu_\theta(x_t, t)\|^2}{2\tilde\beta_t},

    with :math:`x_t \sim q(x_t \mid x_0)` (one draw per term), and the decoder
    :math:`L_0 = -\log p_\theta(x_0 \mid x_1)`: :math:`\mathcal N(\mu_\theta(x_1, 1), \beta_1)` integrated
    over each pixel's bin (Ho et al.'s discretised decoder). The :math:`T-1` KL terms are all
    computed (``t_samples=None``) or estimated from ``t_samples`` times per example, stratified
    over the steps: :math:`(T-1)/K \sum_k L_{t_k - 1}`, unbiased. Returns the per-example
    tensors ``prior``, ``diffusion`` (the KL sum), ``decoder`` and ``total``.
    """
    n, T = len(x0), schedule.num_steps
    flat_sum = lambda v: v.flatten(1).sum(1)  # noqa: E731  (nats of all dimensions of an example)

    def noised(t):
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        return q_sample(x0, t, noise, schedule)

    last = torch.full((n,), T - 1, dtype=torch.long, device=x0.device)
    prior_mean = _at(schedule.alpha_bars, last, x0).sqrt() * x0
    prior_var = 1 - _at(schedule.alpha_bars, last, x0)
    prior = flat_sum(0.5 * (prior_mean ** 2 + prior_var - 1 - prior_var.log()).expand_as(x0))

    if t_samples is None:
        times = torch.arange(1, T).repeat(n, 1)
    else:  # stratified: one time from each of K equal slices of 1..T-1, independently per example
        edges = torch.linspace(1, T, t_samples + 1)
        u = torch.rand(n, t_samples, generator=generator)
        times = (edges[:-1] + u * (edges[1:] - edges[:-1])).long().clamp(1, T - 1)
    diffusion = torch.zeros(n, dtype=x0.dtype, device=x0.device)
    for column in range(times.shape[1]):
        t = times[:, column].to(x0.device)
        xt = noised(t)
        true_mean, variance = posterior_mean_variance(x0, xt, t, schedule)
        mean = model_mean(xt, t, eps_model(xt, t), schedule)
        diffusion += flat_sum((true_mean - mean) ** 2 / (2 * variance))
    diffusion *= (T - 1) / times.shape[1]

    first = torch.zeros(n, dtype=torch.long, device=x0.device)
    x1 = noised(first)
    mean = model_mean(x1, first, eps_model(x1, first), schedule)
    std = _at(schedule.betas, first, x0).sqrt().expand_as(x0)
    decoder = -flat_sum(_discretised_gaussian_log_prob(x0, mean, std, levels))
    return {"prior": prior, "diffusion": diffusion, "decoder": decoder, "total": prior + diffusion + decoder}


def ddpm_loss(model: Callable, x0: torch.Tensor, schedule: NoiseSchedule, y: torch.Tensor | None = None,
              *, label_dropout: float = 0.0, weighting: str = "simple",
              generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Algorithm 1's loss on a batch: :math:`\mathbb E_{t, \varepsilon}\,
    \|\varepsilon - \varepsilon_\theta(\sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\varepsilon, t)\|^2`.

    ``t`` is drawn uniformly from the ``T`` steps, one per image; the squared error is averaged
    over pixels (``L_simple``), or weighted by :func:`vlb_weights` (``weighting="vlb"``, the
    bound's weights normalised to mean 1). Classifier-free guidance trains one network for both
    the conditional and the unconditional model: with ``label_dropout`` = p, each label is
    replaced by the *null label* (``model.num_classes``) with probability p.
    """
    n = x0.shape[0]
    t = torch.randint(0, schedule.num_steps, (n,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    xt = q_sample(x0, t, noise, schedule)
    if y is not None and label_dropout > 0:
        dropped = torch.rand(n, generator=generator).to(x0.device) < label_dropout
        y = torch.where(dropped, torch.full_like(y, model.num_classes), y)
    eps = model(xt, t, y) if y is not None else model(xt, t)
    per_image = (noise - eps).pow(2).flatten(1).mean(1)
    if weighting == "vlb":
        weights = vlb_weights(schedule)
        per_image = per_image * (weights / weights.mean()).to(x0.device, x0.dtype)[t]
    elif weighting != "simple":
        raise ValueError(f"weighting must be 'simple' or 'vlb', not {weighting!r}")
    return per_image.mean()


# --------------------------------------------------------------------------------------
# 4. A small U-Net with a sinusoidal time embedding
# --------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    r"""Sinusoidal features of the time (the Transformer's positions):
    :math:`[\cos(t\,\omega_k), \sin(t\,\omega_k)]`, :math:`\omega_k = \text{max\_period}^{-k/(d/2)}`.

    Nearby times get nearby vectors and every frequency from one cycle per step to one per
    ``max_period`` steps is present, so an MLP on top can represent any smooth function of t.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(embedding, (0, dim % 2))


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time (and class) embedding added in between, plus a skip."""

    def __init__(self, c_in: int, c_out: int, embedding_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.embed = nn.Linear(embedding_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early steps
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.embed(embedding)[:, :, None, None]  # "which step is this": a per-channel shift
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a small feature map (7 x 7 here): global
    context that convolutions at 28 x 28 would need many layers to reach."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        out, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    r"""The noise predictor :math:`\varepsilon_\theta(x_t, t, y)` for 28 x 28 images.

    An encoder halves the resolution at each level (28 -> 14 -> 7 for three levels) while the
    channels grow; a decoder mirrors it, concatenating the encoder's features of the same size
    (the U's skip connections carry the fine detail that the bottleneck cannot); every residual
    block receives the embedding of the time (sinusoidal, then an MLP) and, when
    ``num_classes`` is set, of the class. The embedding table has ``num_classes + 1`` rows: the
    last is the **null label** that classifier-free guidance trains with and samples the
    unconditional model with (``y=None`` means the null label).

    ``channels``: per level; ``blocks``: residual blocks per level; ``attention``: a
    self-attention layer at the lowest resolution. The output convolution starts at zero, so
    the untrained network predicts no noise.
    """

    def __init__(self, in_channels: int = 1, channels=(32, 64, 64), blocks: int = 1,
                 num_classes: int | None = None, attention: bool = True):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.channels = tuple(channels)
        base = self.channels[0]
        embedding_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, embedding_dim), nn.SiLU(),
                                      nn.Linear(embedding_dim, embedding_dim))
        self.class_embedding = nn.Embedding(num_classes + 1, embedding_dim) if num_classes else None
        self.stem = nn.Conv2d(in_channels, base, 3, padding=1)
        self.down_blocks, self.downsamples = nn.ModuleList(), nn.ModuleList()
        c_prev, skips = base, []
        for level, c in enumerate(self.channels):
            for _ in range(blocks):
                self.down_blocks.append(ResidualBlock(c_prev, c, embedding_dim))
                c_prev = c
                skips.append(c)
            last = level == len(self.channels) - 1
            self.downsamples.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.middle = nn.ModuleList([ResidualBlock(c_prev, c_prev, embedding_dim),
                                     ResidualBlock(c_prev, c_prev, embedding_dim)])
        self.attention = SelfAttention(c_prev) if attention else nn.Identity()
        self.up_blocks, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for level, c in reversed(list(enumerate(self.channels))):
            for _ in range(blocks):
                self.up_blocks.append(ResidualBlock(c_prev + skips.pop(), c, embedding_dim))
                c_prev = c
            self.upsamples.append(nn.Conv2d(c, self.channels[level - 1], 3, padding=1)
                                  if level > 0 else nn.Identity())
            c_prev = self.channels[level - 1] if level > 0 else c
        self.blocks = blocks
        self.out_norm = nn.GroupNorm(_groups(base), base)
        self.out = nn.Conv2d(base, in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.stem.weight.device)
        if t.dim() == 0:
            t = t.expand(batch)
        embedding = self.time_mlp(timestep_embedding(t, self.channels[0]))
        if self.class_embedding is not None:
            if y is None:
                y = torch.full((batch,), self.num_classes, device=embedding.device, dtype=torch.long)
            embedding = embedding + self.class_embedding(y)
        return embedding

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        embedding = self.embed(t, y, x.shape[0])
        h = self.stem(x)
        skips, blocks = [], iter(self.down_blocks)
        for downsample in self.downsamples:
            for _ in range(self.blocks):
                h = next(blocks)(h, embedding)
                skips.append(h)
            h = downsample(h)
        h = self.middle[0](h, embedding)
        h = self.attention(h)
        h = self.middle[1](h, embedding)
        blocks = iter(self.up_blocks)
        for upsample in self.upsamples:
            for _ in range(self.blocks):
                h = next(blocks)(torch.cat([h, skips.pop()], 1), embedding)
            if not isinstance(upsample, nn.Identity):
                h = upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))


class MLPDenoiser(nn.Module):
    r""":math:`\varepsilon_\theta(z_t, t, y)` for vectors (a latent code, or 2-D toy data):
    residual MLP blocks, each told the time (and class) embedding."""

    def __init__(self, dim: int, hidden: int = 256, layers: int = 3, num_classes: int | None = None):
        super().__init__()
        self.dim, self.hidden, self.num_classes = dim, hidden, num_classes
        self.time_mlp = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embedding = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList([nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                                     for _ in range(layers)])
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device)
        if t.dim() == 0:
            t = t.expand(z.shape[0])
        embedding = self.time_mlp(timestep_embedding(t, 64))
        if self.class_embedding is not None:
            if y is None:
                y = torch.full((z.shape[0],), self.num_classes, device=z.device, dtype=torch.long)
            embedding = embedding + self.class_embedding(y)
        h = self.inp(z)
        for layer in self.layers:
            h = h + layer(h + embedding)
        return self.out(h)


# --------------------------------------------------------------------------------------
# 5. Samplers
# --------------------------------------------------------------------------------------
def _progress(iterable, show: bool | None, desc: str, total: int):
    from tqdm.auto import tqdm

    from .runtime import in_ci

    show = (not in_ci()) if show is None else show
    return tqdm(iterable, desc=desc, total=total, disable=not show, leave=False)


def _start(shape, x_T, generator, device) -> torch.Tensor:
    if x_T is not None:
        return x_T.clone()
    return torch.randn(tuple(shape), generator=generator).to(device)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def ddpm_sample(model: Callable, schedule: NoiseSchedule, shape, *, x_T: torch.Tensor | None = None,
                generator: torch.Generator | None = None, clip_x0: float | None = None,
                variance: str = "posterior", return_trajectory: bool = False,
                progress: bool | None = None, device=None):
    r"""Algorithm 2 (ancestral sampling): from :math:`x_T \sim \mathcal N(0, I)`, for each step
    from the last to the first,

    .. math::  x_{t-1} = \mu_\theta(x_t, t) + \sigma_t z, \qquad z \sim \mathcal N(0, I)
               \text{ except at the last step, where } z = 0,

    with :math:`\sigma_t^2 = \tilde\beta_t` (``variance="posterior"``: the exact variance when
    the data is a point) or :math:`\beta_t` (``"beta"``: the exact one when the data is
    :math:`\mathcal N(0, I)`; DDPM found both work). ``model(x_t, t)`` predicts the noise
    (wrap a conditional model with :func:`conditional`). ``clip_x0``: clip the implied
    :math:`\hat x_0` to ``[-clip, clip]`` and take the posterior mean around it (images live
    in [-1, 1]; the unclipped mean is :func:`model_mean`).

    Returns :math:`x_0`, or ``(x_0, trajectory)`` with ``trajectory`` a list of
    ``(t, x_t, x0_hat)`` on the CPU for every step.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    x = _start(shape, x_T, generator, device)
    trajectory = []
    steps = range(schedule.num_steps - 1, -1, -1)
    for t in _progress(steps, progress, "DDPM", schedule.num_steps):
        t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        eps = model(x, t_batch)
        x0_hat = predict_x0(x, t_batch, eps, schedule)
        if clip_x0 is not None:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
            mean, _ = posterior_mean_variance(x0_hat, x, t_batch, schedule)
        else:
            mean = model_mean(x, t_batch, eps, schedule)
        if return_trajectory:
            trajectory.append((t, x.cpu(), x0_hat.cpu()))
        if t > 0:  # no noise is added at the last step: x_0 is the mean
            var = schedule.posterior_variances if variance == "posterior" else schedule.betas
            noise = torch.randn(x.shape, generator=generator).to(device)
            x = mean + _at(var, t_batch, x).sqrt() * noise
        else:
            x = mean
    return (x, trajectory) if return_trajectory else x


def ddim_timesteps(num_steps: int, steps: int) -> torch.Tensor:
    """The ``steps`` times DDIM visits, evenly spaced from the last (``T-1``) down to 0."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"steps must be between 1 and {num_steps}, got {steps}")
    return torch.linspace(num_steps - 1, 0, steps).round().long()


def ddim_step(xt: torch.Tensor, t, t_prev, eps: torch.Tensor, schedule: NoiseSchedule,
              eta: float = 0.0, noise: torch.Tensor | None = None, clip_x0: float | None = None):
    r"""One DDIM update from time ``t`` to an earlier time ``t_prev`` (``-1``: the clean image).

    .. math::  x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0
               + \sqrt{1-\bar\alpha_{t'}-\sigma^2}\;\hat\varepsilon + \sigma z, \qquad
               \sigma = \eta\,\sqrt{\frac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}}
                        \sqrt{1-\frac{\bar\alpha_t}{\bar\alpha_{t'}}}

    It keeps the same marginals :math:`q(x_t \mid x_0)` as DDPM for any ``eta``: ``eta = 1``
    over consecutive steps *is* DDPM's step (with :math:`\sigma^2 = \tilde\beta_t`); ``eta = 0``
    adds no noise at all, so the whole chain is a deterministic function of :math:`x_T`.
    Returns ``(x_t_prev, x0_hat)``.
    """
    alpha_bar = _at(schedule.alpha_bars, t, xt)
    t_prev = torch.as_tensor(t_prev)
    alpha_bar_prev = (torch.ones_like(alpha_bar) if int(t_prev.max()) < 0
                      else _at(schedule.alpha_bars, t_prev.clamp(min=0), xt))
    x0_hat = predict_x0(xt, t, eps, schedule)
    if clip_x0 is not None:  # keep the prediction in the data's range, and the noise consistent
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        eps = predict_eps(xt, t, x0_hat, schedule)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    sigma = eta * variance.clamp(min=0).sqrt()
    x_prev = alpha_bar_prev.sqrt() * x0_hat + (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    if eta > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, x0_hat


@torch.no_grad()
def ddim_sample(model: Callable, schedule: NoiseSchedule, shape, steps: int = 50, *, eta: float = 0.0,
                x_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
                clip_x0: float | None = None, return_trajectory: bool = False,
                progress: bool | None = None, device=None):
    r"""DDIM sampling (Song et al. 2021) through ``steps`` of the ``T`` times
    (:func:`ddim_timesteps`), one :func:`ddim_step` each, the last one to the clean image.

    The network is the same one DDPM trained: only the sampler changes. ``eta = 0``: a
    deterministic map from :math:`x_T` (see :func:`ddim_invert`); ``eta = 1``: DDPM-like noise.
    Returns :math:`x_0`, or ``(x_0, trajectory)`` as :func:`ddpm_sample`.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    x = _start(shape, x_T, generator, device)
    times = ddim_timesteps(schedule.num_steps, steps).tolist()
    trajectory = []
    for i in _progress(range(len(times)), progress, "DDIM", len(times)):
        t, t_prev = times[i], (times[i + 1] if i + 1 < len(times) else -1)
        t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        eps = model(x, t_batch)
        noise = torch.randn(x.shape, generator=generator).to(device) if eta > 0 and t_prev >= 0 else None
        x_next, x0_hat = ddim_step(x, t_batch, t_prev, eps, schedule, eta, noise, clip_x0)
        if return_trajectory:
            trajectory.append((t, x.cpu(), x0_hat.cpu()))
        x = x_next
    return (x, trajectory) if return_trajectory else x


@torch.no_grad()
def ddim_invert(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, steps: int = 50,
                progress: bool | None = None) -> torch.Tensor:
    r"""Run DDIM (``eta = 0``) backwards: an image's :math:`x_T`, its *encoding*.

    DDIM's step is an ODE's Euler step; taken in the other direction (from ``t'`` up to ``t``,
    with the noise predicted at the current point) it retraces the path, so
    ``ddim_sample(model, schedule, x0.shape, steps, x_T=ddim_invert(model, schedule, x0, steps))``
    gives ``x0`` back, up to the discretisation error (small for enough steps).
    """
    times = ddim_timesteps(schedule.num_steps, steps).flip(0).tolist()  # 0 ... T-1
    x = x0.clone()
    device = x.device
    for i in _progress(range(len(times)), progress, "DDIM inversion", len(times)):
        t, t_prev = times[i], (times[i - 1] if i > 0 else -1)
        # from t_prev (less noise) up to t: the noise is predicted where we stand
        t_here = torch.full((x.shape[0],), max(t_prev, 0), device=device, dtype=torch.long)
        eps = model(x, t_here)
        alpha_bar_here = (torch.ones((), device=device, dtype=x.dtype) if t_prev < 0
                          else _at(schedule.alpha_bars, t_here, x))
        x0_hat = (x - (1 - alpha_bar_here).sqrt() * eps) / alpha_bar_here.sqrt()
        alpha_bar = _at(schedule.alpha_bars, torch.full_like(t_here, t), x)
        x = alpha_bar.sqrt() * x0_hat + (1 - alpha_bar).sqrt() * eps
    return x


# --------------------------------------------------------------------------------------
# 6. Guidance
# --------------------------------------------------------------------------------------
def cfg_combine(eps_conditional: torch.Tensor, eps_unconditional: torch.Tensor,
                scale: float) -> torch.Tensor:
    r"""Classifier-free guidance (Ho & Salimans 2022):

    .. math::  \hat\varepsilon = \varepsilon_\theta(x_t, \varnothing)
               + s\,\big(\varepsilon_\theta(x_t, y) - \varepsilon_\theta(x_t, \varnothing)\big)

    ``s = 0`` is the unconditional model, ``s = 1`` the conditional one, ``s > 1`` pushes
    further along the direction that the label adds. Since
    :math:`-\varepsilon/\sqrt{1-\bar\alpha_t}` is the score, this is the score of
    :math:`p(x_t)\,p(y \mid x_t)^{s}` with the classifier *implied* by the two models
    (Bayes: :math:`p(y \mid x_t) \propto p(x_t \mid y)/p(x_t)`). The paper writes
    :math:`(1+w)\,\varepsilon(y) - w\,\varepsilon(\varnothing)`: the same with ``s = 1 + w``.
    """
    return eps_unconditional + scale * (eps_conditional - eps_unconditional)


def conditional(model: nn.Module, y: torch.Tensor | None, guidance_scale: float = 1.0) -> Callable:
    """A noise predictor ``(x_t, t) -> eps`` for the samplers, from a class-conditional model.

    ``y=None`` samples the unconditional model (the null label); otherwise ``guidance_scale``
    is classifier-free guidance's ``s`` (:func:`cfg_combine`; 1 is plain conditioning), the two
    predictions computed in one batch.
    """
    null = getattr(model, "num_classes", None)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if y is None:
            return model(x, t, None) if null else model(x, t)
        labels = y.to(x.device)
        if guidance_scale == 1.0:
            return model(x, t, labels)
        both = model(torch.cat([x, x]), torch.cat([t, t]),
                     torch.cat([labels, torch.full_like(labels, null)]))
        eps_conditional, eps_unconditional = both.chunk(2)
        return cfg_combine(eps_conditional, eps_unconditional, guidance_scale)

    eps.parameters = model.parameters  # the samplers find the device through it
    return eps


class NoisyClassifier(nn.Module):
    r""":math:`p_\phi(y \mid x_t, t)`: a small CNN that classifies *noised* images, told the time.

    A classifier trained on clean digits is useless on :math:`x_t`: classifier guidance needs one
    trained on :math:`q(x_t \mid x_0)` at every ``t`` (:func:`noisy_classifier_loss`).
    """

    def __init__(self, channels=(32, 64), num_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(nn.Linear(32, c2), nn.SiLU(), nn.Linear(c2, c2))
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(c2, num_classes))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        h = F.silu(self.conv1(x))
        h = F.silu(self.conv2(h))
        h = self.conv3(h + self.time_mlp(timestep_embedding(t, 32))[:, :, None, None])
        return self.head(F.silu(h).mean((2, 3)))


def noisy_classifier_loss(classifier: nn.Module, x0: torch.Tensor, y: torch.Tensor,
                          schedule: NoiseSchedule, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy of the classifier on :math:`x_t` drawn at a uniform random ``t``."""
    t = torch.randint(0, schedule.num_steps, (len(x0),), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    return F.cross_entropy(classifier(q_sample(x0, t, noise, schedule), t), y)


def classifier_guided(model: Callable, classifier: nn.Module, y: torch.Tensor,
                      schedule: NoiseSchedule, scale: float = 1.0) -> Callable:
    r"""Classifier guidance as seed 002 writes it (Dhariwal & Nichol 2021):

    .. math::  \hat\varepsilon(x_t) = \varepsilon_\theta(x_t)
               - s\,\sqrt{1-\bar\alpha_t}\;\nabla_{x_t} \log p_\phi(y \mid x_t)

    The score of :math:`p(x_t \mid y) \propto p(x_t)\,p(y \mid x_t)` is the unconditional score
    plus the classifier's gradient; the score is :math:`-\varepsilon/\sqrt{1-\bar\alpha_t}`,
    hence the factor. ``scale`` = s sharpens :math:`p(y \mid x_t)` to its s-th power. Returns a
    noise predictor for the samplers (``model(x_t, t)``: an unconditional one).
    """

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=1)
            chosen = log_probs[torch.arange(len(x)), y.to(x.device)].sum()
            gradient, = torch.autograd.grad(chosen, x_in)
        alpha_bar = _at(schedule.alpha_bars, t, x)
        return model(x, t) - scale * (1 - alpha_bar).sqrt() * gradient

    if hasattr(model, "parameters"):  # the samplers find the device through it
        eps.parameters = model.parameters
    return eps


# --------------------------------------------------------------------------------------
# 7. Exact denoisers for known distributions (oracles for the samplers)
# --------------------------------------------------------------------------------------
class GaussianMixtureDenoiser(nn.Module):
    r"""The *exact* noise predictor for data from a Gaussian mixture (a point mass: ``stds=0``).

    If :math:`x_0 \sim \sum_k \pi_k \mathcal N(\mu_k, s_k^2 I)`, then
    :math:`x_t \sim \sum_k \pi_k
    \mathcal N(\sqrt{\bar\alpha_t}\mu_k, (\bar\alpha_t s_k^2 + 1 - \bar\alpha_t) I)`,
    whose score is known in closed form; the optimal :math:`\varepsilon_\theta` is
    :math:`-\sqrt{1-\bar\alpha_t}\,\nabla \log q(x_t)`:

    .. math::  \varepsilon^*(x_t, t) = \sqrt{1-\bar\alpha_t}\;\sum_k r_k(x_t)\,
               \frac{x_t - \sqrt{\bar\alpha_t}\mu_k}{\bar\alpha_t s_k^2 + 1 - \bar\alpha_t},

    :math:`r_k` the posterior responsibility of component k. A sampler driven by it must
    reproduce the mixture: the tests and the lecture check DDPM and DDIM that way.
    """

    def __init__(self, means, stds=0.0, weights=None, schedule: NoiseSchedule | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        self.register_buffer("means", means.reshape(len(means), -1))
        k = len(means)
        self.register_buffer("stds", torch.as_tensor(stds, dtype=torch.float64).expand(k).clone())
        weights = torch.full((k,), 1 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.shape = tuple(means.shape[1:])
        self.schedule = schedule
        self.num_classes = k  # the components play the classes: label k is component k

    def _noised_components(self, x: torch.Tensor, t):
        flat = x.reshape(len(x), -1).double()
        alpha_bar = self.schedule.alpha_bars.to(x.device)[torch.as_tensor(t, device=x.device).long()]
        alpha_bar = alpha_bar.expand(len(x))[:, None]                                   # B x 1
        variances = alpha_bar * self.stds[None] ** 2 + (1 - alpha_bar)                   # B x K
        centred = flat[:, None, :] - alpha_bar.sqrt()[:, :, None] * self.means[None]    # B x K x D
        log_joint = (self.log_weights[None] - 0.5 * centred.pow(2).sum(-1) / variances
                     - 0.5 * flat.shape[1] * variances.log())
        return alpha_bar, variances, centred, log_joint

    def component_logits(self, x: torch.Tensor, t) -> torch.Tensor:
        """``log p(k | x_t)`` up to a constant: the exact noise-aware classifier of the components
        (B x K), for classifier guidance with a known answer."""
        return self._noised_components(x, t)[3].to(x.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The exact noise; with labels ``y``, the exact noise of component ``y`` alone."""
        alpha_bar, variances, centred, log_joint = self._noised_components(x, t)
        resp = log_joint.softmax(1)
        if y is not None:  # the null label (``num_classes``) keeps the whole mixture
            y = torch.as_tensor(y, device=x.device).long().expand(len(x))
            one_component = F.one_hot(y.clamp(max=self.num_classes - 1), self.num_classes).double()
            resp = torch.where((y < self.num_classes)[:, None], one_component, resp)
        eps = (1 - alpha_bar).sqrt() * (resp[:, :, None] * centred / variances[:, :, None]).sum(1)
        return eps.to(x.dtype).reshape(x.shape)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` points of the mixture itself (for comparisons)."""
        component = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn((n, self.means.shape[1]), generator=generator, dtype=torch.float64)
        points = self.means[component] + self.stds[component, None] * noise
        return points.float().reshape(n, *self.shape)


# --------------------------------------------------------------------------------------
# 8. The denoiser with its schedule and EMA; latent diffusion
# --------------------------------------------------------------------------------------
def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] to the [-1, 1] the diffusion runs in (noise is N(0, 1), centred)."""
    return images * 2 - 1


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Back to [0, 1], clipped."""
    return ((x + 1) / 2).clamp(0, 1)


class Diffusion(nn.Module):
    """A noise predictor (``net``), its EMA copy (``ema_net``, what samples) and its schedule.

    ``sample(n or labels, steps=50, method="ddim", eta=0.0, guidance_scale=1.0)`` returns
    images in [0, 1]; labels need a class-conditional ``net``; ``steps=None`` with
    ``method="ddpm"`` runs all ``T`` steps.
    """

    sample_shape = (1, 28, 28)  # one MNIST digit; LatentDiffusion passes its code's shape instead

    def __init__(self, net: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self.net, self.schedule = net, schedule
        self.ema_net = copy.deepcopy(net).eval()
        for p in self.ema_net.parameters():
            p.requires_grad_(False)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.net, "num_classes", None)

    def forward(self, x, t, y=None):
        return self.net(x, t, y)

    def denoiser(self, y: torch.Tensor | None = None, guidance_scale: float = 1.0) -> Callable:
        """The EMA network as a sampler's noise predictor (conditioned and guided as asked)."""
        return conditional(self.ema_net, y, guidance_scale)

    @torch.no_grad()
    def sample_model_range(self, n_or_labels, steps: int | None = 50, method: str = "ddim",
                           eta: float = 0.0, guidance_scale: float = 1.0, generator=None,
                           shape=None, progress: bool | None = None, **kwargs):
        labels = n_or_labels if torch.is_tensor(n_or_labels) else None
        n = len(labels) if labels is not None else int(n_or_labels)
        shape = (n, *(shape or self.sample_shape))
        schedule = self.schedule.to(_device_of(self.ema_net), torch.float32)
        eps = self.denoiser(labels, guidance_scale)
        if method == "ddpm":
            return ddpm_sample(eps, schedule, shape, generator=generator, progress=progress, **kwargs)
        if method != "ddim":
            raise ValueError(f"method must be 'ddim' or 'ddpm', not {method!r}")
        return ddim_sample(eps, schedule, shape, steps or self.schedule.num_steps, eta=eta,
                           generator=generator, progress=progress, **kwargs)

    def sample(self, n_or_labels, steps: int | None = 50, method: str = "ddim", eta: float = 0.0,
               guidance_scale: float = 1.0, generator=None, progress: bool | None = None) -> torch.Tensor:
        x = self.sample_model_range(n_or_labels, steps, method, eta, guidance_scale, generator,
                                    progress=progress, clip_x0=1.0)
        return to_pixels(x)


class LatentDiffusion(nn.Module):
    r"""Diffusion in an autoencoder's latent space (Rombach et al. 2022), with the topic-3 VAE.

    The VAE's encoder maps a digit to the mean of :math:`q(z \mid x)` (32 numbers instead of
    784); the codes are standardised (``latent_mean``, ``latent_std``) so that the forward
    process's :math:`\mathcal N(0, I)` end matches their scale; a small MLP denoiser learns
    their distribution with exactly the same loss and samplers; the VAE's decoder turns sampled
    codes back into digits. Each step costs an MLP on 32 numbers instead of a U-Net on 784
    pixels.
    """

    def __init__(self, autoencoder: nn.Module, diffusion: Diffusion):
        super().__init__()
        self.autoencoder, self.diffusion = autoencoder, diffusion
        for p in self.autoencoder.parameters():
            p.requires_grad_(False)
        dim = diffusion.net.dim
        self.register_buffer("latent_mean", torch.zeros(dim))
        self.register_buffer("latent_std", torch.ones(dim))

    @property
    def num_classes(self) -> int | None:
        return self.diffusion.num_classes

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Digits in [0, 1] -> standardised latent codes (the posterior means)."""
        mu, _ = self.autoencoder.encode(images)
        return (mu - self.latent_mean) / self.latent_std

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Standardised codes -> digits in [0, 1] (the decoder's Bernoulli means)."""
        logits = self.autoencoder.decode(codes * self.latent_std + self.latent_mean)
        return self.autoencoder.mean_image(logits)

    @torch.no_grad()
    def sample(self, n_or_labels, steps: int | None = 50, method: str = "ddim", eta: float = 0.0,
               guidance_scale: float = 1.0, generator=None, progress: bool | None = None) -> torch.Tensor:
        codes = self.diffusion.sample_model_range(n_or_labels, steps, method, eta, guidance_scale,
                                                  generator, shape=(self.diffusion.net.dim,),
                                                  progress=progress)
        return self.decode(codes).reshape(-1, 1, 28, 28)


# --------------------------------------------------------------------------------------
# 9. The registered models: `course train ddpm` and `course train latent-ddpm`
# --------------------------------------------------------------------------------------
VARIANTS = ("ddpm", "ddpm-binary", "latent-ddpm")


def diffusion_config(budget_name: str | None = None, variant: str = "ddpm") -> dict:
    """The diffusion model ``course train VARIANT`` trains, sized for a budget (JSON-able).

    ``ddpm``: the U-Net in pixel space, class-conditional with label dropout 0.2, so that the
    one network is the unconditional model (the null label), the conditional one and, combined,
    classifier-free guidance. ``latent-ddpm``: an MLP denoiser in the latent space of the
    topic-3 VAE (``course train vae``'s checkpoint; trained first when missing). Both: cosine
    schedule over 1,000 steps, ``L_simple``, Adam with warm-up and cosine decay following step
    and clock, an EMA of the weights (what samples). ``eval_samples`` samples with
    ``eval_steps`` DDIM steps are scored against as many held-out digits.
    """
    from .runtime import by_budget

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    cfg = by_budget(
        budget_name,
        channels=([16, 32, 32], [24, 48, 64], [64, 128, 128]),
        blocks=(1, 1, 2),
        latent_hidden=(128, 512, 1024),
        latent_layers=(2, 4, 6),
        latent_steps=(40, 20_000, 100_000),
        latent_time_limit=(20, 240, 1800),
        steps=(40, 30_000, 100_000),
        time_limit=(20, 480, 3600),
        train_images=(2_000, None, None),
        eval_samples=(200, 2000, 10_000),
        guided_samples=(100, 500, 2000),
        eval_steps=(10, 50, 100),
        bound_images=(100, 2000, 2000),
        bound_t_samples=(4, 16, 100),
    )
    config = {
        "model": "Diffusion", "variant": variant, "schedule": "cosine", "num_steps": 1000,
        "num_classes": 10, "label_dropout": 0.2, "weighting": "simple",
        "channels": cfg.channels, "blocks": cfg.blocks, "attention": True,
        "batch_size": 64, "lr": 2e-3, "lr_warmup": 0.02, "final_lr_factor": 0.05,
        "ema_decay": 0.999, "steps": cfg.steps, "time_limit": cfg.time_limit,
        "train_images": cfg.train_images, "eval_samples": cfg.eval_samples,
        "guided_samples": cfg.guided_samples, "eval_steps": cfg.eval_steps, "guidance_scale": 3.0,
        "budget": cfg.budget,
    }
    if variant == "ddpm-binary":  # binarized digits as -1/+1, so its bound compares with MADE's
        config.update(binarize="dynamic", eval_binarize_seed=0, bound_images=cfg.bound_images,
                      bound_t_samples=cfg.bound_t_samples)
    if variant == "latent-ddpm":
        config.update(model="LatentDiffusion", latent_hidden=cfg.latent_hidden,
                      latent_layers=cfg.latent_layers, batch_size=256, lr=1e-3,
                      steps=cfg.latent_steps, time_limit=cfg.latent_time_limit,
                      channels=None, blocks=None, attention=None)
        config["autoencoder"] = "vae"
    return config


def course_train_config(budget_name: str | None = None, variant: str = "ddpm", seed: int = 0,
                        max_seconds: float | None = None) -> dict:
    """The config exactly as ``course train VARIANT`` completes and caches it."""
    from .checkpoints import training_config

    return training_config(diffusion_config(budget_name, variant), budget_name, seed=seed,
                           max_seconds=max_seconds)


def _schedule(config: dict) -> NoiseSchedule:
    return NoiseSchedule(config["num_steps"], config["schedule"])


def _vae_config(config: dict) -> dict:
    from .vae import course_train_config as vae_train_config

    return vae_train_config(config.get("budget"), seed=int(config.get("seed", 0)))


def build_diffusion(config: dict) -> nn.Module:
    """A fresh model from a config, seeded by ``config['seed']``: :class:`Diffusion` or
    :class:`LatentDiffusion` (its VAE freshly built too: training loads the trained one)."""
    from .runtime import local_seed

    with local_seed(int(config.get("seed", 0))):
        if config["model"] == "LatentDiffusion":
            from .vae import build_vae

            vae_config = _vae_config(config)
            net = MLPDenoiser(vae_config["latent_dim"], config["latent_hidden"], config["latent_layers"],
                              num_classes=config.get("num_classes"))
            return LatentDiffusion(build_vae(vae_config), Diffusion(net, _schedule(config)))
        net = UNet(1, config["channels"], config["blocks"], num_classes=config.get("num_classes"),
                   attention=config.get("attention", True))
        return Diffusion(net, _schedule(config))


def _trained_vae(config: dict, device, max_seconds: float | None = None) -> nn.Module:
    """The topic-3 VAE that ``course train vae`` caches for this budget; trained if missing
    (for ``max_seconds``, else its own time limit) and then cached under the same name."""
    from .checkpoints import load_or_train
    from .vae import build_vae, train_vae

    vae_config = _vae_config(config)
    vae, _ = load_or_train("vae", vae_config, build_vae(vae_config),
                           lambda m: train_vae(m, vae_config, device, max_seconds=max_seconds),
                           budget_name=config.get("budget"))
    return vae.to(device).eval()


def train_diffusion(model: nn.Module, config: dict, device=None, max_seconds: float | None = None,
                    images=None, labels=None, progress: bool | None = None, on_step=None,
                    autoencoder_seconds: float | None = None) -> dict:
    """Train with the config's recipe (Algorithm 1 with label dropout); returns training facts.

    Data: ``mnist("train")`` in [-1, 1] (or its VAE codes for latent diffusion), unless
    ``images``/``labels`` are given. Stops after ``config['steps']`` or ``max_seconds`` (else
    the config's ``time_limit``). ``model.history`` gets the per-step losses. Latent diffusion
    loads ``course train vae``'s checkpoint, or trains the VAE first for
    ``autoencoder_seconds`` (else the VAE's own time limit).
    """
    from tqdm.auto import tqdm

    from .data import BatchLoader, training_tensors
    from .runtime import get_device, in_ci, local_seed
    from .training import EMA, stop_reason
    from .vae import Progress, lr_factor

    chosen = get_device()
    device = torch.device(device) if device is not None else chosen
    images, labels, description = training_tensors(device, config.get("train_images"), images, labels)
    latent = isinstance(model, LatentDiffusion)
    binary = config.get("binarize") == "dynamic"  # a fresh Bernoulli draw of the bits per batch
    model.to(device)
    if latent:
        trained = _trained_vae(config, device, autoencoder_seconds)
        model.autoencoder.load_state_dict(trained.state_dict())
        model.autoencoder.eval()
        with torch.no_grad():
            mu = torch.cat([model.autoencoder.encode(chunk)[0] for chunk in images.split(500)])
        model.latent_mean.copy_(mu.mean(0))
        model.latent_std.copy_(mu.std(0).clamp(min=1e-3))
        data = (mu - model.latent_mean) / model.latent_std
        diffusion = model.diffusion
    else:
        data, diffusion = images if binary else to_model_range(images), model
    seed = int(config.get("seed", 0))
    loader = BatchLoader(data.to(device), labels.to(device), batch_size=config["batch_size"],
                         shuffle=True, drop_last=True, binarize=binary, seed=seed)
    limit = max_seconds if max_seconds is not None else config.get("time_limit")
    progress_fraction = Progress(config["steps"], limit)
    net = diffusion.net
    optimizer = torch.optim.Adam(net.parameters(), lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _: lr_factor(progress_fraction(), config["lr_warmup"], config["final_lr_factor"]))
    ema = EMA(net, config.get("ema_decay", 0.999))
    schedule = diffusion.schedule.to(device, torch.float32)
    losses: list[float] = []
    show = (not in_ci()) if progress is None else progress
    bar = tqdm(total=config["steps"], desc=config["variant"], disable=not show, leave=False)
    step, start, stopped_by = 0, time.monotonic(), ""
    net.train()
    with local_seed(seed, device):
        rng = torch.Generator().manual_seed(seed + 1)
        while not stopped_by:
            for x0, y in loader:
                x0 = to_model_range(x0) if binary else x0
                loss = ddpm_loss(net, x0, schedule, y if config.get("num_classes") else None,
                                 label_dropout=config.get("label_dropout", 0.0),
                                 weighting=config.get("weighting", "simple"), generator=rng)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the diffusion loss became {float(loss)} at step {step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                ema.update(net)
                step += 1
                progress_fraction.step = step
                losses.append(float(loss.detach()))
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if on_step is not None:
                    on_step(step, losses)
                stopped_by = stop_reason(step, config["steps"], start, limit)
                if stopped_by:
                    break
    bar.close()
    seconds = time.monotonic() - start
    diffusion.ema_net.load_state_dict(ema.model.state_dict())
    model.eval()
    model.history = {"loss": losses}
    tail = losses[-min(200, len(losses)):]
    return {"train_steps": step, "train_seconds_fit": round(seconds, 1),
            "steps_per_second": round(step / max(seconds, 1e-9), 2), "stopped_by": stopped_by,
            "loss_last_200": round(sum(tail) / len(tail), 5), "train_images": len(images),
            "train_data": description}


def _sample_in_batches(model: nn.Module, count: int, labels: torch.Tensor | None = None, **kwargs):
    """``count`` samples (for ``labels[i]`` when given) in batches of 250: bounded memory on a laptop."""
    return torch.cat([model.sample(labels[rows] if labels is not None else len(rows), **kwargs)
                      for rows in torch.arange(count).split(250)])


def _class_agreement(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of ``images`` the classifier reads as the digit asked for (``labels`` cycle on)."""
    from .metrics import predict_proba

    predicted = predict_proba(classifier, images).argmax(1).cpu()
    return round(float((predicted == labels[:len(images)].cpu()).float().mean()), 4)


@torch.no_grad()
def held_out_bound(model: Diffusion, images: torch.Tensor, t_samples: int | None = 16, seed: int = 0,
                   batch_size: int = 250) -> dict:
    """The mean variational bound (:func:`nll_bound`, nats per image) of binarized ``images``
    (0/1 pixels, as -1/+1) under the unconditional EMA model (the null label), with its parts."""
    generator = torch.Generator().manual_seed(seed)
    schedule = model.schedule.to(_device_of(model.ema_net), torch.float32)
    parts = [nll_bound(model.denoiser(None), to_model_range(chunk), schedule, levels=2,
                       t_samples=t_samples, generator=generator) for chunk in images.split(batch_size)]
    return {key: float(torch.cat([p[key] for p in parts]).mean()) for key in parts[0]}


def evaluate_diffusion(model: nn.Module, config: dict, device=None, classifier=None) -> dict:
    """Sample quality with ``eval_steps`` DDIM steps (eta 0) against the held-out digits.

    Three ways to sample the one network, each scored in the course classifier's feature space
    against the first ``eval_samples`` (``N``) held-out digits:

    * ``*`` keys (``fid``, ``kid``, ``precision``, ``recall``, ``classifier_score``,
      ``confident_fraction``, ``class_entropy``): ``N`` samples of the **unconditional** model,
      the null label;
    * ``labels_*``: ``N`` samples with the digit drawn first, cycling 0-9 (MNIST's classes are
      nearly balanced), then the conditional model at scale 1: another sampler of ``p(x)``,
      ``sum_y p(y) p(x | y)``, and the one the label dropout trained ten times more often;
    * ``guided_*``: ``guided_samples`` samples with classifier-free guidance at
      ``guidance_scale``, with ``class_agreement`` (the classifier's class is the requested one);

    and ``floor_*``: ``N`` real training digits against the same held-out digits, what a perfect
    generator would score with these sample counts. ``sample_seconds_64``: 64 unconditional
    digits on this machine. ``ddpm-binary`` also reports ``test_nll_bound``: the variational
    bound in nats on the first ``bound_images`` held-out digits with the VAE's fixed, seeded
    binarization (:func:`held_out_bound`, ``bound_t_samples`` timesteps per image).
    """
    from .data import as_tensors, describe, mnist
    from .metrics import classifier_features, load_feature_net, sample_figures
    from .runtime import get_device

    device = torch.device(device) if device is not None else get_device()
    model.to(device).eval()
    classifier = classifier or load_feature_net(device=device)
    test_set, train_set = mnist("test"), mnist("train")
    n = int(config.get("eval_samples", 2000))
    held_out, _ = as_tensors(test_set, device, limit=n)
    train_images, _ = as_tensors(train_set, device, limit=n)
    n = min(n, len(held_out))
    n_guided = min(n, int(config.get("guided_samples", n)))
    steps = int(config.get("eval_steps", 50))
    scale = float(config.get("guidance_scale", 3.0))
    generator = torch.Generator().manual_seed(int(config.get("seed", 0)))
    held_out_features = classifier_features(classifier, held_out)
    start = time.perf_counter()
    model.sample(64, steps=steps, generator=generator)
    sample_seconds = time.perf_counter() - start

    start = time.perf_counter()
    samples = _sample_in_batches(model, n, steps=steps, generator=generator)
    seconds = time.perf_counter() - start
    cycling = torch.arange(n) % 10
    with_labels = _sample_in_batches(model, n, cycling, steps=steps, generator=generator)
    guided = _sample_in_batches(model, n_guided, cycling, steps=steps, generator=generator,
                                guidance_scale=scale)
    metrics: dict = {}
    for prefix, images in (("", samples), ("labels_", with_labels), ("guided_", guided),
                           ("floor_", train_images[:n])):
        metrics.update(sample_figures(classifier, images, held_out_features, prefix))
    for prefix, images in (("labels_", with_labels), ("guided_", guided)):
        metrics[f"{prefix}class_agreement"] = _class_agreement(classifier, images, cycling)
    metrics["class_agreement"] = metrics.pop("guided_class_agreement")
    if config.get("binarize") == "dynamic":
        bits_set = mnist("test", binarize="fixed", binarize_seed=config.get("eval_binarize_seed", 0))
        bits, _ = as_tensors(bits_set, device, limit=config.get("bound_images"))
        bound = held_out_bound(model, bits, config.get("bound_t_samples"), int(config.get("seed", 0)))
        metrics.update(test_nll_bound=round(bound["total"], 2), bound_prior=round(bound["prior"], 3),
                       bound_decoder=round(bound["decoder"], 2), bound_images=len(bits),
                       bound_t_samples=config.get("bound_t_samples"))
    metrics.update({
        "n_samples": n, "guided_samples": n_guided, "sampler": f"DDIM, {steps} steps, eta 0",
        "guidance_scale": scale, "sample_seconds_64": round(sample_seconds, 2),
        "sample_seconds_unconditional": round(seconds, 1),
        "test_data": f"the first {n:,} of {describe(test_set)}",
        "floor_data": f"the first {n:,} of {describe(train_set)} against the same held-out digits",
    })
    return metrics


def label_first_figures(model: nn.Module, config: dict, guidance_scale: float, device=None,
                        classifier=None) -> dict:
    """Sample quality with the digit drawn first (cycling 0-9) and classifier-free guidance at
    ``guidance_scale``: ``eval_samples`` samples with ``eval_steps`` DDIM steps against as many
    held-out digits, as :func:`evaluate_diffusion` scores them, plus the class agreement.

    Scale 1 is ``evaluate_diffusion``'s ``labels_*``; a mild scale (1.5-2) trades a little
    diversity for samples the classifier reads more surely, which lowers the FID before a large
    scale's lost diversity raises it again (the lecture's scale sweep).
    """
    from .data import as_tensors, mnist
    from .metrics import classifier_features, load_feature_net, sample_figures
    from .runtime import get_device

    device = torch.device(device) if device is not None else get_device()
    model.to(device).eval()
    classifier = classifier or load_feature_net(device=device)
    n = int(config.get("eval_samples", 2000))
    held_out, _ = as_tensors(mnist("test"), device, limit=n)
    n = min(n, len(held_out))
    generator = torch.Generator().manual_seed(int(config.get("seed", 0)))
    cycling = torch.arange(n) % 10
    samples = _sample_in_batches(model, n, cycling, steps=int(config.get("eval_steps", 50)),
                                 generator=generator, guidance_scale=guidance_scale)
    figures = sample_figures(classifier, samples, classifier_features(classifier, held_out))
    return {**figures, "class_agreement": _class_agreement(classifier, samples, cycling),
            "guidance_scale": guidance_scale, "n_samples": n}


__all__ = [
    "Diffusion", "GaussianMixtureDenoiser", "LatentDiffusion", "MLPDenoiser", "NoiseSchedule",
    "NoisyClassifier", "ResidualBlock", "SelfAttention", "UNet", "VARIANTS", "build_diffusion",
    "cfg_combine", "classifier_guided", "conditional", "course_train_config", "ddim_invert",
    "ddim_sample", "ddim_step", "ddim_timesteps", "ddpm_loss", "ddpm_sample", "diffusion_config",
    "held_out_bound",
    "evaluate_diffusion", "label_first_figures", "model_mean", "nll_bound", "noisy_classifier_loss",
    "posterior_mean_variance",
    "predict_eps", "predict_x0", "q_sample", "timestep_embedding", "to_model_range", "to_pixels",
    "train_diffusion", "velocity", "vlb_weights", "x0_eps_from_velocity",
]
