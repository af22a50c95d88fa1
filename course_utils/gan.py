"""Generative adversarial networks (topic 4), top to bottom.

A GAN trains two networks against each other: a generator G that turns noise
z into samples, and a discriminator D (a *critic* in the Wasserstein variants)
that tells real samples from generated ones. Reading order of this file:

1. The game on histograms: the optimal discriminator D*, the Jensen–Shannon
   divergence and the value V(D, G), where V(D*, G) = −log 4 + 2·JS.
2. The losses on logits: the discriminator's and the generator's, for the
   standard (saturating and non-saturating), LSGAN, hinge and Wasserstein
   games, side by side in ``LOSS_TABLE``; the WGAN-GP gradient penalty and WGAN
   weight clipping.
3. A 2-D toy: rings and grids of Gaussians, MLP generator and discriminator,
   counting the modes a generator covers, and ``train_toy_gan`` to watch mode
   collapse (and its fixes) in seconds.
4. DCGAN for MNIST (conditional and spectral-norm options, minibatch standard
   deviation) and the training tricks: feature matching, historical averaging.
5. Instance normalisation and AdaIN.
6. InfoGAN's code head and loss, the best one-to-one matching of codes to labels
   (a small Hungarian algorithm), latent interpolation.
7. The functions behind ``course train dcgan`` / ``wgan-gp`` / ``cgan`` / ``infogan``:
   ``gan_config``, ``build_gan``, ``train_gan``, ``evaluate_gan``.

"logits" are the raw outputs of a discriminator or critic, shape ``[N]`` or
``[N, 1]``. Every random draw takes an optional ``generator`` (a
``torch.Generator``) so that results can be repeated.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


# --------------------------------------------------------------------------------------
# 1. The game on histograms
# --------------------------------------------------------------------------------------
def _as_float(p) -> torch.Tensor:
    p = torch.as_tensor(p)
    return p if p.is_floating_point() else p.double()


def _normalised(p) -> torch.Tensor:
    p = torch.as_tensor(p).double()  # float64: JS of disjoint supports is log 2 to 1e-15
    if (p < 0).any():
        raise ValueError("a histogram cannot have negative entries")
    total = p.sum()
    if total <= 0:
        raise ValueError("a histogram needs some mass (its entries sum to 0)")
    return p / total


def optimal_discriminator(p_data, p_model) -> torch.Tensor:
    r"""The discriminator that maximises V(D, G) for a fixed generator, point by point.

    For each x, D(x) only appears in :math:`p_\text{data}(x)\log D(x) + p_g(x)\log(1-D(x))`,
    i.e. :math:`a\log y + b\log(1-y)`, whose derivative :math:`a/y - b/(1-y)` vanishes at

    .. math::
        D^*(x) = \frac{p_\text{data}(x)}{p_\text{data}(x) + p_g(x)}.

    Where both densities are 0 the value does not matter; we return ½ there.
    Give two densities on the same grid, or two *normalised* histograms: the
    formula compares probabilities, so raw counts from samples of different
    sizes must be divided by their totals first.
    """
    p_data, p_model = _as_float(p_data), _as_float(p_model)
    total = p_data + p_model
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, p_data / safe, torch.full_like(total, 0.5))


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) in nats with 0·log(0/q) = 0 (q > 0 wherever p > 0 is the caller's job)."""
    ratio = torch.where(p > 0, p / torch.where(q > 0, q, torch.ones_like(q)), torch.ones_like(p))
    return torch.xlogy(p, ratio).sum()


def js_divergence(p, q) -> torch.Tensor:
    r"""Jensen–Shannon divergence of two histograms (normalised inside), in nats (float64).

    .. math::
        \mathrm{JS}(p\|q) = \tfrac12\,\mathrm{KL}(p\|m) + \tfrac12\,\mathrm{KL}(q\|m),
        \qquad m = \tfrac12(p+q)

    With this ½ convention :math:`0\le\mathrm{JS}\le\log 2`: 0 when p = q, and
    exactly log 2 when p and q have disjoint supports (whatever their distance,
    which is why the generator gets no useful gradient there).
    """
    p, q = _normalised(p), _normalised(q)
    m = 0.5 * (p + q)
    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def gan_value(p_data, p_model, d) -> torch.Tensor:
    r"""The value of the game on histograms (normalised inside), in nats.

    .. math::
        V(D, G) = \sum_x p_\text{data}(x)\log D(x) + \sum_x p_g(x)\log\big(1-D(x)\big)

    (0·log 0 = 0). At :math:`D = D^*`: :math:`V(D^*, G) = -\log 4 + 2\,\mathrm{JS}(p_\text{data}\|p_g)`,
    so the generator that minimises :math:`\max_D V` is the one with :math:`p_g = p_\text{data}`.
    """
    p_data, p_model, d = _normalised(p_data), _normalised(p_model), _as_float(d)
    return torch.xlogy(p_data, d).sum() + torch.xlogy(p_model, 1 - d).sum()


# --------------------------------------------------------------------------------------
# 2. Losses on logits
# --------------------------------------------------------------------------------------
LOSS_KINDS = ("standard", "lsgan", "hinge", "wgan")
GENERATOR_KINDS = ("saturating", "non_saturating", "lsgan", "hinge", "wgan")

LOSS_TABLE = {
    # kind: (discriminator loss, generator loss); D(x) = sigmoid(logit), C(x) = the raw critic output
    "saturating": ("−E log D(x) − E log(1 − D(G(z)))", "E log(1 − D(G(z)))   (minimised)"),
    "non_saturating": ("−E log D(x) − E log(1 − D(G(z)))", "−E log D(G(z))"),
    "lsgan": ("½ E (C(x) − 1)² + ½ E C(G(z))²", "½ E (C(G(z)) − 1)²"),
    "hinge": ("E max(0, 1 − C(x)) + E max(0, 1 + C(G(z)))", "−E C(G(z))"),
    "wgan": ("E C(G(z)) − E C(x)   (C kept 1-Lipschitz: clipping)", "−E C(G(z))"),
    "wgan-gp": ("E C(G(z)) − E C(x) + λ E (‖∇C(x̂)‖₂ − 1)²", "−E C(G(z))"),
}


def _flat_logits(logits: torch.Tensor) -> torch.Tensor:
    if logits.ndim == 2 and logits.shape[1] == 1:
        return logits[:, 0]
    if logits.ndim != 1:
        raise ValueError(f"logits should have shape [N] or [N, 1], got {tuple(logits.shape)}")
    return logits


def discriminator_loss(real_logits, fake_logits, kind: str = "standard",
                       real_label: float = 1.0) -> torch.Tensor:
    r"""The discriminator's (critic's) loss on a real and a fake batch, to be minimised.

    ``"standard"``: binary cross-entropy, real → 1, fake → 0, with :math:`D=\sigma(\text{logit})`:

    .. math::  -\mathbb E\log D(x) - \mathbb E\log(1-D(G(z)))

    (the negative of V(D, G)); ``real_label < 1`` is one-sided label smoothing
    (real → ``real_label``, fake still → 0).

    ``"lsgan"``: :math:`\tfrac12\mathbb E(C(x)-1)^2 + \tfrac12\mathbb E\,C(G(z))^2`
    (real target ``real_label``).
    ``"hinge"``: :math:`\mathbb E\max(0,1-C(x)) + \mathbb E\max(0,1+C(G(z)))`.
    ``"wgan"``: :math:`\mathbb E\,C(G(z)) - \mathbb E\,C(x)`, minus the Wasserstein
    estimate (add :func:`gradient_penalty` or :func:`clip_weights`).
    """
    real, fake = _flat_logits(real_logits), _flat_logits(fake_logits)
    if kind == "standard":
        return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, real_label))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    if kind == "lsgan":
        return 0.5 * ((real - real_label) ** 2).mean() + 0.5 * (fake**2).mean()
    if real_label != 1.0:
        raise ValueError(f"real_label (label smoothing) only applies to 'standard' and 'lsgan', not {kind!r}")
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "wgan":
        return fake.mean() - real.mean()
    raise ValueError(f"kind must be one of {', '.join(LOSS_KINDS)}, not {kind!r}")


