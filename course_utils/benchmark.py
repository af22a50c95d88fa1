"""Topic 8: every model family of the course, measured the same way (``course benchmark``).

One table, one evaluator. For each model the benchmark trains (or loads from the checkpoint
cache) the network ``course train NAME`` trains, then measures, on the same data and with the
same seeded randomness:

* **size and cost**: parameters, training time (wall clock and CPU seconds) and the data used;
* **likelihood**, where the model has one, in nats per image on the same held-out digits with
  the VAE's fixed, seeded binarization (so 784 binary pixels each):

  - MADE and the PixelCNNs: the exact :math:`-\\log p(x) = -\\sum_i \\log p(x_i \\mid x_{<i})`;
  - the VAE: the IWAE bound :math:`-\\log \\frac1k \\sum_j p(x, z_j) / q(z_j \\mid x)`
    (:math:`\\ge -\\log p(x)`, tighter as k grows);
  - the binarized DDPM: the variational bound :math:`L_T + \\sum_t L_{t-1} + L_0`
    (:math:`\\ge -\\log p(x)` for the T-step ancestral sampler), its sum over t estimated
    from a few stratified timesteps per image;

  and bits per dimension, :math:`\\text{nats} / (784 \\ln 2)`;
* **sample quality**: FID, KID, precision, recall, the classifier score and the confident
  fraction of ``samples`` unconditional samples against as many held-out digits, in the
  feature space of the course's classifier; beside them the **floors**, the same figures for
  real training digits (grey, and binarized the way the binary models see them): what a
  perfect generator would score with these sample counts;
* **speed**: the seconds to sample 64 digits on this machine (those 64 are the sample grid).

Every model samples ``p(x)`` without labels (the DDPMs with the null label), so that the rows
compare. A run writes ``benchmark.json``, ``benchmark.md``, ``samples.png`` and
``tradeoffs.png``; each model's row is also kept in ``rows/`` beside them with the SHA-256 of
the checkpoint it measured, so an interrupted run picks up where it stopped and a finished one
reprints its table in seconds.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

PIXELS = 28 * 28

# name -> (family, how it defines p(x)); the order is the table's.
FAMILIES: dict[str, tuple[str, str]] = {
    "ae": ("autoencoder", "none"),
    "vae": ("VAE", "approximate"),
    "dcgan": ("GAN", "implicit"),
    "wgan-gp": ("GAN", "implicit"),
    "infogan": ("GAN", "implicit"),
    "made": ("autoregressive", "exact"),
    "pixelcnn": ("autoregressive", "exact"),
    "gated-pixelcnn": ("autoregressive", "exact"),
    "gated-pixelcnn-grey": ("autoregressive", "exact"),
    "ddpm": ("diffusion", "approximate"),
    "ddpm-binary": ("diffusion", "approximate"),
    "latent-ddpm": ("diffusion", "approximate"),
}
DENSITIES = {
    "none": "no density: a Gaussian fitted to its codes samples it",
    "exact": "explicit, tractable: the exact log-likelihood",
    "approximate": "explicit, approximate: a bound on the log-likelihood",
    "implicit": "implicit: samples, no density",
}
# The default run: every family, and the variants its numbers need (the binarized DDPM has a
# bound on the same bits as MADE; the grey DDPM is topic 6's). ``--all`` adds the rest.
LINEUP = ("ae", "vae", "dcgan", "made", "gated-pixelcnn", "ddpm", "ddpm-binary")
BENCHMARKABLE = tuple(FAMILIES)


def benchmark_settings(budget_name: str | None = None, samples: int | None = None) -> dict:
    """What the measurements use, by budget: sample and held-out counts, bound precision."""
    from .runtime import by_budget

    cfg = by_budget(budget_name, samples=(200, 2000, 2000), nll_images=(100, 2000, 2000),
                    iwae_k=(20, 100, 1000), bound_t_samples=(4, 16, 100), diffusion_steps=(10, 50, 100))
    settings = {key: value for key, value in vars(cfg).items()}
    if samples is not None:
        settings["samples"] = int(samples)
    return settings


def bits_per_dim(nats_per_image: float, dims: int = PIXELS) -> float:
    """:func:`course_utils.pixelcnn.bits_per_dim` with MNIST's ``D = 784`` as the default
    (``dims=1``: bits per image)."""
    from .pixelcnn import bits_per_dim as per_dimension

    return per_dimension(nats_per_image, dims)


# -------------------------------------------------------------------------------------------
# Training or loading: the checkpoint `course train NAME` writes is the one found here
# -------------------------------------------------------------------------------------------
def trained_model(name: str, budget_name: str, device, max_seconds: float | None = None,
                  retrain_short: bool = True, say: Callable[[str], None] = print):
    """``(model, facts, source)``: the cached checkpoint of ``course train NAME``, else trained now.

    A cached checkpoint that a short run wrote (it stopped well before its time limit and its
    steps) is retrained when ``retrain_short`` (the command's default: the table is of the
    budget's models), and used as it is otherwise (a notebook's quick look). Training here
    records wall and CPU seconds (``time.process_time``: every thread of this process).
    """
    from . import registry
    from .checkpoints import load_checkpoint, save_checkpoint
    from .runtime import seed_everything

    spec = registry.get(name)
    config = registry.training_config(name, budget_name)
    seed_everything(int(config.get("seed", 0)))
    model = spec.build(config)
    sidecar = load_checkpoint(name, model, config)
    if sidecar is not None:
        full = registry.from_course_train(name, {"source": "cache", **sidecar}, budget_name)
        if full or not retrain_short or max_seconds is not None:
            return model.to(device).eval(), dict(sidecar.get("metrics", {})), (
                "cache" if full else "cache (short run)")
        say(f"{name}: the cached checkpoint is a short run; retraining for the budget's time")
        seed_everything(int(config.get("seed", 0)))
        model = spec.build(config)
    limit = max_seconds or config.get("time_limit")
    say(f"{name}: training ({spec.description.split(':')[0].split(' (')[0]}), "
        + (f"up to {limit} s" if limit else "all its steps"))
    wall, cpu = time.perf_counter(), time.process_time()
    facts = dict(spec.train(model, config, device, max_seconds) or {})
    facts.update(train_seconds=round(time.perf_counter() - wall, 2),
                 train_cpu_seconds=round(time.process_time() - cpu, 2), max_seconds=max_seconds,
                 train_data=config["data"], parameters=sum(p.numel() for p in model.parameters()),
                 device=str(device))
    save_checkpoint(name, model, config, facts)
    return model.to(device).eval(), facts, "trained"


# -------------------------------------------------------------------------------------------
# One sampler and one likelihood per family
# -------------------------------------------------------------------------------------------
def _in_batches(draw: Callable[[int], torch.Tensor], n: int, batch: int) -> torch.Tensor:
    return torch.cat([draw(len(rows)).float().cpu() for rows in torch.arange(n).split(batch)])


def digit_sampler(model, settings: dict, train_images: torch.Tensor | None = None
                  ) -> Callable[[int, torch.Generator], torch.Tensor]:
    """``draw(n, generator)``: ``n`` unconditional digits in [0, 1], ``n x 1 x 28 x 28`` on the
    CPU, whatever the family. What a sampler needs once (the autoencoder's code distribution)
    is prepared here, so that timing ``draw`` times sampling alone.

    Autoencoder: decode codes drawn from a Gaussian fitted to the training digits' codes (it
    has no prior of its own). VAE: E[x | z], z ~ N(0, I). GAN: the EMA generator. MADE and
    PixelCNN: pixel by pixel. Diffusion: DDIM with ``settings['diffusion_steps']`` steps, null label.
    """
    from . import autoencoders, diffusion, gan, pixelcnn, vae

    if isinstance(model, (diffusion.Diffusion, diffusion.LatentDiffusion)):
        steps = settings["diffusion_steps"]
        return lambda n, generator: _in_batches(
            lambda k: model.sample(k, steps=steps, generator=generator, progress=False), n, 250)
    if isinstance(model, (gan.GAN, vae.VAE)):
        return lambda n, generator: _in_batches(lambda k: model.sample(k, generator=generator), n, 500)
    if isinstance(model, (pixelcnn.MADE, pixelcnn.PixelCNN, pixelcnn.GatedPixelCNN)):
        levels = getattr(model, "levels", 2)
        device = next(model.parameters()).device

        def draw_pixels(n, generator):
            drawn = _in_batches(lambda k: pixelcnn.sample(model, k, generator=generator, device=device),
                                n, 500)
            return drawn if levels == 2 else pixelcnn.dequantize(drawn.long(), levels)
        return draw_pixels
    if hasattr(model, "encoder") and hasattr(model, "decoder"):
        if train_images is None:
            raise ValueError("an autoencoder samples through its training codes: pass train_images")
        device = next(model.parameters()).device
        codes = autoencoders.encode_all(model.encoder, train_images.to(device))
        fit = autoencoders.GaussianFit.fit(codes.cpu().double())
        with torch.no_grad():
            shape = model.encoder(train_images[:1].to(device)).shape[1:]

        def decode(k, generator):
            z = fit.sample(k, generator).float().to(device).reshape(k, *shape)
            with torch.no_grad():
                return model.decoder(z)
        return lambda n, generator: _in_batches(lambda k: decode(k, generator), n, 500)
    raise TypeError(f"no sampler for a {type(model).__name__}")


def sample_digits(model, n: int, generator: torch.Generator, settings: dict,
                  train_images: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` unconditional digits in [0, 1] from any course model (see :func:`digit_sampler`)."""
    return digit_sampler(model, settings, train_images)(n, generator)


