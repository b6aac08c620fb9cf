"""Tunes per-class thresholds and minimum areas on labelled validation images, with honest error bars.

    severjax-predict --checkpoint runs/fpn_b5 --images data/val_images --out val.csv \\
        --save_probs val_probs.npz
    severjax-tune --probs val_probs.npz --truth data/train.csv

or, in one go (the probabilities are computed once and cached in --probs, or a temporary file):

    severjax-tune --checkpoint runs/fpn_b5 --images data/val_images --truth data/train.csv

Search: coordinate ascent, class by class, over a grid of thresholds x minimum areas (the grids always
hold the starting values). For each class and candidate threshold one pass gathers per-image
(area, intersection) after the one-class-per-pixel rule (other classes at their current thresholds) and
the small-component removal; any minimum area (gated by saved classifier probabilities if present) is
then scored from those numbers without another pass. ``--rounds`` passes let the classes adjust to each
other. The chosen setting and the starting one are then scored exactly by the jit post-processing.

Report: the score before and after, and each class's gain, with a bootstrap 95% confidence interval
over images; a gain whose interval holds 0 is called within noise. These gains are in-sample (tuned
and measured on the same images); ``--folds K`` adds a K-fold cross-validated estimate of the gain on
unseen images. Probabilities come quantised to 1/255 (see ``severjax.predict.probs``), so thresholds are exact to
that step. ``--dilate`` is not modelled (set it after tuning).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from severjax.cli import errors, flags
from severjax.data import kaggle
from severjax.metrics import dice_per_image_class
from severjax.predict.components import remove_small_components
from severjax.predict.postprocess import PostprocessConfig, postprocess
from severjax.predict.probs import ProbsWriter, read_saved_probs
from severjax.predict.stream import predict_images

DEFAULT_THRESHOLD_GRID = "0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.65,0.7"
DEFAULT_AREA_GRID = "0,200,400,600,800,1000,1200,1500,2000,2500,3000,4000,5000"


def build_parser():
    p = errors.parser("tune", __doc__)
    src = p.add_argument_group("probabilities (saved, or computed from checkpoints)")
    src.add_argument("--probs", default=None, metavar="NPZ",
                     help="probabilities saved by severjax-predict --save_probs; with --checkpoint, where to "
                          "cache the computed ones (default: a temporary file)")
    src.add_argument("--images", default=None, metavar="DIR", help="labelled images (with --checkpoint)")
    flags.add_ensemble_flags(src, required=False)
    p.add_argument("--truth", required=True, metavar="CSV",
                   help="ground truth, either Kaggle layout; in the post layout (defect rows only) an image "
                        "without rows is defect-free")
    flags.add_postprocess_flags(p.add_argument_group("post-processing (the search starts from these)"),
                                dilate=False)
    search = p.add_argument_group("search")
    search.add_argument("--threshold_grid", type=flags.float_list, default=DEFAULT_THRESHOLD_GRID, metavar="LIST",
                        help="candidate thresholds (default %(default)s)")
    search.add_argument("--area_grid", type=flags.float_list, default=DEFAULT_AREA_GRID, metavar="LIST",
                        help="candidate minimum areas (default %(default)s)")
    search.add_argument("--rounds", type=int, default=2, help="coordinate-ascent rounds over the classes (default 2)")
    search.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    search.add_argument("--folds", type=int, default=0,
                        help="also estimate the gain on unseen images by K-fold cross-validation (default 0 = off)")
    search.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the folds")
    p.add_argument("--out", default=None, metavar="JSON", help="write the tuned setting and the report here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the search; returns the report (also written to ``--out``)."""
    args = build_parser().parse_args(argv)
    base = flags.postprocess_config(args)
    grid_t = np.unique(np.concatenate([args.threshold_grid, base.thresholds]))
    grid_a = np.unique(np.concatenate([args.area_grid, base.min_area])).astype(np.int64)
    if (grid_t < 0).any() or (grid_t > 1).any() or (grid_a < 0).any():
        raise ValueError("threshold grid values must lie in [0, 1] and area grid values be >= 0")

    probs_path, temporary = _probabilities(args)
    try:
        data = Data(probs_path, args.truth, args.quiet)
        report = tune(data, base, grid_t, grid_a, rounds=args.rounds, n_boot=args.bootstrap, folds=args.folds,
                      seed=args.seed)
    finally:
        if temporary:
            os.remove(probs_path)
    _print_report(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


def entry() -> int:
    """Console script ``severjax-tune``: with huge pages for XLA:CPU (``severjax.ops.hostmem``)."""
    from severjax.ops import hostmem

    hostmem.reexec_with_huge_pages()  # first: it restarts the process
    return errors.run("tune", main)


# ----------------------------------------------------------------------------------------------- data


class Data:
    """Saved probabilities + truth masks, streamed in chunks; images that failed to load are left out (said)."""

    def __init__(self, probs_path: str, truth_csv: str, quiet: bool = True, chunk: int = 4):
        self.meta, self._chunks = read_saved_probs(probs_path)
        self.chunk, self.quiet = chunk, quiet
        ids = [str(i) for i in self.meta.image_ids]
        self.truth = kaggle.read_truth_for(truth_csv, ids, require_all=True)
        self.keep = np.asarray(self.meta.valid, bool)
        if not self.keep.all():
            print(f"note: {int((~self.keep).sum())} image(s) failed to load at prediction time and are left out: "
                  + ", ".join(np.asarray(ids)[~self.keep][:5]))
        self.ids = [i for i, k in zip(ids, self.keep) if k]
        if not self.ids:
            raise ValueError(f"{probs_path}: no usable images")
        self.class_probs = None if self.meta.class_probs is None else self.meta.class_probs[self.keep]
        self.shape = self.meta.shape[1:3]

    def __len__(self):
        return len(self.ids)

    def batches(self, desc: str):
        """Yields (probs uint8 (n, H, W, 4) = round(255 p), truth bool (n, H, W, 4), class_probs (n, 4) or None)."""
        ids = [str(i) for i in self.meta.image_ids]
        start = 0
        with tqdm(total=len(self.ids), unit="img", desc=desc, disable=self.quiet) as bar:
            for q in self._chunks(self.chunk):
                rows = np.arange(start, start + len(q))
                start += len(q)
                keep = self.keep[rows]
                if not keep.any():
                    continue
                q = q[keep]
                truth = np.stack([kaggle.masks_from_rles(self.truth[ids[r]], self.shape) for r in rows[keep]]) > 0
                cp = None if self.meta.class_probs is None else self.meta.class_probs[rows[keep]]
                yield q, truth, cp
                bar.update(len(q))


# ---------------------------------------------------------------------------------------------- search


def tune(data: Data, base: PostprocessConfig, grid_t: np.ndarray, grid_a: np.ndarray, *, rounds: int = 2,
         n_boot: int = 2000, folds: int = 0, seed: int = 0) -> dict:
    """Coordinate ascent over (threshold, min area) a class, then exact scoring and bootstrap intervals."""
    thresholds, areas = list(base.thresholds), list(base.min_area)
    first_stats = None
    for r in range(max(1, rounds)):
        stats = gather_stats(data, base, tuple(thresholds), grid_t, desc=f"round {r + 1} statistics")
        first_stats = first_stats or stats
        changed = False
        for c in range(4):
            table = stats_dice(stats, c, grid_a, base.c_factor, data.class_probs).mean(axis=0)  # (T, A)
            ti, ai = np.unravel_index(np.argmax(table), table.shape)
            current = (int(np.flatnonzero(grid_t == thresholds[c])[0]), int(np.flatnonzero(grid_a == areas[c])[0]))
            if table[current] >= table[ti, ai] - 1e-12:  # no better than the current setting: keep it
                ti, ai = current
            new_t, new_a = float(grid_t[ti]), int(grid_a[ai])
            changed |= (new_t, new_a) != (thresholds[c], areas[c])
            thresholds[c], areas[c] = new_t, new_a
        if not changed:
            break
    tuned = PostprocessConfig(thresholds=thresholds, min_area=areas, min_component=base.min_component,
                              connectivity=base.connectivity, c_factor=base.c_factor)
    d_base, d_tuned = exact_dice(data, base, tuned)
    rng = np.random.default_rng(seed)
    boot = rng.integers(0, len(data), (n_boot, len(data)))
    report = {
        "images": len(data),
        "base": {"thresholds": list(base.thresholds), "min_area": list(base.min_area),
                 "score": float(d_base.mean()), "per_class": d_base.mean(axis=0).tolist()},
        "tuned": {"thresholds": thresholds, "min_area": areas, "score": float(d_tuned.mean()),
                  "per_class": d_tuned.mean(axis=0).tolist()},
        "gain": _interval((d_tuned - d_base).mean(axis=1), boot),
        "class_gain": [_interval((d_tuned[:, c] - d_base[:, c]) / 4.0, boot) for c in range(4)],
        "predict_flags": "--thresholds " + ",".join(f"{t:g}" for t in thresholds)
                         + " --min_area " + ",".join(str(a) for a in areas),
    }
    if folds > 1:
        report["cross_validated_gain"] = cross_validate(first_stats, base, grid_t, grid_a, data.class_probs, folds,
                                                        rng, boot)
    return report


def gather_stats(data: Data, base: PostprocessConfig, thresholds: tuple, grid_t: np.ndarray, desc: str) -> dict:
    """Per image: areas and intersections ``(N, 4, T)`` for every candidate threshold, truth areas ``(N, 4)``."""
    area, inter, truth_area = [], [], []
    for q, truth, _ in data.batches(desc):
        a, i, t = _stats_batch(jnp.asarray(q), jnp.asarray(truth), jnp.asarray(thresholds, jnp.float32),
                               jnp.asarray(grid_t, jnp.float32), min_component=base.min_component,
                               connectivity=base.connectivity, one_class=base.one_class_per_pixel)
        area.append(np.asarray(a))
        inter.append(np.asarray(i))
        truth_area.append(np.asarray(t))
    return {"area": np.concatenate(area), "inter": np.concatenate(inter), "truth": np.concatenate(truth_area),
            "grid_t": grid_t}


@functools.partial(jax.jit, static_argnames=("min_component", "connectivity", "one_class"))
def _stats_batch(q, truth, thresholds, grid_t, *, min_component: int, connectivity: int, one_class: bool):
    probs = q.astype(jnp.float32) / 255.0
    n, h, w, c = probs.shape
    areas, inters = [], []
    for k in range(c):
        if one_class:
            # Pixels another class takes whatever class k's threshold: above its own threshold and more
            # probable (ties: the lower class), exactly the rule of postprocess.
            others = (probs > thresholds) & (jnp.arange(c) != k)
            blocked = jnp.any(others & ((probs > probs[..., k:k + 1]) |
                                        ((probs == probs[..., k:k + 1]) & (jnp.arange(c) < k))), axis=-1)
        else:
            blocked = jnp.zeros((n, h, w), bool)
        masks = (probs[..., k:k + 1] > grid_t) & ~blocked[..., None]  # (n, H, W, T)
        if min_component > 1:
            masks = remove_small_components(masks, min_component, connectivity)
        areas.append(jnp.sum(masks, axis=(1, 2), dtype=jnp.int32))
        inters.append(jnp.sum(masks & truth[..., k:k + 1], axis=(1, 2), dtype=jnp.int32))
    return jnp.stack(areas, 1), jnp.stack(inters, 1), jnp.sum(truth, axis=(1, 2), dtype=jnp.int32)


def stats_dice(stats: dict, c: int, grid_a: np.ndarray, c_factor: float, class_probs) -> np.ndarray:
    """Per-image Dice ``(N, T, A)`` of class ``c`` for every candidate (threshold, min area)."""
    area = stats["area"][:, c, :, None].astype(np.float64)  # (N, T, 1)
    inter = stats["inter"][:, c, :, None].astype(np.float64)
    truth = stats["truth"][:, c, None, None].astype(np.float64)
    t0 = grid_a.astype(np.float32)[None, None, :]
    if class_probs is None:
        minimum = t0
    else:
        p = np.asarray(class_probs[:, c], np.float32)[:, None, None]
        minimum = t0 * np.float32(c_factor) - t0 * (np.float32(c_factor) - 1) * p
    kept = area.astype(np.float32) >= minimum
    total = area + truth
    dice_kept = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    dice_wiped = (truth == 0).astype(np.float64)
    return np.where(kept, dice_kept, dice_wiped)


def exact_dice(data: Data, *configs: PostprocessConfig) -> list[np.ndarray]:
    """Per-image, per-class Dice ``(N, 4)`` of each config, by the jit post-processing and metrics code."""
    out = [[] for _ in configs]
    for q, truth, cp in data.batches("exact scoring"):
        probs = jnp.asarray(q, jnp.float32) / 255.0
        for k, config in enumerate(configs):
            masks = postprocess(probs, config, None if cp is None else jnp.asarray(cp))
            out[k].append(np.asarray(dice_per_image_class(masks, jnp.asarray(truth)), np.float64))
    return [np.concatenate(o) for o in out]


def cross_validate(stats: dict, base: PostprocessConfig, grid_t, grid_a, class_probs, folds: int, rng, boot) -> dict:
    """K-fold estimate of the gain on unseen images, from the first round's statistics.

    Each fold's setting is chosen on the other folds and scored on it; the base is scored the same way.
    """
    n = stats["area"].shape[0]
    if folds > n:
        raise ValueError(f"--folds {folds} is more than the {n} images")
    fold = rng.permutation(n) % folds
    base_t = [int(np.argmin(np.abs(grid_t - t))) for t in base.thresholds]
    base_a = [int(np.argmin(np.abs(grid_a - a))) for a in base.min_area]
    gains = np.zeros((n, 4))
    for c in range(4):
        dice = stats_dice(stats, c, grid_a, base.c_factor, class_probs)  # (N, T, A)
        for f in range(folds):
            train, held = fold != f, fold == f
            table = dice[train].mean(axis=0)
            ti, ai = np.unravel_index(np.argmax(table), table.shape)
            if table[base_t[c], base_a[c]] >= table[ti, ai] - 1e-12:
                ti, ai = base_t[c], base_a[c]
            gains[held, c] = dice[held, ti, ai] - dice[held, base_t[c], base_a[c]]
    return {"folds": folds, **_interval(gains.mean(axis=1), boot)}


def _interval(values: np.ndarray, boot: np.ndarray) -> dict:
    means = values[boot].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "ci95": [float(low), float(high)], "within_noise": bool(low <= 0 <= high)}


