"""Writes a synthetic steel-defect data set in the Kaggle Severstal layout.

    severjax-make-synthetic --out /tmp/severstal_synth --train 400 --test 100 --seed 0

Output: train_images/, test_images/ (256x1600 JPEGs, 3 identical channels), train.csv
(ImageId,ClassId,EncodedPixels; defect rows only), sample_submission.csv and test_truth.csv
(ImageId_ClassId,EncodedPixels; 4 rows per test image). The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import time
from typing import Sequence

from severjax.cli import errors
from severjax.data.synthetic import make_dataset


def main(argv: Sequence[str] | None = None) -> dict:
    """Writes the data set; returns ``make_dataset``'s summary."""
    parser = errors.parser("make-synthetic", __doc__)
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--train", type=int, default=400, help="number of training images")
    parser.add_argument("--test", type=int, default=100, help="number of test images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering images (output does not depend on it)")
    parser.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = make_dataset(args.out, args.train, args.test, args.seed, num_workers=args.workers,
                           overwrite=args.overwrite, progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(json.dumps(summary))
    print(f"wrote {args.train + args.test} images to {args.out} in {seconds:.1f} s")
    return summary


def entry() -> int:
    """Console script ``severjax-make-synthetic``."""
    return errors.run("make-synthetic", main)


if __name__ == "__main__":
    raise SystemExit(entry())