def generator_loss(fake_logits, kind: str = "non_saturating") -> torch.Tensor:
    r"""The generator's loss on the discriminator's logits for a fake batch, to be minimised.

    With :math:`D=\sigma(\ell)`, :math:`\log D = -\operatorname{softplus}(-\ell)` and
    :math:`\log(1-D) = -\operatorname{softplus}(\ell)`:

    * ``"saturating"``: minimise :math:`\mathbb E\log(1-D(G(z))) = -\mathbb E\operatorname{softplus}(\ell)`,
      the minimax game itself. Its gradient :math:`-\sigma(\ell)` vanishes when D
      confidently rejects the fakes (:math:`D(G(z))\to0`), i.e. early in training.
    * ``"non_saturating"``: minimise :math:`-\mathbb E\log D(G(z)) = \mathbb E\operatorname{softplus}(-\ell)`.
      Same fixed point (:math:`p_g=p_\text{data}`), but its gradient
      :math:`-\sigma(-\ell)\to-1` there: strong exactly when the generator is bad.
    * ``"lsgan"``: :math:`\tfrac12\mathbb E(C(G(z))-1)^2`.
    * ``"hinge"`` and ``"wgan"``: :math:`-\mathbb E\,C(G(z))`.
    """
    fake = _flat_logits(fake_logits)
    if kind == "saturating":
        return -F.softplus(fake).mean()
    if kind == "non_saturating":
        return F.softplus(-fake).mean()
    if kind == "lsgan":
        return 0.5 * ((fake - 1) ** 2).mean()
    if kind in ("hinge", "wgan"):
        return -fake.mean()
    raise ValueError(f"kind must be one of {', '.join(GENERATOR_KINDS)}, not {kind!r}")


