"""Scores a Kaggle submission against the truth: per-class Dice, then the mean score on the last line.

    severjax-score --truth train.csv --submission submission.csv

Either CSV may be in the competition layout (ImageId_ClassId,EncodedPixels) or the post-competition
layout (ImageId,ClassId,EncodedPixels). A post-layout truth lists defect rows only, so the images it
scores are those of the submission when ``--truth_images`` is not given; a post-layout submission
predicts "no defect" for the truth's images it does not mention. Between competition-layout files, an
image that one side has and the other lacks is an error that names it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from severjax.cli import errors
from severjax.data import kaggle
from severjax.metrics import score_annotations


def main(argv: Sequence[str] | None = None) -> float:
    """Scores and prints; returns the mean score."""
    parser = errors.parser("score", __doc__)
    parser.add_argument("--truth", required=True, metavar="CSV", help="ground-truth CSV (either Kaggle layout)")
    parser.add_argument("--submission", required=True, metavar="CSV", help="submission CSV (either Kaggle layout)")
    parser.add_argument("--truth_images", default=None, metavar="DIR",
                        help="folder of the truth's images: with a post-layout truth, images without rows there "
                             "count as defect-free")
    args = parser.parse_args(argv)
    images, per_class, mean = score_files(args.truth, args.submission, args.truth_images)
    print(f"images: {images}")
    for c, d in enumerate(per_class, start=1):
        print(f"class {c} dice: {d:.5f}")
    print(f"score: {mean:.5f}")
    return mean


def score_files(truth_csv: str, submission_csv: str, truth_images: str | None = None,
                also_empty: Sequence[str] = ()) -> tuple[int, np.ndarray, float]:
    """``(images scored, per-class mean Dice (4,), mean score)`` of a submission CSV against a truth CSV.

    ``also_empty``: image ids the submission predicts defect-free even where it has no rows for them (a
    post-layout submission written by ``severjax-predict`` for exactly those images).
    """
    truth, submission = kaggle.read_pair(truth_csv, submission_csv, truth_images)
    for image_id in also_empty:
        submission.setdefault(image_id, [""] * kaggle.NUM_CLASSES)
    try:
        per_class, mean = score_annotations(truth, submission)
    except ValueError as err:
        raise ValueError(f"{submission_csv} against {truth_csv}: {err}") from None
    return len(truth), per_class, mean


def entry() -> int:
    """Console script ``severjax-score``."""
    return errors.run("score", main)


if __name__ == "__main__":
    raise SystemExit(entry())