def held_out_nll(model, bits: torch.Tensor, settings: dict, seed: int,
                 config: dict | None = None) -> tuple[float, str] | None:
    """``(nats per image, what it is)`` on binarized digits ``bits``, or None without a density
    on them (a GAN, an autoencoder, a model of grey levels). ``config``: the model's training
    config (a diffusion model's bound is of binarized digits only if it trained on them)."""
    from . import diffusion, pixelcnn, vae

    if isinstance(model, (pixelcnn.MADE, pixelcnn.PixelCNN, pixelcnn.GatedPixelCNN)):
        if getattr(model, "levels", 2) != 2:
            return None  # a grey-level model: its likelihood is of other data
        with torch.no_grad():
            return pixelcnn.held_out_nll(model, bits), "exact"
    if isinstance(model, vae.VAE) and getattr(model, "likelihood", "bernoulli") == "bernoulli":
        torch.manual_seed(seed)  # the importance samples
        with torch.no_grad():
            nll = float(vae.iwae_nll(model, bits, k=settings["iwae_k"]))
        return nll, f"upper bound (IWAE, k = {settings['iwae_k']})"
    if isinstance(model, diffusion.Diffusion) and (config or {}).get("binarize") == "dynamic":
        bound = diffusion.held_out_bound(model, bits, settings["bound_t_samples"], seed)
        return bound["total"], (f"upper bound (ELBO, T = {model.schedule.num_steps}, "
                                f"{settings['bound_t_samples']} t per image)")
    return None


