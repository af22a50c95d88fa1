"""Judging generated images: FID, KID and a small MNIST classifier of our own.

The usual FID/KID use features of an ImageNet Inception network. For MNIST the
course trains its own small CNN, :class:`MNISTFeatureNet`, and uses its
128-d penultimate layer as the feature space. Numbers are therefore comparable
*within* the course (same classifier, same budget), not with published FIDs.

Fréchet distance (FID)
----------------------
Fit a Gaussian to each set of features, ``N(mu_1, S_1)`` and ``N(mu_2, S_2)``;
the Fréchet (2-Wasserstein) distance between them is

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

Kernel inception distance (KID)
-------------------------------
The unbiased estimate of the squared maximum mean discrepancy (MMD^2) with the
polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets.
Unlike FID it has no bias from the sample size, so it is fair to small samples;
it can come out slightly negative when the two sets match.

Precision and recall (Kynkäänniemi et al., 2019)
------------------------------------------------
FID mixes two failures: samples that look wrong (low *precision*) and parts
of the data the model never produces (low *recall*). Estimate each set's
support as a union of balls, one per point, of radius the distance to its
k-th nearest neighbour in the same set; precision is the share of generated
points inside the real support, recall the share of real points inside the
generated support. ``memorisation_check`` compares how close samples come to
the training images with how close unseen real images come.

Classifier checks
-----------------
``confident_fraction`` (does the classifier recognise the samples as digits?),
``class_histogram_entropy`` (are all ten digits produced? ``log 10`` = yes,
equally often) and ``classifier_score`` (the Inception-score recipe with our
classifier). ``sample_quality`` reports them all at once.

The classifier's pieces for ``course train classifier`` are plain functions:
``classifier_config``, ``build_classifier``, ``train_classifier`` and
``evaluate_classifier``; ``load_feature_net`` loads the cached copy (or trains it).
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import CourseError, budget, by_budget, get_device, local_seed

__all__ = [
    "frechet_distance",
    "sample_figures",
    "gaussian_statistics",
    "fid",
    "kid",
    "MNISTFeatureNet",
    "random_affine",
    "classifier_config",
    "build_classifier",
    "train_classifier",
    "evaluate_classifier",
    "load_feature_net",
    "classifier_features",
    "predict_proba",
    "accuracy",
    "confident_fraction",
    "class_histogram_entropy",
    "classifier_score",
    "inception_score",
    "sample_quality",
    "knn_radii",
    "precision_recall",
    "nearest_neighbours",
    "memorisation_check",
]

CHECKPOINT_NAME = "classifier"  # the name `course train classifier` caches it under


# =====================================================================================
# Fréchet distance, FID, KID
# =====================================================================================
def _float64_device(device: torch.device) -> torch.device:
    """Apple's MPS has no float64: do the (small) linear algebra on the CPU there."""
    return torch.device("cpu") if device.type == "mps" else device


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix via ``eigh``.

    ``S = Q diag(l) Q^T``  =>  ``S^{1/2} = Q diag(sqrt(max(l, 0))) Q^T``; the tiny
    negative eigenvalues that rounding produces are clamped to 0.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    root = eigenvalues.clamp_min(0).sqrt()
    return (eigenvectors * root) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> torch.Tensor:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

        d^2 = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^{1/2})

    ``S_1 S_2`` is not symmetric, so its square root is awkward to compute
    directly. But ``S_1 S_2`` is similar to the symmetric PSD matrix

        M = S_1^{1/2} S_2 S_1^{1/2}      (M = S_1^{-1/2} (S_1 S_2) S_1^{1/2})

    so both have the same eigenvalues l_i >= 0, and

        Tr((S_1 S_2)^{1/2}) = sum_i sqrt(l_i(M)).

    Everything runs in float64 with ``torch.linalg.eigh`` (no SciPy), and the
    tiny negative eigenvalues that rounding produces are clamped to 0. Returns a
    0-d float64 tensor (on the inputs' device; CPU for MPS inputs).
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(v) for v in (mu1, mu2, sigma1, sigma2))
    device = _float64_device(mu1.device)
    mu1, mu2, sigma1, sigma2 = (v.to(device, torch.float64) for v in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (
            mu1.numel(), mu1.numel()):
        raise ValueError(f"frechet_distance: shapes do not match: mu {tuple(mu1.shape)}, "
                         f"{tuple(mu2.shape)}; sigma {tuple(sigma1.shape)}, {tuple(sigma2.shape)}")
    # symmetrise: covariances computed in floating point are symmetric only up to rounding
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    diff = mu1 - mu2
    mean_term = diff @ diff                                      # ||mu_1 - mu_2||^2
    root1 = _sqrtm_psd(sigma1)                                   # S_1^{1/2}
    m = root1 @ sigma2 @ root1                                   # M = S_1^{1/2} S_2 S_1^{1/2}
    eigenvalues = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0)
    trace_sqrt = eigenvalues.sqrt().sum()                        # Tr((S_1 S_2)^{1/2})
    distance = mean_term + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return distance.clamp_min(0)  # >= 0 in exact arithmetic; rounding may give -1e-12


