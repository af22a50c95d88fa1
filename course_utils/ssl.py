"""Self-supervised learning (topic 7): labels that come from the data itself.

A self-supervised method is an ordinary supervised loss whose targets are made from
unlabelled images: the pixels hidden behind a patch (context encoder), the angle an
image was turned by (rotation prediction), or which of many augmented images is another
view of the same digit (SimCLR). Nobody cares about these *pretext* tasks; what they
leave behind is an encoder, and the encoder is judged the same way for every method:

* freeze it, compute features ``h = f(x)`` of a few labelled digits, fit a **linear
  probe** (logistic regression) on them and report its accuracy on held-out digits;
* and the **k-NN accuracy**: the majority label of the ``k`` nearest labelled features.

A frozen random encoder and raw pixels are the baselines every table must carry: a
probe on random convolutional features is far better than chance, so a method only
earns credit for what it adds above them.

Every method here trains the same :class:`ConvEncoder` (``1x28x28 -> 128x7x7 -> 128``),
for the same time, so the probe table compares the pretext tasks and nothing else.

Contents, top to bottom: the encoder; the pretext batches (rotation, patch mask, masked
loss); augmentations (torch only, batched); the NT-Xent loss; the models (rotation,
context encoder with an optional adversarial loss, SimCLR, the supervised ceiling);
probes (linear, k-NN, labelled subsets); configs, training and evaluation for
``course train rotation | context-encoder | simclr | supervised-encoder``; the probe table.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoders import encode_all, linear_probe

VARIANTS = ("rotation", "context-encoder", "simclr", "supervised-encoder")
LABELS_PER_CLASS = (10, 100, 1000)
ROTATIONS = 4  # 0, 90, 180 and 270 degrees


# ----------------------------------------------------------------------------------
# The encoder every method trains
# ----------------------------------------------------------------------------------
def _conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ConvEncoder(nn.Module):
    """``f``: a 1x28x28 digit -> ``feature_dim`` x 7 x 7 maps -> a ``feature_dim`` vector.

    Five 3x3 convolutions with batch norm (28 -> 28 -> 14 -> 14 -> 7 -> 7), then the
    global average of each map: ``h_c = (1/49) sum_ij A_cij``. The maps keep *where*
    (the context encoder decodes from them); the average is the representation every
    probe reads. Inputs in [0, 1], mapped to [-1, 1] first.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            _conv_block(1, width),
            _conv_block(width, 2 * width, stride=2),
            _conv_block(2 * width, 2 * width),
            _conv_block(2 * width, 4 * width, stride=2),
            _conv_block(4 * width, feature_dim),
        )

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(2 * x - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(x).mean(dim=(2, 3))


# ----------------------------------------------------------------------------------
# Pretext batches: rotation, the patch mask, the loss inside the hole
# ----------------------------------------------------------------------------------
def rotation_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image turned by 0, 90, 180 and 270 degrees, with the turn as its label.

    Returns ``(rotated, labels)``: ``rotated`` is ``[4N, C, H, W]``, the N images turned
    by k quarter turns counter-clockwise (``torch.rot90`` over the image plane) in block
    ``k``; ``labels`` is ``[4N]`` with ``k`` in block ``k``. The label is free: we made it.
    """
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(len(images))
    return rotated, labels


def patch_mask(batch_size: int, patch_size: int = 12, image_size: int = 28, margin: int = 4,
               generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A square hole per image: ``[N, 1, H, W]``, 1 inside the hole and 0 elsewhere.

    The hole's top-left corner is uniform over the positions that keep the whole
    square at least ``margin`` pixels from the border (MNIST's strokes live in the
    central 20x20, so a hole there always hides some of the digit).
    """
    top_left = torch.randint(margin, image_size - margin - patch_size + 1, (batch_size, 2),
                             generator=generator)
    rows = torch.arange(image_size).view(1, image_size, 1)
    cols = torch.arange(image_size).view(1, 1, image_size)
    r0, c0 = top_left[:, 0].view(-1, 1, 1), top_left[:, 1].view(-1, 1, 1)
    inside = ((rows >= r0) & (rows < r0 + patch_size) & (cols >= c0) & (cols < c0 + patch_size))
    return inside.unsqueeze(1).float().to(device)


HOLE_FILL = 0.5  # mid-grey: a flat square no MNIST digit contains, so the encoder sees the hole


def mask_images(images: torch.Tensor, mask: torch.Tensor, fill: float = HOLE_FILL) -> torch.Tensor:
    """The context the encoder sees: ``x * (1 - M) + fill * M``."""
    return images * (1 - mask) + fill * mask


def masked_reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor,
                               mask: torch.Tensor) -> torch.Tensor:
    """The context encoder's L2 loss, inside the hole only.

    ``L_rec = sum_i M_i (x_i - x_hat_i)^2 / sum_i M_i``: the mean squared error over the
    hidden pixels of the batch. Outside the hole the answer is in the input; a loss that
    counted it would mostly reward copying.
    """
    return ((reconstruction - target).pow(2) * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------
# Augmentations (batched, torch only): SimCLR's real design choice
# ----------------------------------------------------------------------------------
def _uniform(n: int, low: float, high: float, generator, device) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=generator)).to(device)


