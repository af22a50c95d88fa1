"""Benchmark: pixel-space and latent diffusion on the 8,000/2,000 split, against the course's DCGAN.

    COURSE_DATA_DIR=/path/to/data python benchmarks/diffusion.py [--budget classroom] [--only ddpm]

For ``ddpm`` and ``latent-ddpm``, trains (or loads from the checkpoint cache, with exactly the
config that ``course train NAME`` caches) the model of ``diffusion_config(budget, NAME)`` on the
first 8,000 MNIST test images, then prints, for ``eval_samples`` samples drawn with
``eval_steps`` DDIM steps against as many of the last 2,000 images, in the feature space of the
course's classifier (``course train classifier``):

* FID, KID, precision, recall, the classifier score and the share of samples classified with
  >= 0.9 confidence: unconditional (the null label), with the digit drawn first (the
  conditional model at scale 1) and with classifier-free guidance, and the real-vs-real floor
  (as many training digits against the same held-out digits);
* the classifier's agreement with the requested digit under guidance;
* with the digit drawn first and mild guidance (``--scales``, 1.5 by default): the same figures;
* the seconds to sample 64 digits with 50 DDIM steps on this machine;
* the DCGAN's FID in the same budget (``course train dcgan``'s checkpoint, when cached);
* training steps, wall and CPU seconds, and the load average (these machines are shared);
* the issue's targets beside the figures (printed, not asserted).
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
    parser.add_argument("--only", action="append", help="ddpm or latent-ddpm (repeatable)")
    parser.add_argument("--no-gan", action="store_true", help="skip the DCGAN comparison")
    parser.add_argument("--scales", type=float, nargs="*", default=[1.5],
                        help="also score ddpm with the digit drawn first and guidance at these scales")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def _dcgan_fid(budget: str, device, classifier, n: int) -> float | None:
    """The cached DCGAN's FID on the same number of samples, or None when it was never trained."""
    from course_utils import gan
    from course_utils.checkpoints import load_checkpoint

    config = gan.course_train_config(budget, "dcgan")
    model = gan.build_gan(config)
    if load_checkpoint("dcgan", model, config) is None:
        return None
    config = dict(config, eval_samples=n)
    return gan.evaluate_gan(model.to(device), config, device, classifier)["fid"]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("COURSE_TEST_SPLIT", "1")
    import torch

    from course_utils import diffusion
    from course_utils.checkpoints import load_or_train
    from course_utils.metrics import load_feature_net
    from course_utils.runtime import get_device, seed_everything

    device = torch.device(args.device) if args.device else get_device()
    classifier = load_feature_net(device=device)
    figures: dict = {"budget": args.budget, "device": str(device), "threads": torch.get_num_threads()}
    for name in args.only or diffusion.VARIANTS:
        config = diffusion.course_train_config(args.budget, name)
        seed_everything(0)
        load_before = os.getloadavg()
        cpu_start, wall_start = time.process_time(), time.monotonic()
        model, info = load_or_train(name, config, diffusion.build_diffusion(config),
                                    lambda m, c=config: diffusion.train_diffusion(m, c, device))
        trained = {"source": info["source"], "wall_seconds": round(time.monotonic() - wall_start, 1),
                   "cpu_seconds": round(time.process_time() - cpu_start, 1),
                   "load_before": [round(x, 2) for x in load_before],
                   "load_after": [round(x, 2) for x in os.getloadavg()]}
        trained.update({k: v for k, v in info.get("metrics", {}).items()
                        if k in ("train_steps", "train_seconds_fit", "steps_per_second", "stopped_by")})
        start = time.monotonic()
        metrics = diffusion.evaluate_diffusion(model, config, device, classifier)
        metrics["eval_wall_seconds"] = round(time.monotonic() - start, 1)
        metrics["load_after_eval"] = [round(x, 2) for x in os.getloadavg()]
        if name == "ddpm":
            for scale in args.scales:
                metrics[f"labels_scale_{scale:g}"] = diffusion.label_first_figures(
                    model, config, scale, device, classifier)
        figures[name] = {"training": trained, "metrics": metrics}
        print(f"\n== {name} ({args.budget}; {trained['source']}) ==")
        print(json.dumps(figures[name], indent=1))
    if not args.no_gan:
        n = diffusion.diffusion_config(args.budget)["eval_samples"]  # the same sample count as above
        figures["dcgan_fid"] = _dcgan_fid(args.budget, device, classifier, n)
    pixel, latent = figures.get("ddpm", {}).get("metrics"), figures.get("latent-ddpm", {}).get("metrics")
    print("\n== targets (issue 12; printed, not asserted) ==")
    if pixel:
        gan_fid = figures.get("dcgan_fid")
        print(f"{pixel['sampler']}, FID (target: below the DCGAN's {gan_fid}; real-vs-real floor "
              f"{pixel['floor_fid']:.2f}): unconditional (null label) {pixel['fid']:.2f}, digit drawn "
              f"first (scale 1) {pixel['labels_fid']:.2f}")
        print(f"confident (p >= 0.9; target >= 70%): unconditional {pixel['confident_fraction']:.1%}, "
              f"digit drawn first {pixel['labels_confident_fraction']:.1%}")
        for scale in args.scales:
            mild = pixel[f"labels_scale_{scale:g}"]
            print(f"digit drawn first, guidance s = {scale:g}: FID {mild['fid']:.2f}, confident "
                  f"{mild['confident_fraction']:.1%}, class agreement {mild['class_agreement']:.1%}")
        print(f"classifier-free guidance s = {pixel['guidance_scale']}: class agreement "
              f"{pixel['class_agreement']:.1%} (target >= 90%)")
        print(f"64 digits, {pixel['sampler']}: {pixel['sample_seconds_64']:.1f} s (target <= 20 s)")
    if pixel and latent:
        share = latent["sample_seconds_64"] / pixel["sample_seconds_64"]
        print(f"latent diffusion: confident {latent['confident_fraction']:.1%} vs pixel "
              f"{pixel['confident_fraction']:.1%} (target: at least as high); 64 digits in "
              f"{latent['sample_seconds_64']:.2f} s = {share:.1%} of the pixel model's (target <= 10%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