def _features_2d(features, name: str) -> torch.Tensor:
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected an N x D tensor of features, got {tuple(x.shape)}")
    if len(x) < 2:
        raise ValueError(f"{name}: need at least 2 feature vectors, got {len(x)}")
    return x


def gaussian_statistics(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (float64) of ``N x D`` features.

        mu = (1/N) sum_n x_n,    S = 1/(N-1) sum_n (x_n - mu)(x_n - mu)^T
    """
    x = _features_2d(features, "gaussian_statistics")
    x = x.to(_float64_device(x.device), torch.float64)
    mu = x.mean(0)
    centred = x - mu
    sigma = centred.T @ centred / (len(x) - 1)
    return mu, sigma


def fid(features_a, features_b) -> torch.Tensor:
    """Fréchet distance between Gaussians fitted to two sets of ``N x D`` features.

    Use the features of :class:`MNISTFeatureNet` (see :func:`classifier_features`).
    FID is biased upwards for small N (it overestimates with few samples), so only
    compare FIDs computed with the same number of samples; with N < D the
    covariances are singular but the formula still holds. Returns a 0-d tensor.
    """
    a = _features_2d(features_a, "fid")
    b = _features_2d(features_b, "fid")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fid: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    return frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b))


def kid(features_a, features_b, num_subsets: int = 100, subset_size: int = 1000,
        return_std: bool = False, seed: int = 0):
    """Kernel inception distance: unbiased MMD^2 with a cubic polynomial kernel.

        k(x, y) = (x.y / d + 1)^3                (d = feature dimension)

        MMD^2_u = 1/(m(m-1)) sum_{i != j} k(a_i, a_j)
                + 1/(m(m-1)) sum_{i != j} k(b_i, b_j)
                - 2/m^2      sum_{i, j}   k(a_i, b_j)

    computed on ``num_subsets`` random subsets of ``m = min(subset_size, N_a, N_b)``
    vectors from each set (drawn without replacement, from ``seed``) and averaged.
    The estimate is unbiased, so it is about 0 (and may be slightly negative) when
    both sets come from the same distribution. Returns a 0-d tensor, or
    ``(mean, std over subsets)`` with ``return_std=True``.
    """
    a = _features_2d(features_a, "kid")
    b = _features_2d(features_b, "kid")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kid: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    device = _float64_device(a.device)
    a = a.to(device, torch.float32)
    b = b.to(device, torch.float32)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    generator = torch.Generator().manual_seed(seed)

    def kernel(x, y):  # the Gram matrix in float32, the cube and the sums in float64
        return (x @ y.T / d + 1).to(torch.float64) ** 3

    estimates = []
    for _ in range(num_subsets):
        x = a[torch.randperm(len(a), generator=generator)[:m].to(device)]
        y = b[torch.randperm(len(b), generator=generator)[:m].to(device)]
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        within = ((k_xx.sum() - k_xx.diagonal().sum()) + (k_yy.sum() - k_yy.diagonal().sum()))
        estimates.append(within / (m * (m - 1)) - 2 * k_xy.mean())
    values = torch.stack(estimates)
    mean = values.mean()
    if return_std:
        std = values.std() if len(values) > 1 else torch.zeros_like(mean)
        return mean, std
    return mean


# =====================================================================================
# The classifier whose features FID/KID use
# =====================================================================================
def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x 28 x 28, N x 28 x 28 or N x 784 -> N x 1 x 28 x 28."""
    if x.ndim == 2 and x.shape[1] == 28 * 28:
        return x.view(-1, 1, 28, 28)
    if x.ndim == 3 and x.shape[1:] == (28, 28):
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[1:] == (1, 28, 28):
        return x
    raise ValueError(f"expected MNIST images N x 1 x 28 x 28 (or N x 28 x 28, N x 784), "
                     f"got {tuple(x.shape)}")


class MNISTFeatureNet(nn.Module):
    """A small CNN classifier for MNIST; its 128-d penultimate layer feeds FID/KID.

    ::

        1x28x28 -> conv16 -> pool -> conv32 -> conv32 -> pool -> conv64   (64x7x7)
                -> dropout -> fc128 -> BN -> ReLU      = features(x)  (128-d)
                -> dropout -> fc10                     = forward(x)   (logits)

    Every conv is 3x3 with padding 1, then batch norm and ReLU. Inputs are images
    in [0, 1] (N x 1 x 28 x 28, N x 28 x 28 or N x 784); the network normalises
    them itself. About 436k parameters (most of them in fc128); the course's
    recipe trains it to about 99 % held-out accuracy in a minute on a 2-core CPU.
    """

    MEAN, STD = 0.1307, 0.3081  # MNIST pixel mean and standard deviation

    def __init__(self, channels=(16, 32, 32, 64), hidden: int = 128, dropout: float = 0.25,
                 num_classes: int = 10):
        super().__init__()
        c1, c2, c3, c4 = channels
        self.feature_dim = hidden
        self.body = nn.Sequential(
            _conv_bn_relu(1, c1), nn.MaxPool2d(2),                          # 28 -> 14
            _conv_bn_relu(c1, c2), _conv_bn_relu(c2, c3), nn.MaxPool2d(2),  # 14 -> 7
            _conv_bn_relu(c3, c4), nn.Flatten(),                            # c4 * 7 * 7
        )
        self.embed = nn.Sequential(nn.Dropout(dropout), nn.Linear(c4 * 49, hidden, bias=False),
                                   nn.BatchNorm1d(hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-d penultimate activations (used by FID/KID)."""
        x = (_as_batch(x) - self.MEAN) / self.STD
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, N x 10."""
        return self.head(self.features(x))


def random_affine(x: torch.Tensor, generator: torch.Generator | None = None,
                  max_rotation: float = 10.0, max_scale: float = 0.1,
                  max_shift: float = 2.0) -> torch.Tensor:
    """Random small rotations, zooms and shifts of a batch, on the batch's device.

    Each image gets its own angle ``a`` (degrees, uniform in +-max_rotation),
    scale ``s`` (uniform in 1 +- max_scale) and shift ``t`` (pixels, uniform in
    +-max_shift). Output pixel ``p`` (in [-1, 1] coordinates) samples the input at

        p_in = s R(a) p + 2 t / W

    by bilinear interpolation (``affine_grid`` + ``grid_sample``), zeros outside.
    The random numbers come from ``generator`` (on the CPU) for repeatable runs.
    """
    n, _, h, w = x.shape
    a = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_rotation)
    s = 1 + (torch.rand(n, generator=generator) * 2 - 1) * max_scale
    t = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
    cos, sin = s * torch.cos(a), s * torch.sin(a)
    theta = torch.stack([cos, -sin, 2 * t[:, 0] / w, sin, cos, 2 * t[:, 1] / h], 1).view(n, 2, 3)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# -- the pieces `course train classifier` registers ------------------------------------
def classifier_config(budget_name: str | None = None, root=None) -> dict:
    """Everything that determines the trained classifier (its checkpoint hash).

    ======================  =====  =========  =====
    budget                  smoke  classroom  full
    ======================  =====  =========  =====
    optimizer steps (x128)    200       1500   6000
    ======================  =====  =========  =====

    ``classroom`` is the one-minute recipe (about 24 epochs of the 8,000-image
    split on a 2-core CPU). The config also names the training data, so a
    classifier trained on the 8,000/2,000 split is never mistaken for one trained
    on MNIST train. ``seed`` and ``max_seconds`` match the defaults of
    ``course train``, so that command caches the very checkpoint this loads.
    """
    from .data import training_data_description

    cfg = by_budget(budget_name, steps=(200, 1500, 6000))
    return {
        "model": "MNISTFeatureNet",
        "version": 1,
        "arch": {"channels": [16, 32, 32, 64], "hidden": 128, "dropout": 0.25},
        "budget": cfg.budget,
        "steps": cfg.steps,
        "batch_size": 128,
        "optimizer": "AdamW",
        "lr": 3e-3,
        "weight_decay": 5e-4,
        "schedule": "OneCycle",
        "warmup_fraction": 0.25,
        "label_smoothing": 0.0,
        "augment": {"max_rotation": 10.0, "max_scale": 0.1, "max_shift": 2.0},
        "seed": 0,
        "max_seconds": None,
        "data": training_data_description(root, cfg.budget),
    }


def build_classifier(config: dict) -> MNISTFeatureNet:
    """A freshly initialised :class:`MNISTFeatureNet` (seeded from ``config['seed']``).

    The global random state is left untouched.
    """
    arch = config.get("arch", {})
    with local_seed(int(config.get("seed", 0))):
        return MNISTFeatureNet(channels=tuple(arch.get("channels", (16, 32, 32, 64))),
                               hidden=int(arch.get("hidden", 128)),
                               dropout=float(arch.get("dropout", 0.25)))


def train_classifier(model: nn.Module, config: dict, device=None, max_seconds=None,
                     root=None, progress: bool | None = None) -> dict:
    """Train ``model`` with the recipe in ``config``; returns training figures.

    Recipe: AdamW, one-cycle learning rate (warm-up for the first quarter, then
    cosine decay), batch 128, every batch randomly rotated/zoomed/shifted by
    :func:`random_affine` on the device, cross-entropy loss. The data are
    ``mnist("train")`` as whole tensors on the device. Stops after
    ``config['steps']`` steps or ``max_seconds`` (argument, else config).
    The caller's random state is left as it was.
    """
    from .data import BatchLoader, as_tensors, describe, mnist, training_data_description
    from .training import fit

    device = torch.device(device) if device is not None else get_device()
    expected = training_data_description(root, config.get("budget"))
    if config.get("data") not in (None, expected):
        raise CourseError(f"this classifier config is for {config['data']!r}, but the data here "
                          f"is {expected!r} (check $COURSE_TEST_SPLIT / the data root)")
    max_seconds = max_seconds if max_seconds is not None else config.get("max_seconds")
    train_set = mnist("train", root=root, budget_name=config.get("budget"))
    images, labels = as_tensors(train_set, device)
    seed = int(config.get("seed", 0))
    steps, aug = int(config["steps"]), dict(config.get("augment", {}))
    channels_last = device.type == "cpu"  # about 1.3x faster convolutions on a CPU
    if channels_last:
        model.to(memory_format=torch.channels_last)

    with local_seed(seed, device):
        loader = BatchLoader(images, labels, config["batch_size"], shuffle=True, drop_last=True,
                             seed=seed)
        augment_rng = torch.Generator().manual_seed(seed + 1)

        def loss_fn(net, batch):
            x, y = batch
            if aug:
                x = random_affine(x, augment_rng, **aug)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=config.get("label_smoothing", 0.0))
            return loss, {"accuracy": (logits.argmax(1) == y).float().mean()}

        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"],
                                      weight_decay=config["weight_decay"])
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config["lr"], total_steps=steps,
            pct_start=config.get("warmup_fraction", 0.25))
        result = fit(model, loss_fn, loader, optimizer=optimizer, scheduler=scheduler,
                     steps=steps, max_seconds=max_seconds, device=device, progress=progress,
                     live_plot=False, desc="MNISTFeatureNet")
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    seconds = result.history.seconds
    tail = result.history.logs.get("accuracy", [])[-50:]
    return {
        "train_steps": result.step,
        "train_seconds": round(seconds, 1),
        "train_images_per_second": round(result.step * config["batch_size"] / max(seconds, 1e-9)),
        "train_final_loss": round(result.final_loss, 4),
        "train_accuracy_last_50_steps": round(sum(tail) / max(len(tail), 1), 4),
        "stopped_by": result.history.stopped_by,
        "train_data": describe(train_set),
    }