def random_affine(images: torch.Tensor, degrees: float = 15.0, scale=(0.75, 1.15),
                  translate: float = 0.12, shear: float = 10.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image rotated, rescaled, sheared and shifted by its own random amount.

    A sampling grid ``p_in = A p_out + b`` (``F.affine_grid``, coordinates in [-1, 1]) with
    ``A = s R(theta) [[1, tan(phi)], [0, 1]]`` and ``b`` uniform in ``+-2 translate``:
    a digit shrinks by ``s`` > 1 and grows by ``s`` < 1, and the crop-and-resize of
    SimCLR on natural images is the ``s``/``b`` part. Pixels from outside are black.
    """
    n, device = len(images), images.device
    theta = _uniform(n, -degrees, degrees, generator, device) * math.pi / 180
    phi = _uniform(n, -shear, shear, generator, device) * math.pi / 180
    s = _uniform(n, scale[0], scale[1], generator, device)
    shift = torch.stack([_uniform(n, -2 * translate, 2 * translate, generator, device)
                         for _ in range(2)], dim=1)
    cos, sin, tan = torch.cos(theta), torch.sin(theta), torch.tan(phi)
    A = torch.stack([torch.stack([cos, cos * tan - sin], 1),
                     torch.stack([sin, sin * tan + cos], 1)], 1) * s.view(-1, 1, 1)
    grid = F.affine_grid(torch.cat([A, shift.unsqueeze(2)], 2).to(images.dtype), list(images.shape),
                         align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def random_erasing(images: torch.Tensor, probability: float = 0.5, max_size: int = 10,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """With ``probability``, black out a random rectangle (sides 4..``max_size``) per image."""
    n, _, height, width = images.shape
    h = torch.randint(4, max_size + 1, (n,), generator=generator)
    w = torch.randint(4, max_size + 1, (n,), generator=generator)
    top = (torch.rand(n, generator=generator) * (height - h + 1)).long()
    left = (torch.rand(n, generator=generator) * (width - w + 1)).long()
    chosen = torch.rand(n, generator=generator) < probability
    rows, cols = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1))
           & chosen.view(-1, 1, 1))
    return images * (~box).unsqueeze(1).to(images.device, images.dtype)


AUGMENTATIONS = {
    "full": {"affine": True, "erase": 0.5, "noise": 0.1},
    "crop": {"affine": True, "erase": 0.0, "noise": 0.0},
    "noise": {"affine": False, "erase": 0.0, "noise": 0.1},
    "none": {"affine": False, "erase": 0.0, "noise": 0.0},
}


def augment(images: torch.Tensor, kind: str = "full",
            generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of each image: ``kind`` is a key of :data:`AUGMENTATIONS`.

    ``full`` = random affine (rotation, scale, shear, shift) + random erasing + Gaussian
    pixel noise (std 0.1), clamped to [0, 1]; ``crop`` = the affine part only;
    ``noise`` = the pixel noise only; ``none`` = the image itself (two identical views).
    """
    recipe = AUGMENTATIONS[kind]
    x = random_affine(images, generator=generator) if recipe["affine"] else images
    if recipe["erase"]:
        x = random_erasing(x, recipe["erase"], generator=generator)
    if recipe["noise"]:
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        x = (x + recipe["noise"] * noise).clamp(0, 1)
    return x


# ----------------------------------------------------------------------------------
# NT-Xent, the loss of SimCLR
# ----------------------------------------------------------------------------------
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """The normalised-temperature cross-entropy of two batches of projections.

    Row ``i`` of ``z1`` and row ``i`` of ``z2`` are two views of one image (a positive
    pair); the other ``2N - 2`` rows are its negatives. With ``u = z / ||z||`` and the
    cosine similarity ``s_ij = u_i . u_j`` over all ``2N`` rows,

        l_i = -log( exp(s_{i,p(i)} / tau) / sum_{k != i} exp(s_ik / tau) ),

    where ``p(i)`` is ``i``'s partner, and the loss is the mean of ``l_i`` over all ``2N``
    anchors: a ``2N``-way classification whose right answer is the partner. The sum
    leaves out ``k = i`` (an image is trivially similar to itself) but keeps the partner.
    """
    n = len(z1)
    u = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = u @ u.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=u.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(u.device)
    return F.cross_entropy(logits, partner)


def positive_retrieval(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """How often an anchor's most similar other row is its partner (SimCLR's own accuracy)."""
    n = len(z1)
    u = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = (u @ u.T).fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(u.device)
    return float((similarity.argmax(1) == partner).float().mean())


# ----------------------------------------------------------------------------------
# The models: one encoder each, plus what its pretext task needs
# ----------------------------------------------------------------------------------
class RotationNet(nn.Module):
    """Encoder + a linear head that tells which of the 4 quarter turns was applied."""

    method = "rotation"

    def __init__(self, encoder: ConvEncoder):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, ROTATIONS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def pretext_loss(self, images, labels, generator=None):
        del labels, generator  # the labels of this task come from the rotations
        rotated, turns = rotation_batch(images)
        logits = self(rotated)
        return F.cross_entropy(logits, turns), {"accuracy": (logits.argmax(1) == turns).float().mean()}


class InpaintingDecoder(nn.Module):
    """``g``: 128x7x7 feature maps -> a whole 1x28x28 image in [0, 1] (two x2 upsamplings)."""

    def __init__(self, feature_dim: int = 128, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(feature_dim, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(True),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, 1, 3, 1, 1), nn.Sigmoid())

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net(maps)


class PatchCritic(nn.Module):
    """The adversarial loss's discriminator: is this hole's content real or inpainted?

    It sees the whole image with the hole filled (real pixels or the decoder's), and the
    mask as a second channel, so it judges the patch *in its context*.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(2, width, 4, 2, 1)), nn.LeakyReLU(0.2),          # 14
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2),  # 7
            nn.Flatten(), sn(nn.Linear(2 * width * 49, 1)))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([2 * images - 1, mask], 1))[:, 0]


class ContextEncoder(nn.Module):
    """Pathak et al.'s context encoder: hide a patch, inpaint it from its context.

    ``L = (1 - lambda_adv) L_rec + lambda_adv L_adv``: ``L_rec`` is the L2 loss inside the
    hole (:func:`masked_reconstruction_loss`), ``L_adv`` the non-saturating generator loss
    against :class:`PatchCritic` (when ``adversarial_weight`` > 0). L2 alone is minimised
    by the *average* of the plausible fillings, a blur; the critic penalises blur, because
    no real patch is blurred.
    """

    method = "context-encoder"

    def __init__(self, encoder: ConvEncoder, patch_size: int = 12, adversarial_weight: float = 0.0,
                 width: int = 32):
        super().__init__()
        self.encoder, self.patch_size = encoder, patch_size
        self.decoder = InpaintingDecoder(encoder.feature_dim, width)
        self.adversarial_weight = adversarial_weight
        self.critic = PatchCritic(width) if adversarial_weight > 0 else None

    def inpaint(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The decoder's guess inside the hole, the real pixels outside it."""
        guess = self.decoder(self.encoder.feature_maps(mask_images(images, mask)))
        return images * (1 - mask) + guess * mask

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder.feature_maps(mask_images(images, mask)))

    def pretext_loss(self, images, labels, generator=None):
        del labels
        mask = patch_mask(len(images), self.patch_size, images.shape[-1], generator=generator,
                          device=images.device)
        guess = self(images, mask)
        reconstruction = masked_reconstruction_loss(guess, images, mask)
        extras = {"hole_mse": reconstruction.detach()}
        if self.critic is None:
            return reconstruction, extras
        from .gan import generator_loss

        filled = images * (1 - mask) + guess * mask
        self._for_critic = (images, filled.detach(), mask)  # the critic's step reuses this batch
        adversarial = generator_loss(self.critic(filled, mask))
        extras["adversarial"] = adversarial.detach()
        w = self.adversarial_weight
        return (1 - w) * reconstruction + w * adversarial, extras

    def critic_loss(self) -> torch.Tensor:
        from .gan import discriminator_loss

        real, fake, mask = self._for_critic
        return discriminator_loss(self.critic(real, mask), self.critic(fake, mask))


class SimCLR(nn.Module):
    """Encoder + projection head ``g``: ``z = g(f(x))``; NT-Xent on two augmented views.

    The probe reads ``h = f(x)`` and throws ``g`` away: the loss makes ``z`` invariant to
    the augmentations, which also erases information (position, thickness) that a later
    task might need; ``h``, one layer before, keeps more of it.
    """

    method = "simclr"

    def __init__(self, encoder: ConvEncoder, projection_dim: int = 64, temperature: float = 0.5,
                 augmentation: str = "full"):
        super().__init__()
        self.encoder = encoder
        d = encoder.feature_dim
        self.projection = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, projection_dim))
        self.temperature, self.augmentation = temperature, augmentation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x))

    def pretext_loss(self, images, labels, generator=None):
        del labels
        views = augment(torch.cat([images, images]), self.augmentation, generator)
        z1, z2 = self(views).chunk(2)
        return nt_xent(z1, z2, self.temperature), {"retrieval": positive_retrieval(z1.detach(), z2.detach())}


