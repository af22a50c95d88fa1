"""Does the seed's conv autoencoder (8-d code) beat PCA with 8 components?

Trains ``course train ae`` (``course_utils.autoencoders.ae_config``) and prints the
held-out reconstruction MSE per pixel of the AE and of PCA-8 (fitted on the same
training images), their ratio, the time taken and the machine.

    python benchmarks/ae_vs_pca.py                      # classroom budget, 8,000/2,000 split, CPU
    python benchmarks/ae_vs_pca.py --budget smoke
    python benchmarks/ae_vs_pca.py --no-test-split      # classroom on the real train split

Target: ratio < 1 in the classroom budget on the 8,000/2,000 split, in a few minutes on
a 2-core CPU. The data used is always printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or "?",
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default=os.environ.get("COURSE_BUDGET", "classroom"))
    parser.add_argument("--no-test-split", action="store_true",
                        help="use the real MNIST train split instead of the 8,000/2,000 split")
    parser.add_argument("--device", default="cpu", help="default cpu (the target is a CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=None, help="override the budget's steps")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    os.environ["COURSE_BUDGET"] = args.budget
    os.environ.setdefault("CI", "true")  # no progress bar
    if not args.no_test_split:
        os.environ["COURSE_TEST_SPLIT"] = "1"

    import torch

    from course_utils.autoencoders import ae_config, build_ae, evaluate_ae, train_ae

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ae_config(args.budget)
    if args.steps:
        config["steps"] = args.steps
    print(f"config: {json.dumps(config)}")
    before = machine()
    model = build_ae(config)
    cpu0, wall0 = time.process_time(), time.monotonic()  # process_time: all threads, any OS
    train_info = train_ae(model, config, args.device)
    wall, cpu_seconds = time.monotonic() - wall0, time.process_time() - cpu0
    metrics = evaluate_ae(model, config, args.device)
    after = machine()
    k = metrics["latent_dim"]
    print(f"train data: {config['data']}; test data: {metrics['test_data']}")
    print(f"AE   (seed conv AE, {k}-d code) held-out MSE per pixel: {metrics['test_mse']:.5f}")
    print(f"PCA  ({k} components)            held-out MSE per pixel: {metrics['pca_mse']:.5f}")
    print(f"ratio AE / PCA: {metrics['ratio_ae_over_pca']:.3f} "
          f"({'AE wins' if metrics['ratio_ae_over_pca'] < 1 else 'PCA wins'})")
    print(f"training: {train_info['train_steps']} steps ({train_info['train_epochs']} full epochs), "
          f"{wall:.1f} s wall, {cpu_seconds:.1f} s CPU (all threads)")
    print(f"machine: {json.dumps(before)}")
    print(f"load average (1 min) before/after: {before.get('load_average_1min')} / "
          f"{after.get('load_average_1min')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config, "metrics": metrics, "train": train_info,
                       "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu_seconds, 1),
                       "machine": before, "load_after": after.get("load_average_1min")}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