def evaluate_classifier(model: nn.Module, config: dict | None = None, device=None,
                        root=None) -> dict:
    """Accuracy on the held-out images: MNIST test, or its last 2,000 with the split."""
    from .data import as_tensors, describe, mnist

    device = torch.device(device) if device is not None else _model_device(model)
    budget_name = (config or {}).get("budget")
    test_set = mnist("test", root=root, budget_name=budget_name)
    images, labels = as_tensors(test_set, device)
    model.to(device)
    return {"test_accuracy": round(accuracy(model, images, labels), 4),
            "test_images": len(labels), "test_data": describe(test_set)}


_loaded: dict[tuple[str, str], MNISTFeatureNet] = {}


def load_feature_net(device=None, root=None, train_if_missing: bool = True,
                     budget_name: str | None = None) -> MNISTFeatureNet:
    """The trained :class:`MNISTFeatureNet` of this budget, in eval mode, on ``device``.

    Looks in the checkpoint cache (``course_utils.checkpoints``) for the classifier
    trained with :func:`classifier_config` (verified by SHA-256 and config hash);
    when there is none it trains one (a minute on a CPU in the classroom budget,
    seconds in smoke) and caches it, unless ``train_if_missing=False``, which
    raises instead. ``course train classifier`` fills the same cache. It prints
    what it did. Within one Python session the result is remembered, and each
    call returns a fresh copy.
    """
    from .checkpoints import checkpoint_dir, config_hash, load_checkpoint, load_or_train

    device = torch.device(device) if device is not None else get_device()
    budget_name = budget(budget_name)
    config = classifier_config(budget_name, root)
    key = (config_hash(config), str(device))
    if key not in _loaded:
        model = build_classifier(config)
        if not train_if_missing:
            sidecar = load_checkpoint(CHECKPOINT_NAME, model, config)
            if sidecar is None:
                raise CourseError(
                    f"no trained MNISTFeatureNet for the {budget_name} budget in "
                    f"{checkpoint_dir()}: run `course train classifier --budget {budget_name}` "
                    "or call load_feature_net(train_if_missing=True)")
            info = {"source": "cache", **sidecar}
        else:
            def train_fn(net):
                print(f"[course metrics] training MNISTFeatureNet ({config['steps']} steps, "
                      f"{budget_name} budget) on {config['data']} ...", flush=True)
                figures = train_classifier(net, config, device, root=root)
                figures.update(evaluate_classifier(net, config, device, root=root))
                return figures

            # The classifier is a measuring instrument, not the lesson: even the smoke
            # budget reuses a verified cached copy, so each notebook does not retrain it.
            model, info = load_or_train(CHECKPOINT_NAME, config, model, train_fn,
                                        budget_name=budget_name, use_cache=True)
        figures = info.get("metrics", {})
        how = ("loaded from the checkpoint cache" if info["source"] == "cache" else
               f"trained in {figures.get('train_seconds', '?')} s and cached")
        acc = figures.get("test_accuracy")
        acc_text = (f": {100 * acc:.2f} % accuracy on {figures.get('test_data', 'held-out data')}"
                    if acc is not None else "")
        print(f"[course metrics] MNISTFeatureNet {how}{acc_text}")
        _loaded[key] = model.to(device).eval()
    return copy.deepcopy(_loaded[key]).eval()


