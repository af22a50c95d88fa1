"""Models that ``course train MODEL`` knows how to train.

Each topic registers a :class:`ModelSpec`: how to size it for a budget, build
it, train it and evaluate it on held-out data. ``course train`` then seeds,
trains, evaluates, caches the checkpoint and writes ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def _register_builtin() -> None:
    from . import autoencoders, metrics, vae

    register(ModelSpec(
        "classifier",
        "MNISTFeatureNet: the small CNN whose features FID/KID use (test accuracy)",
        metrics.classifier_config, metrics.build_classifier,
        metrics.train_classifier, metrics.evaluate_classifier,
    ))
    register(ModelSpec(
        "ae",
        "the seed's deep conv autoencoder, 8-d code (test MSE vs PCA with 8 components)",
        autoencoders.ae_config, autoencoders.build_ae,
        autoencoders.train_ae, autoencoders.evaluate_ae,
    ))
    register(ModelSpec(
        "dae",
        "an MLP denoising autoencoder, masking noise (test MSE on corrupted digits vs PCA)",
        autoencoders.dae_config, autoencoders.build_dae,
        autoencoders.train_dae, autoencoders.evaluate_ae,
    ))
    register(ModelSpec(
        "vae",
        "conv VAE on binarized MNIST (test -ELBO and IWAE NLL in nats, prior-sample quality)",
        vae.vae_config, vae.build_vae, vae.train_vae, vae.evaluate_vae,
    ))


def available() -> dict[str, ModelSpec]:
    if not _REGISTRY:
        _register_builtin()
    return dict(_REGISTRY)


def get(name: str) -> ModelSpec:
    specs = available()
    if name not in specs:
        raise CourseError(f"unknown model {name!r}: choose one of {', '.join(sorted(specs))}")
    return specs[name]
