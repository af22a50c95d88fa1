"""Models that ``course train MODEL`` knows how to train.

Each topic registers a :class:`ModelSpec`: how to size it for a budget, build
it, train it and evaluate it on held-out data. ``course train`` then seeds,
trains, evaluates, caches the checkpoint and writes ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from .runtime import CourseError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    make_config: Callable[[str], dict]            # budget name -> config (hashable JSON)
    build: Callable[[dict], nn.Module]            # config -> fresh model
    train: Callable[..., dict | None]             # (model, config, device, max_seconds)
    evaluate: Callable[..., dict]                 # (model, config, device) -> test metrics


_REGISTRY: dict[str, ModelSpec] = {}


_builtins_added = False


def register(spec: ModelSpec) -> ModelSpec:
    """Add (or replace) a model; the built-in ones never override a registered name."""
    _REGISTRY[spec.name] = spec
    return spec


def _variants(make_config, build, train, evaluate, descriptions: dict[str, str]) -> list[ModelSpec]:
    """One spec per variant of a topic whose config function takes ``variant=NAME``."""
    return [ModelSpec(name, description, partial(make_config, variant=name), build, train, evaluate)
            for name, description in descriptions.items()]


def _builtin_specs() -> list[ModelSpec]:
    from . import autoencoders, diffusion, gan, metrics, pixelcnn, ssl, vae

    return [
        ModelSpec("classifier",
                  "MNISTFeatureNet: the small CNN whose features FID/KID use (test accuracy)",
                  metrics.classifier_config, metrics.build_classifier,
                  metrics.train_classifier, metrics.evaluate_classifier),
        ModelSpec("ae",
                  "the seed's deep conv autoencoder, 8-d code (test MSE vs PCA with 8 components)",
                  autoencoders.ae_config, autoencoders.build_ae,
                  autoencoders.train_ae, autoencoders.evaluate_ae),
        ModelSpec("dae",
                  "an MLP denoising autoencoder, masking noise (test MSE on corrupted digits vs PCA)",
                  autoencoders.dae_config, autoencoders.build_dae,
                  autoencoders.train_dae, autoencoders.evaluate_ae),
        ModelSpec("vae",
                  "conv VAE on binarized MNIST (test -ELBO and IWAE NLL in nats, prior-sample quality)",
                  vae.vae_config, vae.build_vae, vae.train_vae, vae.evaluate_vae),
        *_variants(gan.gan_config, gan.build_gan, gan.train_gan, gan.evaluate_gan, {
            "dcgan": "DCGAN, hinge loss, spectral norm in D, EMA generator (FID/KID, precision/recall "
                     "vs the held-out digits, with the real-vs-real floor)",
            "wgan-gp": "WGAN-GP: Wasserstein critic with the gradient penalty, same generator and figures",
            "cgan": "class-conditional DCGAN (label embedding in G, projection D); also the "
                    "classifier's agreement with the requested digit",
            "infogan": "InfoGAN: DCGAN plus a 10-way categorical code; also how well code and digit match",
        }),
        *_variants(pixelcnn.pixelcnn_config, pixelcnn.build_pixelcnn, pixelcnn.train_pixelcnn,
                   pixelcnn.evaluate_pixelcnn, {
            "made": "MADE on binarized MNIST: masked MLP, exact NLL in nats (and bits/dim), samples",
            "pixelcnn": "plain PixelCNN (mask A, then mask-B residual blocks): exact NLL, sample quality "
                        "and the time to sample 64 digits",
            "gated-pixelcnn": "gated PixelCNN (vertical + horizontal stacks, no blind spot): "
                              "the same figures",
            "gated-pixelcnn-grey": "the gated PixelCNN on 16 grey levels (4 bits, a softmax per pixel): "
                                   "held-out bits/dim, samples",
        }),
        *_variants(diffusion.diffusion_config, diffusion.build_diffusion, diffusion.train_diffusion,
                   diffusion.evaluate_diffusion, {
            "ddpm": "DDPM: a U-Net noise predictor, class-conditional with label dropout (so also "
                    "unconditional and classifier-free guided); FID/KID, precision/recall with DDIM "
                    "sampling and the real-vs-real floor, class agreement under guidance",
            "ddpm-binary": "the DDPM on binarized digits (-1/+1, dynamic binarization): also its "
                           "variational bound in nats on the VAE's binarization of the held-out digits",
            "latent-ddpm": "latent diffusion: an MLP denoiser in the topic-3 VAE's latent space "
                           "(needs `course train vae`, trained first if missing); the same figures",
        }),
        *_variants(ssl.ssl_config, ssl.build_ssl, ssl.train_ssl, ssl.evaluate_ssl, {
            "rotation": "rotation prediction (0/90/180/270 degrees) with the course's SSL encoder; "
                        "linear probes at 10/100/1,000 labels per class and k-NN on the held-out digits",
            "context-encoder": "a context encoder: inpaint a hidden 12x12 patch (L2 in the hole plus a "
                               "small adversarial loss); the same probes",
            "simclr": "SimCLR: NT-Xent on two augmented views, a projection head the probes discard; "
                      "the same probes",
            "supervised-encoder": "the same encoder trained with every label: the probe table's ceiling",
        }),
    ]


def available() -> dict[str, ModelSpec]:
    global _builtins_added
    if not _builtins_added:  # on first use, so that importing the registry stays cheap
        _builtins_added = True
        for spec in _builtin_specs():
            _REGISTRY.setdefault(spec.name, spec)
    return dict(_REGISTRY)


def get(name: str) -> ModelSpec:
    specs = available()
    if name not in specs:
        raise CourseError(f"unknown model {name!r}: choose one of {', '.join(sorted(specs))}")
    return specs[name]


def trained(name: str, max_seconds: float | None = None, device=None, budget_name: str | None = None,
            **options):
    """``(model, info)``: the checkpoint ``course train NAME`` cached, else trained now and cached.

    Built from the same config and seed as the command, so the command's checkpoint is the one
    found. When none is cached (or in the smoke budget, which always trains) the model trains for
    ``max_seconds`` (else its own time limit). ``info['source']`` is ``"cache"`` or ``"trained"``,
    ``info['metrics']`` the training facts.
    """
    from .checkpoints import load_or_train
    from .runtime import get_device, seed_everything

    spec = get(name)
    config = training_config(name, budget_name)
    device = get_device() if device is None else device
    seed_everything(int(config.get("seed", 0)))  # as `course train` does before it builds the model
    model, info = load_or_train(name, config, spec.build(config),
                                lambda m: spec.train(m, config, device, max_seconds=max_seconds, **options),
                                budget_name=budget_name)
    return model.to(device).eval(), info


def from_course_train(name: str, info: dict, budget_name: str | None = None) -> bool:
    """Whether ``info`` (from :func:`trained`) is a cached run of ``course train NAME``: it ran
    all its steps or (almost) its whole time limit, so claims about trained models hold for it."""
    facts = info.get("metrics", {})
    limit = training_config(name, budget_name).get("time_limit") or float("inf")
    seconds = facts.get("train_seconds_fit", facts.get("train_seconds", facts.get("seconds", 0)))
    return info.get("source") == "cache" and (facts.get("stopped_by") in ("steps", "epochs")
                                             or seconds >= 0.9 * limit)


def training_config(name: str, budget_name: str | None = None, seed: int = 0,
                    max_seconds: float | None = None) -> dict:
    """The config exactly as ``course train NAME`` completes and caches it.

    The model's own config for the budget, plus the seed, the time limit and the
    training data's description. A notebook that builds the same dict finds the
    checkpoint that command cached (``checkpoints.load_or_train``).
    """
    from .checkpoints import training_config as complete

    return complete(get(name).make_config(budget_name), budget_name, seed, max_seconds)