# =====================================================================================
# Using a classifier on (generated) images
# =====================================================================================
def _model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _check_images(images) -> torch.Tensor:
    x = torch.as_tensor(images)
    if not x.is_floating_point():
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -0.05 or hi > 1.05:
            warnings.warn(f"images range over [{lo:.2f}, {hi:.2f}], but the classifier expects "
                          "[0, 1]; for tanh outputs in [-1, 1] pass (x + 1) / 2", stacklevel=3)
    return x


@torch.no_grad()
def _batched(fn, model: nn.Module, images, batch_size: int) -> torch.Tensor:
    x = _check_images(images)
    device = _model_device(model)
    outputs = [fn(x[i:i + batch_size].to(device, torch.float32)).float()
               for i in range(0, len(x), batch_size)]
    if not outputs:
        raise ValueError("no images given")
    return torch.cat(outputs).to(x.device)


def classifier_features(classifier: nn.Module, images, batch_size: int = 500) -> torch.Tensor:
    """``classifier.features(x)`` for all images, in batches, without gradients.

    Runs in eval mode (restored afterwards) on the classifier's device and
    returns an N x D tensor on the images' device.
    """
    if not hasattr(classifier, "features"):
        raise TypeError(f"{type(classifier).__name__} has no .features(x) method; "
                        "use MNISTFeatureNet (load_feature_net())")
    with _eval_mode(classifier):
        return _batched(classifier.features, classifier, images, batch_size)