class SupervisedNet(nn.Module):
    """The ceiling: the same encoder trained with every label (cross-entropy)."""

    method = "supervised-encoder"

    def __init__(self, encoder: ConvEncoder, num_classes: int = 10):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def pretext_loss(self, images, labels, generator=None):
        del generator
        logits = self(images)
        return F.cross_entropy(logits, labels), {"accuracy": (logits.argmax(1) == labels).float().mean()}


# ----------------------------------------------------------------------------------
# Probes: how good is a frozen representation?
# ----------------------------------------------------------------------------------
def features_of(encoder, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``f(x)`` of every image, flattened, in eval mode, without gradients (``[N, d]``).

    The encoder is frozen: eval mode (batch norm uses its running statistics, so an
    image's features do not depend on its batch) and no gradient reaches it.
    """
    was_training = getattr(encoder, "training", False)
    if isinstance(encoder, nn.Module):
        encoder.eval()
    try:
        return encode_all(encoder, images, batch_size)
    finally:
        if isinstance(encoder, nn.Module):
            encoder.train(was_training)


def labelled_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` random examples of each class (all of a class with fewer).

    Seeded: the same ``seed`` picks the same digits, so every representation in a table
    is probed with the same few labels.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, k: int = 10,
                 chunk: int = 1000) -> float:
    """Accuracy of a k-nearest-neighbour vote by cosine similarity.

    Each test feature takes the most frequent label among the ``k`` labelled features
    with the largest cosine similarity ``u . v / (||u|| ||v||)``; a tie goes to the
    smallest label (``argmax`` of the vote counts). No training at all: it asks whether
    digits of one class are *near* each other, where the probe asks whether they are
    linearly separable.
    """
    train = F.normalize(train_features.detach().flatten(1).float().cpu(), dim=1)
    test = F.normalize(test_features.detach().flatten(1).float().cpu(), dim=1)
    train_labels, test_labels = train_labels.long().cpu(), test_labels.long().cpu()
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for rows in torch.arange(len(test)).split(chunk):
        nearest = (test[rows] @ train.T).topk(k, dim=1).indices
        votes = F.one_hot(train_labels[nearest], classes).sum(1)
        correct += int((votes.argmax(1) == test_labels[rows]).sum())
    return correct / len(test)


def probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
          test_labels: torch.Tensor, labels_per_class=LABELS_PER_CLASS, draws=(5, 3, 1),
          knn_k: int = 10) -> dict:
    """Linear-probe accuracies with few labels, and the k-NN accuracy with all of them.

    For each ``n`` in ``labels_per_class`` the probe (:func:`~course_utils.autoencoders.linear_probe`)
    is fitted on ``n`` labelled features per class (seeded draws ``0..draws-1``; the mean
    and the spread over draws) and scored on every test feature. ``n_used`` is what was
    really there: on the 8,000/2,000 split a class has about 800 training digits, so
    1,000 per class means all of them. Returns a JSON-able dict.
    """
    out: dict = {}
    available = int(torch.bincount(train_labels.long().cpu()).min())
    for n, repeats in zip(labels_per_class, draws, strict=True):
        used = min(n, available)
        repeats = repeats if used < available else 1  # every draw of "all of them" is the same
        scores = []
        for seed in range(repeats):
            rows = labelled_subset(train_labels, n, seed)
            scores.append(linear_probe(train_features[rows], train_labels[rows], test_features, test_labels))
        scores_t = torch.tensor(scores)
        out[f"probe_{n}"] = round(float(scores_t.mean()), 4)
        out[f"probe_{n}_std"] = round(float(scores_t.std()) if repeats > 1 else 0.0, 4)
        out[f"probe_{n}_draws"] = repeats
        out[f"probe_{n}_labels"] = int(len(labelled_subset(train_labels, n, 0)))
    out["knn"] = round(knn_accuracy(train_features, train_labels, test_features, test_labels, knn_k), 4)
    out["knn_k"] = knn_k
    return out


# ----------------------------------------------------------------------------------
# `course train rotation | context-encoder | simclr | supervised-encoder`
# ----------------------------------------------------------------------------------
def ssl_config(budget_name: str | None = None, variant: str = "simclr") -> dict:
    """One method's pretraining, sized for a budget (JSON-able).

    Every method trains the same :class:`ConvEncoder` for the same wall-clock budget
    (``time_limit``: 4 minutes in the classroom budget), with AdamW, a short warm-up and a
    cosine decay following step and clock. Batches: ``batch_size`` images (rotation sees
    each four times, SimCLR twice). ``adversarial_weight``: the context encoder's
    lambda_adv; ``temperature``/``augmentation``: SimCLR's.
    """
    from .runtime import by_budget

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    cfg = by_budget(
        budget_name,
        width=(16, 16, 64),
        steps=(20, 20_000, 50_000),
        time_limit=(8, 240, 1800),
        train_images=(2_000, None, None),
        eval_images=(500, None, None),
    )
    config = {
        "model": "ssl", "variant": variant, "width": cfg.width, "feature_dim": 128,
        "batch_size": {"rotation": 64, "context-encoder": 128, "simclr": 128,
                       "supervised-encoder": 128}[variant],
        "lr": 2e-3, "weight_decay": 1e-5, "lr_warmup": 0.03, "final_lr_factor": 0.02,
        "steps": cfg.steps, "time_limit": cfg.time_limit, "train_images": cfg.train_images,
        "eval_images": cfg.eval_images, "labels_per_class": list(LABELS_PER_CLASS),
        "budget": cfg.budget,
    }
    if variant == "context-encoder":
        config.update(patch_size=12, adversarial_weight=0.01)
    if variant == "simclr":
        config.update(temperature=0.5, augmentation="full", projection_dim=64)
    return config


def course_train_config(budget_name: str | None = None, variant: str = "simclr", seed: int = 0,
                        max_seconds: float | None = None) -> dict:
    """The config exactly as ``course train VARIANT`` completes and caches it."""
    from .checkpoints import training_config

    return training_config(ssl_config(budget_name, variant), budget_name, seed=seed, max_seconds=max_seconds)


def build_ssl(config: dict) -> nn.Module:
    """A fresh model of the config's method, seeded by ``config['seed']``."""
    torch.manual_seed(int(config.get("seed", 0)))
    encoder = ConvEncoder(config["width"], config["feature_dim"])
    variant = config["variant"]
    if variant == "rotation":
        return RotationNet(encoder)
    if variant == "context-encoder":
        return ContextEncoder(encoder, config["patch_size"], config["adversarial_weight"], config["width"])
    if variant == "simclr":
        return SimCLR(encoder, config["projection_dim"], config["temperature"], config["augmentation"])
    return SupervisedNet(encoder)


def train_ssl(model: nn.Module, config: dict, device=None, max_seconds: float | None = None,
              images=None, labels=None, progress: bool | None = None, on_step=None) -> dict:
    """Pretrain with the model's own pretext loss; returns training facts.

    Data: ``mnist("train")`` (labels are read only by the supervised ceiling). Stops after
    ``config['steps']`` or ``max_seconds`` (else the config's ``time_limit``). The context
    encoder's critic, when there is one, takes one step per encoder step on the same batch.
    ``model.history`` gets the per-step losses and the task's own accuracy.
    """
    from tqdm.auto import tqdm

    from .data import BatchLoader, training_tensors
    from .runtime import get_device, in_ci, local_seed
    from .training import stop_reason
    from .vae import Progress, lr_factor

    device = torch.device(device) if device is not None else get_device()
    images, labels, description = training_tensors(device, config.get("train_images"), images, labels)
    model.to(device)
    seed = int(config.get("seed", 0))
    loader = BatchLoader(images, labels.to(device), batch_size=config["batch_size"], shuffle=True,
                         drop_last=True, seed=seed)
    limit = max_seconds if max_seconds is not None else config.get("time_limit")
    progress_fraction = Progress(config["steps"], limit)
    critic = getattr(model, "critic", None)
    trained = [p for name, p in model.named_parameters() if not name.startswith("critic.")]
    optimizer = torch.optim.AdamW(trained, lr=config["lr"], weight_decay=config["weight_decay"])
    schedule = lambda _: lr_factor(progress_fraction(), config["lr_warmup"], config["final_lr_factor"])  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    critic_optimizer = (torch.optim.Adam(critic.parameters(), lr=config["lr"], betas=(0.5, 0.999))
                        if critic is not None else None)
    history: dict[str, list[float]] = {"loss": []}
    show = (not in_ci()) if progress is None else progress
    bar = tqdm(total=config["steps"], desc=config["variant"], disable=not show, leave=False)
    step, start, stopped_by = 0, time.monotonic(), ""
    model.train()
    with local_seed(seed, device):
        generator = torch.Generator().manual_seed(seed + 1)
        while not stopped_by:
            for x, y in loader:
                loss, extras = model.pretext_loss(x, y, generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the {config['variant']} loss became {float(loss)} at step {step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if critic is not None:
                    critic_optimizer.zero_grad(set_to_none=True)
                    model.critic_loss().backward()
                    critic_optimizer.step()
                step += 1
                progress_fraction.step = step
                history["loss"].append(float(loss.detach()))
                for key, value in extras.items():
                    history.setdefault(key, []).append(float(value))
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
                if on_step is not None:
                    on_step(step, history)
                stopped_by = stop_reason(step, config["steps"], start, limit)
                if stopped_by:
                    break
    bar.close()
    seconds = time.monotonic() - start
    model.eval()
    model.history = history
    facts = {"train_steps": step, "train_seconds_fit": round(seconds, 1),
             "steps_per_second": round(step / max(seconds, 1e-9), 2), "stopped_by": stopped_by,
             "train_images": len(images), "train_data": description}
    for key, values in history.items():
        tail = values[-min(100, len(values)):]
        facts[f"{key}_last_100"] = round(sum(tail) / len(tail), 5)
    return facts


def evaluate_ssl(model: nn.Module, config: dict, device=None) -> dict:
    """Probe the frozen encoder: linear probes at 10/100/1,000 labels per class and k-NN.

    Features of the training images (the labelled pool: ``mnist("train")``) and of the
    held-out digits (``mnist("test")``); also the pretext task's own score on the held-out
    digits (rotation accuracy, the hole's MSE, SimCLR's positive retrieval, or the
    supervised test accuracy), which says whether the task was learnt, not whether the
    features are good.
    """
    from .data import as_tensors, describe, mnist
    from .runtime import get_device

    device = torch.device(device) if device is not None else get_device()
    model.to(device).eval()
    train_set, test_set = mnist("train"), mnist("test")
    train_images, train_labels = as_tensors(train_set, device, limit=config.get("train_images"))
    test_images, test_labels = as_tensors(test_set, device, limit=config.get("eval_images"))
    start = time.perf_counter()
    train_features = features_of(model.encoder, train_images)
    test_features = features_of(model.encoder, test_images)
    feature_seconds = time.perf_counter() - start
    metrics = probe(train_features, train_labels, test_features, test_labels,
                    config.get("labels_per_class", LABELS_PER_CLASS))
    metrics["pretext"] = pretext_score(model, test_images, test_labels)
    metrics.update({
        "feature_dim": int(train_features.shape[1]),
        "feature_seconds": round(feature_seconds, 2),
        "labelled_pool": f"{len(train_images):,} of {describe(train_set)}",
        "test_data": f"{len(test_images):,} of {describe(test_set)}",
    })
    return metrics


def pretext_score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The pretext task's own figure on held-out digits (seeded; see :func:`evaluate_ssl`)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if isinstance(model, RotationNet):
            rotated, turns = rotation_batch(images)
            return round(float((model(rotated).argmax(1) == turns).float().mean()), 4)
        if isinstance(model, ContextEncoder):
            mask = patch_mask(len(images), model.patch_size, generator=generator, device=images.device)
            return round(float(masked_reconstruction_loss(model(images, mask), images, mask)), 5)
        if isinstance(model, SimCLR):
            views = augment(torch.cat([images, images]), model.augmentation, generator)
            z1, z2 = model(views).chunk(2)
            return round(positive_retrieval(z1, z2), 4)
        return round(float((model(images).argmax(1) == labels).float().mean()), 4)


# ----------------------------------------------------------------------------------
# The probe table: every representation the course has, probed the same way
# ----------------------------------------------------------------------------------
def pca_features(train_images: torch.Tensor, components: int = 50):
    """A function ``x -> the coordinates of x on the top principal directions`` of the training images."""
    flat = train_images.flatten(1).double().cpu()
    mean = flat.mean(0)
    _, _, V = torch.linalg.svd(flat - mean, full_matrices=False)
    basis = V[:components].T

    def project(x: torch.Tensor) -> torch.Tensor:
        return ((x.flatten(1).double().cpu() - mean) @ basis).float()

    return project


FEATURE_READERS = {
    # registered model -> how its frozen representation is read
    "ae": lambda model: model.encode,
    "vae": lambda model: (lambda x: model.encode(x)[0]),
    "dcgan": lambda model: model.discriminator.features,
}


def representation(name: str, model: nn.Module):
    """The frozen encoder of a registered model: ``x -> features``."""
    if name in FEATURE_READERS:
        return FEATURE_READERS[name](model)
    return model.encoder


# (row label, registered model or None, what the row is); the order of the printed table
TABLE_ROWS = (
    ("random init", None, "the course encoder, untrained (frozen at its seeded initialisation)"),
    ("raw pixels", None, "the 784 pixels themselves"),
    ("PCA (50)", None, "coordinates on the top 50 principal directions of the training digits"),
    ("autoencoder", "ae", "topic 1: the seed's conv autoencoder, its 8-d code"),
    ("VAE mean", "vae", "topic 3: the conv VAE's posterior mean, 32-d"),
    ("GAN discriminator", "dcgan", "topic 4: the DCGAN discriminator's penultimate layer"),
    ("context encoder", "context-encoder", "inpainting a 12x12 hole, L2 + adversarial"),
    ("rotation", "rotation", "predicting the quarter turn"),
    ("SimCLR", "simclr", "NT-Xent on two augmented views"),
    ("supervised (ceiling)", "supervised-encoder", "the same encoder trained with all labels"),
)


def probe_table(load, train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                test_labels: torch.Tensor, rows=TABLE_ROWS, width: int | None = None, on_row=None,
                **probe_options):
    """The course's version of the pretraining table: every representation, probed the same way.

    ``load(name) -> (model, info)`` gives a registered model (``registry.trained``: the cached
    ``course train`` checkpoint or a short run); ``info['metrics']`` has its training time. The
    random encoder has the budget's ``width`` (``ssl_config()['width']`` unless given).
    Each row: the representation's name, where it came from, its pretraining seconds,
    its dimension and :func:`probe`'s figures on ``test_images``. ``on_row(row)`` is called
    as each row is done (progress for a long table).
    """
    table = []
    for label, name, description in rows:
        start = time.perf_counter()
        source, seconds = "no training", 0.0
        if label == "random init":
            torch.manual_seed(0)
            read = ConvEncoder(width or ssl_config()["width"]).to(train_images.device).eval()
        elif label == "raw pixels":
            read = nn.Flatten()
        elif label.startswith("PCA"):
            read = pca_features(train_images, int(label.split("(")[1].rstrip(")")))
            source, seconds = "fitted here", time.perf_counter() - start
        else:
            model, info = load(name)
            facts = info.get("metrics", {})
            read = representation(name, model)
            source = "checkpoint" if info.get("source") == "cache" else "trained here"
            seconds = float(next((facts[key] for key in ("train_seconds_fit", "train_seconds", "seconds")
                                  if key in facts), 0.0))
        train_features = features_of(read, train_images)
        test_features = features_of(read, test_images)
        row = {"representation": label, "model": name, "what": description, "source": source,
               "pretrain_seconds": round(seconds, 1), "feature_dim": int(train_features.shape[1]),
               **probe(train_features, train_labels, test_features, test_labels, **probe_options)}
        table.append(row)
        if on_row is not None:
            on_row(row)
    return table


def format_table(table, labels_per_class=LABELS_PER_CLASS) -> str:
    """The probe table as Markdown (accuracies in %, the spread over draws after +-)."""
    head = ["representation", "pretraining", "dim",
            *(f"probe, {n}/class" for n in labels_per_class), "k-NN"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        trained = row["model"] or row["pretrain_seconds"]
        when = f"{row['pretrain_seconds']:.0f} s ({row['source']})" if trained else row["source"]
        cells = [row["representation"], when, str(row["feature_dim"])]
        for n in labels_per_class:
            spread = f" ± {100 * row[f'probe_{n}_std']:.1f}" if row[f"probe_{n}_draws"] > 1 else ""
            cells.append(f"{100 * row[f'probe_{n}']:.1f}{spread}")
        cells.append(f"{100 * row['knn']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "AUGMENTATIONS", "ContextEncoder", "ConvEncoder", "FEATURE_READERS", "HOLE_FILL",
    "InpaintingDecoder", "LABELS_PER_CLASS", "PatchCritic", "RotationNet", "SimCLR", "SupervisedNet",
    "TABLE_ROWS", "VARIANTS", "augment", "build_ssl", "course_train_config", "evaluate_ssl",
    "features_of", "format_table", "knn_accuracy", "labelled_subset", "linear_probe", "mask_images",
    "masked_reconstruction_loss", "nt_xent", "patch_mask", "pca_features", "positive_retrieval",
    "pretext_score", "probe", "probe_table", "random_affine", "random_erasing", "representation",
    "rotation_batch", "ssl_config", "train_ssl",
]