# -------------------------------------------------------------------------------------------
# The evaluation of one model, and the floors
# -------------------------------------------------------------------------------------------
def _model_seed(seed: int, name: str) -> int:
    return seed * 1_000_003 + zlib.crc32(name.encode()) % 1_000_003  # stable across runs


def evaluate_model(name: str, model, facts: dict, settings: dict, reference: dict, seed: int = 0,
                   config: dict | None = None) -> dict:
    """One table row (a dict) and the 64 timed samples (the grid), for a trained model."""
    from .metrics import sample_figures
    from .runtime import seed_everything

    model_seed = _model_seed(seed, name)
    seed_everything(model_seed)
    draw = digit_sampler(model, settings, reference["train"])
    generator = torch.Generator().manual_seed(model_seed)
    start = time.perf_counter()
    grid = draw(64, generator)
    sample_seconds = time.perf_counter() - start
    samples = draw(settings["samples"], generator)
    figures = sample_figures(reference["classifier"], samples, reference["features"])
    family, density = FAMILIES.get(name, ("other", "none"))
    row = {"model": name, "family": family, "density": density,
           "parameters": sum(p.numel() for p in model.parameters()),
           "train_seconds": facts.get("train_seconds"), "train_cpu_seconds": facts.get("train_cpu_seconds"),
           "train_steps": facts.get("train_steps", facts.get("steps")), "stopped_by": facts.get("stopped_by"),
           "train_data": facts.get("train_data"), "sample_seconds_64": float(f"{sample_seconds:.3g}"),
           "samples": len(samples), **figures}
    nll = held_out_nll(model, reference["bits"], settings, model_seed, config)
    if nll is not None:
        row.update(nll_nats=round(nll[0], 2), nll_kind=nll[1],
                   bits_per_dim=round(bits_per_dim(nll[0]), 4), nll_images=len(reference["bits"]))
    row["nn_distance_ratio"] = round(_copy_ratio(samples, reference), 3)
    return {"row": row, "grid": grid}


def _copy_ratio(samples: torch.Tensor, reference: dict) -> float:
    """Median distance to the nearest training digit, samples over held-out digits (memorisation)."""
    from .metrics import memorisation_check

    n = min(len(samples), 500)
    return memorisation_check(samples[:n], reference["train"], reference["held_out"][:n])["ratio"]