def predict_proba(classifier: nn.Module, images, batch_size: int = 500) -> torch.Tensor:
    """Softmax class probabilities p(y|x), N x 10, in batches, without gradients."""
    with _eval_mode(classifier):
        return _batched(lambda x: classifier(x).softmax(-1), classifier, images, batch_size)


def accuracy(classifier: nn.Module, images, labels, batch_size: int = 500) -> float:
    """Fraction of images whose most probable class is the label."""
    predicted = predict_proba(classifier, images, batch_size).argmax(1)
    labels = torch.as_tensor(labels).to(predicted.device)
    return float((predicted == labels).float().mean())


def _confident(probs: torch.Tensor, threshold: float) -> float:
    return float((probs.max(1).values >= threshold).float().mean())


def _histogram_entropy(probs: torch.Tensor) -> float:
    counts = torch.bincount(probs.argmax(1).cpu(), minlength=probs.shape[1]).double()
    h = counts / counts.sum()
    h = h[h > 0]
    return float(-(h * h.log()).sum())


def _score(probs: torch.Tensor) -> float:
    probs = probs.double().cpu()
    marginal = probs.mean(0, keepdim=True)
    eps = 1e-12
    kl = (probs * ((probs + eps).log() - (marginal + eps).log())).sum(1)
    return float(kl.mean().exp())


