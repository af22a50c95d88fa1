"""Autoencoders (topic 1): models, losses, corruptions, penalties and analysis tools.

Notation used everywhere in the course, in the maths *and* in the code::

    h     = f(x)       the encoder f maps an image x to its code h   (``model.encode``)
    x_hat = g(h)       the decoder g maps a code back to an image     (``model.decode``)
    L(x)  = ||x - g(f(x))||^2                                         (``reconstruction_loss``)

(Erratum: seed ``000`` sometimes writes the decoder as ``D``, and seed ``004`` calls the
encoder's activation ``g`` and the whole network ``f``. The course always means
encoder = f, decoder = g.)

Conventions of this module
--------------------------
* **Decoder output.** :class:`MLPAutoencoder` ends its decoder with a sigmoid, so
  ``g(h)`` is an image with pixels in [0, 1], directly comparable with ``x``. A linear
  autoencoder (``linear=True``) has no activation at all, not even the sigmoid: it must
  be an affine map for the PCA result to hold. The seed's :class:`ConvAutoencoder`
  (from :mod:`course_utils.convolution`) is used exactly as that module defines it.
* **Loss.** ``reconstruction_loss`` is the squared error *summed over the pixels* of
  each image and *averaged over the batch*: the per-image quantity ||x - x_hat||^2 of
  the maths. Reported numbers (``reconstruction_mse``, ``evaluate_ae``) are the *mean
  squared error per pixel*, i.e. that loss divided by 784, so they do not depend on the
  image size. The penalties (sparse, contractive) follow the loss: summed over the
  code units of one image, averaged over the batch.
* Everything takes and returns torch tensors, works batched, on any device.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# The seed's deep conv AE (1x28x28 -> 8x1x1 -> 1x28x28) lives with the transposed
# convolutions of topic 2; ConvAutoencoder is its public name.
from .convolution import SeedConvAutoencoder as ConvAutoencoder
from .convolution import init_output_bias
from .data import BatchLoader, as_tensors, describe, mnist, training_data_description
from .runtime import by_budget, get_device, seed_everything

IMAGE_SHAPE = (1, 28, 28)
MEAN_PIXEL = 0.13  # the average MNIST pixel intensity (about 0.1307)


# ----------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------
class MLPAutoencoder(nn.Module):
    """A fully connected autoencoder for 1x28x28 images.

    encoder f:  x (784) -> hidden[0] -> ... -> hidden[-1] -> h (latent_dim)
    decoder g:  h -> hidden[-1] -> ... -> hidden[0] -> 784 -> sigmoid -> x_hat (1x28x28)

    Hidden layers use ReLU. By default the code ``h`` has no activation (any real
    number); ``code_activation="sigmoid"`` or ``"relu"`` squashes it (the classic
    contractive AE uses a sigmoid code, a sparse AE often a ReLU code, whose units can be
    exactly 0). The decoder ends with a sigmoid so that ``x_hat`` lies in [0, 1] like
    the data; its bias starts at logit(``mean_pixel``), so that an untrained decoder
    draws the average intensity (0.13 for MNIST) rather than 0.5 (see
    :func:`init_output_bias`).

    With ``linear=True`` every activation is removed (the sigmoid too), so
    ``g(f(x)) = W_g (W_f x + b_f) + b_g`` is affine: trained with the L2 loss it
    finds the same subspace as PCA (see :func:`pca_subspace`). ``hidden`` defaults to
    ``()`` in that case, i.e. one weight matrix in f and one in g.
    """

    def __init__(self, latent_dim: int = 32, hidden: Sequence[int] | None = None,
                 linear: bool = False, image_shape: tuple[int, ...] = IMAGE_SHAPE,
                 code_activation: str | None = None, mean_pixel: float | None = None):
        super().__init__()
        if code_activation not in (None, "sigmoid", "relu"):
            raise ValueError(f"code_activation must be None, 'sigmoid' or 'relu', not {code_activation!r}")
        if linear and code_activation:
            raise ValueError("a linear autoencoder has no code activation")
        if hidden is None:
            hidden = () if linear else (256,)
        self.latent_dim, self.hidden, self.linear = latent_dim, tuple(hidden), linear
        self.code_activation = code_activation
        self.image_shape = tuple(image_shape)
        d = math.prod(self.image_shape)

        def act():
            return nn.Identity() if linear else nn.ReLU()

        widths = [d, *self.hidden]
        enc: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            enc += [nn.Linear(a, b), act()]
        enc.append(nn.Linear(widths[-1], latent_dim))
        if code_activation:
            enc.append(nn.Sigmoid() if code_activation == "sigmoid" else nn.ReLU())
        dec: list[nn.Module] = []
        back = [latent_dim, *reversed(self.hidden)]
        for a, b in zip(back[:-1], back[1:], strict=True):
            dec += [nn.Linear(a, b), act()]
        dec += [nn.Linear(back[-1], d), nn.Identity() if linear else nn.Sigmoid(),
                nn.Unflatten(1, self.image_shape)]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        if not linear:
            init_output_bias(self, MEAN_PIXEL if mean_pixel is None else mean_pixel)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """h = f(x): N x 1 x 28 x 28 -> N x latent_dim."""
        return self.encoder(x)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """x_hat = g(h): N x latent_dim -> N x 1 x 28 x 28 (in [0, 1] unless linear)."""
        return self.decoder(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x_hat = g(f(x))."""
        return self.decode(self.encode(x))


