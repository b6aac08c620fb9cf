"""Pseudo-labels unlabelled images with an ensemble, keeping only the images it is confident about.

    severjax-pseudo-label --checkpoint runs/fpn_b5 --checkpoint runs/unet_b5 [--classifier runs/cls_b1] \\
        --images data/test_images --out pseudo.csv [--hi 0.9 --lo 0.1] [--seg_conf 0.8] [--truth test_truth.csv]

Prediction is ``severjax-predict``'s (``severjax.predict``: per-model jit forward over the TTA views,
ensemble average, jit post-processing with the classifier gating the minimum areas). Then each image passes
or fails the enabled confidence rules; it is kept when it passes all of them:

- classifier rule (with ``--classifier``): every class probability is ``>= --hi`` or ``<= --lo``, and the
  classifier agrees with the segmentation (class present in the mask iff its probability > 0.5);
- segmentation rule (with ``--seg_conf`` > 0): ``segmentation_confidence >= --seg_conf``, i.e. the mean
  probability of the predicted pixels (each pixel's predicted class); an image with no predicted defect
  scores ``1 - max_c min(1, candidates_c / min_area_c)`` where ``candidates_c`` counts the pixels above
  class c's threshold (it is confidently empty when no class came near its minimum area).

With no rule enabled every image is kept (said so in the summary). Output, for
``config.data.pseudo_csv`` (training mixes them in at a fixed share a batch, see severjax.data.sampling):
``--layout competition`` (default) writes four rows a kept image, so defect-free pseudo images stay known;
``--layout post`` writes the post-competition layout (ImageId,ClassId,EncodedPixels, defect rows only) and
then needs ``--out_images`` (the kept ids, one a line) to say which defect-free images were kept.
``--truth`` prints the Kaggle score of the kept pseudo labels and of all predictions against it.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from severjax.cli import errors, flags
from severjax.data import kaggle
from severjax.metrics import score_annotations
from severjax.predict.postprocess import PostprocessConfig
from severjax.predict.stream import predict_images


def build_parser():
    p = errors.parser("pseudo-label", __doc__)
    p.add_argument("--images", required=True, metavar="DIR", help="folder of unlabelled 256x1600 images")
    p.add_argument("--out", required=True, metavar="CSV", help="pseudo-label CSV to write (kept images only)")
    p.add_argument("--layout", choices=("competition", "post"), default="competition",
                   help="competition (default): 4 rows a kept image, defect-free ones included; post: "
                        "ImageId,ClassId,EncodedPixels defect rows only (needs --out_images)")
    p.add_argument("--out_images", default=None, metavar="TXT", help="also write the kept image ids, one a line")
    rules = p.add_argument_group("confidence rules")
    rules.add_argument("--hi", type=float, default=0.9, help="classifier rule: a class is sure when p >= hi (0.9)")
    rules.add_argument("--lo", type=float, default=0.1,
                       help="classifier rule: a class is surely absent when p <= lo (0.1)")
    rules.add_argument("--seg_conf", type=float, default=0.0,
                       help="segmentation rule: keep images whose segmentation confidence >= this (default 0 = off)")
    p.add_argument("--truth", default=None, metavar="CSV",
                   help="ground truth (either layout; images it lacks count as defect-free): score the kept labels")
    flags.add_ensemble_flags(p.add_argument_group("ensemble (--classifier also enables the classifier rule)"))
    flags.add_postprocess_flags(p.add_argument_group("post-processing"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the ensemble over ``--images``, selects, writes; returns the summary printed."""
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.lo < 0.5 < args.hi <= 1.0:
        raise ValueError(f"--lo {args.lo} and --hi {args.hi} must satisfy 0 <= lo < 0.5 < hi <= 1")
    if not 0.0 <= args.seg_conf <= 1.0:
        raise ValueError(f"--seg_conf {args.seg_conf} must lie in [0, 1]")
    if args.layout == "post" and not args.out_images:
        raise ValueError("--layout post lists defect rows only: give --out_images so the kept defect-free "
                         "images are known (or use --layout competition)")
    config = flags.postprocess_config(args)
    ids = kaggle.list_images(args.images)
    ensemble = flags.ensemble_from_args(args, config)
    use_classifier, use_seg = bool(args.classifier), args.seg_conf > 0

    from tqdm import tqdm

    rows, kept, reasons = {}, [], {"classifier_unsure": 0, "classifier_disagrees": 0, "segmentation_unsure": 0}
    paths = [os.path.join(args.images, i) for i in ids]
    results = predict_images(ensemble, paths, args.batch_size, keep_masks=use_seg, keep_probs=use_seg)
    for result in tqdm(results, total=len(ids), unit="img", disable=args.quiet, desc="pseudo-label"):
        rows[result.image_id] = result.rles
        present = np.asarray([bool(r) for r in result.rles])
        ok = True
        if use_classifier:
            sure, agrees = classifier_verdict(result.class_probs[None], present[None], args.hi, args.lo)
            reasons["classifier_unsure"] += int(not sure[0])
            reasons["classifier_disagrees"] += int(not agrees[0])
            ok &= bool(sure[0] and agrees[0])
        if use_seg:
            confidence = segmentation_confidence(result.probs[None], result.masks[None], config)[0]
            reasons["segmentation_unsure"] += int(confidence < args.seg_conf)
            ok &= bool(confidence >= args.seg_conf)
        if ok:
            kept.append(result.image_id)

    kaggle.write_submission(args.out, {i: rows[i] for i in kept}, layout=args.layout, order=kept)
    if args.out_images:
        with open(args.out_images, "w") as f:
            f.writelines(f"{i}\n" for i in kept)
    summary = summarize(rows, kept, reasons, use_classifier, use_seg)
    if args.truth:
        truth = kaggle.read_submission(args.truth)
        summary["score_kept"] = _score(truth, rows, kept)
        summary["score_all"] = _score(truth, rows, list(rows))
    _print_summary(args, summary)
    return summary


