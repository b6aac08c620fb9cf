"""Scores a Kaggle submission against the truth: per-class Dice, then the mean score on the last line.

    python tools/score.py --truth train.csv --submission submission.csv

Either CSV may be in the competition layout (ImageId_ClassId,EncodedPixels) or the post-competition
layout (ImageId,ClassId,EncodedPixels). A post-layout truth lists defect rows only, so the images it
scores are those of the submission when ``--truth_images`` is not given; a post-layout submission
predicts "no defect" for the truth's images it does not mention. Between competition-layout files, an
image that one side has and the other lacks is an error that names it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from severjax.data import kaggle  # noqa: E402
from severjax.metrics import score_annotations  # noqa: E402


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--truth", required=True, help="ground-truth CSV (either Kaggle layout)")
    parser.add_argument("--submission", required=True, help="submission CSV (either Kaggle layout)")
    parser.add_argument("--truth_images", default=None,
                        help="folder of the truth's images: with a post-layout truth, images without rows there "
                             "count as defect-free")
    args = parser.parse_args(argv)
    truth, submission = load_pair(args.truth, args.submission, args.truth_images)
    per_class, mean = score_annotations(truth, submission)
    print(f"images: {len(truth)}")
    for c, d in enumerate(per_class, start=1):
        print(f"class {c} dice: {d:.5f}")
    print(f"score: {mean:.5f}")
    return mean


def load_pair(truth_csv: str, submission_csv: str, truth_images: str | None = None):
    """Reads truth and submission; a side in the defect-rows-only (post) layout is completed with empty rows.

    That layout cannot say which images it covers: a post-layout truth without ``truth_images`` takes the
    submission's images it does not mention as defect-free, and a post-layout submission predicts
    "no defect" for the truth's images it does not mention. Competition-layout files list every image,
    so there a missing image is an error.
    """
    submission = kaggle.read_submission(submission_csv)
    truth = kaggle.read_train_csv(truth_csv, truth_images) if truth_images else kaggle.read_submission(truth_csv)
    empty = [""] * kaggle.NUM_CLASSES
    if not truth_images and _is_post_layout(truth_csv):
        for image_id in submission:
            truth.setdefault(image_id, list(empty))
    if _is_post_layout(submission_csv):
        for image_id in truth:
            submission.setdefault(image_id, list(empty))
    return truth, submission


def _is_post_layout(csv_path: str) -> bool:
    with open(csv_path) as f:
        return f.readline().strip().lstrip("\ufeff").replace(" ", "") == ",".join(kaggle.POST_HEADER)


if __name__ == "__main__":
    main()
