"""Training input pipeline speed on the synthetic set: images/s, and images/s per worker process.

    python benchmarks/bench_pipeline.py [--images 200] [--workers 0 1 2] [--crop 256 416] [--batch 18]

Generates a synthetic Kaggle-layout folder in a temporary directory, prepares the TFDS set (timed),
then times ``pipeline.train_loader`` batches at the given crop for each grain worker count (after a
warm-up that absorbs the worker start-up). For reference, in the same run, it times the original
solution's per-image work in one process: ``cv2.imread`` of the JPEG + RLE decode of the four masks +
the same albumentations transform (what its PyTorch ``Dataset.__getitem__`` did), and prints the ratio.
Stages are also timed alone: record read+decode from array_record, and augmentation only.

``benchmarks/run_all.py`` reuses ``make_setup``, ``reference_rate`` and ``loader_rate``.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from severjax import config as defaults  # noqa: E402

from severjax.data import augment, kaggle, pipeline, synthetic, tfds_severstal  # noqa: E402


class Setup(NamedTuple):
    """A prepared synthetic set: its folder, the config pointing at it, the TFDS builder, prepare images/s."""

    folder: str
    config: ml_collections.ConfigDict
    builder: Any
    prepare_rate: float


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="synthetic training images")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="grain worker counts to time")
    parser.add_argument("--crop", type=int, nargs=2, default=[256, 416])
    parser.add_argument("--batch", type=int, default=18)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per worker count")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (worker start-up)")
    args = parser.parse_args(argv)
    results: dict[str, float] = {}
    print(f"cpu cores: {os.cpu_count()}, crop {args.crop[0]}x{args.crop[1]}, batch {args.batch}")

    with tempfile.TemporaryDirectory() as tmp:
        setup = make_setup(tmp, args.images, tuple(args.crop), args.batch)
        results["tfds_prepare"] = setup.prepare_rate
        print(f"TFDS prepare (JPEG decode + array_record write): {setup.prepare_rate:7.1f} images/s")

        n = min(args.images, 100)
        rate, records = read_decode_rate(setup, n)
        results["read_decode"] = rate
        print(f"record read + decode incl. RLE (1 thread):      {rate:7.1f} images/s")

        rate = augment_rate(setup, records)
        results["augment_only"] = rate
        print(f"augmentation only (1 thread):                   {rate:7.1f} images/s")
        del records

        reference = reference_rate(setup, n)
        results["reference_per_process"] = reference
        print(f"reference, original-style JPEG+RLE+aug (1 proc): {reference:7.1f} images/s")

        for workers in args.workers:
            rate = loader_rate(setup, workers, args.batches, args.warmup)
            per_worker = rate / max(workers, 1)
            results[f"train_workers{workers}"] = rate
            results[f"train_per_worker{workers}"] = per_worker
            print(f"train_loader, {workers} worker(s): {rate:7.1f} images/s, {per_worker:7.1f} images/s per "
                  f"{'worker' if workers else 'process (in-process)'}, {per_worker / reference:5.2f}x reference")
    return results


def make_setup(tmp: str, images: int, crop: tuple[int, int], batch: int) -> Setup:
    """Writes a synthetic set of ``images`` training images under ``tmp`` and prepares its TFDS records."""
    folder = os.path.join(tmp, "severstal")
    synthetic.make_dataset(folder, images, 0, seed=0)
    config = defaults.get_config()
    config.data.dir = folder
    config.data.crop = tuple(crop)
    config.batch_size = batch
    config.data.val_fraction = 0.0
    config.data.synthetic = ml_collections.ConfigDict(dict(n_train=images, n_test=0, seed=0))
    start = time.perf_counter()
    builder = pipeline.prepare_data(config)
    return Setup(folder, config, builder, images / (time.perf_counter() - start))


def read_decode_rate(setup: Setup, n: int) -> tuple[float, list[dict[str, np.ndarray]]]:
    """Images/s of reading + decoding ``n`` records from array_record in one thread; also the records."""
    source = setup.builder.as_data_source("train")
    n = min(len(source), n)
    start = time.perf_counter()
    records = [tfds_severstal.decode_record(source[i]) for i in range(n)]
    return n / (time.perf_counter() - start), records


def augment_rate(setup: Setup, records: list[dict[str, np.ndarray]]) -> float:
    """Images/s of the training augmentation alone, one thread."""
    transform = augment.train_transform(**augment.train_kwargs(setup.config))
    start = time.perf_counter()
    for i, record in enumerate(records):
        augment.apply(transform, record["image"], record["mask"], np.random.default_rng(i))
    return len(records) / (time.perf_counter() - start)


def reference_rate(setup: Setup, n: int) -> float:
    """Images/s of the original's per-image work in one process: JPEG read + RLE decode + augmentation."""
    transform = augment.train_transform(**augment.train_kwargs(setup.config))
    annotations = kaggle.read_train_csv(os.path.join(setup.folder, "train.csv"),
                                        os.path.join(setup.folder, "train_images"))
    ids = sorted(annotations)[:n]
    start = time.perf_counter()
    for i, image_id in enumerate(ids):
        image = kaggle.load_image(os.path.join(setup.folder, "train_images", image_id))
        mask = kaggle.masks_from_rles(annotations[image_id])
        augment.apply(transform, image, mask, np.random.default_rng(i))
    return len(ids) / (time.perf_counter() - start)


def loader_rate(setup: Setup, workers: int, batches: int, warmup: int) -> float:
    """Images/s of ``pipeline.train_loader`` with ``workers`` grain workers, after ``warmup`` batches."""
    config = setup.config.copy_and_resolve_references()
    config.data.workers = workers
    iterator = iter(pipeline.train_loader(config, process_index=0, process_count=1, builder=setup.builder))
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    seconds = time.perf_counter() - start
    expected = (config.batch_size, *config.data.crop, 1)
    if batch["image"].shape != expected:
        raise AssertionError(f"train_loader gave images {batch['image'].shape}, expected {expected}")
    del iterator, batch
    gc.collect()
    return batches * config.batch_size / seconds


if __name__ == "__main__":
    main()