def entry() -> int:
    """Console script ``severjax-pseudo-label``: with huge pages for XLA:CPU (``severjax.ops.hostmem``)."""
    from severjax.ops import hostmem

    hostmem.reexec_with_huge_pages()  # first: it restarts the process
    return errors.run("pseudo-label", main)


def classifier_verdict(class_probs: np.ndarray, present: np.ndarray, hi: float, lo: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Per image ``(sure, agrees)``: every class ``p >= hi`` or ``p <= lo``; ``(p > 0.5) == present``.

    ``class_probs`` float ``(N, C)``, ``present`` bool ``(N, C)`` (the segmentation kept that class).
    """
    class_probs, present = np.asarray(class_probs, np.float64), np.asarray(present, bool)
    if class_probs.shape != present.shape:
        raise ValueError(f"classifier probabilities {class_probs.shape} and mask presence {present.shape} differ")
    sure = np.all((class_probs >= hi) | (class_probs <= lo), axis=1)
    agrees = np.all((class_probs > 0.5) == present, axis=1)
    return sure, agrees


def segmentation_confidence(probs: np.ndarray, masks: np.ndarray, config: PostprocessConfig) -> np.ndarray:
    """Per image: mean probability of the predicted pixels (their class), or for an image with no
    predicted pixel ``1 - max_c min(1, candidates_c / min_area_c)`` (``candidates_c``: pixels above
    class c's threshold). ``probs`` ``(N, H, W, C)`` float in [0, 1] or uint8 ``round(255 p)``; ``masks``
    bool ``(N, H, W, C)``."""
    probs = np.asarray(probs)
    if probs.dtype == np.uint8:
        probs = probs.astype(np.float32) / 255.0
    masks = np.asarray(masks, bool)
    if probs.shape != masks.shape:
        raise ValueError(f"probabilities {probs.shape} and masks {masks.shape} differ")
    thresholds = np.asarray(config.thresholds, np.float32)
    min_area = np.maximum(np.asarray(config.min_area, np.float64), 1.0)
    out = np.empty(len(probs))
    for i, (p, m) in enumerate(zip(probs, masks)):
        n = m.sum()
        if n:
            out[i] = float(p[m].sum() / n)
        else:
            candidates = (p > thresholds).sum(axis=(0, 1))
            out[i] = 1.0 - float(np.max(np.minimum(1.0, candidates / min_area)))
    return out


def summarize(rows: dict, kept: Sequence[str], reasons: dict, use_classifier: bool, use_seg: bool) -> dict:
    """Counts: images, kept, kept defect-free, kept images with each class, rejections by reason."""
    per_class = np.zeros(4, np.int64)
    for image_id in kept:
        per_class += np.asarray([bool(r) for r in rows[image_id]])
    empty = sum(not any(rows[i]) for i in kept)
    rules = [n for n, on in (("classifier", use_classifier), ("segmentation", use_seg)) if on]
    return {"images": len(rows), "kept": len(kept), "kept_defect_free": int(empty),
            "kept_per_class": per_class.tolist(), "rules": rules,
            "rejected": {k: v for k, v in reasons.items() if (k.startswith("classifier") and use_classifier)
                         or (k.startswith("segmentation") and use_seg)}}


def _score(truth: dict, rows: dict, ids: Sequence[str]) -> float | None:
    if not ids:
        return None
    _, mean = score_annotations({i: truth.get(i, [""] * 4) for i in ids}, {i: rows[i] for i in ids})
    return float(mean)


def _print_summary(args, summary: dict) -> None:
    print(f"wrote {args.out} ({args.layout} layout)" + (f" and {args.out_images}" if args.out_images else ""))
    if not summary["rules"]:
        print("note: no confidence rule enabled (no --classifier, --seg_conf 0): every image is kept")
    print(f"kept {summary['kept']} / {summary['images']} images ({summary['kept_defect_free']} defect-free); "
          f"rules: {', '.join(summary['rules']) or 'none'}")
    print("kept images with a defect, by class: "
          + "  ".join(f"{c + 1}: {n}" for c, n in enumerate(summary["kept_per_class"])))
    if summary["rejected"]:
        print("failed: " + "  ".join(f"{k}: {v}" for k, v in summary["rejected"].items()))
    if "score_kept" in summary:
        fmt = lambda s: "n/a" if s is None else f"{s:.5f}"  # noqa: E731
        print(f"score vs truth: kept {fmt(summary['score_kept'])}  all {fmt(summary['score_all'])}")


if __name__ == "__main__":
    raise SystemExit(entry())