def confident_fraction(classifier: nn.Module, images, threshold: float = 0.9,
                       batch_size: int = 500) -> float:
    """Fraction of images given max_y p(y|x) >= ``threshold`` by the classifier.

    A rough "does it look like a digit at all?" check for generated samples:
    real MNIST test digits score about 0.99 with the course's classifier.
    """
    return _confident(predict_proba(classifier, images, batch_size), threshold)


def class_histogram_entropy(classifier: nn.Module, images, batch_size: int = 500) -> float:
    """Entropy (in nats) of the histogram of predicted classes.

        H = -sum_y h_y log h_y,    h_y = (number of images predicted as y) / N

    ``log 10 = 2.303`` means all ten classes are predicted equally often (no mode
    collapse); ``0`` means every image gets the same class.
    """
    return _histogram_entropy(predict_proba(classifier, images, batch_size))


def classifier_score(classifier: nn.Module, images, batch_size: int = 500) -> float:
    """The Inception-score recipe with the course's classifier.

        IS = exp( E_x [ KL( p(y|x) || p(y) ) ] ),    p(y) = E_x [ p(y|x) ]

    High when each image is classified confidently (sharp ``p(y|x)``) *and* the
    classes are varied (flat ``p(y)``): between 1 and 10 for MNIST's ten classes.
    """
    return _score(predict_proba(classifier, images, batch_size))


