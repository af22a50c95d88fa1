"""Variational autoencoders (topic 3), top to bottom.

A VAE is a latent-variable model trained by maximising a lower bound on its
log-likelihood. Reading order of this file:

1. Gaussian densities and the closed-form KL to the standard normal prior.
2. The reparameterization trick.
3. Likelihoods p(x|z): Bernoulli (binary pixels) and Gaussian (grey levels).
4. Models: ``MLPVAE`` (the seed's slide code, made right), the convolutional
   ``VAE`` and the ``ConditionalVAE``. They share one small interface::

       mu, logvar = model.encode(x)            # q(z|x) = N(mu, diag(exp(logvar)))
       out = model.decode(z)                   # the decoder's raw output (logits for VAE)
       log_px_z = model.log_likelihood(x, out) # log p(x|z), summed over pixels: shape [B]
       images = model.mean_image(out)          # E[x|z], for display

   (the conditional model takes the label too: ``encode(x, y)``, ``decode(z, y)``).
5. The ELBO and the importance-weighted bound (IWAE) for the test NLL.
6. Plain functions for ``course train vae``: ``vae_config``, ``build_vae``,
   ``train_vae``, ``evaluate_vae``.

All log-densities are in **nats** and summed over the dimensions of one
example, so every per-example quantity has shape ``[batch]``.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn import functional as F

LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------------
# 1. Gaussian densities and the KL divergence
# --------------------------------------------------------------------------------------
def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""Log-density of a diagonal Gaussian, summed over the last dimension.

    .. math::
        \log \mathcal N(z;\mu,\operatorname{diag}\sigma^2)
        = -\tfrac12 \sum_{j=1}^{d}\Big[\log 2\pi + \log\sigma_j^2 + \frac{(z_j-\mu_j)^2}{\sigma_j^2}\Big]

    Note the constant: :math:`-\tfrac12\log 2\pi` once **per dimension**, so
    :math:`-\tfrac d2 \log 2\pi` in all (the seed's code adds it only once).
    """
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    r"""Log-density of the prior :math:`p(z)=\mathcal N(0, I)`, summed over the last dimension."""
    return -0.5 * (LOG_2PI + z**2).sum(-1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""KL( N(mu, diag(exp(logvar))) || N(0, I) ), summed over the last dimension.

    Derivation, one dimension at a time (:math:`q=\mathcal N(\mu,\sigma^2)`, :math:`p=\mathcal N(0,1)`):

    .. math::
        \mathrm{KL}(q\|p) &= \mathbb E_q[\log q(z) - \log p(z)] \\
        &= \mathbb E_q\Big[-\tfrac12\log\sigma^2 - \frac{(z-\mu)^2}{2\sigma^2} + \frac{z^2}{2}\Big]
           \quad(\text{the } \log 2\pi \text{ terms cancel}) \\
        &= -\tfrac12\log\sigma^2 - \tfrac12 + \tfrac12(\mu^2+\sigma^2)
           \quad(\mathbb E_q(z-\mu)^2=\sigma^2,\ \mathbb E_q z^2=\mu^2+\sigma^2) \\
        &= \tfrac12\big(\mu^2 + \sigma^2 - 1 - \log\sigma^2\big).

    The dimensions of a diagonal Gaussian are independent, so their KLs add up.
    """
    return 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).sum(-1)


def gaussian_kl_between(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    r"""KL between two diagonal Gaussians, summed over the last dimension.

    .. math::
        \mathrm{KL}\big(\mathcal N(\mu_q,\sigma_q^2)\,\|\,\mathcal N(\mu_p,\sigma_p^2)\big)
        = \tfrac12\Big[\log\frac{\sigma_p^2}{\sigma_q^2}
          + \frac{\sigma_q^2 + (\mu_q-\mu_p)^2}{\sigma_p^2} - 1\Big]

    With :math:`\mu_p=0,\ \sigma_p=1` this is :func:`gaussian_kl`.
    """
    return 0.5 * (logvar_p - logvar_q
                  + (logvar_q.exp() + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1.0).sum(-1)


# --------------------------------------------------------------------------------------
# 2. The reparameterization trick
# --------------------------------------------------------------------------------------
def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""A sample of :math:`z\sim q(z|x)=\mathcal N(\mu,\operatorname{diag}\sigma^2)`
    that gradients flow through.

    .. math::
        z = \mu + \sigma\odot\varepsilon,\qquad \sigma=\exp(\tfrac12\log\sigma^2),
        \qquad \varepsilon\sim\mathcal N(0, I)

    The randomness sits in :math:`\varepsilon`, which does not depend on the
    encoder, so :math:`z` is a differentiable function of :math:`(\mu,\log\sigma^2)`.
    """
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    return mu + std * eps


# --------------------------------------------------------------------------------------
# 3. Likelihoods p(x|z)
# --------------------------------------------------------------------------------------
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""log p(x|z) for binary pixels with :math:`p_i=\sigma(\text{logit}_i)`, summed per image.

    .. math::
        \log p(x|z) = \sum_i x_i\log p_i + (1-x_i)\log(1-p_i)

    computed from the logits (``binary_cross_entropy_with_logits``) so that it
    never takes the log of 0. Shape ``[B]``.
    """
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").reshape(
        x.shape[0], -1).sum(-1)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, logvar) -> torch.Tensor:
    r"""log p(x|z) for :math:`x\sim\mathcal N(\text{mean},\operatorname{diag}\sigma^2)`, summed per image.

    .. math::
        \log p(x|z) = -\tfrac12\sum_{i=1}^{D}\Big[\log 2\pi + \log\sigma_i^2
                      + \frac{(x_i-\text{mean}_i)^2}{\sigma_i^2}\Big]

    ``logvar`` may be a tensor shaped like ``x`` or a number (a fixed variance).
    With :math:`\sigma^2=1` this is :math:`-\tfrac12\|x-\text{mean}\|^2 - \tfrac D2\log 2\pi`:
    the squared error, up to a constant **per pixel**.
    """
    logvar = torch.as_tensor(logvar, dtype=x.dtype, device=x.device).expand_as(x)
    return log_normal(_flat(x), _flat(mean), _flat(logvar))


def condition_on_label(h: torch.Tensor, y: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """Append the one-hot label to a batch of feature vectors: ``[B, F] -> [B, F + num_classes]``.

    This is how the conditional VAE feeds the label y to both networks:
    q(z | x, y) and p(x | z, y).
    """
    return torch.cat([h, F.one_hot(y.long(), num_classes).to(h.dtype)], dim=1)


# --------------------------------------------------------------------------------------
# 4a. The seed's MLP VAE, made right
# --------------------------------------------------------------------------------------
class MLPVAE(nn.Module):
    r"""The seed's ``VariationalAutoEncoder``, made right.

    Same networks as the slide (one hidden layer each way), but

    * it is an ``nn.Module``: ``parameters()``, ``.to(device)``, ``state_dict()``
      work, and no ``Variable`` is needed (plain tensors track gradients);
    * the Gaussian log-likelihood has :math:`-\tfrac12\log 2\pi` once **per pixel**;
    * the decoder variance is what you ask for: ``decoder_variance="fixed"``
      gives :math:`p(x|z)=\mathcal N(f(z), \sigma^2 I)` with
      :math:`\sigma^2=\exp(\texttt{fixed\_logvar})` (1 by default, as the slide
      says), ``"learned"`` lets the decoder output a log-variance per pixel (what
      the slide's code does). A learned variance is kept above
      ``exp(min_logvar)``: always-black pixels would otherwise drive it to 0 and
      the density to infinity.
    * ``likelihood="bernoulli"`` swaps in binary pixels (the decoder outputs logits).
    """

    def __init__(self, dim_x: int = 784, dim_z: int = 20, dim_hidden: int = 400,
                 likelihood: str = "gaussian", decoder_variance: str = "fixed",
                 fixed_logvar: float = 0.0, min_logvar: float = -6.0):
        super().__init__()
        if likelihood not in ("gaussian", "bernoulli"):
            raise ValueError(f"likelihood must be 'gaussian' or 'bernoulli', not {likelihood!r}")
        if decoder_variance not in ("fixed", "learned"):
            raise ValueError(f"decoder_variance must be 'fixed' or 'learned', not {decoder_variance!r}")
        self.dim_x, self.dim_z, self.dim_hidden = dim_x, dim_z, dim_hidden
        self.likelihood, self.decoder_variance = likelihood, decoder_variance
        self.fixed_logvar, self.min_logvar = fixed_logvar, min_logvar
        self.latent_dim = dim_z
        learned = likelihood == "gaussian" and decoder_variance == "learned"
        self.encoder = nn.Sequential(nn.Linear(dim_x, dim_hidden), nn.ReLU(),
                                     nn.Linear(dim_hidden, 2 * dim_z))
        self.decoder = nn.Sequential(nn.Linear(dim_z, dim_hidden), nn.ReLU(),
                                     nn.Linear(dim_hidden, dim_x * (2 if learned else 1)))

    def encode(self, x):
        """q(z|x): ``(mu, logvar)``, each ``[B, dim_z]``."""
        mu, logvar = self.encoder(_flat(x)).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z):
        """The decoder's output: the mean (fixed variance), mean and log-variance, or logits."""
        return self.decoder(z)

    def _mean_logvar(self, out):
        if self.likelihood == "gaussian" and self.decoder_variance == "learned":
            mean, raw = out.chunk(2, dim=-1)
            # a smooth floor: logvar = min + softplus(raw - min) >= min
            return mean, self.min_logvar + F.softplus(raw - self.min_logvar)
        return out, torch.full_like(out, self.fixed_logvar)

    def log_likelihood(self, x, out):
        """log p(x|z) per image (nats), with the right constant."""
        if self.likelihood == "bernoulli":
            return bernoulli_log_likelihood(out, _flat(x))
        mean, logvar = self._mean_logvar(out)
        return gaussian_log_likelihood(_flat(x), mean, logvar)

    def mean_image(self, out):
        """E[x|z] as images 1x28x28 (clipped to [0, 1] for display in the Gaussian case)."""
        mean = torch.sigmoid(out) if self.likelihood == "bernoulli" else self._mean_logvar(out)[0]
        side = int(math.isqrt(self.dim_x))
        return mean.clamp(0, 1).reshape(-1, 1, side, side)

    def decoder_std(self, out):
        """The decoder's per-pixel standard deviation (Gaussian likelihood only)."""
        return torch.exp(0.5 * self._mean_logvar(out)[1])

    def forward(self, x):
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


# --------------------------------------------------------------------------------------
# 4b. The convolutional VAE
# --------------------------------------------------------------------------------------
class VAE(nn.Module):
    r"""A convolutional VAE for 1x28x28 images.

    Encoder (28 -> 14 -> 7)::

        x -> [conv 4x4 stride 2 -> act -> (blocks x conv 3x3 -> act)] per stage
          -> flatten -> (linear hidden -> act) -> linear 2*latent_dim -> (mu, logvar)

    Decoder, the mirror image with transposed convolutions (7 -> 14 -> 28),
    ending in one channel of **logits**.

    ``likelihood="bernoulli"``: :math:`p(x_i|z)=\mathrm{Bernoulli}(\sigma(\text{logit}_i))`
    (binarized MNIST). ``likelihood="gaussian"``: :math:`p(x_i|z)=\mathcal
    N(\sigma(\text{logit}_i), \sigma_i^2)` for grey levels, with a fixed variance
    (``decoder_logvar`` a number) or one learned log-variance per pixel
    (``decoder_logvar="learned"``).

    ``channels=(32, 64), hidden=0, blocks=0`` is the plain two-layer conv VAE.
    """

    def __init__(self, latent_dim: int = 16, channels=(32, 64), hidden: int = 256,
                 blocks: int = 0, likelihood: str = "bernoulli", decoder_logvar="learned",
                 num_classes: int = 0):
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', not {likelihood!r}")
        if len(channels) != 2:
            raise ValueError("channels: two stages (28 -> 14 -> 7), e.g. (32, 64)")
        self.latent_dim, self.likelihood, self.num_classes = latent_dim, likelihood, num_classes
        c1, c2 = channels
        act = nn.SiLU

        def stage(c_in, c_out, down: bool):
            layer = (nn.Conv2d(c_in, c_out, 4, 2, 1) if down
                     else nn.ConvTranspose2d(c_in, c_out, 4, 2, 1))
            extra = [m for _ in range(blocks) for m in (nn.Conv2d(c_out, c_out, 3, 1, 1), act())]
            return [layer, act(), *extra]

        self.encoder_conv = nn.Sequential(*stage(1, c1, True), *stage(c1, c2, True), nn.Flatten())
        features = c2 * 7 * 7
        head_in = features + num_classes
        self.encoder_head = (nn.Sequential(nn.Linear(head_in, hidden), act(),
                                           nn.Linear(hidden, 2 * latent_dim))
                             if hidden else nn.Linear(head_in, 2 * latent_dim))
        dec_in = latent_dim + num_classes
        self.decoder_fc = (nn.Sequential(nn.Linear(dec_in, hidden), act(),
                                         nn.Linear(hidden, features), act())
                           if hidden else nn.Sequential(nn.Linear(dec_in, features), act()))
        self.decoder_conv = nn.Sequential(
            nn.Unflatten(1, (c2, 7, 7)),
            *stage(c2, c1, False),
            nn.ConvTranspose2d(c1, 1, 4, 2, 1),  # 14 -> 28, one channel of logits
        )
        self.learned_logvar = likelihood == "gaussian" and decoder_logvar == "learned"
        if self.learned_logvar:
            self.decoder_logvar = nn.Parameter(torch.full((1, 28, 28), -2.0))
        elif likelihood == "gaussian":
            self.register_buffer("decoder_logvar", torch.full((1, 28, 28), float(decoder_logvar)))
        else:
            self.decoder_logvar = None

    # q(z|x) and p(x|z) ---------------------------------------------------------------
    def encode(self, x):
        """q(z|x) = N(mu, diag(exp(logvar))): returns ``(mu, logvar)``, each ``[B, latent_dim]``."""
        return self.encoder_head(self.encoder_conv(x)).chunk(2, dim=-1)

    def decode(self, z):
        """The decoder's logits, ``[B, 1, 28, 28]``."""
        return self.decoder_conv(self.decoder_fc(z))

    def log_likelihood(self, x, logits):
        """log p(x|z) per image, in nats (shape ``[B]``)."""
        if self.likelihood == "bernoulli":
            return bernoulli_log_likelihood(logits, x)
        return gaussian_log_likelihood(x, torch.sigmoid(logits), self.decoder_logvar)

    def mean_image(self, logits):
        """E[x|z]: the pixel probabilities (Bernoulli) or means (Gaussian), in [0, 1]."""
        return torch.sigmoid(logits)

    def forward(self, x):
        """``(logits, mu, logvar)`` for one reparameterized sample per image."""
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar)), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None):
        """``n`` images E[x|z] with z drawn from the prior N(0, I)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator).to(device)
        return self.mean_image(self.decode(z))


class ConditionalVAE(VAE):
    r"""A conditional VAE: :math:`q_\phi(z|x,y)` and :math:`p_\theta(x|z,y)`,
    with the prior :math:`p(z)=\mathcal N(0,I)`.

    The one-hot label is appended to the encoder's convolutional features and to
    the decoder's input (:func:`condition_on_label`). The derivation of the ELBO
    is unchanged, every distribution just gains a ``| y``:

    .. math::
        \log p(x|y) \ge \mathbb E_{q(z|x,y)}[\log p(x|z,y)] - \mathrm{KL}(q(z|x,y)\,\|\,p(z)).

    (Seed 002 writes the encoder as q(x|z,y): it is q(z|x,y).)
    """

    def __init__(self, latent_dim: int = 16, num_classes: int = 10, **kwargs):
        super().__init__(latent_dim=latent_dim, num_classes=num_classes, **kwargs)

    def encode(self, x, y):
        h = condition_on_label(self.encoder_conv(x), y, self.num_classes)
        return self.encoder_head(h).chunk(2, dim=-1)

    def decode(self, z, y):
        return self.decoder_conv(self.decoder_fc(condition_on_label(z, y, self.num_classes)))

    def forward(self, x, y):
        mu, logvar = self.encode(x, y)
        return self.decode(reparameterize(mu, logvar), y), mu, logvar

    @torch.no_grad()
    def sample(self, y: torch.Tensor, generator: torch.Generator | None = None):
        """One image per label in ``y``, with z drawn from the prior."""
        device = next(self.parameters()).device
        z = torch.randn(len(y), self.latent_dim, generator=generator).to(device)
        return self.mean_image(self.decode(z, y.to(device)))


# --------------------------------------------------------------------------------------
# 5. The ELBO and the importance-weighted bound
# --------------------------------------------------------------------------------------
def _encode(model, x, y):
    return model.encode(x) if y is None else model.encode(x, y)


def _decode(model, z, y):
    return model.decode(z) if y is None else model.decode(z, y)


def elbo_terms(model, x, y=None):
    r"""The two terms of the ELBO per image, with one reparameterized sample.

    Returns ``(log_px_z, kl)``, each ``[B]``:
    :math:`\log p(x|z)` with :math:`z\sim q(z|x)` (a one-sample estimate of the
    reconstruction term) and the closed-form :math:`\mathrm{KL}(q(z|x)\|p(z))`.
    """
    mu, logvar = _encode(model, x, y)
    z = reparameterize(mu, logvar)
    return model.log_likelihood(x, _decode(model, z, y)), gaussian_kl(mu, logvar)


def elbo(model, x, y=None, beta: float = 1.0) -> torch.Tensor:
    r"""The evidence lower bound per image (nats), shape ``[B]``.

    .. math::
        \mathcal L(x) = \mathbb E_{q_\phi(z|x)}[\log p_\theta(x|z)]
                        - \beta\,\mathrm{KL}(q_\phi(z|x)\,\|\,p(z)) \;\le\; \log p_\theta(x)

    (the bound holds for :math:`\beta=1`; :math:`\beta\ne1` is the β-VAE objective).
    """
    log_px_z, kl = elbo_terms(model, x, y)
    return log_px_z - beta * kl


def vae_loss(model, batch, beta: float = 1.0, conditional: bool = False):
    """``loss_fn`` for :func:`course_utils.training.fit`: the batch mean of the negative ELBO.

    Returns ``(loss, {"reconstruction": -E log p(x|z), "kl": KL})``, all in nats per image.
    """
    x, y = batch
    log_px_z, kl = elbo_terms(model, x, y if conditional else None)
    loss = (-log_px_z + beta * kl).mean()
    return loss, {"reconstruction": -log_px_z.mean().detach(), "kl": kl.mean().detach()}


def _repeat(t: torch.Tensor, s: int) -> torch.Tensor:
    """``[B, ...] -> [s * B, ...]``: the batch repeated ``s`` times (sample-major, like ``z``)."""
    return t.unsqueeze(0).expand(s, *t.shape).reshape(s * len(t), *t.shape[1:])


@torch.no_grad()
def importance_log_weights(model, x, k: int, y=None, chunk: int = 4096) -> torch.Tensor:
    r"""Log importance weights :math:`\log w_j = \log p(x|z_j) + \log p(z_j) - \log q(z_j|x)`, ``[k, B]``.

    :math:`z_1,\dots,z_k\sim q(z|x)` independently. Since
    :math:`\mathbb E_q[w]=\int q\,\frac{p(x,z)}{q}\,dz=p(x)`, the weights are
    unbiased estimates of the marginal likelihood. ``chunk`` bounds how many
    images go through the decoder at once.
    """
    mu, logvar = _encode(model, x, y)
    per_round = max(1, chunk // max(len(x), 1))
    out = []
    for start in range(0, k, per_round):
        s = min(per_round, k - start)
        z = reparameterize(mu.expand(s, *mu.shape), logvar.expand(s, *logvar.shape))  # [s, B, d]
        flat_z = z.reshape(s * len(x), -1)
        decoded = _decode(model, flat_z, None if y is None else _repeat(y, s))
        log_px_z = model.log_likelihood(_repeat(x, s), decoded).reshape(s, len(x))
        out.append(log_px_z + log_standard_normal(z) - log_normal(z, mu, logvar))
    return torch.cat(out)


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    r"""The importance-weighted lower bound from ``[k, B]`` log weights, per image.

    .. math::
        \mathcal L_k(x) = \log \frac1k\sum_{j=1}^k w_j
        = \operatorname{logsumexp}_j(\log w_j) - \log k
        \;\le\; \log p(x)

    :math:`\mathcal L_1` is the ELBO; :math:`\mathcal L_k` grows with k and tends
    to :math:`\log p(x)` as :math:`k\to\infty` (Burda et al., 2016).
    """
    k = log_weights.shape[0]
    return torch.logsumexp(log_weights, dim=0) - math.log(k)


def _log_weight_batches(model, x, k: int, y, batch_size: int):
    """``importance_log_weights`` of consecutive batches of ``x``, the model in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            yield importance_log_weights(model, x[i:i + batch_size], k,
                                         None if y is None else y[i:i + batch_size])
    finally:
        model.train(was_training)


