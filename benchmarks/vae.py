"""Benchmark: the topic-3 VAE on the 8,000/2,000 split, within the classroom budget.

    COURSE_DATA_DIR=/path/to/data python benchmarks/vae.py [--baseline] [--budget classroom]

Trains ``course_utils.vae``'s VAE with the recipe of ``vae_config(budget)`` on the
first 8,000 MNIST test images (dynamically binarized), at most ``--max-seconds``
of training (default: the config's limit, 290 s in the classroom budget), then
prints on the last 2,000 images (binarized once, seed 0):

* the test negative ELBO and the IWAE NLL (nats per image, k stated);
* the share of 1,000 prior samples that the course's MNIST classifier
  recognises with >= 0.9 confidence;
* the wall-clock and CPU seconds of training, the steps and the data used.

``--baseline`` also trains the reference: a plain two-layer conv VAE (z=16,
Adam 1e-3 constant, batch 128, no KL warm-up) for ``--baseline-seconds``
(default 180 s), and prints the same figures for it. These are benchmark
figures, not tests: wall-clock times depend on the machine and its load, so the
CPU seconds are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="classroom", help="smoke, classroom or full")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="training time limit (default: the config's time_limit)")
    parser.add_argument("--baseline", action="store_true",
                        help="also train the plain conv VAE reference")
    parser.add_argument("--baseline-seconds", type=float, default=180.0,
                        help="the baseline's training time limit")
    parser.add_argument("--baseline-epochs", type=int, default=None,
                        help="stop the baseline after this many epochs instead (e.g. to match "
                             "its CPU time on a busy machine)")
    parser.add_argument("--all-data", action="store_true",
                        help="use MNIST train/test when present instead of the 8,000/2,000 split")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="force a device, e.g. cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def run(label: str, config: dict, device, max_seconds: float | None) -> dict:
    import torch

    from course_utils import vae
    from course_utils.runtime import seed_everything

    seed_everything(config.get("seed", 0))
    model = vae.build_vae(config)
    wall, cpu = time.monotonic(), time.process_time()
    info = vae.train_vae(model, config, device, max_seconds=max_seconds, progress=False,
                         live_plot=False, desc=label)
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    start = time.monotonic()
    figures = vae.evaluate_vae(model, config, device)
    figures.update(info)
    figures.update(model=label, train_wall_seconds=round(wall, 1), train_cpu_seconds=round(cpu, 1),
                   eval_seconds=round(time.monotonic() - start, 1),
                   parameters=sum(p.numel() for p in model.parameters()),
                   threads=torch.get_num_threads(), device=str(device))
    return figures


def report(figures: dict) -> None:
    print(f"\n== {figures['model']} ({figures['parameters']:,} parameters, {figures['device']}, "
          f"{figures['threads']} threads)")
    print(f"  trained on       {figures['train_data']}")
    print(f"  training         {figures['train_wall_seconds']} s wall, {figures['train_cpu_seconds']} s CPU, "
          f"{figures['train_steps']} steps ({figures['train_epochs']} epochs, stopped by "
          f"{figures['stopped_by']})")
    print(f"  evaluated on     {figures['test_images']} images: {figures['test_data']}")
    print(f"  test -ELBO       {figures['test_neg_elbo']:.2f} nats per image")
    print(f"  test IWAE NLL    {figures['test_iwae_nll']:.2f} nats per image (k = {figures['iwae_k']})")
    if "prior_confident_fraction" in figures:
        print(f"  prior samples recognised with >= 0.9 confidence: "
              f"{figures['prior_confident_fraction']:.1%} of {figures['prior_samples']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["COURSE_BUDGET"] = args.budget
    if not args.all_data:
        os.environ["COURSE_TEST_SPLIT"] = "1"
    os.environ.setdefault("CI", "true")  # no progress bars
    import torch

    from course_utils import vae
    from course_utils.data import training_data_description
    from course_utils.runtime import get_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    print(f"VAE benchmark | budget {args.budget} | device {device} | torch threads "
          f"{torch.get_num_threads()} | data: {training_data_description()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None:
        print(f"load average before training: {load:.1f} on {os.cpu_count()} CPUs "
              "(a busy machine inflates wall-clock times)")
    results = []
    config = vae.course_train_config(args.budget, seed=args.seed)
    results.append(run("VAE (course recipe)", config, device, args.max_seconds))
    report(results[-1])
    if args.baseline:
        plain = dict(config, latent_dim=16, channels=[32, 64], hidden=0, blocks=0, lr=1e-3,
                     final_lr_factor=1.0, lr_warmup=0.0, kl_warmup=0.0,
                     epochs=args.baseline_epochs or 10_000,
                     time_limit=None if args.baseline_epochs else args.baseline_seconds)
        results.append(run("plain conv VAE (baseline)", plain, device, None))
        report(results[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
