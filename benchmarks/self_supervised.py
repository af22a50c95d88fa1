"""Benchmark: the course's pretraining table (topic 7), every representation probed the same way.

    COURSE_DATA_DIR=/path/to/data python benchmarks/self_supervised.py [--budget classroom] [--json out.json]

Trains (or loads from the checkpoint cache, with exactly the config that ``course train NAME``
caches) the topic-1 autoencoder (``ae``), the topic-3 VAE (``vae``), the topic-4 DCGAN (``dcgan``)
and the four topic-7 encoders (``context-encoder``, ``rotation``, ``simclr``,
``supervised-encoder``: one architecture, the same time budget each), then freezes every
representation and prints, on the 8,000/2,000 split:

* the linear-probe accuracy on the 2,000 held-out digits with 10, 100 and 1,000 labels per class
  (mean and spread over seeded draws of the labelled digits; on this split a class has about
  800 training digits, so "1,000" means all of them), and the k-NN accuracy with every label;
* the random-init encoder, raw pixels and PCA as baselines; the supervised encoder as the ceiling;
* each model's pretraining seconds, and the load average (these machines are shared);
* the issue's targets beside the figures (printed, not asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SELF_SUPERVISED = ("context encoder", "rotation", "SimCLR")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="classroom", help="smoke, classroom or full")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, help="also write the table to this JSON file")
    return parser.parse_args(argv)


def targets(table: list[dict]) -> list[str]:
    """The issue's targets, read off the table (printed, not asserted)."""
    by_name = {row["representation"]: row for row in table}
    best = max((by_name[name] for name in SELF_SUPERVISED if name in by_name), key=lambda r: r["probe_100"])
    lines = [f"best self-supervised encoder at 100 labels/class: {best['representation']} "
             f"{100 * best['probe_100']:.1f} % (target >= 95 %)"]
    for baseline in ("raw pixels", "random init"):
        if baseline in by_name:
            gap = 100 * (best["probe_100"] - by_name[baseline]["probe_100"])
            lines.append(f"  ahead of {baseline} by {gap:+.1f} points (target >= +5)")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("COURSE_TEST_SPLIT", "1")
    import torch

    from course_utils import registry, ssl
    from course_utils.data import as_tensors, describe, mnist
    from course_utils.runtime import by_budget, get_device

    device = torch.device(args.device) if args.device else get_device()
    train_set, test_set = mnist("train"), mnist("test")
    sizes = by_budget(args.budget, train_images=(2000, None, None), eval_images=(500, None, None))
    train_images, train_labels = as_tensors(train_set, device, limit=sizes.train_images)
    test_images, test_labels = as_tensors(test_set, device, limit=sizes.eval_images)
    print(f"labelled pool: {len(train_images):,} of {describe(train_set)}; "
          f"probed on {len(test_images):,} of {describe(test_set)}", flush=True)
    print(f"device {device}, {torch.get_num_threads()} threads, load {os.getloadavg()}", flush=True)

    def load(name):
        start = time.monotonic()
        model, info = registry.trained(name, device=device, budget_name=args.budget)
        print(f"  {name}: {info['source']} ({time.monotonic() - start:.0f} s)", flush=True)
        return model, info

    def report(row):
        probes = " / ".join(f"{100 * row[f'probe_{n}']:.1f}" for n in ssl.LABELS_PER_CLASS)
        print(f"{row['representation']:>22}: probe {probes} %, k-NN {100 * row['knn']:.1f} % "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)

    start = time.monotonic()
    load_before = os.getloadavg()
    table = ssl.probe_table(load, train_images, train_labels, test_images, test_labels, on_row=report)
    print()
    print(ssl.format_table(table))
    print()
    print("\n".join(targets(table)))
    figures = {"budget": args.budget, "device": str(device), "threads": torch.get_num_threads(),
               "seconds": round(time.monotonic() - start, 1), "load_before": load_before,
               "load_after": os.getloadavg(), "table": table}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
