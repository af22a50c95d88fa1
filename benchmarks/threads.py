"""Benchmark: CPU threads for training on a small machine, quiet and while something else runs.

Times a fixed piece of training (the seed conv autoencoder of topic 2, batches of
128 MNIST-sized images) with 1 thread and with every core, first on a quiet
machine, then while another process keeps one core busy (a student's laptop with
a browser and a video call open). PyTorch's OpenMP threads wait for each other at
every operation, so when a core is taken, two threads can be much slower than
one. `course_utils.runtime.configure_threads` chooses from these figures.

    python benchmarks/threads.py            # prints a table, with the load average
    python benchmarks/threads.py --steps 60
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def one_run(threads: int, steps: int) -> float:
    code = f"""
import time, torch
torch.set_num_threads({threads})
from course_utils.convolution import SeedConvAutoencoder
torch.manual_seed(0)
model = SeedConvAutoencoder()
opt = torch.optim.Adam(model.parameters(), 1e-3)
x = torch.rand(128, 1, 28, 28)
for _ in range(3):  # warm-up
    loss = ((model(x) - x) ** 2).mean(); opt.zero_grad(); loss.backward(); opt.step()
start = time.perf_counter()
for _ in range({steps}):
    loss = ((model(x) - x) ** 2).mean(); opt.zero_grad(); loss.backward(); opt.step()
print(time.perf_counter() - start)
"""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = sorted({1, cores})
    print(f"{cores} CPU cores; {args.steps} training steps of the seed conv AE, batch 128")
    print(f"{'machine':<28} {'threads':>7} {'seconds':>8} {'steps/s':>8}  load average")
    for label in ("quiet", "one core kept busy"):
        hog = None
        if label != "quiet":
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(2)
        try:
            for threads in counts:
                seconds = one_run(threads, args.steps)
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                print(f"{label:<28} {threads:>7} {seconds:>8.2f} {args.steps / seconds:>8.1f}  {load:.2f}")
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()


if __name__ == "__main__":
    main()