inception_score = classifier_score  # the name used in the GAN literature


def sample_quality(classifier: nn.Module, images, reference_images=None, *,
                   reference_features=None, batch_size: int = 500, kid_subsets: int = 100,
                   kid_subset_size: int = 1000) -> dict:
    """All sample-quality numbers at once, as a dict of floats (for tables).

    images:           generated images in [0, 1] (N x 1 x 28 x 28, ...).
    reference_images: real images to compare with (e.g. held-out MNIST), or give
                      their precomputed ``reference_features`` instead.

    Keys: ``fid``, ``kid``, ``kid_std``, ``confident_fraction`` (p >= 0.9),
    ``class_entropy`` (nats; log 10 = 2.303 is the ideal), ``classifier_score``
    and ``n_images``. Use the same number of images when comparing FIDs.
    """
    if reference_features is None:
        if reference_images is None:
            raise ValueError("sample_quality needs reference_images or reference_features")
        reference_features = classifier_features(classifier, reference_images, batch_size)
    if isinstance(classifier, MNISTFeatureNet):  # one pass: features, then the head on them
        def features_and_probs(x):
            f = classifier.features(x)
            return torch.cat([f, classifier.head(f).softmax(-1)], 1)

        with _eval_mode(classifier):
            both = _batched(features_and_probs, classifier, images, batch_size)
        features, probs = both[:, :classifier.feature_dim], both[:, classifier.feature_dim:]
    else:
        features = classifier_features(classifier, images, batch_size)
        probs = predict_proba(classifier, images, batch_size)
    kid_mean, kid_std = kid(features, reference_features, num_subsets=kid_subsets,
                            subset_size=kid_subset_size, return_std=True)
    return {
        "fid": float(fid(features, reference_features)),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        "confident_fraction": _confident(probs, 0.9),
        "class_entropy": _histogram_entropy(probs),
        "classifier_score": _score(probs),
        "n_images": len(features),
    }


# =====================================================================================
# Precision / recall on k-NN manifolds, and a memorisation check
# =====================================================================================
def _pairwise_chunks(queries: torch.Tensor, reference: torch.Tensor, chunk: int):
    for start in range(0, len(queries), chunk):
        yield start, torch.cdist(queries[start:start + chunk], reference)