def affine_maps(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matrices of a *linear* autoencoder: ``(W_f, b_f, W_g, b_g)``.

    f(x) = W_f x + b_f and g(h) = W_g h + b_g, found by probing the maps with the zero
    vector and the unit vectors, so this works for any depth of linear layers.
    Shapes: W_f is k x D, b_f is k, W_g is D x k, b_g is D (D = 784).
    """
    param = next(model.parameters())
    d = math.prod(model.image_shape)
    with torch.no_grad():
        eye_d = torch.eye(d, device=param.device).view(d, *model.image_shape)
        b_f = model.encode(torch.zeros_like(eye_d[:1]))[0]
        W_f = (model.encode(eye_d) - b_f).T
        eye_k = torch.eye(model.latent_dim, device=param.device)
        b_g = model.decode(torch.zeros_like(eye_k[:1])).flatten(1)[0]
        W_g = (model.decode(eye_k).flatten(1) - b_g).T
    return W_f, b_f, W_g, b_g


# ----------------------------------------------------------------------------------
# Losses, corruptions and penalties
# ----------------------------------------------------------------------------------
def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """L2 reconstruction loss: (1/N) sum_n ||x_n - x_hat_n||^2 (sum over pixels, mean over batch)."""
    return (x - x_hat).pow(2).flatten(1).sum(1).mean()


def reconstruction_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error *per pixel* (= ``reconstruction_loss`` / number of pixels)."""
    return (x - x_hat).pow(2).mean()


def _uniform_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.rand_like(x)
    return torch.rand(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)


def _normal_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None,
                   clip: bool = True) -> torch.Tensor:
    """Additive Gaussian corruption: x_tilde = clip(x + sigma * eps, 0, 1), eps ~ N(0, I).

    Clipping keeps x_tilde a valid image (pixels in [0, 1]); ``clip=False`` skips it.
    """
    noisy = x + sigma * _normal_like(x, generator)
    return noisy.clamp(0.0, 1.0) if clip else noisy


def masking_noise(x: torch.Tensor, nu: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Masking corruption: each pixel is set to 0 *with probability nu*, else kept.

    x_tilde = m * x with m_i ~ Bernoulli(1 - nu), independently per pixel. Unlike
    dropout, the kept pixels are *not* rescaled by 1 / (1 - nu): the corrupted image
    must still look like a digit with holes in it.
    """
    if not 0.0 <= nu <= 1.0:
        raise ValueError(f"nu is a probability, got {nu}")
    keep = _uniform_like(x, generator) >= nu
    return x * keep


def sparse_penalty(h: torch.Tensor, lam: float) -> torch.Tensor:
    """Sparsity penalty lam * ||h||_1, summed over code units, averaged over the batch.

    (Erratum: seed ``000`` puts this slide under the title "Denoising Autoencoder". It is
    the *sparse* autoencoder; denoising is a different idea, see :func:`masking_noise`.)
    """
    return lam * h.abs().flatten(1).sum(1).mean()


def contractive_penalty(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        lam: float, create_graph: bool = True) -> torch.Tensor:
    """Contractive penalty lam * sum_i ||grad_x h_i||^2 = lam * ||J_f(x)||_F^2, batch mean.

    h = f(x) has k units; the gradient of unit i with respect to the input is row i
    of the Jacobian J_f(x). We get it with autograd, one unit at a time: because every
    image is encoded independently, the gradient of ``h[:, i].sum()`` with respect to
    the batch ``x`` holds, in row n, exactly grad_x h_i(x_n).

    ``create_graph=True`` keeps the graph of these gradients, so the penalty itself can
    be differentiated with respect to the encoder's weights and trained. (Encoders with
    batch norm in training mode mix images and break the one-unit-at-a-time trick.)
    """
    x = x.detach().requires_grad_(True)
    h = encoder(x).flatten(1)
    total = x.new_zeros(x.shape[0])
    for i in range(h.shape[1]):
        (grad,) = torch.autograd.grad(h[:, i].sum(), x, create_graph=create_graph,
                                      retain_graph=True)
        total = total + grad.pow(2).flatten(1).sum(1)
    return lam * total.mean()


def contractive_penalty_sigmoid(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                                lam: float) -> torch.Tensor:
    """Closed form of the contractive penalty for one sigmoid layer h = sigmoid(W x + b).

    dh_i/dx_j = h_i (1 - h_i) W_ij, hence
    sum_i ||grad_x h_i||^2 = sum_i (h_i (1 - h_i))^2 sum_j W_ij^2  (then batch mean).
    """
    h = torch.sigmoid(x.flatten(1) @ weight.T + bias)
    per_image = (h * (1 - h)).pow(2) @ weight.pow(2).sum(1)
    return lam * per_image.mean()


# ----------------------------------------------------------------------------------
# Latent space: interpolation, sampling, the explorer widget
# ----------------------------------------------------------------------------------
def interpolate(encoder, decoder, x0: torch.Tensor, x1: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decoded latent interpolation xi(x0, x1, alpha) = g((1 - alpha) f(x0) + alpha f(x1)).

    alpha runs over ``torch.linspace(0, 1, steps)``, so the first image decodes f(x0) and
    the last decodes f(x1). ``x0`` and ``x1`` are one image (C x H x W) or a batch of
    the same shape; the result has shape ``(steps, *x0.shape)``.
    """
    single = x0.dim() == 3
    if single:
        x0, x1 = x0.unsqueeze(0), x1.unsqueeze(0)
    with torch.no_grad():
        h0, h1 = encoder(x0), encoder(x1)
        alphas = torch.linspace(0, 1, steps, device=h0.device, dtype=h0.dtype)
        shape = (steps,) + (1,) * h0.dim()
        codes = (1 - alphas.view(shape)) * h0 + alphas.view(shape) * h1  # steps x N x ...
        out = decoder(codes.reshape(-1, *h0.shape[1:]))
    out = out.reshape(steps, *x0.shape)
    return out[:, 0] if single else out