def random_interpolates(real: torch.Tensor, fake: torch.Tensor,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Points on straight lines between real and fake samples, one weight **per sample**.

    :math:`\hat x_i = \varepsilon_i x_i + (1-\varepsilon_i)\tilde x_i`,
    :math:`\varepsilon_i\sim U[0,1]`. Returns ``(x_hat, eps)``; ``eps`` has shape
    ``[N, 1, ..., 1]`` so it broadcasts over each sample.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real and fake batches differ in shape: {tuple(real.shape)} vs {tuple(fake.shape)}")
    eps = torch.rand(real.shape[0], *([1] * (real.ndim - 1)), generator=generator)
    eps = eps.to(real.device, real.dtype)
    return eps * real + (1 - eps) * fake, eps


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None, target: float = 1.0,
                     **critic_kwargs) -> torch.Tensor:
    r"""The WGAN-GP penalty (Gulrajani et al., 2017), to be added to the critic's loss times λ.

    .. math::
        \mathrm{GP} = \mathbb E_{\hat x}\big(\|\nabla_{\hat x} C(\hat x)\|_2 - 1\big)^2,
        \qquad \hat x = \varepsilon x + (1-\varepsilon)\tilde x,\ \varepsilon\sim U[0,1]

    * ε is drawn **per sample** (:func:`random_interpolates`);
    * the norm is taken **per sample**, over all its pixels/channels, not per pixel;
    * ``create_graph=True``: the penalty is a function of the critic's weights and
      trains them through the backward pass.

    The fake batch is detached (the penalty trains the critic only). Extra critic
    arguments (e.g. ``labels=...``) go through ``critic_kwargs``.
    """
    x_hat, _ = random_interpolates(real.detach(), fake.detach(), generator)
    x_hat.requires_grad_(True)
    scores = critic(x_hat, **critic_kwargs)
    (grads,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    # the tiny constant keeps the gradient of the square root finite at a zero gradient
    norms = torch.sqrt(grads.reshape(len(grads), -1).pow(2).sum(1) + 1e-12)
    return ((norms - target) ** 2).mean()


@torch.no_grad()
def clip_weights(module: nn.Module, limit: float = 0.01) -> None:
    """WGAN's original Lipschitz constraint: clamp every parameter to [−limit, limit], in place."""
    for p in module.parameters():
        p.clamp_(-limit, limit)


# --------------------------------------------------------------------------------------
# 3. The 2-D toy: mixtures of Gaussians, small MLPs and mode counting
# --------------------------------------------------------------------------------------
def mode_centers(kind: str = "ring", *, modes: int = 8, radius: float = 2.0, side: int = 5,
                 spacing: float = 2.0, std: float | None = None) -> torch.Tensor:
    """The means of the toy mixtures, ``[K, 2]``: ``"ring"`` (``modes`` on a circle of
    ``radius``) or ``"grid"`` (``side × side`` points ``spacing`` apart, centred on 0).

    ``std`` is accepted (and ignored) so the same keywords serve the samplers.
    """
    del std
    if kind == "ring":
        angles = 2 * math.pi * torch.arange(modes) / modes
        return radius * torch.stack([angles.cos(), angles.sin()], 1)
    if kind == "grid":
        coords = (torch.arange(side) - (side - 1) / 2) * spacing
        return torch.cartesian_prod(coords, coords).float()
    raise ValueError(f"kind must be 'ring' or 'grid', not {kind!r}")


def _mixture(centers: torch.Tensor, n: int, std: float, generator) -> torch.Tensor:
    which = torch.randint(len(centers), (n,), generator=generator)
    return centers[which] + std * torch.randn(n, 2, generator=generator)


def ring_of_gaussians(n: int, modes: int = 8, radius: float = 2.0, std: float = 0.02,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` points from an equal mixture of ``modes`` Gaussians N(c_k, std² I) on a circle, ``[n, 2]``."""
    return _mixture(mode_centers("ring", modes=modes, radius=radius), n, std, generator)


def grid_of_gaussians(n: int, side: int = 5, spacing: float = 2.0, std: float = 0.02,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` points from an equal mixture of ``side²`` Gaussians on a square grid, ``[n, 2]``."""
    return _mixture(mode_centers("grid", side=side, spacing=spacing), n, std, generator)


def count_modes(samples: torch.Tensor, centers: torch.Tensor, std: float, threshold: float = 3.0,
                min_share: float = 0.1) -> dict:
    """How many modes a generator covers, and how good its samples are.

    Rule (as in the unrolled-GAN and VEEGAN papers, stated here exactly):

    * a sample is **high quality** when it lies within ``threshold × std`` of its
      nearest centre (3 standard deviations by default);
    * a mode is **covered** when at least ``min_share × n / K`` of the ``n``
      samples are high-quality samples nearest to it (``n / K`` is its fair
      share; by default a tenth of it).

    Returns ``{"covered": int, "high_quality": float (share of all samples),
    "counts": LongTensor[K] (high-quality samples per mode)}``.
    """
    samples, centers = samples.detach().float().cpu(), centers.float().cpu()
    distances = torch.cdist(samples, centers)          # [n, K]
    nearest_distance, nearest = distances.min(1)
    good = nearest_distance <= threshold * std
    counts = torch.bincount(nearest[good], minlength=len(centers))
    n, k = len(samples), len(centers)
    covered = int((counts >= min_share * n / k).sum()) if n else 0
    return {"covered": covered, "high_quality": float(good.float().mean()) if n else 0.0,
            "counts": counts}


class MinibatchStdDev(nn.Module):
    r"""Minibatch standard deviation (Karras et al., 2018): a feature that tells D how varied a batch is.

    For groups of ``group_size`` samples (the whole batch by default), take the
    standard deviation of every feature across the group, average them to one
    number per group, and append it to each sample: as one more feature for
    ``[N, F]`` inputs, as one more constant channel for ``[N, C, H, W]``. A
    collapsed generator produces batches with a small value, which D can spot.
    This is a cheap relative of Salimans et al.'s minibatch discrimination.
    """

    def __init__(self, group_size: int | None = None):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        group = self.group_size if self.group_size and n % self.group_size == 0 else n
        grouped = x.reshape(n // group, group, *x.shape[1:])
        # sqrt(var + eps): the square root's gradient stays finite for identical samples
        std = torch.sqrt(grouped.var(1, unbiased=False) + 1e-8)                 # [G, ...]
        per_group = std.reshape(std.shape[0], -1).mean(1)                     # [G]
        value = per_group.repeat_interleave(group)                            # [N]
        extra = value.reshape(n, *([1] * (x.ndim - 1))).expand(n, 1, *x.shape[2:])
        return torch.cat([x, extra], 1)


def _spectral(layer: nn.Module, on: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(layer) if on else layer


class ToyGenerator(nn.Module):
    """An MLP from ``latent_dim``-d Gaussian noise to 2-D points (``depth`` hidden ReLU layers)."""

    def __init__(self, latent_dim: int = 2, hidden: int = 128, depth: int = 3, out_dim: int = 2):
        super().__init__()
        self.latent_dim = latent_dim
        layers, width = [], latent_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points G(z), z ~ N(0, I) (no gradients)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator).to(device)
        return self(z)


class ToyDiscriminator(nn.Module):
    """An MLP from 2-D points to one logit per point (shape ``[N]``); LeakyReLU(0.2) units.

    ``spectral_norm=True`` divides every weight matrix by its largest singular
    value (Miyato et al., 2018), making D roughly 1-Lipschitz. ``minibatch_std=True``
    appends :class:`MinibatchStdDev` before the last layer.
    """

    def __init__(self, hidden: int = 128, depth: int = 3, spectral_norm: bool = False,
                 minibatch_std: bool = False, in_dim: int = 2):
        super().__init__()
        layers, width = [], in_dim
        for _ in range(depth):
            layers += [_spectral(nn.Linear(width, hidden), spectral_norm), nn.LeakyReLU(0.2)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.minibatch_std = MinibatchStdDev() if minibatch_std else None
        self.head = _spectral(nn.Linear(width + int(minibatch_std), 1), spectral_norm)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer ``[N, hidden]`` (what feature matching compares)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.minibatch_std is not None:
            h = self.minibatch_std(h)
        return self.head(h)[:, 0]


@dataclass
class ToyGANResult:
    """What :func:`train_toy_gan` returns.

    ``snapshots``: ``(step, samples [n, 2])`` from one fixed batch of noise.
    ``history``: per generator step, ``"d_loss"``, ``"g_loss"`` and ``"g_grad_norm"``
    (the 2-norm of the generator's loss gradient over all its parameters).
    """

    generator: ToyGenerator
    discriminator: ToyDiscriminator
    snapshots: list = field(default_factory=list)
    history: dict = field(default_factory=dict)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)


TOY_KINDS = ("saturating", "non_saturating", "lsgan", "hinge", "wgan", "wgan-gp")


def _toy_sampler(sampler):
    if sampler in ("ring", "grid"):
        fn = ring_of_gaussians if sampler == "ring" else grid_of_gaussians
        return lambda n, generator=None: fn(n, generator=generator)
    if not callable(sampler):
        raise TypeError("sampler must be 'ring', 'grid' or a function (n, generator=None) -> [n, 2]")
    return sampler


def _unrolled_parameters(discriminator, real, fake, kind, steps, lr):
    """D's parameters after ``steps`` differentiable SGD steps on its own loss (Metz et al., 2017).

    The generator's loss is then evaluated against this look-ahead D, and its
    gradient flows through the unrolled steps (``create_graph=True``), so the
    generator anticipates how D would react to a collapsed batch.
    """
    from torch.func import functional_call

    params = dict(discriminator.named_parameters())
    d_kind = "standard" if kind in ("saturating", "non_saturating") else kind
    for _ in range(steps):
        loss = discriminator_loss(functional_call(discriminator, params, (real,)),
                                  functional_call(discriminator, params, (fake,)), d_kind)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {name: p - lr * g for (name, p), g in zip(params.items(), grads, strict=True)}
    return params


@contextmanager
def _one_cpu_thread():
    """Tiny networks on a CPU: one thread. Measured here (300 steps, batch 256, 128 units, load 3-5):
    1 s with one thread, 20 s with two, which wait for each other at every small operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_toy_gan(sampler="ring", *, kind: str = "non_saturating", steps: int = 2000,
                  batch_size: int = 256, lr: float = 1e-3, d_lr: float | None = None,
                  betas: tuple = (0.5, 0.999), d_steps: int = 1, unrolled_steps: int = 0,
                  spectral_norm: bool = False, minibatch_std: bool = False,
                  gp_weight: float = 10.0, clip: float = 0.01, real_label: float = 1.0,
                  feature_matching: bool = False, historical_weight: float = 0.0,
                  latent_dim: int = 2, hidden: int = 128, depth: int = 3,
                  snapshot_every: int = 0, snapshot_size: int = 1000, seed: int = 0) -> ToyGANResult:
    """Train a small GAN on 2-D points; a few seconds on a CPU for 2,000 steps.

    sampler:        ``"ring"``, ``"grid"``, or ``f(n, generator=None) -> [n, 2]``.
    kind:           the generator's loss and the matching discriminator loss:
                    ``"saturating"``/``"non_saturating"`` (standard D loss), ``"lsgan"``,
                    ``"hinge"``, ``"wgan"`` (weight clipping at ``clip``, RMSprop as in
                    the paper) or ``"wgan-gp"`` (penalty weight ``gp_weight``).
    steps:          generator steps; each follows ``d_steps`` discriminator steps.
    lr, d_lr:       Adam learning rates of G and D (``d_lr`` defaults to ``lr``).
    unrolled_steps: k > 0 trains G against D unrolled k SGD steps ahead.
    spectral_norm, minibatch_std: the discriminator's options (:class:`ToyDiscriminator`).
    real_label:     < 1 is one-sided label smoothing (standard/LSGAN losses).
    feature_matching: G minimises :func:`feature_matching_loss` on D's last hidden
                    layer instead of ``kind``'s generator loss.
    historical_weight: > 0 adds ``historical_weight ×`` :class:`HistoricalAverage`'s
                    penalty to both players' losses.
    snapshot_every: keep ``(step, samples)`` of ``snapshot_size`` points from fixed
                    noise every that many steps (and at step 0 and at the end).

    Everything random is drawn from generators seeded by ``seed``, so a run repeats
    exactly; the global random state is left as it was. It runs on the CPU with
    one thread (faster than several for networks this small).
    """
    with _one_cpu_thread():
        return _train_toy_gan(sampler, kind=kind, steps=steps, batch_size=batch_size, lr=lr,
                              d_lr=d_lr, betas=betas, d_steps=d_steps, unrolled_steps=unrolled_steps,
                              spectral_norm=spectral_norm, minibatch_std=minibatch_std,
                              gp_weight=gp_weight, clip=clip, real_label=real_label,
                              feature_matching=feature_matching, historical_weight=historical_weight,
                              latent_dim=latent_dim, hidden=hidden, depth=depth,
                              snapshot_every=snapshot_every, snapshot_size=snapshot_size, seed=seed)


def _train_toy_gan(sampler, *, kind, steps, batch_size, lr, d_lr, betas, d_steps, unrolled_steps,
                   spectral_norm, minibatch_std, gp_weight, clip, real_label, feature_matching,
                   historical_weight, latent_dim, hidden, depth, snapshot_every, snapshot_size,
                   seed) -> ToyGANResult:
    from .runtime import local_seed

    if kind not in TOY_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TOY_KINDS)}, not {kind!r}")
    sample_data = _toy_sampler(sampler)
    config = {k: v for k, v in locals().items() if k not in ("sampler", "sample_data", "local_seed")}
    with local_seed(seed):
        G = ToyGenerator(latent_dim, hidden, depth)
        D = ToyDiscriminator(hidden, depth, spectral_norm=spectral_norm, minibatch_std=minibatch_std)
    rng = torch.Generator().manual_seed(seed + 1)
    d_kind = {"saturating": "standard", "non_saturating": "standard", "wgan-gp": "wgan"}.get(kind, kind)
    g_kind = "wgan" if kind == "wgan-gp" else kind
    d_lr = lr if d_lr is None else d_lr
    if kind == "wgan":
        opt_g = torch.optim.RMSprop(G.parameters(), lr=lr)
        opt_d = torch.optim.RMSprop(D.parameters(), lr=d_lr)
    else:
        opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=betas)
        opt_d = torch.optim.Adam(D.parameters(), lr=d_lr, betas=betas)
    fixed_z = torch.randn(snapshot_size, latent_dim, generator=rng)
    averages = (HistoricalAverage(G), HistoricalAverage(D)) if historical_weight else None
    history = {"d_loss": [], "g_loss": [], "g_grad_norm": []}
    snapshots = []

    def snapshot(step):
        with torch.no_grad():
            snapshots.append((step, G(fixed_z).clone()))

    if snapshot_every:
        snapshot(0)
    start = time.monotonic()
    for step in range(1, steps + 1):
        for _ in range(d_steps):
            real = sample_data(batch_size, generator=rng)
            with torch.no_grad():  # D's step must not reach G's weights
                fake = G(torch.randn(batch_size, latent_dim, generator=rng))
            d_loss = discriminator_loss(D(real), D(fake), d_kind,
                                        real_label=real_label if d_kind in ("standard", "lsgan") else 1.0)
            if kind == "wgan-gp":
                d_loss = d_loss + gp_weight * gradient_penalty(D, real, fake, generator=rng)
            if averages is not None:
                d_loss = d_loss + historical_weight * averages[1].penalty(D)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            if kind == "wgan":
                clip_weights(D, clip)
            if averages is not None:
                averages[1].update(D)
        fake = G(torch.randn(batch_size, latent_dim, generator=rng))
        if unrolled_steps:
            from torch.func import functional_call

            real = sample_data(batch_size, generator=rng)
            params = _unrolled_parameters(D, real, fake, kind, unrolled_steps, d_lr)
            fake_logits = functional_call(D, params, (fake,))
        else:
            fake_logits = D(fake)
        if feature_matching:
            g_loss = feature_matching_loss(D.features(sample_data(batch_size, generator=rng)),
                                           D.features(fake))
        else:
            g_loss = generator_loss(fake_logits, g_kind)
        if averages is not None:
            g_loss = g_loss + historical_weight * averages[0].penalty(G)
        opt_g.zero_grad(set_to_none=True)
        D.zero_grad(set_to_none=True)
        g_loss.backward()
        grad_norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in G.parameters()))
        opt_g.step()
        if averages is not None:
            averages[0].update(G)
        history["d_loss"].append(float(d_loss.detach()))
        history["g_loss"].append(float(g_loss.detach()))
        history["g_grad_norm"].append(float(grad_norm))
        if snapshot_every and (step % snapshot_every == 0 or step == steps):
            if not snapshots or snapshots[-1][0] != step:
                snapshot(step)
    G.eval()
    D.eval()
    return ToyGANResult(G, D, snapshots, history, time.monotonic() - start, config)



