"""Training input pipeline speed on the synthetic set: images/s, and images/s per worker process.

    python benchmarks/bench_pipeline.py [--images 200] [--workers 0 1 2] [--crop 256 416] [--batch 18]

Generates a synthetic Kaggle-layout folder in a temporary directory, prepares the TFDS set (timed),
then times ``pipeline.train_loader`` batches at the given crop for each grain worker count (after a
warm-up that absorbs the worker start-up). For reference, in the same run, it times the original
solution's per-image work in one process: ``cv2.imread`` of the JPEG + RLE decode of the four masks +
the same albumentations transform (what its PyTorch ``Dataset.__getitem__`` did), and prints the ratio.
Stages are also timed alone: record read+decode from array_record, and augmentation only.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import common  # noqa: E402

from severjax.data import augment, kaggle, pipeline, synthetic, tfds_severstal  # noqa: E402


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
        folder = os.path.join(tmp, "severstal")
        synthetic.make_dataset(folder, args.images, 0, seed=0)
        config = common.get_config()
        config.data.dir = folder
        config.data.crop = tuple(args.crop)
        config.batch_size = args.batch
        config.data.val_fraction = 0.0
        config.data.synthetic = ml_collections.ConfigDict(dict(n_train=args.images, n_test=0, seed=0))

        start = time.perf_counter()
        builder = pipeline.prepare_data(config)
        rate = args.images / (time.perf_counter() - start)
        results["tfds_prepare"] = rate
        print(f"TFDS prepare (JPEG decode + array_record write): {rate:7.1f} images/s")

        source = builder.as_data_source("train")
        n = min(len(source), 100)
        start = time.perf_counter()
        records = [tfds_severstal.decode_record(source[i]) for i in range(n)]
        rate = n / (time.perf_counter() - start)
        results["read_decode"] = rate
        print(f"record read + decode incl. RLE (1 thread):      {rate:7.1f} images/s")

        transform = augment.train_transform(**augment.train_kwargs(config))
        start = time.perf_counter()
        for i, record in enumerate(records):
            augment.apply(transform, record["image"], record["mask"], np.random.default_rng(i))
        rate = n / (time.perf_counter() - start)
        results["augment_only"] = rate
        print(f"augmentation only (1 thread):                   {rate:7.1f} images/s")

        annotations = kaggle.read_train_csv(os.path.join(folder, "train.csv"), os.path.join(folder, "train_images"))
        ids = sorted(annotations)[:n]
        start = time.perf_counter()
        for i, image_id in enumerate(ids):
            image = kaggle.load_image(os.path.join(folder, "train_images", image_id))
            mask = kaggle.masks_from_rles(annotations[image_id])
            augment.apply(transform, image, mask, np.random.default_rng(i))
        reference = n / (time.perf_counter() - start)
        results["reference_per_process"] = reference
        print(f"reference, original-style JPEG+RLE+aug (1 proc): {reference:7.1f} images/s")
        del records

        for workers in args.workers:
            config.data.workers = workers
            iterator = iter(pipeline.train_loader(config, process_index=0, process_count=1, builder=builder))
            for _ in range(args.warmup):
                next(iterator)
            start = time.perf_counter()
            for _ in range(args.batches):
                batch = next(iterator)
            seconds = time.perf_counter() - start
            assert batch["image"].shape == (args.batch, *args.crop, 1)
            rate = args.batches * args.batch / seconds
            per_worker = rate / max(workers, 1)
            results[f"train_workers{workers}"] = rate
            results[f"train_per_worker{workers}"] = per_worker
            print(f"train_loader, {workers} worker(s): {rate:7.1f} images/s, {per_worker:7.1f} images/s per "
                  f"{'worker' if workers else 'process (in-process)'}, {per_worker / reference:5.2f}x reference")
            del iterator, batch
            gc.collect()
    return results


if __name__ == "__main__":
    main()
