"""The flags the prediction tools share (predict, tune, pseudo_label), each defined once.

- ensemble: ``--checkpoint``, ``--classifier``, ``--tta``, ``--average``, ``--weights``, ``--batch_size``
  (``add_ensemble_flags``; ``ensemble_from_args`` loads the models and builds the ``Ensemble``);
- post-processing: ``--thresholds``, ``--min_area``, ``--min_component``, ``--connectivity``, ``--dilate``,
  ``--c_factor`` (``add_postprocess_flags``; ``postprocess_config`` builds the ``PostprocessConfig``).

Lists of numbers are comma-separated (``floats``; ``float_list`` as an argparse type).
"""

from __future__ import annotations

import argparse
from typing import Sequence

from severjax.predict.ensemble import AVERAGES, TTA_MODES, Ensemble, load_members
from severjax.predict.postprocess import DEFAULT_C_FACTOR, DEFAULT_MIN_AREA, DEFAULT_THRESHOLDS, PostprocessConfig

NUM_CLASSES = 4


def floats(text: str, flag: str = "value") -> tuple[float, ...]:
    """``"0.5,0.45"`` -> ``(0.5, 0.45)``; anything else is a ValueError naming ``flag`` and the text."""
    try:
        return tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers") from None


def join(values: Sequence[float]) -> str:
    """The text ``floats`` reads back: ``(0.5, 600.0)`` -> ``"0.5,600"``."""
    return ",".join(f"{v:g}" for v in values)


def float_list(text: str) -> tuple[float, ...]:
    """``floats`` as an argparse ``type`` (argparse names the flag in its error)."""
    try:
        return floats(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None


def add_ensemble_flags(group, *, required: bool = True) -> None:
    """The ensemble's flags, added to a parser or an argument group; ``required``: whether
    ``--checkpoint`` must be given."""
    group.add_argument("--checkpoint", action="append", required=required, default=None if required else [],
                       metavar="DIR", help="segmentation model: an exported model folder or a training workdir "
                                           "(its model_best, else model_last); repeat for an ensemble")
    group.add_argument("--classifier", action="append", default=[], metavar="DIR",
                       help="classifier model (arch 'classifier', 4 logits an image) gating the minimum areas; "
                            "repeat to average several")
    group.add_argument("--tta", choices=TTA_MODES, default="w",
                       help="flip test-time augmentation, probabilities averaged over the views, flips undone: "
                            "none; w = + horizontal flip (the original's); h = + vertical flip; hw = all 4 "
                            "flips (default w; classifiers use the same views)")
    group.add_argument("--average", choices=AVERAGES, default="mean",
                       help="how models' probabilities are combined: mean (default, the original's), rms "
                            "(sqrt of mean of squares) or geo (geometric mean)")
    group.add_argument("--weights", type=float_list, default=None, metavar="W1,W2,...",
                       help="per-model weights, one per --checkpoint in order (default: equal)")
    group.add_argument("--batch_size", type=_positive_int, default=8, help="images a batch (default 8)")


def add_postprocess_flags(group, *, dilate: bool = True) -> None:
    """The post-processing flags, added to a parser or an argument group (``dilate``: with ``--dilate``)."""
    group.add_argument("--thresholds", type=float_list, default=join(DEFAULT_THRESHOLDS), metavar="T1,T2,T3,T4",
                       help="per-class probability thresholds, strictly greater passes (default %(default)s)")
    group.add_argument("--min_area", type=float_list, default=join(DEFAULT_MIN_AREA), metavar="A1,A2,A3,A4",
                       help="per-class minimum pixels an image: a class with fewer is wiped (default %(default)s)")
    group.add_argument("--min_component", type=int, default=0,
                       help="remove connected components with fewer pixels before the area check "
                            "(default 0 = off)")
    group.add_argument("--connectivity", type=int, choices=(4, 8), default=8,
                       help="pixel connectivity for --min_component (default 8, as cv2/scipy with a 3x3 structure)")
    if dilate:
        group.add_argument("--dilate", type=int, default=0,
                           help="odd kernel size of a final dilation of the kept masks (default 0 = off)")
    group.add_argument("--c_factor", type=float, default=DEFAULT_C_FACTOR,
                       help="classifier gating: min_area = t0*c - t0*(c-1)*p with p the classifier probability "
                            "(default %(default)s); used only with classifier probabilities")


def postprocess_config(args: argparse.Namespace) -> PostprocessConfig:
    """The ``PostprocessConfig`` of parsed post-processing flags (``--dilate`` 0 where the tool has none)."""
    if len(args.thresholds) != NUM_CLASSES or len(args.min_area) != NUM_CLASSES:
        raise ValueError(f"--thresholds {join(args.thresholds)} and --min_area {join(args.min_area)} need "
                         f"{NUM_CLASSES} values each, one a class")
    return PostprocessConfig(thresholds=args.thresholds, min_area=args.min_area, min_component=args.min_component,
                             connectivity=args.connectivity, dilate=getattr(args, "dilate", 0),
                             c_factor=args.c_factor)


def ensemble_from_args(args: argparse.Namespace, postprocess: PostprocessConfig = PostprocessConfig()) -> Ensemble:
    """Loads ``--checkpoint`` and ``--classifier`` models into an ``Ensemble`` with the other ensemble flags."""
    members = load_members(args.checkpoint)
    classifiers = load_members(args.classifier, classifier=True) if args.classifier else []
    return Ensemble(members, tta=args.tta, average=args.average, weights=args.weights,
                    classifiers=classifiers, postprocess=postprocess)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value