@torch.no_grad()
def iwae_nll(model, x, k: int = 100, y=None, reduction: str = "mean", batch_size: int = 100):
    r"""Test negative log-likelihood estimated with k importance samples, in **nats per image**.

    :math:`-\mathcal L_k(x)`, an upper bound on :math:`-\log p(x)` that
    tightens as k grows. ``reduction="mean"`` averages over the images (a
    0-d tensor); ``"none"`` returns one value per image ``[B]``.
    """
    values = torch.cat([-iwae_bound(lw) for lw in _log_weight_batches(model, x, k, y, batch_size)])
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")


@torch.no_grad()
def evaluate_bounds(model, x, k: int = 100, y=None, batch_size: int = 100) -> dict:
    """Mean −ELBO and IWAE NLL (nats per image) from the same k samples per image.

    The k log weights give both: their mean is a k-sample estimate of the ELBO
    (the KL estimated by Monte Carlo), their log-mean-exp the IWAE bound.
    """
    neg_elbo, nll = [], []
    for lw in _log_weight_batches(model, x, k, y, batch_size):
        neg_elbo.append(-lw.mean(0))
        nll.append(-iwae_bound(lw))
    return {"neg_elbo": torch.cat(neg_elbo).mean().item(), "iwae_nll": torch.cat(nll).mean().item(),
            "k": k, "images": len(x)}


