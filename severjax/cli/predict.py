"""Predicts a folder of Severstal images with an ensemble and writes a Kaggle submission.

    severjax-predict --checkpoint runs/fpn_b5 --checkpoint runs/unet_b5 \\
        --images data/test_images --out submission.csv [--classifier runs/cls_b1] [--truth test_truth.csv]

Each --checkpoint is an exported model (a folder with model.json) or a training workdir (its model_best,
else model_last). Images are read by a background thread one batch ahead, so memory stays flat for any
number of images. Pipeline: per model jit forward over the TTA views -> ensemble average -> jit
post-processing (thresholds, one class per pixel, small components, minimum areas gated by the
classifier, dilation) -> Kaggle RLE -> CSV. With --truth the score is computed from the written CSV by
severjax-score's code, so both print the same number.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from severjax.cli import errors, flags
from severjax.cli.score import score_files
from severjax.data import kaggle
from severjax.predict.probs import ProbsWriter
from severjax.predict.stream import ImageResult, predict_images

# BGR colours of classes 1..4 in overlays: red, green, blue, yellow.
CLASS_COLOURS = ((0, 0, 255), (0, 200, 0), (255, 64, 0), (0, 220, 255))
OVERLAY_ALPHA = 0.4


def build_parser():
    p = errors.parser("predict", __doc__)
    p.add_argument("--images", required=True, metavar="DIR", help="folder of 256x1600 .jpg/.png images")
    p.add_argument("--out", required=True, metavar="CSV", help="submission CSV to write")
    flags.add_ensemble_flags(p.add_argument_group("ensemble"))
    flags.add_postprocess_flags(p.add_argument_group("post-processing"))
    p.add_argument("--layout", choices=("competition", "post"), default="competition",
                   help="competition: ImageId_ClassId,EncodedPixels, 4 rows an image (default); post: "
                        "ImageId,ClassId,EncodedPixels, defect rows only")
    p.add_argument("--sample_submission", default=None, metavar="CSV",
                   help="predict exactly this CSV's images, in its row order (every one must be in --images)")
    p.add_argument("--truth", default=None, metavar="CSV",
                   help="ground truth (either layout): print the score, computed as severjax-score does")
    p.add_argument("--save_overlays", default=None, metavar="DIR",
                   help="write a PNG an image: predicted masks filled translucent, true masks (with --truth) "
                        "outlined; class colours red, green, blue, yellow")
    p.add_argument("--save_probs", default=None, metavar="NPZ",
                   help="also store the ensemble probabilities, quantised to uint8, for severjax-tune")
    p.add_argument("--skip_bad", action="store_true",
                   help="report an unreadable or wrong-size image, write it as empty and go on (default: stop "
                        "with an error naming the file)")
    p.add_argument("--prefetch", type=int, default=2, help="batches read ahead by the reader thread (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the prediction; returns the summary (images, bad, defects per class, images/s, score)."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    config = flags.postprocess_config(args)
    ids = _image_ids(args.images, args.sample_submission)
    truth = kaggle.read_truth_for(args.truth, ids) if args.truth else None

    ensemble = flags.ensemble_from_args(args, config)
    paths = [os.path.join(args.images, i) for i in ids]
    probs_writer = ProbsWriter(args.save_probs, len(ids)) if args.save_probs else None
    if args.save_overlays:
        os.makedirs(args.save_overlays, exist_ok=True)

    rows, bad, defects = {}, [], np.zeros(kaggle.NUM_CLASSES, np.int64)
    first_batch_done, after_first = None, 0  # steady-state rate: images after the first batch (compilation)
    try:
        with tqdm(total=len(ids), unit="img", disable=args.quiet, desc="predict") as bar:
            for result in predict_images(ensemble, paths, args.batch_size, skip_bad=args.skip_bad,
                                         keep_masks=bool(args.save_overlays), keep_probs=probs_writer is not None,
                                         prefetch=args.prefetch):
                if first_batch_done is None and bar.n >= min(args.batch_size, len(ids)) - 1:
                    first_batch_done = time.perf_counter()
                elif first_batch_done is not None:
                    after_first += 1
                rows[result.image_id] = result.rles
                if result.error is not None:
                    bad.append((result.image_id, result.error))
                    bar.write(f"bad image {result.image_id}: {result.error} (written as empty)")
                else:
                    defects += np.asarray([bool(r) for r in result.rles])
                    if args.save_overlays:
                        _save_overlay(args.save_overlays, args.images, result, truth)
                if probs_writer is not None:
                    probs_writer.write(result.image_id, result.probs, result.class_probs)
                bar.update(1)
        if probs_writer is not None:
            probs_writer.close()
    except BaseException:
        if probs_writer is not None:
            probs_writer.abort()
        raise
    finished = time.perf_counter()
    kaggle.write_submission(args.out, rows, layout=args.layout, order=ids)
    elapsed = time.perf_counter() - started

    steady = after_first / (finished - first_batch_done) if after_first and finished > first_batch_done else None
    summary = {"images": len(ids), "bad": len(bad), "defects_per_class": defects.tolist(),
               "seconds": elapsed, "images_per_s": len(ids) / elapsed, "steady_images_per_s": steady}
    print(f"wrote {args.out} ({args.layout} layout)")
    print(f"images: {len(ids)}  bad: {len(bad)}  models: {len(ensemble.members)}  "
          f"classifiers: {len(ensemble.classifiers)}  tta: {args.tta}  average: {args.average}")
    print("images with a defect, by class: " + "  ".join(f"{c + 1}: {n}" for c, n in enumerate(defects)))
    print(f"time: {elapsed:.1f} s, {summary['images_per_s']:.2f} images/s overall (model loading and "
          f"compilation included)" + (f", {steady:.2f} images/s after the first batch" if steady else ""))
    for image_id, error in bad:
        print(f"bad image {image_id}: {error}")
    if args.truth:
        # The post layout has no row for an image predicted defect-free: every predicted id is also_empty.
        _, per_class, score = score_files(args.truth, args.out, also_empty=ids)
        summary["per_class_dice"], summary["score"] = per_class.tolist(), score
        print("dice by class: " + "  ".join(f"{c + 1}: {d:.5f}" for c, d in enumerate(per_class)))
        print(f"score: {score:.5f}")
    return summary


def entry() -> int:
    """Console script ``severjax-predict``: with huge pages for XLA:CPU (``severjax.ops.hostmem``)."""
    from severjax.ops import hostmem

    hostmem.reexec_with_huge_pages()  # first: it restarts the process
    return errors.run("predict", main)


def _image_ids(image_dir: str, sample_submission: str | None) -> list[str]:
    on_disk = kaggle.list_images(image_dir)  # errors on a missing or empty folder
    if sample_submission is None:
        return on_disk
    order = list(kaggle.read_submission(sample_submission))
    missing = sorted(set(order) - set(on_disk))
    if missing:
        raise FileNotFoundError(f"{sample_submission}: {len(missing)} image(s) it lists are not in {image_dir}: "
                                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    extra = len(set(on_disk) - set(order))
    if extra:
        print(f"note: {extra} image(s) in {image_dir} are not in {sample_submission} and are not predicted")
    return order


def _save_overlay(out_dir: str, image_dir: str, result: ImageResult, truth) -> None:
    import cv2

    grey = kaggle.load_image(os.path.join(image_dir, result.image_id))[..., 0]
    canvas = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR).astype(np.float32)
    for c, colour in enumerate(CLASS_COLOURS):
        mask = result.masks[..., c]
        if mask.any():
            canvas[mask] = (1 - OVERLAY_ALPHA) * canvas[mask] + OVERLAY_ALPHA * np.asarray(colour, np.float32)
    canvas = canvas.round().astype(np.uint8)
    if truth is not None:
        true_masks = kaggle.masks_from_rles(truth[result.image_id], grey.shape)
        for c, colour in enumerate(CLASS_COLOURS):
            if true_masks[..., c].any():
                contours, _ = cv2.findContours(true_masks[..., c], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(canvas, contours, -1, colour, 2)
    name = os.path.splitext(result.image_id)[0] + ".png"
    if not cv2.imwrite(os.path.join(out_dir, name), canvas):
        raise OSError(f"could not write overlay {os.path.join(out_dir, name)}")


if __name__ == "__main__":
    raise SystemExit(entry())