def reference_data(settings: dict, device, seed: int = 0) -> dict:
    """The held-out digits (grey, and with the fixed binarization), training digits, classifier."""
    from .data import as_tensors, describe, mnist
    from .metrics import classifier_features, load_feature_net

    classifier = load_feature_net(device=device)
    test_set = mnist("test")
    held_out, _ = as_tensors(test_set, limit=settings["samples"])
    bits_set = mnist("test", binarize="fixed", binarize_seed=0)
    bits, _ = as_tensors(bits_set, limit=settings["nll_images"])
    train, _ = as_tensors(mnist("train"), limit=8_000)
    return {"classifier": classifier, "held_out": held_out, "bits": bits.to(device), "train": train,
            "features": classifier_features(classifier, held_out),
            "held_out_data": f"the first {len(held_out):,} of {describe(test_set)}",
            "nll_data": f"the first {len(bits):,} of {describe(bits_set)}, fixed binarization (seed 0)"}


def floors(settings: dict, reference: dict, seed: int = 0) -> list[dict]:
    """The real-vs-real rows: training digits, grey and binarized, against the held-out digits."""
    from .metrics import sample_figures

    n = min(settings["samples"], len(reference["train"]))
    real = reference["train"][:n]
    binarized = torch.bernoulli(real, generator=torch.Generator().manual_seed(seed))
    return [{"model": label, "family": "real digits", "density": "floor",
             **sample_figures(reference["classifier"], images, reference["features"])}
            for label, images in (("real digits", real), ("real digits, binarized", binarized))]


# -------------------------------------------------------------------------------------------
# The run: progress, resume, outputs
# -------------------------------------------------------------------------------------------
def default_folder(budget_name: str) -> Path:
    """Where ``course benchmark`` writes by default: beside the checkpoints it measured."""
    from .checkpoints import checkpoint_dir

    return checkpoint_dir() / f"benchmark-{budget_name}"


def machine() -> dict:
    """The machine a table came from (times mean nothing without it): ``course check``'s
    environment plus the processor and the load average."""
    from .runtime import describe_environment

    environment = describe_environment()
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": environment["cpu_threads"],
            "device": environment["device"], "torch": environment["torch"],
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if "gpu" in environment:
        info["gpu"] = environment["gpu"]
    return info


def _checkpoint_sha(name: str, budget_name: str) -> str | None:
    from . import registry
    from .checkpoints import checkpoint_paths

    sidecar = checkpoint_paths(name, registry.training_config(name, budget_name))[1]
    return json.loads(sidecar.read_text()).get("sha256") if sidecar.exists() else None


def cached_row(folder: Path, name: str, budget_name: str, settings: dict | None) -> dict | None:
    """The row saved for ``name`` if it measured the checkpoint now cached (and, when
    ``settings`` is given, with those settings); else None."""
    path = folder / "rows" / f"{name}.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    sha = _checkpoint_sha(name, budget_name)
    if sha is None or saved.get("checkpoint_sha256") != sha:
        return None
    if settings is not None and saved.get("settings") != settings:
        return None
    return saved