# --------------------------------------------------------------------------------------
# 4. DCGAN for 1x28x28 images, conditioning, and the training tricks
# --------------------------------------------------------------------------------------
class DCGANGenerator(nn.Module):
    r"""A DCGAN generator for 1x28x28 images in [0, 1].

    ::

        z (+ label embedding) -> [linear hidden -> BN -> ReLU]
          -> linear 2c·7·7 -> BN -> ReLU -> reshape (2c, 7, 7)
          -> conv-transpose 4x4 stride 2 -> BN -> ReLU        (c, 14, 14)
          -> conv-transpose 4x4 stride 2 -> sigmoid            (1, 28, 28)

    with ``c = base_channels``. The fully connected layers are cheap on a CPU
    compared with convolutions at 28x28, so that is where extra width goes
    (``hidden``). ``num_classes`` makes it class-conditional: a learned
    embedding of the label is appended to z (also how InfoGAN's categorical code
    enters). ``batch_norm=False`` drops the batch norms.
    """

    def __init__(self, latent_dim: int = 64, base_channels: int = 64, num_classes: int | None = None,
                 hidden: int = 0, batch_norm: bool = True, embed_dim: int | None = None):
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        c = base_channels
        norm1d = (lambda n: nn.BatchNorm1d(n)) if batch_norm else (lambda n: nn.Identity())
        norm2d = (lambda n: nn.BatchNorm2d(n)) if batch_norm else (lambda n: nn.Identity())
        embed_dim = embed_dim or (num_classes or 0)
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        width = latent_dim + (embed_dim if num_classes else 0)
        fc = []
        if hidden:
            fc += [nn.Linear(width, hidden), norm1d(hidden), nn.ReLU()]
            width = hidden
        fc += [nn.Linear(width, 2 * c * 49), norm1d(2 * c * 49), nn.ReLU(), nn.Unflatten(1, (2 * c, 7, 7))]
        self.fc = nn.Sequential(*fc)
        self.conv = nn.Sequential(
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1), norm2d(c), nn.ReLU(),   # 7 -> 14
            nn.ConvTranspose2d(c, 1, 4, 2, 1),                             # 14 -> 28, logits
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1], ``[N, 1, 28, 28]``; ``labels`` (``[N]`` ints) for a conditional model."""
        if self.embed is not None:
            if labels is None:
                raise ValueError("this generator is conditional: pass labels")
            z = torch.cat([z, self.embed(labels.long())], 1)
        return torch.sigmoid(self.conv(self.fc(z)))

    @torch.no_grad()
    def sample(self, n_or_labels, generator: torch.Generator | None = None,
               batch_size: int = 500) -> torch.Tensor:
        """Images from z ~ N(0, I), in eval mode (batch-norm running statistics), without gradients.

        Pass a number of images, or (conditional model) a tensor of labels; a
        number for a conditional model cycles through the classes 0, 1, ..., 9, 0, ...
        """
        device = next(self.parameters()).device
        if isinstance(n_or_labels, torch.Tensor):
            labels = n_or_labels.long()
            n = len(labels)
        else:
            n = int(n_or_labels)
            labels = torch.arange(n) % self.num_classes if self.num_classes else None
        z = torch.randn(n, self.latent_dim, generator=generator)
        was_training = self.training
        self.eval()
        try:
            out = [self(z[i:i + batch_size].to(device),
                        None if labels is None else labels[i:i + batch_size].to(device))
                   for i in range(0, n, batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, 1, 28, 28, device=device)


class DCGANDiscriminator(nn.Module):
    r"""A DCGAN discriminator (or critic) for 1x28x28 images in [0, 1]; one logit per image.

    ::

        2x - 1 -> conv 4x4 stride 2 -> LeakyReLU(0.2)                  (c, 14, 14)
               -> conv 4x4 stride 2 -> [BN] -> LeakyReLU(0.2)          (2c, 7, 7)
               -> [minibatch std channel] -> flatten
               -> [linear hidden -> LeakyReLU(0.2)]                    = features(x)
               -> linear 1  (+ projection  <embed(y), features(x)>)  = logit

    * ``spectral_norm=True`` wraps every layer in spectral normalisation (the
      usual partner of the hinge loss); batch norm is then best switched off
      (``batch_norm=False``), and it must be off for WGAN-GP, whose per-sample
      gradient penalty batch norm would mix across samples.
    * ``num_classes``: the projection discriminator of Miyato & Koyama (2018),
      :math:`D(x,y) = \psi(\phi(x)) + \langle e_y, \phi(x)\rangle`.
    * ``minibatch_std=True``: :class:`MinibatchStdDev` adds a channel before the
      flatten, so D can see a batch with too little variety.
    """

    def __init__(self, base_channels: int = 64, num_classes: int | None = None,
                 spectral_norm: bool = False, batch_norm: bool = True, minibatch_std: bool = False,
                 hidden: int = 0, minibatch_group: int | None = 4):
        super().__init__()
        c = base_channels
        sn = lambda layer: _spectral(layer, spectral_norm)  # noqa: E731
        self.conv = nn.Sequential(
            sn(nn.Conv2d(1, c, 4, 2, 1)), nn.LeakyReLU(0.2),                   # 28 -> 14
            sn(nn.Conv2d(c, 2 * c, 4, 2, 1)),                                  # 14 -> 7
            nn.BatchNorm2d(2 * c) if batch_norm else nn.Identity(), nn.LeakyReLU(0.2),
        )
        self.minibatch_std = MinibatchStdDev(minibatch_group) if minibatch_std else None
        width = (2 * c + int(minibatch_std)) * 49
        self.fc = (nn.Sequential(sn(nn.Linear(width, hidden)), nn.LeakyReLU(0.2)) if hidden
                   else nn.Identity())
        self.feature_dim = hidden or width
        self.head = sn(nn.Linear(self.feature_dim, 1))
        self.num_classes = num_classes
        self.embed = sn(nn.Embedding(num_classes, self.feature_dim)) if num_classes else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations ``[N, feature_dim]`` (feature matching, InfoGAN, probes)."""
        h = self.conv(2 * x - 1)
        if self.minibatch_std is not None:
            h = self.minibatch_std(h)
        return self.fc(h.flatten(1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                return_features: bool = False):
        h = self.features(x)
        logits = self.head(h)[:, 0]
        if self.embed is not None:
            if labels is None:
                raise ValueError("this discriminator is conditional: pass labels")
            logits = logits + (self.embed(labels.long()) * h).sum(1)
        return (logits, h) if return_features else logits


def feature_matching_loss(real_features: torch.Tensor, fake_features: torch.Tensor) -> torch.Tensor:
    r"""Salimans et al. (2016): the generator matches the mean of D's features on real data.

    .. math::  \big\|\mathbb E_x f(x) - \mathbb E_z f(G(z))\big\|_2^2

    with f an intermediate layer of D (:meth:`DCGANDiscriminator.features`). The
    real features are a fixed target (detached): only the generator moves.
    """
    return (real_features.detach().mean(0) - fake_features.mean(0)).pow(2).sum()


class HistoricalAverage:
    r"""Historical averaging (Salimans et al., 2016): pull the weights towards their running mean.

    .. math::  \Big\|\theta - \frac1t\sum_{i=1}^{t}\theta_i\Big\|^2

    θ_1..θ_t are the weights after each :meth:`update` (the initial weights only
    serve as a starting value). Call :meth:`update` after each optimizer step and add
    ``weight * penalty(module)`` to that player's loss. It damps the
    back-and-forth orbits that simultaneous gradient steps can fall into.
    """

    def __init__(self, module: nn.Module):
        self.count = 0
        self.average = {name: p.detach().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.count += 1
        for name, p in module.named_parameters():  # running mean: a += (θ - a) / t
            self.average[name].add_((p.detach() - self.average[name]) / self.count)

    def penalty(self, module: nn.Module) -> torch.Tensor:
        return historical_average_penalty(module, self.average)


def historical_average_penalty(module: nn.Module, average: dict) -> torch.Tensor:
    """Sum over parameters of ``‖θ − θ̄‖²``; ``average``: name -> θ̄ (see :class:`HistoricalAverage`)."""
    return sum(((p - average[name]) ** 2).sum() for name, p in module.named_parameters())


# --------------------------------------------------------------------------------------
# 5. Instance normalisation and AdaIN
# --------------------------------------------------------------------------------------
def channel_statistics(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel: mean and standard deviation over the positions, each ``[N, C, 1, 1]``."""
    mean = x.mean((2, 3), keepdim=True)
    std = torch.sqrt(x.var((2, 3), keepdim=True, unbiased=False) + eps)
    return mean, std


def instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    r"""Instance normalisation: every channel of every image to mean 0 and variance 1.

    .. math::  \mathrm{IN}(x)_{nc} = \frac{x_{nc} - \mu_{nc}}{\sigma_{nc}}, \quad
               \mu_{nc},\sigma_{nc} \text{ over the spatial positions of image n, channel c}

    It removes each channel's per-image mean and contrast: the "style" statistics.
    """
    mean, std = channel_statistics(x, eps)
    return (x - mean) / std


def adain(content: torch.Tensor, style_mean: torch.Tensor, style_std: torch.Tensor,
          eps: float = 1e-5) -> torch.Tensor:
    r"""Adaptive instance normalisation (Huang & Belongie, 2017; the style input of StyleGAN).

    .. math::  \mathrm{AdaIN}(x, s) = \sigma(s)\,\mathrm{IN}(x) + \mu(s)

    ``style_mean``/``style_std``: ``[N, C]`` or ``[N, C, 1, 1]`` (for example
    :func:`channel_statistics` of a style image, or an affine map of a style vector).
    """
    if style_mean.ndim == 2:
        style_mean, style_std = style_mean[:, :, None, None], style_std[:, :, None, None]
    return style_std * instance_norm(content, eps) + style_mean


class AdaIN(nn.Module):
    """AdaIN with the style given as a vector w: a linear map gives each channel its scale and bias.

    ``AdaIN(channels, style_dim)(x, w) = (1 + scale(w)) * IN(x) + bias(w)``; the
    ``1 +`` starts it near plain instance normalisation.
    """

    def __init__(self, channels: int, style_dim: int):
        super().__init__()
        self.affine = nn.Linear(style_dim, 2 * channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale, bias = self.affine(w).chunk(2, dim=1)
        return adain(x, bias, 1 + scale)


# --------------------------------------------------------------------------------------
# 6. InfoGAN, matching codes to labels, latent interpolation
# --------------------------------------------------------------------------------------
class InfoGANHead(nn.Module):
    r"""InfoGAN's Q network: categorical-code logits from the discriminator's features.

    It shares D's body (:meth:`DCGANDiscriminator.features`) and adds a small
    MLP, so the mutual-information term costs almost nothing extra.
    """

    def __init__(self, feature_dim: int, num_codes: int = 10, hidden: int = 128):
        super().__init__()
        self.num_codes = num_codes
        self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, num_codes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def info_loss(code_logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    r"""InfoGAN's mutual-information term for a categorical code: the cross-entropy of Q(c|x) at the true c.

    With :math:`c\sim\mathrm{Cat}(1/K)` fed to G and :math:`Q(c|x)` predicting it back from :math:`x=G(z,c)`,

    .. math::
        I(c; G(z,c)) \;\ge\; H(c) + \mathbb E\log Q(c\mid G(z,c)) = \log K - \mathrm{CE},

    so minimising this loss (in both G and Q) maximises a lower bound on the
    mutual information (Chen et al., 2016).
    """
    return F.cross_entropy(code_logits, codes.long())


def linear_assignment(cost) -> torch.Tensor:
    r"""Hungarian algorithm: the permutation that minimises the total cost of a square matrix.

    Returns ``assignment`` with ``assignment[i]`` the column given to row i, so that
    :math:`\sum_i \text{cost}[i, \text{assignment}[i]]` is minimal. The O(n³) version
    with row/column potentials u, v (reduced costs ``cost[i, j] - u[i] - v[j] >= 0``):
    rows are added one at a time, each by a shortest augmenting path.
    """
    cost = torch.as_tensor(cost, dtype=torch.float64).tolist()
    n = len(cost)
    if any(len(row) != n for row in cost):
        raise ValueError("linear_assignment needs a square cost matrix")
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match = [0] * (n + 1)     # match[j] = row (1-based) holding column j; column 0 is a sentinel
    way = [0] * (n + 1)
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        min_reduced = [inf] * (n + 1)
        used = [False] * (n + 1)
        while True:  # grow a shortest-path tree until it reaches a free column
            used[j0] = True
            i0, delta, j1 = match[j0], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < min_reduced[j]:
                        min_reduced[j], way[j] = reduced, j0
                    if min_reduced[j] < delta:
                        delta, j1 = min_reduced[j], j
            for j in range(n + 1):  # shift the potentials: reduced costs stay >= 0
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    min_reduced[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    assignment = [0] * n
    for j in range(1, n + 1):
        assignment[match[j] - 1] = j - 1
    return torch.tensor(assignment, dtype=torch.long)


def best_matching_accuracy(predicted, labels, num_classes: int = 10) -> float:
    """Accuracy of ``predicted`` cluster ids against ``labels`` under the best one-to-one renaming.

    Builds the confusion matrix ``C[p, l]`` (how often cluster p meets label l)
    and finds the permutation that maximises the matched count (the Hungarian
    algorithm on ``-C``, :func:`linear_assignment`). The score for InfoGAN's
    unsupervised code: 1 when each code value is exactly one digit, about
    1/num_classes for a code unrelated to the digit.
    """
    predicted = torch.as_tensor(predicted).long().flatten().cpu()
    labels = torch.as_tensor(labels).long().flatten().cpu()
    if len(predicted) != len(labels) or not len(labels):
        raise ValueError("predicted and labels must be non-empty and of the same length")
    confusion = torch.bincount(predicted * num_classes + labels,
                               minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    assignment = linear_assignment(-confusion.double())
    matched = confusion[torch.arange(num_classes), assignment].sum()
    return float(matched) / len(labels)


def interpolate(z0: torch.Tensor, z1: torch.Tensor, steps: int = 8, mode: str = "slerp") -> torch.Tensor:
    r"""``steps`` latent vectors from z0 to z1 (both included): shape ``[steps, *z0.shape]``.

    ``"lerp"``: :math:`(1-t)z_0 + t z_1`. ``"slerp"`` (spherical, along the great
    circle, which keeps the norm typical of a Gaussian z in high dimension; a
    straight line passes through low-norm points the generator rarely saw):

    .. math::  \frac{\sin((1-t)\theta)}{\sin\theta}z_0 + \frac{\sin(t\theta)}{\sin\theta}z_1,
               \qquad \cos\theta = \frac{z_0\cdot z_1}{\|z_0\|\|z_1\|}

    Vectors are the last dimension, so ``[B, d]`` inputs interpolate B pairs at once.
    """
    if mode not in ("slerp", "lerp"):
        raise ValueError(f"mode must be 'slerp' or 'lerp', not {mode!r}")
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device).reshape(-1, *([1] * z0.ndim))
    line = (1 - t) * z0 + t * z1
    if mode == "lerp":
        return line
    cos = (z0 * z1).sum(-1, keepdim=True) / (z0.norm(dim=-1, keepdim=True) * z1.norm(dim=-1, keepdim=True))
    theta = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    small = sin.abs() < 1e-6  # (anti)parallel vectors: the great circle is not defined, use the line
    safe = torch.where(small, torch.ones_like(sin), sin)
    arc = (torch.sin((1 - t) * theta) * z0 + torch.sin(t * theta) * z1) / safe
    return torch.where(small, line, arc)


# --------------------------------------------------------------------------------------
# 7. The registered models: `course train dcgan`, `wgan-gp`, `cgan` (and `infogan`)
# --------------------------------------------------------------------------------------
VARIANTS = ("dcgan", "wgan-gp", "cgan", "infogan")


class GAN(nn.Module):
    """The trained pieces of one GAN, in one module so that one checkpoint holds them all.

    ``generator`` and ``discriminator`` are the two players; ``ema_generator`` is an
    exponential moving average of the generator's weights (the one evaluated and
    sampled: averaging the weights smooths out the last steps' oscillation of the
    game); ``info_head`` is InfoGAN's Q network (``None`` for the other variants).
    ``sample(n_or_labels, generator=None)`` samples the EMA generator.
    """

    def __init__(self, generator: DCGANGenerator, discriminator: DCGANDiscriminator,
                 info_head: InfoGANHead | None = None):
        super().__init__()
        self.generator, self.discriminator, self.info_head = generator, discriminator, info_head
        self.ema_generator = copy.deepcopy(generator).eval()
        for p in self.ema_generator.parameters():
            p.requires_grad_(False)

    @property
    def latent_dim(self) -> int:
        return self.generator.latent_dim

    @property
    def num_classes(self) -> int | None:
        return self.generator.num_classes

    def sample(self, n_or_labels, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.ema_generator.sample(n_or_labels, generator=generator)


def gan_config(budget_name: str | None = None, variant: str = "dcgan") -> dict:
    """The GAN that ``course train VARIANT`` trains, sized for a budget (a JSON-able dict).

    Variants: ``"dcgan"`` (hinge loss, spectral norm in D), ``"wgan-gp"`` (Wasserstein
    loss with the gradient penalty, a critic without normalisation), ``"cgan"``
    (the dcgan recipe, class-conditional: label embedding in G, projection in D),
    ``"infogan"`` (the dcgan recipe plus a 10-way categorical code and a Q head).

    Recipe, against a plain pytorch/examples DCGAN (batch norm in D, BCE, Adam
    2e-4 with β1 = 0.5, batch 64), chosen for what is cheap on a 2-core CPU:

    * the convolutions stay small (28 -> 14 -> 7); width goes into fully
      connected layers (``g_hidden``, ``d_hidden``), which cost little;
    * D has spectral norm and no batch norm, with the hinge loss;
    * Adam at 1e-3 for both players with β1 = 0, β2 = 0.99: measured on this split
      (600 steps, 2,000 samples), FID 25 against 62 for Adam 2e-4/4e-4 and 62 for
      the BCE + batch-norm-D recipe at 2e-4, β1 = 0.5. A short CPU budget rewards
      large steps; spectral norm keeps them stable;
    * a cosine decay of both learning rates to 10 %, driven by the step count *and*
      the clock (:class:`course_utils.vae.Progress`), so a run cut by the time limit
      still ends on small steps;
    * an EMA of the generator's weights (:class:`course_utils.training.EMA`), which
      is what gets evaluated (its batch-norm statistics re-measured,
      :func:`recalibrate_batch_norm`).

    Measured (``benchmarks/gan.py``, 2,000 samples against the 2,000 held-out
    digits; real-vs-real floor FID 2.90), classroom budget on a 2-core CPU with the
    load average at 1.3-2.1 (one torch thread): 4,553 steps in 360 s, FID 3.12,
    precision 0.57, recall 0.83, 85.4 % confident samples, class entropy 2.300;
    the conditional model 4,161 steps, FID 1.78, 99.3 % of samples classified as
    the requested digit. At an equal 600 steps (equal CPU time) this recipe scores
    FID 24.8 and the plain pytorch/examples DCGAN 37.5. A machine busy with other
    work gives far fewer steps in six minutes (593 steps, FID 24.8 at load 8).

    ``train_images`` limits the training set (smoke). ``eval_samples``: how many
    samples are scored against as many held-out digits (and as many training digits
    for the real-vs-real floor).
    """
    from .runtime import by_budget

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    cfg = by_budget(
        budget_name,
        latent_dim=(32, 64, 128),
        g_channels=(8, 32, 64),
        g_hidden=(64, 512, 1024),
        d_channels=(8, 32, 64),
        d_hidden=(64, 512, 1024),
        steps=(60, 20_000, 40_000),
        time_limit=(20, 360, 3600),
        train_images=(2_000, None, None),
        eval_samples=(200, 2000, 10_000),
    )
    config = {
        "model": "GAN", "variant": variant, "loss": "hinge",
        "latent_dim": cfg.latent_dim, "g_channels": cfg.g_channels, "g_hidden": cfg.g_hidden,
        "g_batch_norm": True, "d_channels": cfg.d_channels, "d_hidden": cfg.d_hidden,
        "d_spectral_norm": True, "d_batch_norm": False, "minibatch_std": False,
        "num_classes": None, "info_codes": 0, "info_weight": 1.0,
        "batch_size": 64, "lr_g": 1e-3, "lr_d": 1e-3, "beta1": 0.0, "beta2": 0.99,
        "d_steps": 1, "gp_weight": 0.0, "clip_weights": 0.0, "real_label": 1.0,
        "lr_warmup": 0.0, "final_lr_factor": 0.1, "ema_decay": 0.999,
        "steps": cfg.steps, "time_limit": cfg.time_limit, "train_images": cfg.train_images,
        "eval_samples": cfg.eval_samples, "eval_k": 3, "budget": cfg.budget,
    }
    if variant == "wgan-gp":
        config.update(loss="wgan", gp_weight=10.0, d_spectral_norm=False, d_batch_norm=False,
                      lr_g=5e-4, lr_d=5e-4, beta1=0.0, beta2=0.9, d_steps=2)
    elif variant == "cgan":
        config.update(num_classes=10)
    elif variant == "infogan":
        config.update(info_codes=10)
    return config


def course_train_config(budget_name: str | None = None, variant: str = "dcgan", seed: int = 0,
                        max_seconds: float | None = None) -> dict:
    """The config exactly as ``course train VARIANT`` completes and caches it.

    A notebook that builds the same dict finds the checkpoint that command cached
    (``checkpoints.load_or_train(variant, course_train_config(...), ...)``).
    """
    from .checkpoints import training_config

    return training_config(gan_config(budget_name, variant), budget_name, seed=seed,
                           max_seconds=max_seconds)


def build_gan(config: dict) -> GAN:
    """A fresh :class:`GAN` from a config, seeded by ``config['seed']``."""
    from .runtime import local_seed

    codes = config.get("info_codes") or 0
    conditioning = config.get("num_classes") or (codes or None)
    with local_seed(int(config.get("seed", 0))):  # the same initial weights wherever it is built
        generator = DCGANGenerator(config["latent_dim"], config["g_channels"],
                                   num_classes=conditioning, hidden=config["g_hidden"],
                                   batch_norm=config.get("g_batch_norm", True))
        discriminator = DCGANDiscriminator(config["d_channels"], num_classes=config.get("num_classes"),
                                           spectral_norm=config.get("d_spectral_norm", False),
                                           batch_norm=config.get("d_batch_norm", True),
                                           minibatch_std=config.get("minibatch_std", False),
                                           hidden=config["d_hidden"])
        head = InfoGANHead(discriminator.feature_dim, codes) if codes else None
        return GAN(generator, discriminator, head)


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def train_gan(model: GAN, config: dict, device=None, max_seconds: float | None = None,
              images=None, labels=None, progress: bool | None = None, on_step=None) -> dict:
    """Train ``model`` with the config's recipe; returns a dict of training facts.

    One step: ``d_steps`` discriminator updates on fresh real batches against
    detached fakes, then one generator update, then the EMA update. The config's
    ``loss`` is any of :data:`GENERATOR_KINDS` (D's loss follows), plus
    ``gp_weight`` > 0 (WGAN-GP) or ``clip_weights`` > 0 (WGAN with clipping). Data:
    ``mnist("train")`` grey levels in [0, 1], unless ``images``/``labels`` are
    given. Stops after ``config['steps']`` or ``max_seconds`` (else the config's
    ``time_limit``); the learning rates follow :class:`course_utils.vae.Progress`.
    ``model.history`` gets the per-step losses (``d_loss``, ``g_loss``, and
    ``info_loss`` for InfoGAN) for plots.
    """
    from .data import BatchLoader, training_tensors
    from .runtime import get_device, in_ci, local_seed
    from .training import EMA, stop_reason
    from .vae import Progress, lr_factor

    chosen = get_device()  # also picks the CPU thread count from the machine's load, once
    device = torch.device(device) if device is not None else chosen
    images, labels, description = training_tensors(device, config.get("train_images"), images, labels)
    seed = int(config.get("seed", 0))
    loader = BatchLoader(images.to(device), labels.to(device), batch_size=config["batch_size"],
                         shuffle=True, drop_last=True, seed=seed)
    limit = max_seconds if max_seconds is not None else config.get("time_limit")
    schedule = Progress(config["steps"], limit)
    G, D, Q = model.generator.to(device), model.discriminator.to(device), model.info_head
    model.to(device)
    betas = (config.get("beta1", 0.0), config.get("beta2", 0.99))
    opt_g = torch.optim.Adam(G.parameters(), lr=config["lr_g"], betas=betas)
    d_params = list(D.parameters()) + (list(Q.parameters()) if Q is not None else [])
    opt_d = torch.optim.Adam(d_params, lr=config["lr_d"], betas=betas)

    def factor(_):
        return lr_factor(schedule(), config.get("lr_warmup", 0.0), config.get("final_lr_factor", 0.1))

    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in (opt_g, opt_d)]
    ema = EMA(G, config.get("ema_decay", 0.999))
    d_kind = "wgan" if config["loss"] == "wgan" else (
        "standard" if config["loss"] in ("non_saturating", "saturating") else config["loss"])
    g_kind = config["loss"]
    conditional = bool(config.get("num_classes"))
    codes = config.get("info_codes") or 0
    latent = config["latent_dim"]
    history = {"d_loss": [], "g_loss": [], "info_loss": []} if codes else {"d_loss": [], "g_loss": []}
    batches = _endless(loader)
    step, start = 0, time.monotonic()
    show = (not in_ci()) if progress is None else progress
    from tqdm.auto import tqdm

    bar = tqdm(total=config["steps"], desc=config.get("variant", "GAN"), disable=not show, leave=False)
    with local_seed(seed, device):
        rng = torch.Generator().manual_seed(seed + 1)
        G.train()
        D.train()
        while True:
            for _ in range(config.get("d_steps", 1)):
                real, y = next(batches)
                n = len(real)
                z = torch.randn(n, latent, generator=rng).to(device)
                fake_labels = _fake_labels(y, codes, n, rng, device)
                with torch.no_grad():  # D's update must not reach G
                    fake = G(z, fake_labels)
                real_logits = D(real, y if conditional else None)
                if Q is not None:
                    fake_logits, fake_features = D(fake, return_features=True)
                else:
                    fake_logits = D(fake, fake_labels if conditional else None)
                d_loss = discriminator_loss(real_logits, fake_logits, d_kind,
                                            real_label=config.get("real_label", 1.0)
                                            if d_kind in ("standard", "lsgan") else 1.0)
                if config.get("gp_weight"):
                    kwargs = {"labels": y} if conditional else {}
                    d_loss = d_loss + config["gp_weight"] * gradient_penalty(D, real, fake, rng, **kwargs)
                if Q is not None:  # Q learns to read the code back from the fakes
                    q_loss = info_loss(Q(fake_features), fake_labels)
                    d_loss = d_loss + config.get("info_weight", 1.0) * q_loss
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                if config.get("clip_weights"):  # the original WGAN's Lipschitz constraint
                    clip_weights(D, config["clip_weights"])
            _set_requires_grad(D, False)  # G's step needs gradients through D, not of D's weights
            z = torch.randn(n, latent, generator=rng).to(device)
            fake_labels = _fake_labels(y, codes, n, rng, device)
            fake = G(z, fake_labels)
            if Q is not None:
                fake_logits, fake_features = D(fake, return_features=True)
            else:
                fake_logits = D(fake, fake_labels if conditional else None)
            g_loss = generator_loss(fake_logits, g_kind)
            if Q is not None:
                g_info = info_loss(Q(fake_features), fake_labels)
                g_loss = g_loss + config.get("info_weight", 1.0) * g_info
                history["info_loss"].append(float(g_info.detach()))
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            _set_requires_grad(D, True)
            ema.update(G)
            for scheduler in schedulers:
                scheduler.step()
            step += 1
            schedule.step = step
            history["d_loss"].append(float(d_loss.detach()))
            history["g_loss"].append(float(g_loss.detach()))
            bar.update(1)
            if not math.isfinite(history["d_loss"][-1] + history["g_loss"][-1]):
                raise FloatingPointError(f"the GAN's losses became infinite or NaN at step {step}")
            if on_step is not None:
                on_step(step, history)
            stopped_by = stop_reason(step, config["steps"], start, limit)
            if stopped_by:
                break
    bar.close()
    seconds = time.monotonic() - start
    model.ema_generator.load_state_dict(ema.model.state_dict())
    recalibrate_batch_norm(model.ema_generator, config, rng, device)
    model.eval()
    model.history = history
    tail = slice(-min(200, step), None)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {"train_steps": step, "train_seconds_fit": round(seconds, 1),
            "steps_per_second": round(step / max(seconds, 1e-9), 2), "stopped_by": stopped_by,
            "d_loss_last_200": round(mean(history["d_loss"][tail]), 4),
            "g_loss_last_200": round(mean(history["g_loss"][tail]), 4),
            "train_images": len(images), "train_data": description}


@torch.no_grad()
def recalibrate_batch_norm(generator: DCGANGenerator, config: dict, rng: torch.Generator, device,
                           batches: int = 20, batch_size: int = 256) -> None:
    """Re-estimate the batch-norm statistics of an averaged generator.

    The EMA copies the running means and variances of the live generator, which
    were measured with *its* weights, not the averaged ones. A few forward passes
    in training mode with a cumulative average (``momentum=None``) measure the
    averaged generator's own statistics. Costs about a second.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    codes = config.get("num_classes") or config.get("info_codes") or 0
    generator.train()
    for _ in range(batches):
        z = torch.randn(batch_size, generator.latent_dim, generator=rng).to(device)
        labels = torch.randint(codes, (batch_size,), generator=rng).to(device) if codes else None
        generator(z, labels)
    generator.eval()
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum


def _endless(loader):
    while True:
        yield from loader


def _fake_labels(real_labels, codes: int, n: int, rng, device):
    """The labels a fake batch is generated with: the real batch's (class-conditional,
    so fakes follow the class frequencies), or uniform random codes (InfoGAN)."""
    if codes:
        return torch.randint(codes, (n,), generator=rng).to(device)
    return real_labels


def evaluate_gan(model: GAN, config: dict, device=None, classifier=None) -> dict:
    """Sample quality of the EMA generator against the held-out digits, with the real-vs-real floor.

    ``eval_samples`` samples (``N``) are compared with the first ``N`` held-out
    digits (``mnist("test")``: the last 2,000 of the 8,000/2,000 split) in the
    feature space of the course's classifier: FID, KID, precision and recall
    (k = ``eval_k``), the classifier score, the confident fraction and the class
    entropy. The ``floor_*`` keys are the same figures for ``N`` real training
    digits against the same held-out digits: what a perfect generator would
    score with these sample counts. ``nn_distance_ratio`` is the memorisation
    check (median pixel distance to the nearest training digit, samples over
    held-out digits; well below 1 would mean copying). Conditional models add
    ``class_agreement`` (the classifier's class equals the requested one);
    InfoGAN adds ``code_label_matching`` (:func:`best_matching_accuracy` of the
    code against the classifier's class).
    """
    from .data import as_tensors, describe, mnist
    from .metrics import (
        classifier_features,
        load_feature_net,
        memorisation_check,
        predict_proba,
        sample_figures,
    )
    from .runtime import get_device

    device = torch.device(device) if device is not None else get_device()
    model.to(device).eval()
    classifier = classifier or load_feature_net(device=device)
    test_set, train_set = mnist("test"), mnist("train")
    n = int(config.get("eval_samples", 2000))
    held_out, _ = as_tensors(test_set, device, limit=n)
    train_images, _ = as_tensors(train_set, device)
    n = min(n, len(held_out))
    generator = torch.Generator().manual_seed(int(config.get("seed", 0)))
    requested = None
    if model.num_classes:
        requested = torch.arange(n) % model.num_classes
        samples = model.sample(requested, generator=generator)
    else:
        samples = model.sample(n, generator=generator)
    k = int(config.get("eval_k", 3))
    metrics: dict = {}
    held_out_features = classifier_features(classifier, held_out)
    for prefix, images in (("", samples), ("floor_", train_images[:n])):
        metrics.update(sample_figures(classifier, images, held_out_features, prefix, k))
    metrics["n_samples"] = n
    metrics["test_data"] = f"the first {n:,} of {describe(test_set)}"
    metrics["floor_data"] = f"the first {n:,} of {describe(train_set)} against the same held-out digits"
    memo = memorisation_check(samples.cpu(), train_images.cpu(), held_out.cpu())
    metrics["nn_distance_ratio"] = round(memo["ratio"], 4)
    predicted = predict_proba(classifier, samples).argmax(1).cpu()
    if requested is not None and config.get("num_classes"):
        metrics["class_agreement"] = round(float((predicted == requested).float().mean()), 4)
    if config.get("info_codes"):
        metrics["code_label_matching"] = round(best_matching_accuracy(requested, predicted,
                                                                      model.num_classes), 4)
    metrics["eval_k"] = k
    return metrics


__all__ = [
    "GAN", "VARIANTS", "build_gan", "course_train_config", "evaluate_gan",
    "gan_config", "recalibrate_batch_norm", "train_gan",
    "AdaIN", "DCGANDiscriminator", "DCGANGenerator", "HistoricalAverage", "InfoGANHead",
    "adain", "best_matching_accuracy", "channel_statistics", "feature_matching_loss",
    "historical_average_penalty", "info_loss", "instance_norm", "interpolate", "linear_assignment",
    "GENERATOR_KINDS", "LOSS_KINDS", "LOSS_TABLE", "MinibatchStdDev", "TOY_KINDS", "ToyDiscriminator",
    "ToyGANResult", "ToyGenerator", "clip_weights", "count_modes", "discriminator_loss", "gan_value",
    "generator_loss", "gradient_penalty", "grid_of_gaussians", "js_divergence", "mode_centers",
    "optimal_discriminator", "random_interpolates", "ring_of_gaussians", "train_toy_gan",
]
