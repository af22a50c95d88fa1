"""Benchmark: the topic-4 GANs on the 8,000/2,000 split, within the classroom budget.

    COURSE_DATA_DIR=/path/to/data python benchmarks/gan.py [--variants dcgan cgan wgan-gp]
                                                           [--budget classroom] [--max-seconds S]
                                                           [--set key=value ...] [--baseline]

Trains each variant with the recipe of ``course_utils.gan.gan_config(budget, variant)`` on
the first 8,000 MNIST test images, at most ``--max-seconds`` of training (default: the
config's limit, 360 s in the classroom budget), then scores the EMA generator with
the course's classifier (``course_utils.metrics``), ``eval_samples`` samples (2,000 in
the classroom budget) against as many held-out digits (the last 2,000):

* FID, KID, precision and recall (k-NN manifolds, k = 3), the classifier score,
  the share of samples classified with >= 0.9 confidence and the entropy of the
  predicted classes (log 10 = 2.303 is the ideal);
* the same figures for 2,000 real training digits against the same held-out
  digits: the floor a perfect generator would reach with these counts;
* for the conditional model, how often the classifier agrees with the requested digit;
* steps, steps per second, wall-clock and CPU seconds, threads and the load average
  before and after (the machine may be shared: report steps with every figure).

``--set key=value`` overrides a config entry (values parsed as JSON when they can be),
for comparing recipes with short runs. ``--baseline`` also trains a plain
pytorch/examples-style DCGAN (batch norm in D, BCE, Adam 2e-4 with beta1 = 0.5, batch 64,
no EMA, constant learning rate). These are benchmark figures, not tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["dcgan"],
                        help="dcgan, wgan-gp, cgan, infogan (default: dcgan)")
    parser.add_argument("--budget", default="classroom", help="smoke, classroom or full")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="training time limit (default: the config's time_limit)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config entries, e.g. --set lr_g=1e-4 batch_size=32")
    parser.add_argument("--baseline", action="store_true",
                        help="also train the plain pytorch/examples-style DCGAN")
    parser.add_argument("--all-data", action="store_true",
                        help="use MNIST train/test when present instead of the 8,000/2,000 split")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="force a device, e.g. cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run(label: str, config: dict, device, max_seconds: float | None) -> dict:
    import torch

    from course_utils import gan
    from course_utils.runtime import seed_everything

    seed_everything(config.get("seed", 0))
    model = gan.build_gan(config)
    load_before = load_average()
    wall, cpu = time.monotonic(), time.process_time()
    info = gan.train_gan(model, config, device, max_seconds=max_seconds, progress=False)
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    load_after = load_average()
    start = time.monotonic()
    figures = gan.evaluate_gan(model, config, device)
    figures.update(info)
    figures.update(model=label, variant=config["variant"], train_wall_seconds=round(wall, 1),
                   train_cpu_seconds=round(cpu, 1), eval_seconds=round(time.monotonic() - start, 1),
                   load_before=load_before, load_after=load_after,
                   parameters=sum(p.numel() for p in model.generator.parameters()),
                   threads=torch.get_num_threads(), device=str(device), config=config)
    return figures


def report(f: dict) -> None:
    print(f"\n== {f['model']} ({f['parameters']:,} generator parameters, {f['device']}, "
          f"{f['threads']} threads)")
    print(f"  trained on        {f['train_data']}")
    print(f"  training          {f['train_wall_seconds']} s wall, {f['train_cpu_seconds']} s CPU, "
          f"{f['train_steps']} steps ({f['steps_per_second']} steps/s, stopped by {f['stopped_by']}); "
          f"load average {f['load_before']} before, {f['load_after']} after")
    print(f"  evaluated         {f['n_samples']:,} EMA-generator samples vs {f['test_data']} "
          f"({f['eval_seconds']} s)")
    rows = [("FID", "fid", "{:.2f}"), ("KID", "kid", "{:.4f}"), ("precision", "precision", "{:.3f}"),
            ("recall", "recall", "{:.3f}"), ("classifier score", "classifier_score", "{:.2f}"),
            ("confident >= 0.9", "confident_fraction", "{:.1%}"),
            ("class entropy", "class_entropy", "{:.3f}")]
    print(f"  {'':<18}{'model':>10}{'real floor':>12}")
    for name, key, fmt in rows:
        print(f"  {name:<18}{fmt.format(f[key]):>10}{fmt.format(f['floor_' + key]):>12}")
    print(f"  (class entropy ideal: log 10 = {math.log(10):.3f}; 0.95 log 10 = {0.95 * math.log(10):.3f})")
    print(f"  memorisation: median nearest-training-digit distance, samples / held-out = "
          f"{f['nn_distance_ratio']:.2f}")
    if "class_agreement" in f:
        print(f"  class agreement   {f['class_agreement']:.1%} of samples classified as the requested digit")
    if "code_label_matching" in f:
        print(f"  code vs digit     {f['code_label_matching']:.1%} (best one-to-one matching)")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["COURSE_BUDGET"] = args.budget
    if not args.all_data:
        os.environ["COURSE_TEST_SPLIT"] = "1"
    os.environ.setdefault("CI", "true")  # no progress bars
    import torch

    from course_utils import gan
    from course_utils.data import training_data_description
    from course_utils.runtime import get_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    print(f"GAN benchmark | budget {args.budget} | device {device} | torch threads "
          f"{torch.get_num_threads()} | data: {training_data_description()} | "
          f"load average {load_average()} on {os.cpu_count()} CPUs")
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides = {key: _parse_value(value) for key, value in overrides.items()}
    results = []
    for variant in args.variants:
        config = gan.course_train_config(args.budget, variant, seed=args.seed)
        config.update(overrides)
        label = variant + (f" ({', '.join(args.set)})" if args.set else "")
        results.append(run(label, config, device, args.max_seconds))
        report(results[-1])
    if args.baseline:
        plain = gan.course_train_config(args.budget, "dcgan", seed=args.seed)
        plain.update(loss="non_saturating", latent_dim=100, g_channels=64, g_hidden=0, d_channels=64,
                     d_hidden=0, d_spectral_norm=False, d_batch_norm=True, lr_g=2e-4, lr_d=2e-4,
                     beta1=0.5, beta2=0.999, batch_size=64, final_lr_factor=1.0, ema_decay=0.0)
        results.append(run("plain DCGAN (pytorch/examples style, no EMA)", plain, device,
                           args.max_seconds))
        report(results[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