# ------------------------------------------------------------------------------------------ plumbing


def _probabilities(args) -> tuple[str, bool]:
    """The saved probabilities to tune on: ``--probs`` as given, or computed from ``--checkpoint``."""
    if not args.checkpoint:
        if args.probs is None:
            raise ValueError("give --probs (saved by severjax-predict --save_probs) or --checkpoint with --images")
        if args.images or args.classifier:
            raise ValueError("--images/--classifier go with --checkpoint, not with saved --probs")
        return args.probs, False
    if args.images is None:
        raise ValueError("--checkpoint needs --images (a labelled folder)")
    ids = kaggle.list_images(args.images)
    ensemble = flags.ensemble_from_args(args)
    temporary = args.probs is None
    path = args.probs or tempfile.mkstemp(suffix=".npz", prefix="severjax-tune-")[1]
    writer = ProbsWriter(path, len(ids))
    try:
        for result in tqdm(predict_images(ensemble, [os.path.join(args.images, i) for i in ids], args.batch_size,
                                          keep_probs=True),
                           total=len(ids), unit="img", desc="predict", disable=args.quiet):
            writer.write(result.image_id, result.probs, result.class_probs)
        writer.close()
    except BaseException:
        writer.abort()
        if temporary and os.path.exists(path):
            os.remove(path)
        raise
    return path, temporary


def _print_report(report: dict) -> None:
    base, tuned = report["base"], report["tuned"]
    print(f"images: {report['images']}")
    for c in range(4):
        g = report["class_gain"][c]
        print(f"class {c + 1}: threshold {base['thresholds'][c]:g} -> {tuned['thresholds'][c]:g}, "
              f"min area {base['min_area'][c]} -> {tuned['min_area'][c]}: dice {base['per_class'][c]:.5f} -> "
              f"{tuned['per_class'][c]:.5f}; score {_gain_text(g)}")
    print(f"score: {base['score']:.5f} -> {tuned['score']:.5f}, {_gain_text(report['gain'])} (in-sample)")
    if "cross_validated_gain" in report:
        cv = report["cross_validated_gain"]
        print(f"{cv['folds']}-fold cross-validated gain on unseen images: {_gain_text(cv)}")
    print(f"predict.py flags: {report['predict_flags']}")


def _gain_text(g: dict) -> str:
    low, high = g["ci95"]
    verdict = "within noise" if g["within_noise"] else ("a real gain" if low > 0 else "a real loss")
    return f"{g['mean']:+.5f} (95% CI {low:+.5f}..{high:+.5f}: {verdict})"


if __name__ == "__main__":
    raise SystemExit(entry())
