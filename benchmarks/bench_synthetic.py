"""Synthetic data set speed: images per second for make_dataset, and where the time goes.

    python benchmarks/bench_synthetic.py [--images 300] [--workers 1 2]

Writes to a temporary folder (removed afterwards). Prints images/s end to end (render + JPEG + RLE +
CSVs) for each worker count, and the render-only rate (render_sample, no I/O) for reference. There is
no PyTorch counterpart: the original solution had no synthetic data.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from severjax.data.synthetic import make_dataset, render_sample  # noqa: E402


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="images per run (80%% train, 20%% test)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_test = args.images // 5
    n_train = args.images - n_test
    results: dict[str, float] = {}

    start = time.perf_counter()
    for i in range(n_train):
        render_sample(args.seed, "train", i)
    rate = n_train / (time.perf_counter() - start)
    results["render_only"] = rate
    print(f"render_sample only (1 process):        {rate:7.1f} images/s")

    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            make_dataset(os.path.join(tmp, "d"), n_train, n_test, args.seed, num_workers=workers)
            seconds = time.perf_counter() - start
        rate = args.images / seconds
        results[f"make_dataset_workers{workers}"] = rate
        print(f"make_dataset, {workers} worker(s), {args.images} images: {rate:7.1f} images/s ({seconds:.2f} s)")
    return results


if __name__ == "__main__":
    main()
