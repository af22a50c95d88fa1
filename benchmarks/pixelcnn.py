"""Benchmark: MADE, PixelCNN and gated PixelCNN on the 8,000/2,000 split, in one budget.

    COURSE_DATA_DIR=/path/to/data python benchmarks/pixelcnn.py [--budget classroom] [--only made]

For each variant, trains (or loads from the checkpoint cache, with exactly the config that
``course train VARIANT`` caches) the model of ``pixelcnn_config(budget, variant)`` on the first
8,000 MNIST test images, dynamically binarized, then prints on the last 2,000 images, binarized
once with the VAE's seed (so the numbers compare with the VAE's IWAE NLL):

* the exact held-out NLL in nats per image and in bits per dimension;
* the share of 64 samples that the course's classifier recognises with >= 0.9 confidence;
* the seconds to sample 64 digits, with every step run on the whole image ("before"), on the
  rows of the receptive field only ("rows cropped"), and, for the gated model, with its
  vertical stacks run once per row as well ("after", what ``sample`` does by default);
* training steps, wall and CPU seconds, and the load average (these machines are shared);
* the topic-3 VAE's IWAE bound on the same digits (``course train vae``'s checkpoint), and the
  issue's targets beside the figures (printed, not asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="classroom", help="smoke, classroom or full")
    parser.add_argument("--only", action="append", help="one variant (repeatable)")
    parser.add_argument("--skip-uncropped", action="store_true",
                        help="do not time sampling without the crop (it is the slow one)")
    parser.add_argument("--no-vae", action="store_true",
                        help="skip the topic-3 VAE's IWAE bound on the same digits")
    parser.add_argument("--iwae-k", type=int, default=100, help="importance samples for the VAE")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("COURSE_TEST_SPLIT", "1")
    import torch

    from course_utils import pixelcnn
    from course_utils.checkpoints import load_or_train
    from course_utils.metrics import confident_fraction, load_feature_net
    from course_utils.runtime import get_device, seed_everything

    device = torch.device(args.device) if args.device else get_device()
    classifier = load_feature_net(device=device)
    figures = {}
    for variant in args.only or pixelcnn.VARIANTS:
        config = pixelcnn.course_train_config(args.budget, variant)
        seed_everything(0)
        cpu_start, wall_start = time.process_time(), time.monotonic()
        model, info = load_or_train(variant, config, pixelcnn.build_pixelcnn(config),
                                    lambda m, c=config: pixelcnn.train_pixelcnn(m, c, device))
        train = info["metrics"]
        model.to(device).eval()
        result = pixelcnn.evaluate_pixelcnn(model, config, device, classifier=classifier)
        timings = {}
        modes = {"before": dict(crop_rows=False, reuse_vertical=False),
                 "rows cropped": dict(crop_rows=True, reuse_vertical=False),
                 "after": dict(crop_rows=True, reuse_vertical=True)}
        if args.skip_uncropped:
            del modes["before"]
        if variant != "gated-pixelcnn":  # reusing the vertical stacks is the gated model's
            modes.pop("rows cropped")
            modes["after"] = dict(crop_rows=True)
        for mode, options in modes.items():
            start = time.perf_counter()
            samples = pixelcnn.sample(model, 64, generator=torch.Generator().manual_seed(0), **options)
            timings[mode] = round(time.perf_counter() - start, 1)
        figures[variant] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "test_nll": result["test_nll"], "test_bits_per_dim": result["test_bits_per_dim"],
            "test_images": result["test_images"],
            "confident_64": round(float(confident_fraction(classifier, samples)), 3),
            "sample_seconds_64": timings, "train_steps": train.get("train_steps"),
            "train_seconds": train.get("train_seconds_fit"), "source": info["source"],
            "cpu_seconds_here": round(time.process_time() - cpu_start, 1),
            "wall_seconds_here": round(time.monotonic() - wall_start, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        print(variant, json.dumps(figures[variant]), flush=True)
    if not args.no_vae:
        from course_utils import registry
        from course_utils.data import as_tensors, mnist
        from course_utils.vae import iwae_nll

        spec, config = registry.get("vae"), registry.training_config("vae", args.budget)
        seed_everything(0)
        vae, info = load_or_train("vae", config, spec.build(config),
                                  lambda m: spec.train(m, config, device))
        held_out, _ = as_tensors(mnist("test", binarize="fixed", binarize_seed=0), device,
                                 limit=pixelcnn.pixelcnn_config(args.budget)["eval_images"])
        torch.manual_seed(0)
        bound = float(iwae_nll(vae.to(device).eval(), held_out, k=args.iwae_k))
        figures["vae"] = {"iwae_nll": round(bound, 2), "k": args.iwae_k,
                          "test_images": len(held_out), "source": info["source"]}
        print("vae", json.dumps(figures["vae"]), flush=True)
    summary(figures)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)
    return 0


def summary(figures: dict) -> None:
    """The issue's targets beside the measured figures (printed, never asserted)."""
    nll = {name: f.get("test_nll", f.get("iwae_nll")) for name, f in figures.items()}
    print("\nheld-out NLL, nats (same 2,000 digits, same fixed binarization):",
          ", ".join(f"{name} {value}" for name, value in nll.items()))
    gated = figures.get("gated-pixelcnn")
    if gated is None:
        return
    checks = {
        "gated <= 90 nats": gated["test_nll"] <= 90,
        "gated below the VAE's IWAE bound": "vae" in nll and gated["test_nll"] < nll["vae"],
        "plain worse than gated": "pixelcnn" in nll and nll["pixelcnn"] > gated["test_nll"],
        "MADE worse than both": "made" in nll
        and nll["made"] > max(nll.get("pixelcnn", 0), gated["test_nll"]),
        ">= 50 % of gated samples confident": gated["confident_64"] >= 0.5,
        "64 gated samples in <= 30 s": gated["sample_seconds_64"].get("after", 1e9) <= 30,
    }
    for claim, holds in checks.items():
        print(f"  {'yes' if holds else 'NO '}  {claim}")


if __name__ == "__main__":
    sys.exit(main())
