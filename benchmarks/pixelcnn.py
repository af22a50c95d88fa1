"""Benchmark: MADE, PixelCNN and gated PixelCNN on the 8,000/2,000 split, in one budget.

    COURSE_DATA_DIR=/path/to/data python benchmarks/pixelcnn.py [--budget classroom] [--only made]

For each variant, trains (or loads from the checkpoint cache, with exactly the config that
``course train VARIANT`` caches) the model of ``pixelcnn_config(budget, variant)`` on the first
8,000 MNIST test images, dynamically binarized, then prints on the last 2,000 images, binarized
once with the VAE's seed (so the numbers compare with the VAE's IWAE NLL):

* the exact held-out NLL in nats per image and in bits per dimension;
* the share of 64 samples that the course's classifier recognises with >= 0.9 confidence;
* the seconds to sample 64 digits, with every step run on the whole image ("before") and on
  the rows of the receptive field only ("after", what ``sample`` does by default);
* training steps, wall and CPU seconds, and the load average (these machines are shared).
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
        for crop in ([True] if args.skip_uncropped else [False, True]):
            start = time.perf_counter()
            samples = pixelcnn.sample(model, 64, generator=torch.Generator().manual_seed(0),
                                      crop_rows=crop)
            timings["after" if crop else "before"] = round(time.perf_counter() - start, 1)
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
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
