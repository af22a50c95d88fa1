"""Benchmark: the MNISTFeatureNet recipe on the 8,000 / 2,000 split of MNIST test.

Trains the classifier exactly as ``load_feature_net`` / ``course train classifier``
would (the ``classroom`` budget by default), on the first 8,000 MNIST test images,
and measures accuracy on the last 2,000, which it never saw. Target: >= 98.5 %
in about a minute on a 2-core CPU.

    COURSE_DATA_DIR=/path/to/data python benchmarks/classifier.py
    python benchmarks/classifier.py --budget smoke --seeds 0 1 2
    python benchmarks/classifier.py --threads 2 --device cpu

It prints the wall-clock training time, the CPU time, images per second and the
machine's load average (other programs slow a shared machine down: CPU seconds /
threads estimates the time on an idle one). Nothing is written to the checkpoint
cache unless ``--save`` is given.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="classroom", choices=["smoke", "classroom", "full"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, help="override the budget's number of steps")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", help="e.g. cpu or cuda (default: the best available)")
    parser.add_argument("--save", action="store_true", help="cache the (last) trained model")
    args = parser.parse_args()

    os.environ["COURSE_TEST_SPLIT"] = "1"  # the 8,000 / 2,000 split in every budget
    os.environ.setdefault("CI", "true")  # no progress bar in the printed report
    import torch

    from course_utils import metrics
    from course_utils.data import data_root, split_available
    from course_utils.runtime import get_device

    if split_available("train"):
        raise SystemExit(f"{data_root()} holds MNIST train: the 8,000/2,000 split of the test "
                         "images is only used without it. Point COURSE_DATA_DIR at a folder "
                         "with only the test split.")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    config = metrics.classifier_config(args.budget)
    if args.steps:
        config["steps"] = args.steps
    print(f"torch {torch.__version__} | device {device} | threads {torch.get_num_threads()} | "
          f"cpus {os.cpu_count()} | budget {args.budget} | steps {config['steps']} x "
          f"batch {config['batch_size']}")
    print(f"train data: {config['data']}")
    results = []
    for seed in args.seeds:
        config["seed"] = seed
        model = metrics.build_classifier(config)
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        figures = metrics.train_classifier(model, config, device)
        wall = time.perf_counter() - wall_start
        cpu = time.process_time() - cpu_start
        load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        eval_start = time.perf_counter()
        test = metrics.evaluate_classifier(model, config, device)
        eval_seconds = time.perf_counter() - eval_start
        images = figures["train_steps"] * config["batch_size"]
        results.append(test["test_accuracy"])
        print(f"seed {seed}: held-out accuracy {100 * test['test_accuracy']:.2f} % "
              f"on {test['test_images']:,} images ({test['test_data']})")
        print(f"  training: {wall:.1f} s wall, {cpu:.1f} s CPU, {images / wall:,.0f} images/s, "
              f"{figures['train_steps']} steps ({images / 8000:.1f} epochs of 8,000), "
              f"final loss {figures['train_final_loss']:.4f}")
        print(f"  evaluation of 2,000 images: {eval_seconds:.2f} s | load average "
              f"{load_before:.1f} -> {load_after:.1f} | parameters "
              f"{sum(p.numel() for p in model.parameters()):,}")
    if len(results) > 1:
        mean = sum(results) / len(results)
        print(f"mean held-out accuracy over {len(results)} seeds: {100 * mean:.2f} % "
              f"(min {100 * min(results):.2f} %, max {100 * max(results):.2f} %)")
    if args.save:
        from course_utils.checkpoints import save_checkpoint

        path = save_checkpoint(metrics.CHECKPOINT_NAME, model, config, {**figures, **test})
        print(f"cached: {path}")


if __name__ == "__main__":
    main()