# --------------------------------------------------------------------------------------
# 6. Training recipe and the functions behind `course train vae`
# --------------------------------------------------------------------------------------
class Progress:
    """How far training is, in [0, 1]: the larger of the step fraction and the time fraction.

    The learning-rate schedule and the KL warm-up follow it, so a run cut short
    by ``max_seconds`` still ends with a decayed learning rate and a full KL
    weight. The clock is read when ``step`` is set (after each optimizer step), not
    when the fraction is asked for: a run that finishes its steps well inside its
    time limit then follows the step fraction alone and is exactly reproducible.
    """

    def __init__(self, total_steps: int, max_seconds: float | None):
        self.total_steps, self.max_seconds = max(int(total_steps), 1), max_seconds
        self.start = time.monotonic()
        self._step, self._seconds = 0, 0.0

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step, self._seconds = value, time.monotonic() - self.start

    def __call__(self) -> float:
        fraction = self._step / self.total_steps
        if self.max_seconds:
            fraction = max(fraction, self._seconds / self.max_seconds)
        return min(fraction, 1.0)


def lr_factor(progress: float, warmup: float = 0.02, final: float = 0.02) -> float:
    """Learning-rate multiplier: a short linear warm-up, then a cosine decay to ``final``."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    t = (progress - warmup) / max(1 - warmup, 1e-8)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def kl_weight(progress: float, warmup: float) -> float:
    """KL warm-up: β grows linearly from 0 to 1 over the first ``warmup`` of training."""
    return 1.0 if warmup <= 0 else min(1.0, progress / warmup)


def vae_config(budget_name: str | None = None) -> dict:
    """The VAE that ``course train vae`` trains, sized for a budget (a JSON-able dict).

    Design, against a plain two-layer conv VAE (z=16, Adam 1e-3, batch 128):

    * a 32-d latent and a 256-unit hidden layer each way (more capacity where it
      is cheap: the fully connected layers, not the 28x28 convolutions);
    * Adam at 2e-3 with a short warm-up and a cosine decay to 2 % of it; the
      schedule follows the step count *and* the clock (:class:`Progress`), so a
      run cut by the time limit still ends on a small learning rate;
    * a KL warm-up (β from 0 to 1 over the first 10 % of training), which lets
      the decoder learn to use z before the KL pulls q onto the prior.

    ``blocks`` adds 3x3 convolutions per stage (the ``full`` budget, on a GPU).
    ``train_images`` limits the training set (the ``smoke`` budget).
    """
    from .runtime import by_budget

    cfg = by_budget(
        budget_name,
        latent_dim=(16, 32, 32),
        channels=([16, 32], [32, 64], [64, 128]),
        hidden=(128, 256, 512),
        blocks=(0, 0, 1),
        epochs=(1, 130, 200),
        train_images=(2_000, None, None),
        time_limit=(60, 290, 3600),
        eval_k=(20, 100, 1000),
        eval_images=(200, 2000, None),
        prior_samples=(200, 1000, 5000),
    )
    return {
        "model": "VAE", "likelihood": "bernoulli",
        "latent_dim": cfg.latent_dim, "channels": cfg.channels, "hidden": cfg.hidden,
        "blocks": cfg.blocks, "train_images": cfg.train_images,
        "batch_size": 128, "lr": 2e-3, "final_lr_factor": 0.02, "lr_warmup": 0.02,
        "kl_warmup": 0.1, "epochs": cfg.epochs, "time_limit": cfg.time_limit,
        "binarize": "dynamic", "eval_binarize_seed": 0, "eval_k": cfg.eval_k,
        "eval_images": cfg.eval_images, "prior_samples": cfg.prior_samples,
        "budget": cfg.budget,
    }


def course_train_config(budget_name: str | None = None, seed: int = 0,
                        max_seconds: float | None = None) -> dict:
    """The config exactly as ``course train vae`` completes and caches it.

    ``course train`` adds the seed, its ``--max-seconds`` and the training data's
    description to :func:`vae_config`; a notebook that builds the same dict finds
    the checkpoint that command cached (``checkpoints.load_or_train``).
    """
    from .checkpoints import training_config

    return training_config(vae_config(budget_name), budget_name, seed=seed, max_seconds=max_seconds)


def build_vae(config: dict) -> nn.Module:
    """A fresh model from a config (``VAE`` or ``ConditionalVAE``), seeded by ``config['seed']``."""
    from .runtime import local_seed

    cls = ConditionalVAE if config.get("model") == "ConditionalVAE" else VAE
    kwargs = dict(latent_dim=config["latent_dim"], channels=tuple(config["channels"]),
                  hidden=config["hidden"], blocks=config["blocks"],
                  likelihood=config.get("likelihood", "bernoulli"))
    if config.get("likelihood") == "gaussian":
        kwargs["decoder_logvar"] = config.get("decoder_logvar", "learned")
    with local_seed(int(config.get("seed", 0))):  # the same initial weights wherever it is built
        return cls(**kwargs)


def train_vae(model, config: dict, device=None, max_seconds: float | None = None,
              images=None, labels=None, **fit_kwargs) -> dict | None:
    """Train ``model`` with the config's recipe; returns a dict of training facts.

    Data: ``mnist("train")`` with dynamic binarization (a fresh Bernoulli draw of
    every image at every epoch), unless ``images``/``labels`` are given.
    ``max_seconds`` (else the config's ``time_limit``) caps the wall-clock time; the
    schedule adapts so the learning rate has decayed when time is up.
    """
    from .data import BatchLoader, training_tensors
    from .runtime import get_device
    from .training import fit

    device = torch.device(device) if device is not None else get_device()
    images, labels, description = training_tensors(device, config.get("train_images"), images, labels)
    binarize = config.get("binarize", "dynamic") == "dynamic"  # BatchLoader draws the bits
    loader = BatchLoader(images.to(device), labels.to(device), batch_size=config["batch_size"],
                         shuffle=True, binarize=binarize, seed=config.get("seed", 0))
    limit = max_seconds if max_seconds is not None else config.get("time_limit")
    progress = Progress(config["epochs"] * len(loader), limit)
    conditional = isinstance(model, ConditionalVAE)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _: lr_factor(progress(), config.get("lr_warmup", 0.02),
                                       config.get("final_lr_factor", 0.02)))

    def loss_fn(m, batch):
        beta = kl_weight(progress(), config.get("kl_warmup", 0.0)) * config.get("beta", 1.0)
        return vae_loss(m, batch, beta=beta, conditional=conditional)

    user_on_step = fit_kwargs.pop("on_step", None)

    def on_step(step, value):
        progress.step = step
        if user_on_step is not None:
            user_on_step(step, value)

    fit_kwargs.setdefault("desc", "VAE")
    result = fit(model, loss_fn, loader, optimizer=optimizer, scheduler=scheduler,
                 epochs=config["epochs"], max_seconds=limit, device=device, on_step=on_step,
                 **fit_kwargs)
    history = result.history
    model.history = history  # the loss curves, for plots (not part of the returned metrics)
    tail = slice(-max(1, len(loader)), None)  # the last epoch's worth of steps
    return {"train_steps": result.step, "train_epochs": round(result.step / len(loader), 2),
            "train_loss_last_epoch": round(sum(history.losses[tail]) / len(history.losses[tail]), 3),
            "train_seconds_fit": round(history.seconds, 1), "stopped_by": history.stopped_by,
            "train_data": description}


def evaluate_vae(model, config: dict, device=None, classifier=None) -> dict:
    """Held-out figures: −ELBO and IWAE NLL (nats per image, k stated), and prior-sample quality.

    * data: ``mnist("test", binarize="fixed", binarize_seed=config["eval_binarize_seed"])``,
      a binarization drawn once from a seed, so every run scores the same bits;
    * ``prior_confident_fraction``: the share of ``prior_samples`` images
      E[x|z], z ~ N(0, I), that the course's MNIST classifier assigns to a class
      with probability >= 0.9.
    """
    from .data import as_tensors, describe, mnist
    from .runtime import get_device

    device = torch.device(device) if device is not None else get_device()
    model.to(device).eval()
    test_set = mnist("test", binarize="fixed", binarize_seed=config.get("eval_binarize_seed", 0))
    images, labels = as_tensors(test_set, device, limit=config.get("eval_images"))
    torch.manual_seed(config.get("seed", 0))
    conditional = isinstance(model, ConditionalVAE)
    bounds = evaluate_bounds(model, images, k=config["eval_k"], y=labels if conditional else None)
    metrics = {
        "test_neg_elbo": round(bounds["neg_elbo"], 2),
        "test_iwae_nll": round(bounds["iwae_nll"], 2),
        "iwae_k": config["eval_k"],
        "test_images": bounds["images"],
        "test_data": (describe(test_set) + ", fixed binarization "
                      f"(seed {config.get('eval_binarize_seed', 0)})"),
    }
    n = config.get("prior_samples", 1000)
    generator = torch.Generator().manual_seed(config.get("seed", 0))
    if conditional:
        samples = model.sample(torch.arange(n) % 10, generator=generator)
    else:
        samples = model.sample(n, generator=generator)
    from .metrics import confident_fraction, load_feature_net

    classifier = classifier or load_feature_net(device=device)
    metrics["prior_confident_fraction"] = round(float(confident_fraction(classifier, samples)), 4)
    metrics["prior_samples"] = n
    return metrics


__all__ = [
    "ConditionalVAE", "MLPVAE", "VAE", "bernoulli_log_likelihood", "build_vae",
    "condition_on_label", "course_train_config", "elbo", "elbo_terms", "evaluate_bounds", "evaluate_vae",
    "gaussian_kl", "gaussian_kl_between", "gaussian_log_likelihood", "importance_log_weights",
    "iwae_bound", "iwae_nll", "kl_weight", "log_normal", "log_standard_normal", "lr_factor",
    "reparameterize", "train_vae", "vae_config", "vae_loss",
]