def knn_radii(features, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest *other* point of the same set, ``[N]`` (float64).

    The point itself (distance 0) is not counted; duplicates are, so a point with
    k copies elsewhere in the set has radius 0.
    """
    x = _features_2d(features, "knn_radii")
    x = x.to(_float64_device(x.device), torch.float64)
    if not 1 <= k < len(x):
        raise ValueError(f"knn_radii: k must be between 1 and N - 1 = {len(x) - 1}, got {k}")
    radii = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for start, distances in _pairwise_chunks(x, x, chunk):
        # the k+1-th smallest includes the point itself at distance 0
        radii[start:start + len(distances)] = distances.kthvalue(k + 1, dim=1).values
    return radii


def _share_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                  chunk: int) -> float:
    inside = []
    for _, distances in _pairwise_chunks(queries, centres, chunk):
        inside.append((distances <= radii[None, :]).any(1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real_features, fake_features, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    r"""Improved precision and recall (Kynkäänniemi et al., 2019) of generated samples, in feature space.

    Each set's manifold is a union of balls :math:`B(x, r_k(x))`, :math:`r_k(x)` the
    distance from x to its k-th nearest neighbour in its own set (:func:`knn_radii`):

    .. math::
        \text{precision} = \frac1{M}\sum_{j} \mathbb 1\big[\exists i:\
            \|\tilde x_j - x_i\| \le r_k(x_i)\big],
        \qquad
        \text{recall} = \frac1{N}\sum_{i} \mathbb 1\big[\exists j:\
            \|x_i - \tilde x_j\| \le r_k(\tilde x_j)\big]

    with real :math:`x_1..x_N` and generated :math:`\tilde x_1..\tilde x_M`.
    Precision: how many samples look real (quality); recall: how much of the real
    data the generator covers (diversity). Use the same k and similar set sizes
    when comparing models; the paper uses k = 3. Returns ``(precision, recall)``.
    """
    real = _features_2d(real_features, "precision_recall")
    fake = _features_2d(fake_features, "precision_recall")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: feature sizes differ ({real.shape[1]} vs {fake.shape[1]})")
    device = _float64_device(real.device)
    real, fake = real.to(device, torch.float64), fake.to(device, torch.float64)
    precision = _share_inside(fake, real, knn_radii(real, k, chunk), chunk)
    recall = _share_inside(real, fake, knn_radii(fake, k, chunk), chunk)
    return precision, recall


def sample_figures(classifier: nn.Module, images, reference_features, prefix: str = "", k: int = 3) -> dict:
    """The figures a registered generator reports for a set of images, rounded for ``metrics.json``.

    FID, KID, precision and recall (k-NN manifolds with ``k``) against ``reference_features``,
    the classifier score, the confident fraction and the class entropy, each key starting with
    ``prefix`` (``"floor_"`` for real digits, ``"guided_"``...).
    """
    quality = sample_quality(classifier, images, reference_features=reference_features)
    precision, recall = precision_recall(reference_features, classifier_features(classifier, images), k=k)
    figures = {"fid": round(quality["fid"], 3), "kid": round(quality["kid"], 5),
               "precision": round(precision, 4), "recall": round(recall, 4),
               "classifier_score": round(quality["classifier_score"], 3),
               "confident_fraction": round(quality["confident_fraction"], 4),
               "class_entropy": round(quality["class_entropy"], 4)}
    return {prefix + key: value for key, value in figures.items()}


def nearest_neighbours(queries, reference, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, the Euclidean distance to its nearest reference and that reference's index.

    Images are flattened (pixel space); feature vectors are used as they are.
    Returns ``(distances [M], indices [M])``.
    """
    q = torch.as_tensor(queries).float().flatten(1)
    r = torch.as_tensor(reference).float().flatten(1).to(q.device)
    distances, indices = [], []
    for _, d in _pairwise_chunks(q, r, chunk):
        best = d.min(1)
        distances.append(best.values)
        indices.append(best.indices)
    return torch.cat(distances), torch.cat(indices)


def memorisation_check(samples, train, held_out, quantile: float = 0.01, chunk: int = 1024) -> dict:
    """Does a generator copy its training images? Compare nearest-training-neighbour distances.

    For each generated sample, the distance to its nearest training image; for
    each held-out real image (never trained on), the same. A model that merely
    memorised would put its samples much closer to the training set than unseen
    digits come (a ratio of medians well below 1, many samples below the
    held-out images' ``quantile``). Pixel space for images; pass features to
    compare in a feature space instead.

    Returns ``sample_to_train_median``, ``held_out_to_train_median``, ``ratio``
    (of the two medians), ``held_out_quantile`` (the held-out distances'
    ``quantile``), ``share_closer_than_quantile`` (of the samples; about
    ``quantile`` for a generator that does not copy), ``n_samples``, ``n_held_out``
    and ``nearest_train_index`` (per sample, for showing sample/neighbour pairs).
    """
    sample_distances, indices = nearest_neighbours(samples, train, chunk)
    held_out_distances, _ = nearest_neighbours(held_out, train, chunk)
    sample_median = float(sample_distances.median())
    held_out_median = float(held_out_distances.median())
    threshold = float(torch.quantile(held_out_distances.double(), quantile))
    return {
        "sample_to_train_median": sample_median,
        "held_out_to_train_median": held_out_median,
        "ratio": sample_median / held_out_median if held_out_median > 0 else float("inf"),
        "held_out_quantile": threshold,
        "share_closer_than_quantile": float((sample_distances.double() < threshold).double().mean()),
        "quantile": quantile,
        "n_samples": len(sample_distances),
        "n_held_out": len(held_out_distances),
        "nearest_train_index": indices,
    }