def run_benchmark(names: Sequence[str] = LINEUP, budget_name: str | None = None, out=None, *,
                  max_seconds: float | None = None, samples: int | None = None, seed: int = 0,
                  device=None, retrain_short: bool = True, any_cached_settings: bool = False,
                  say: Callable[[str], None] | None = None) -> dict:
    """Train or load each model of ``names``, measure it, write the table; returns its dict.

    ``out``: the folder for ``benchmark.json``, ``benchmark.md``, ``samples.png``,
    ``tradeoffs.png`` and ``rows/`` (default :func:`default_folder`). A model whose row in
    ``rows/`` measured the checkpoint now cached is not measured again (with the same settings,
    or any when ``any_cached_settings``), so an interrupted run resumes.
    """
    from . import registry
    from .runtime import budget, get_device

    budget_name = budget(budget_name)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        from .runtime import CourseError

        raise CourseError(f"cannot benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKABLE)}")
    say = say or (lambda message: print(message, flush=True))
    device = torch.device(device) if device is not None else get_device()
    settings = benchmark_settings(budget_name, samples)
    folder = Path(out) if out is not None else default_folder(budget_name)
    (folder / "rows").mkdir(parents=True, exist_ok=True)
    say(f"benchmark | budget {budget_name} | device {device} | {len(names)} models | writing {folder}")
    reference = None
    rows, grids = [], {}
    for index, name in enumerate(names, 1):
        prefix = f"[{index}/{len(names)}] {name}"
        saved = cached_row(folder, name, budget_name, None if any_cached_settings else settings)
        if saved is not None:
            say(f"{prefix}: measured before (same checkpoint), reusing its row")
            rows.append(saved["row"])
            grid_path = folder / "rows" / f"{name}.pt"
            if grid_path.exists():
                grids[name] = torch.load(grid_path, weights_only=True)
            continue
        started = time.perf_counter()
        model, facts, source = trained_model(name, budget_name, device, max_seconds, retrain_short,
                                             say=lambda message, p=prefix: say(f"{p}: {message}"))
        if reference is None:
            reference = reference_data(settings, device, seed)
        say(f"{prefix}: {source}; measuring ({settings['samples']:,} samples)")
        result = evaluate_model(name, model, facts, settings, reference, seed,
                                registry.training_config(name, budget_name))
        row = dict(result["row"], checkpoint=source, eval_seconds=round(time.perf_counter() - started, 1))
        sha = _checkpoint_sha(name, budget_name)
        (folder / "rows" / f"{name}.json").write_text(json.dumps(
            {"row": row, "settings": settings, "checkpoint_sha256": sha, "seed": seed}, indent=1) + "\n")
        torch.save(result["grid"], folder / "rows" / f"{name}.pt")
        grids[name] = result["grid"]
        rows.append(row)
        nll = f", NLL {row['nll_nats']} nats" if "nll_nats" in row else ""
        say(f"{prefix}: FID {row['fid']}{nll}, 64 samples in {row['sample_seconds_64']} s")
        del model
    counts = {row.get("samples", settings["samples"]) for row in rows}
    floor_settings = dict(settings, samples=counts.pop()) if len(counts) == 1 else settings
    if reference is None or floor_settings["samples"] != len(reference["held_out"]):
        reference = reference_data(floor_settings, device, seed)  # the floors compare like with like
    table = {"budget": budget_name, "seed": seed, "settings": floor_settings, "machine": machine(),
             "held_out_data": reference["held_out_data"], "nll_data": reference["nll_data"],
             "rows": rows, "floors": floors(floor_settings, reference, seed),
             "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_outputs(table, grids, folder, reference["train"][:64])
    say(f"table: {folder / 'benchmark.md'}")
    return table


# -------------------------------------------------------------------------------------------
# Outputs: the markdown table and the figures
# -------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _sample_counts(table: dict) -> str:
    counts = {row.get("samples") for row in table["rows"]}
    if len(counts) == 1:
        return f"{counts.pop():,} samples per model"
    return "samples per model: " + ", ".join(f"{row['model']} {row.get('samples')}" for row in table["rows"])


def _seconds(value) -> str:
    return "–" if value is None else f"{value:,.1f}" if value < 10 else f"{value:,.0f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def format_table(table: dict) -> str:
    """The benchmark as a markdown table (the README's "Results" shows this)."""
    head = ("| model | family | p(x) | parameters | training: wall / CPU s | held-out NLL, nats "
            "(bits/dim) | FID ↓ | KID ↓ | precision | recall | classifier score | confident | "
            "64 samples, s |")
    lines = [head, "|" + " --- |" * 13]
    for row in table["rows"]:
        nll = "–"
        if "nll_nats" in row:
            marker = "" if row["nll_kind"] == "exact" else "≤ "
            nll = f"{marker}{row['nll_nats']:.1f} ({row['bits_per_dim']:.3f})"
        cpu = _seconds(row.get("train_cpu_seconds")) if row.get("train_cpu_seconds") is not None else "n/r"
        lines.append(
            f"| {row['model']} | {row['family']} | {row['density']} | {_params(row['parameters'])} | "
            f"{_seconds(row.get('train_seconds'))} / {cpu} | {nll} | {_fmt(row['fid'])} | "
            f"{_fmt(row['kid'], 4)} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | "
            f"{_fmt(row['classifier_score'])} | {_fmt(row['confident_fraction'])} | "
            f"{_fmt(row['sample_seconds_64'])} |")
    for row in table["floors"]:
        lines.append(f"| *{row['model']}* | floor | – | – | – | – | {_fmt(row['fid'])} | "
                     f"{_fmt(row['kid'], 4)} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | "
                     f"{_fmt(row['classifier_score'])} | "
                     f"{_fmt(row['confident_fraction'])} | – |")
    m = table["machine"]
    kinds = sorted({f"{row['model']}: {row['nll_kind']}" for row in table["rows"] if "nll_kind" in row})
    notes = [
        f"Budget `{table['budget']}`, seed {table['seed']}. Machine: {m['cpu']} ({m['cpu_count']} cores, "
        f"{m['torch_threads']} torch threads), device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "") + f", torch {m['torch']}, load average "
        f"{', '.join(str(x) for x in m['load_average'] or [])} at the end.",
        f"Sample quality: {_sample_counts(table)} against {table['held_out_data']}, in the "
        "course classifier's feature space; the floors are real training digits against the same digits.",
        f"NLL: {table['nll_data']}; ≤ marks an upper bound ({'; '.join(kinds) or 'none'}).",
        "Training data: " + "; ".join(sorted({str(row.get('train_data')) for row in table['rows']})) + ".",
    ]
    if any(row.get("train_cpu_seconds") is None for row in table["rows"]):
        notes.append("n/r: CPU time not recorded (a checkpoint trained before `course` recorded it).")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def plot_samples(grids: dict, real: torch.Tensor | None = None, ncols: int = 4):
    """One 8 x 8 grid of samples per model (and real digits), side by side."""
    import matplotlib.pyplot as plt

    from .plotting import image_grid

    panels = ([("real digits", real)] if real is not None else []) + list(grids.items())
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, images) in zip(axes.flat, panels, strict=False):
        image_grid(images[:64], nrow=8, title=name, ax=ax)
    fig.tight_layout()
    return fig