def pixel_interpolate(x0: torch.Tensor, x1: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """The naive alternative: blend the pixels, (1 - alpha) x0 + alpha x1. Shape (steps, *x0.shape)."""
    alphas = torch.linspace(0, 1, steps, device=x0.device, dtype=x0.dtype)
    shape = (steps,) + (1,) * x0.dim()
    return (1 - alphas.view(shape)) * x0 + alphas.view(shape) * x1


@dataclass
class GaussianFit:
    """A Gaussian N(mean, cov) fitted to a set of codes, to sample new codes from."""

    mean: torch.Tensor
    cov: torch.Tensor

    @classmethod
    def fit(cls, codes: torch.Tensor) -> GaussianFit:
        codes = codes.flatten(1)
        mean = codes.mean(0)
        centred = codes - mean
        cov = centred.T @ centred / max(len(codes) - 1, 1)
        return cls(mean, cov)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = len(self.mean)
        jitter = 1e-6 * torch.eye(k, device=self.cov.device, dtype=self.cov.dtype)
        chol = torch.linalg.cholesky(self.cov + jitter)
        eps = torch.randn(n, k, generator=generator,
                          device=generator.device if generator is not None else self.mean.device)
        return self.mean + eps.to(self.mean.device, self.mean.dtype) @ chol.T


def _device_of(fn) -> torch.device:
    """The device of a module, or of the module behind a bound method such as ``model.decode``."""
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        param = next(owner.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


def decode_latent_point(decoder, z) -> torch.Tensor:
    """Decode one latent point ``z`` (a sequence of k numbers) into an H x W image on the CPU."""
    z = torch.as_tensor(z, dtype=torch.float32, device=_device_of(decoder)).reshape(1, -1)
    with torch.no_grad():
        image = decoder(z)
    return image.reshape(-1, *image.shape[-2:])[0].float().cpu()


def latent_explorer_figure(decoder, z, codes=None, labels=None, z_range=None,
                           scatter_title: str = "codes h = f(x) of test digits"):
    """The explorer's picture for one point ``z``: the code scatter with a cross, and g(z).

    A plain function (no widget), so it can be tested and used in static notebooks.
    Returns a matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from .plotting import latent_scatter

    image = decode_latent_point(decoder, z)
    if codes is None:
        fig, ax_img = plt.subplots(figsize=(3, 3))
    else:
        fig, (ax_map, ax_img) = plt.subplots(1, 2, figsize=(8, 3.6),
                                             gridspec_kw={"width_ratios": [1.5, 1]})
        latent_scatter(codes, labels, title=scatter_title, ax=ax_map,
                       point_size=4)
        ax_map.plot([z[0]], [z[1]], marker="x", color="black", markersize=12, mew=3)
        ax_map.set(xlabel="$h_1$", ylabel="$h_2$")
        if z_range is not None:
            (x_lo, x_hi), (y_lo, y_hi) = _ranges(z_range)
            ax_map.set(xlim=(x_lo, x_hi), ylim=(y_lo, y_hi))
    ax_img.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
    ax_img.set(title=f"g(h), h = ({z[0]:.2f}, {z[1]:.2f})", xticks=[], yticks=[])
    fig.tight_layout()
    return fig


def _ranges(z_range):
    z_range = [tuple(float(v) for v in r) for r in z_range] if isinstance(z_range[0], (tuple, list)) \
        else [tuple(float(v) for v in z_range)] * 2
    if len(z_range) != 2 or any(len(r) != 2 or r[0] >= r[1] for r in z_range):
        raise ValueError(f"z_range must be (lo, hi) or ((lo1, hi1), (lo2, hi2)), got {z_range}")
    return z_range


def figure_png(fig) -> bytes:
    """A Matplotlib figure as PNG bytes (and closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def latent_explorer(decoder, z_range=(-3.0, 3.0), codes=None, labels=None, steps: int = 60,
                    scatter_title: str = "codes h = f(x) of test digits"):
    """An ipywidgets explorer of a 2-D latent space: two sliders pick z, the figure shows g(z).

    ``z_range`` is ``(lo, hi)`` for both axes or ``((lo1, hi1), (lo2, hi2))``. With
    ``codes`` (N x 2, e.g. the test codes) and ``labels`` the scatter is drawn beside the
    digit, with the chosen point marked. Returns a ``VBox``; its ``.sliders`` and
    ``.image`` attributes give access to the parts (``.update()`` redraws), and
    ``.snapshot()`` gives the starting picture as PNG bytes.
    """
    import ipywidgets as widgets

    (x_lo, x_hi), (y_lo, y_hi) = _ranges(z_range)
    make = dict(continuous_update=False, readout_format=".2f")
    s1 = widgets.FloatSlider(value=(x_lo + x_hi) / 2, min=x_lo, max=x_hi,
                             step=(x_hi - x_lo) / steps, description="h1", **make)
    s2 = widgets.FloatSlider(value=(y_lo + y_hi) / 2, min=y_lo, max=y_hi,
                             step=(y_hi - y_lo) / steps, description="h2", **make)
    image = widgets.Image(format="png")

    def update(*_):
        z = (s1.value, s2.value)
        image.value = figure_png(latent_explorer_figure(decoder, z, codes, labels, z_range,
                                                        scatter_title))

    s1.observe(update, names="value")
    s2.observe(update, names="value")
    update()
    box = widgets.VBox([widgets.HBox([s1, s2]), image])
    box.sliders, box.image, box.update = (s1, s2), image, update
    starting_picture = image.value
    box.snapshot = lambda: starting_picture  # PNG, for readers without a kernel
    return box


# ----------------------------------------------------------------------------------
# PCA and principal angles (linear AE = PCA)
# ----------------------------------------------------------------------------------
@dataclass
class PCA:
    """The first k principal components of a data set.

    ``mean`` (D), ``components`` (D x k, orthonormal columns, by decreasing variance) and
    ``variances`` (k). As an "autoencoder": encode(x) = U^T (x - mean), decode(h) = U h + mean.
    """

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).to(self.mean) - self.mean) @ self.components

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.components.T + self.mean

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Project onto the principal subspace; same shape and dtype as ``x``."""
        return self.decode(self.encode(x)).to(x).reshape(x.shape)


def pca_subspace(X: torch.Tensor, k: int) -> PCA:
    """PCA of the rows of ``X`` (N x D, or N x C x H x W): the top-k eigenvectors of the
    covariance (1/N) sum_n (x_n - mean)(x_n - mean)^T, computed in float64."""
    X = X.flatten(1).double()
    mean = X.mean(0)
    centred = X - mean
    cov = centred.T @ centred / len(X)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending order
    order = torch.argsort(eigenvalues, descending=True)[:k]
    return PCA(mean, eigenvectors[:, order], eigenvalues[order])


def _orthonormal_basis(A: torch.Tensor) -> torch.Tensor:
    U, S, _ = torch.linalg.svd(A.double(), full_matrices=False)
    rank = int((S > S.max() * max(A.shape) * torch.finfo(torch.float64).eps).sum())
    return U[:, :rank]


def subspace_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of A (D x p) and B (D x q).

    With orthonormal bases Q_A, Q_B, the cosines of the angles are the singular values
    of Q_A^T Q_B. Small angles are taken from the sines instead (the singular values of
    Q_B - Q_A Q_A^T Q_B), which is accurate where arccos is not. All angles 0 means the
    two matrices span the same subspace; there are min(rank A, rank B) angles.
    """
    QA, QB = _orthonormal_basis(A.detach().cpu()), _orthonormal_basis(B.detach().cpu())
    if QA.shape[1] < QB.shape[1]:
        QA, QB = QB, QA
    cosines = torch.linalg.svdvals(QA.T @ QB).clamp(-1, 1)               # descending
    sines = torch.linalg.svdvals(QB - QA @ (QA.T @ QB)).clamp(-1, 1)      # descending
    from_cos = torch.arccos(cosines)                                     # ascending
    from_sin = torch.arcsin(sines).flip(0)                               # ascending
    return torch.where(cosines.pow(2) < 0.5, from_cos, from_sin)


def projection_matrix(A: torch.Tensor) -> torch.Tensor:
    """The orthogonal projection P = Q Q^T onto the column space of A (D x D, float64)."""
    Q = _orthonormal_basis(A.detach().cpu())
    return Q @ Q.T


# ----------------------------------------------------------------------------------
# Using the codes: linear probe, anomaly scores, ROC
# ----------------------------------------------------------------------------------
def linear_probe(features_train: torch.Tensor, y_train: torch.Tensor, features_test: torch.Tensor,
                 y_test: torch.Tensor, weight_decay: float = 1e-2, iterations: int = 200) -> float:
    """Accuracy on the test set of a logistic regression trained on frozen features.

    Features are flattened and standardised with the training mean and standard
    deviation; the model softmax(W phi + b) is fitted by L-BFGS to the cross-entropy plus
    ``weight_decay * ||W||^2`` (a small L2 term keeps it well posed with few labels).
    Deterministic. Returns a float in [0, 1].
    """
    Xtr = features_train.detach().flatten(1).double().cpu()
    Xte = features_test.detach().flatten(1).double().cpu()
    ytr, yte = y_train.detach().long().cpu(), y_test.detach().long().cpu()
    mean, std = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xte = (Xtr - mean) / std, (Xte - mean) / std
    classes = int(max(ytr.max(), yte.max())) + 1
    W = torch.zeros(Xtr.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], lr=1, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(Xtr @ W + b, ytr) + weight_decay * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float(((Xte @ W + b).argmax(1) == yte).double().mean())


def anomaly_scores(model, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Per-image reconstruction error ||x_n - g(f(x_n))||^2 (sum over pixels), shape N.

    A high score means the autoencoder cannot rebuild the image: it is unlike the
    training data. ``model(x)`` must return the reconstruction.
    """
    return _in_chunks(lambda chunk: (chunk - model(chunk)).pow(2).flatten(1).sum(1), x, batch_size)


def roc_auc(scores_normal: torch.Tensor, scores_anomalous: torch.Tensor) -> float:
    """Area under the ROC curve when higher scores should flag anomalies.

    Equals P(score of an anomaly > score of a normal image), ties counting 1/2
    (the Mann-Whitney statistic): for each anomalous score, count the normal scores
    below it (``below``) and those at most equal to it (``at_most``) in the sorted
    normal scores; the pair counts are ``below + (at_most - below) / 2``.
    """
    s0 = torch.sort(scores_normal.detach().double().flatten().cpu()).values
    s1 = scores_anomalous.detach().double().flatten().cpu()
    below = torch.searchsorted(s0, s1)
    at_most = torch.searchsorted(s0, s1, right=True)
    return (below + at_most).sum().item() / (2 * len(s0) * len(s1))  # exact integer counts


def roc_curve(scores_normal: torch.Tensor, scores_anomalous: torch.Tensor):
    """False- and true-positive rates (``fpr``, ``tpr``) over all thresholds, for plotting."""
    scores = torch.cat([scores_normal.flatten(), scores_anomalous.flatten()]).double().cpu()
    truth = torch.cat([torch.zeros(scores_normal.numel()), torch.ones(scores_anomalous.numel())])
    order = torch.argsort(scores, descending=True)
    truth = truth[order].double()
    tpr = torch.cat([torch.zeros(1), truth.cumsum(0) / truth.sum()])
    fpr = torch.cat([torch.zeros(1), (1 - truth).cumsum(0) / (1 - truth).sum()])
    return fpr, tpr


def encode_all(encoder, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Codes of a whole tensor of images, in chunks, without gradients; shape N x k."""
    return _in_chunks(lambda chunk: encoder(chunk).flatten(1), x, batch_size)


def reconstruct_all(model, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Reconstructions of a whole tensor of images, in chunks, without gradients."""
    return _in_chunks(model, x, batch_size)


def _in_chunks(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``fn`` applied to ``x`` chunk by chunk (bounded memory), without gradients, concatenated."""
    with torch.no_grad():
        return torch.cat([fn(chunk) for chunk in x.split(batch_size)])


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------
def make_corruption(kind: str | None, level: float,
                    generator: torch.Generator | None = None) -> Callable | None:
    """``"gaussian"`` (level = sigma), ``"masking"`` (level = nu) or None (plain AE).

    ``generator`` makes the noise repeatable (evaluation); training leaves it None.
    """
    if kind in (None, "none"):
        return None
    if kind == "gaussian":
        return lambda x: gaussian_noise(x, level, generator)
    if kind == "masking":
        return lambda x: masking_noise(x, level, generator)
    raise ValueError(f"unknown corruption {kind!r}: use 'gaussian', 'masking' or None")


def autoencoder_objective(model, x: torch.Tensor, corrupt: Callable | None = None,
                          sparse_lam: float = 0.0, contractive_lam: float = 0.0,
                          contractive_batch: int | None = 32):
    """The training loss of every autoencoder in this topic, and its parts for the log.

    loss = ||x - g(f(x_tilde))||^2 + sparse_lam ||f(x_tilde)||_1
           + contractive_lam sum_i ||grad_x f_i(x_tilde)||^2      (batch means)

    where x_tilde = corrupt(x) for a denoising AE, else x. The target is always the
    clean x. The contractive term costs k extra backward passes, so it is averaged over
    the first ``contractive_batch`` images of the (shuffled) batch only: an unbiased
    estimate of the batch mean, about 4x cheaper for batches of 128 (None: all images).
    """
    x_tilde = corrupt(x) if corrupt is not None else x
    h = model.encode(x_tilde)
    x_hat = model.decode(h)
    rec = reconstruction_loss(x, x_hat)
    loss, logs = rec, {"reconstruction": rec.detach()}
    if sparse_lam:
        penalty = sparse_penalty(h, sparse_lam)
        loss, logs["sparse"] = loss + penalty, penalty.detach()
    if contractive_lam:
        penalty = contractive_penalty(model.encode, x_tilde[:contractive_batch], contractive_lam)
        loss, logs["contractive"] = loss + penalty, penalty.detach()
    return loss, logs


def train_autoencoder(model: nn.Module, loader, *, epochs: int | None = None,
                      steps: int | None = None, max_seconds: float | None = None,
                      lr: float = 1e-3, schedule: str | None = "onecycle", corrupt=None,
                      sparse_lam: float = 0.0, contractive_lam: float = 0.0, device=None,
                      contractive_batch: int | None = 32, optimizer=None,
                      desc: str = "autoencoder", **fit_kwargs):
    """Train an autoencoder with :func:`course_utils.training.fit`; returns its ``TrainResult``.

    ``loader`` yields ``(images, labels)`` (labels unused). ``corrupt`` (a function, or
    one of :func:`make_corruption`) makes it a denoising AE; ``sparse_lam`` and
    ``contractive_lam`` add the penalties. With ``schedule="onecycle"`` the learning
    rate warms up to ``lr`` over the first 20 % of the steps and anneals to ~0 (it needs
    ``epochs`` or ``steps`` to know the total); ``None`` keeps it constant. The optimizer
    is Adam unless one is given (built on ``model.parameters()``).
    """
    from .training import fit

    device = torch.device(device) if device is not None else get_device()
    model.to(device)
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    total = steps if steps is not None else (epochs * len(loader) if epochs is not None else None)
    scheduler = None
    if schedule == "onecycle" and total:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total,
                                                        pct_start=0.2)
    elif schedule not in (None, "none", "onecycle"):
        raise ValueError(f"unknown schedule {schedule!r}: use 'onecycle' or None")

    def loss_fn(net, batch):  # `net` may be a compiled wrapper; encode/decode live on `model`
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return autoencoder_objective(model, x, corrupt, sparse_lam, contractive_lam,
                                     contractive_batch)

    return fit(model, loss_fn, loader, optimizer=optimizer, scheduler=scheduler, epochs=epochs,
               steps=steps, max_seconds=max_seconds, device=device, desc=desc, **fit_kwargs)


# ----------------------------------------------------------------------------------
# Registered models: `course train ae` and `course train dae`
# ----------------------------------------------------------------------------------
def _base_config(name: str, budget_name: str | None, **table) -> dict:
    cfg = by_budget(budget_name, **table)
    config = {k: v for k, v in vars(cfg).items()}
    config.update(name=name, data=training_data_description(budget_name=cfg.budget), seed=0)
    return config


def ae_config(budget_name: str | None = None) -> dict:
    """`course train ae`: the seed's conv AE (8-d code), L2 loss, Adam + one-cycle schedule.

    Work is counted in optimizer steps (batches of 128), so it costs the same on the
    8,000-image split and on the 60,000-image train split. 600 steps is about 10 epochs
    of 8,000 images: two to three minutes on a 2-core CPU. Target (classroom budget, 8,000/2,000
    split): lower held-out MSE than PCA with 8 components (``benchmarks/ae_vs_pca.py``).
    """
    return _base_config(
        "ae", budget_name,
        model=("ConvAutoencoder",) * 3,
        latent_dim=(8, 8, 8),
        steps=(30, 600, 6_000),
        train_images=(2_000, None, None),
        batch_size=(128, 128, 128),
        lr=(3e-3, 3e-3, 2e-3),
        schedule=("onecycle",) * 3,
        corruption=(None, None, None),
        noise_level=(0.0, 0.0, 0.0),
    )


def dae_config(budget_name: str | None = None) -> dict:
    """`course train dae`: an MLP denoising AE (32-d code) trained against masking noise nu = 0.5.

    Evaluated on held-out digits corrupted the same way (fixed seed): the MSE of its
    output against the clean digits, against PCA-32 applied to the corrupted digits.
    """
    return _base_config(
        "dae", budget_name,
        model=("MLPAutoencoder",) * 3,
        latent_dim=(32, 32, 32),
        hidden=([256], [256], [512, 256]),
        steps=(30, 2_000, 20_000),
        train_images=(2_000, None, None),
        batch_size=(128, 128, 128),
        lr=(3e-3, 3e-3, 2e-3),
        schedule=("onecycle",) * 3,
        corruption=("masking",) * 3,
        noise_level=(0.5, 0.5, 0.5),
    )


def build_ae(config: dict) -> nn.Module:
    """A fresh model for ``config`` (seeded with ``config["seed"]``).

    Sigmoid decoders start at the mean intensity (see :func:`init_output_bias`).
    """
    seed_everything(int(config.get("seed", 0)))
    if config["model"] == "ConvAutoencoder":
        return init_output_bias(ConvAutoencoder(), MEAN_PIXEL)
    if config["model"] == "MLPAutoencoder":
        return MLPAutoencoder(config["latent_dim"], hidden=tuple(config.get("hidden", (256,))))
    raise ValueError(f"unknown model {config['model']!r}")


build_dae = build_ae


def _train_loader(config: dict, device) -> BatchLoader:
    images, labels = as_tensors(mnist("train"), device=device, limit=config.get("train_images"))
    return BatchLoader(images, labels, batch_size=config["batch_size"], shuffle=True,
                       seed=int(config.get("seed", 0)))


def train_ae(model: nn.Module, config: dict, device=None, max_seconds: float | None = None) -> dict:
    """Train ``model`` as ``config`` says; returns a small dict for metrics.json."""
    device = torch.device(device) if device is not None else get_device()
    seed_everything(int(config.get("seed", 0)))
    loader = _train_loader(config, device)
    result = train_autoencoder(
        model, loader, steps=config["steps"], max_seconds=max_seconds, lr=config["lr"],
        schedule=config.get("schedule"), device=device, desc=config["name"],
        corrupt=make_corruption(config.get("corruption"), config.get("noise_level", 0.0)))
    return {"train_steps": result.step, "train_epochs": result.epoch,
            "train_images": len(loader.images),
            "final_train_loss": round(result.final_loss, 4),
            "stopped_by": result.history.stopped_by,
            "seconds": round(result.history.seconds, 1)}


train_dae = train_ae


def evaluate_ae(model: nn.Module, config: dict, device=None) -> dict:
    """Held-out reconstruction MSE per pixel, against PCA with the same number of components.

    PCA is fitted on the same training images as the AE. ``ratio`` = AE / PCA (< 1: the
    AE wins). For a denoising config the inputs are corrupted (with a fixed seed) and the
    targets clean; PCA then projects the corrupted images, and ``noisy_input_mse`` is the
    error of doing nothing.
    """
    device = torch.device(device) if device is not None else get_device()
    train_set, test_set = mnist("train"), mnist("test")
    x_train, _ = as_tensors(train_set, limit=config.get("train_images"))
    x_test, _ = as_tensors(test_set)
    k = int(config["latent_dim"])
    pca = pca_subspace(x_train, k)
    corrupt = make_corruption(config.get("corruption"), config.get("noise_level", 0.0),
                              torch.Generator().manual_seed(1234))
    x_in = corrupt(x_test) if corrupt else x_test
    model.to(device).eval()
    start = time.monotonic()
    x_hat = reconstruct_all(model, x_in.to(device)).cpu()
    ae_mse = float(reconstruction_mse(x_test, x_hat))
    pca_mse = float(reconstruction_mse(x_test, pca.reconstruct(x_in)))
    metrics = {"test_mse": round(ae_mse, 5), f"pca{k}_mse": round(pca_mse, 5),
               "pca_mse": round(pca_mse, 5), "ratio_ae_over_pca": round(ae_mse / pca_mse, 4),
               "latent_dim": k, "test_images": len(x_test), "test_data": describe(test_set),
               "eval_seconds": round(time.monotonic() - start, 2)}
    if corrupt:
        metrics["noisy_input_mse"] = round(float(reconstruction_mse(x_test, x_in)), 5)
        metrics["corruption"] = f"{config['corruption']} {config['noise_level']}"
    return metrics


evaluate_dae = evaluate_ae


# ----------------------------------------------------------------------------------
# Sparse coding (Olshausen & Field, 1996): codes that are solved for, not computed
# ----------------------------------------------------------------------------------
# A dictionary D (d x k) holds k "atoms" d_1, ..., d_k in its columns. Each example x
# (d) is written as a sparse combination x ~ D h = sum_j h_j d_j, where the code h (k)
# has mostly zeros. There is no encoder network: the code of x is whatever minimizes
#
#     E(h) = 1/2 ||x - D h||^2 + lam ||h||_1                       (the Lasso)
#
# so the "encoder" is an optimization (implicit, nonlinear), while the "decoder"
# h -> D h is linear. A sparse autoencoder instead *learns* an explicit encoder
# h = f(x) and only penalizes lam ||h||_1 in its loss: one forward pass per code, but
# codes that need not be the best ones for its decoder.
#
# (The seed writes the objective without the 1/2. That only rescales lam: its lam is
# twice ours. Rows are examples everywhere below: x is (N, d), the codes are (N, k) and
# the reconstructions are codes @ D^T.)
def soft_threshold(x: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Soft thresholding S_t(x) = sign(x) * max(|x| - t, 0), elementwise.

    It is the proximal operator of t ||.||_1:

        S_t(x) = argmin_z  1/2 (z - x)^2 + t |z|,

    i.e. entries with |x| <= t (the "dead zone") become exactly 0 and all the others
    move towards 0 by t. ``threshold`` is a number or a tensor that broadcasts with x.
    """
    return torch.sign(x) * (x.abs() - threshold).clamp_min(0)


def lasso_objective(x: torch.Tensor, dictionary: torch.Tensor, codes: torch.Tensor,
                    lam: float) -> torch.Tensor:
    """Per-example Lasso objective 1/2 ||x_n - D h_n||^2 + lam ||h_n||_1, shape (N,).

    x: (N, d) data (or (N, ...), flattened); dictionary D: (d, k); codes h: (N, k).
    """
    x = x.reshape(len(x), -1)
    residual = x - codes @ dictionary.T
    return 0.5 * residual.pow(2).sum(1) + lam * codes.abs().sum(1)


def ista(x: torch.Tensor, dictionary: torch.Tensor, lam: float, steps: int = 100,
         fista: bool = True, codes: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse codes (N, k) minimizing the Lasso objective for every row of x, by (F)ISTA.

    The objective is smooth part + L1 part. The gradient of the smooth part
    1/2 ||x - D h||^2 is D^T (D h - x), and it is L-Lipschitz with L the largest
    eigenvalue of D^T D (= ||D||_2^2, the squared spectral norm). ISTA takes a gradient
    step of size 1/L on the smooth part, then the prox of the L1 part:

        h  <-  S_{lam/L}( h - (1/L) D^T (D h - x) ),

    which never increases the objective and converges like O(1/t). FISTA (Beck &
    Teboulle, 2009) applies the same step at an extrapolated point y, which gives
    O(1/t^2):

        h_new = S_{lam/L}( y - (1/L) D^T (D y - x) )
        t_new = (1 + sqrt(1 + 4 t^2)) / 2,                      t_0 = 1
        y     = h_new + ((t - 1) / t_new) (h_new - h)           (momentum)

    All rows are solved at once: with rows as examples, D^T (D h - x) is
    h @ (D^T D) - x @ D. ``codes`` (N, k) warm-starts the iteration (default: zeros).
    """
    x = x.reshape(len(x), -1)
    gram = dictionary.T @ dictionary                              # (k, k)
    data_term = x @ dictionary                                   # (N, k): rows D^T x_n
    lipschitz = torch.linalg.matrix_norm(dictionary, ord=2).pow(2)
    step = 1.0 / lipschitz.clamp_min(torch.finfo(lipschitz.dtype).tiny)
    if codes is None:
        codes = x.new_zeros(len(x), dictionary.shape[1])
    y, t = codes, 1.0
    for _ in range(steps):
        gradient = y @ gram - data_term                          # D^T (D y - x), per row
        new_codes = soft_threshold(y - step * gradient, step * lam)
        if fista:
            t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            y = new_codes + ((t - 1.0) / t_new) * (new_codes - codes)
            t = t_new
        else:
            y = new_codes
        codes = new_codes
    return codes


def _random_rows(x: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` distinct random rows of x (with repeats if x has fewer), as unit vectors."""
    device = generator.device if generator is not None else torch.device("cpu")
    if count <= len(x):
        index = torch.randperm(len(x), generator=generator, device=device)[:count]
    else:
        index = torch.randint(len(x), (count,), generator=generator, device=device)
    rows = x[index.to(x.device)]
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).eps)


def update_dictionary(x: torch.Tensor, codes: torch.Tensor, eps: float = 1e-8,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The dictionary step: least squares for D given the codes, then unit-norm atoms.

    With the codes H (N, k) fixed, the reconstruction error ||X - H D^T||^2 is quadratic
    in D, minimized by the normal equations

        (H^T H + ridge I) D^T = H^T X,

    with a tiny ridge (eps, relative to the mean of diag H^T H) so that the system stays
    solvable when some atom is never used. Then every column d_j is divided by its norm.
    Why: the L1 penalty would otherwise be dodged, since replacing (d_j, h_j) by
    (c d_j, h_j / c) leaves D h unchanged and divides lam |h_j| by c; with c -> infinity
    every code would shrink to 0 while atoms blow up.

    Atoms that no example uses (a zero column of H, hence of D) are re-initialized as
    random data rows (normalized), drawn with ``generator``, so that they get another
    chance at the next Lasso step. Returns D, shape (d, k), dtype and device of x.
    """
    x = x.reshape(len(x), -1)
    codes = codes.to(x)
    gram = codes.T @ codes                                           # (k, k)
    ridge = eps * (1.0 + gram.diagonal().mean())
    eye = torch.eye(gram.shape[0], dtype=x.dtype, device=x.device)
    dictionary = torch.linalg.solve(gram + ridge * eye, codes.T @ x).T  # (d, k)
    norms = dictionary.norm(dim=0)
    unused = (codes == 0).all(dim=0) | (norms <= torch.finfo(x.dtype).eps)
    dictionary = dictionary / norms.clamp_min(torch.finfo(x.dtype).eps)
    count = int(unused.sum())
    if count:
        dictionary[:, unused] = _random_rows(x, count, generator).T
    return dictionary


def learn_dictionary(x: torch.Tensor, num_atoms: int, lam: float, iterations: int = 20,
                     ista_steps: int = 50, generator: torch.Generator | None = None,
                     ) -> tuple[torch.Tensor, list[float]]:
    """Sparse coding by alternating minimization of the summed Lasso objective

        sum_n  1/2 ||x_n - D h_n||^2 + lam ||h_n||_1    over the codes h_n and D.

    The objective is not convex in (D, h) jointly, but it is in each one alone:

    1. Lasso step: D fixed, solve for every code with :func:`ista` (FISTA), warm-started
       from the previous codes.
    2. Dictionary step: codes fixed, least squares for D, atoms normalized
       (:func:`update_dictionary`).

    The atoms start as ``num_atoms`` random data rows, normalized, and get a first
    Lasso step. Each iteration is then a dictionary step followed by a Lasso step for
    the new D, after which the history records the mean Lasso objective, so that the
    returned D and the last value belong together. It goes down, mostly: normalizing
    the atoms after the least-squares fit can cost a little.

    Returns (D of shape (d, num_atoms), list of ``iterations`` floats).
    """
    x = x.reshape(len(x), -1)
    history: list[float] = []
    with torch.no_grad():
        dictionary = _random_rows(x, num_atoms, generator).T.contiguous()
        codes = ista(x, dictionary, lam, steps=ista_steps)
        for _ in range(iterations):
            dictionary = update_dictionary(x, codes, generator=generator)
            codes = ista(x, dictionary, lam, steps=ista_steps, codes=codes)
            history.append(float(lasso_objective(x, dictionary, codes, lam).mean()))
    return dictionary, history