_FAMILY_MARKERS = {"autoencoder": "s", "VAE": "D", "GAN": "^", "autoregressive": "o", "diffusion": "*"}


def plot_tradeoffs(table: dict):
    """Quality (FID, lower is better) against the time to sample 64 digits (log scale), and
    NLL against FID for the models with a likelihood: where likelihood and quality disagree."""
    import matplotlib.pyplot as plt

    rows = table["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for index, row in enumerate(rows):
        style = {"marker": _FAMILY_MARKERS.get(row["family"], "x"), "s": 70, "color": f"C{index % 10}"}
        seconds = max(row["sample_seconds_64"], 1e-3)  # a log axis has no zero
        left.scatter(seconds, row["fid"], **style)
        left.annotate(row["model"], (seconds, row["fid"]), textcoords="offset points", xytext=(5, 4),
                      fontsize=8)
        if "nll_nats" in row:
            right.scatter(row["nll_nats"], row["fid"], **style)
            right.annotate(row["model"] + ("" if row["nll_kind"] == "exact" else " (bound)"),
                           (row["nll_nats"], row["fid"]), textcoords="offset points", xytext=(5, 4),
                           fontsize=8)
    for floor in table["floors"]:
        for ax in (left, right):
            ax.axhline(floor["fid"], ls=":", lw=1, color="grey")
            ax.text(0.01, floor["fid"], f"floor: {floor['model']}", transform=ax.get_yaxis_transform(),
                    fontsize=7, color="grey", va="bottom")
    left.set(xscale="log", xlabel="seconds to sample 64 digits (log scale)", ylabel="FID (lower is better)",
             title="sample quality vs sampling time")
    right.set(xlabel="held-out NLL, nats per image (lower is better)", ylabel="FID",
              title="likelihood vs sample quality")
    fig.tight_layout()
    return fig


def write_outputs(table: dict, grids: dict, folder, real: torch.Tensor | None = None) -> None:
    import matplotlib.pyplot as plt

    folder = Path(folder)
    (folder / "benchmark.json").write_text(json.dumps(table, indent=1) + "\n")
    (folder / "benchmark.md").write_text(format_table(table))
    figures = (("samples.png", plot_samples(grids, real)), ("tradeoffs.png", plot_tradeoffs(table)))
    for filename, fig in figures:
        fig.savefig(folder / filename, dpi=110, bbox_inches="tight")
        plt.close(fig)


def load_table(folder) -> dict:
    """A table ``course benchmark`` wrote (``benchmark.json``)."""
    return json.loads((Path(folder) / "benchmark.json").read_text())


__all__ = [
    "BENCHMARKABLE", "DENSITIES", "FAMILIES", "LINEUP", "benchmark_settings", "bits_per_dim",
    "cached_row", "default_folder", "digit_sampler", "evaluate_model", "floors", "format_table",
    "held_out_nll", "load_table",
    "machine", "plot_samples", "plot_tradeoffs", "reference_data", "run_benchmark", "sample_digits",
    "trained_model", "write_outputs",
]
