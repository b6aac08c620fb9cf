"""A procedural steel-like data set in the Kaggle Severstal layout.

Real Severstal data cannot be shipped with the code, yet every stage (TFDS builder, training,
prediction, scoring) needs a folder that looks exactly like Kaggle's. ``make_dataset`` writes one:

    out/train_images/<9 hex>.jpg   256x1600 JPEG, three identical channels
    out/test_images/<9 hex>.jpg
    out/train.csv                  ImageId,ClassId,EncodedPixels  (defect rows only)
    out/sample_submission.csv      ImageId_ClassId,EncodedPixels  ("1 1" on every row, as Kaggle's)
    out/test_truth.csv             ImageId_ClassId,EncodedPixels  (ground truth, "" when empty)

Each image is a rolled-steel surface (streaks along the rolling direction, grain, uneven lighting,
sometimes a black band where the frame passes the sheet edge) carrying defects of four kinds:
1 clusters of small pits, 2 thin scratches (rare), 3 long streaks and patches (most common),
4 large dark blobs. A defect's label is the polygon whose texture was altered, computed in image
pixels, so the CSV masks are exact; no pixel belongs to two classes. Class and defect-free
frequencies follow the real training set.

Every image depends only on (seed, split, index): the output is byte-identical for a seed whatever
the worker count, and ``render_sample`` regenerates any single image and its masks.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
from typing import Any, NamedTuple

import cv2
import numpy as np

from severjax.data.kaggle import write_submission
from severjax.data.rle import rle_encode

HEIGHT, WIDTH = 256, 1600
NUM_CLASSES = 4
DEFECT_FREE_P = 0.47  # real train set: 5,902 of 12,568 images have no defect
CLASS_P = (0.126, 0.035, 0.726, 0.113)  # share of defect masks per class (897/247/5,150/801)
SECOND_CLASS_P = 0.065  # real: 7,095 masks on 6,666 defect images
JPEG_QUALITY = 90
SPLITS = ("train", "test")

# Smallest total area (pixels) a class may have in an image: post-processing wipes classes under
# 600/600/1000/2000 px, so labels sit comfortably above those.
MIN_CLASS_AREA = (800, 800, 2200, 2500)


class Sample(NamedTuple):
    """One generated image: uint8 (H, W) grayscale and bool (H, W, 4) masks."""

    image: np.ndarray
    masks: np.ndarray


def make_dataset(out_dir: str | os.PathLike, n_train: int, n_test: int, seed: int, *,
                 num_workers: int = 1, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Writes a synthetic Severstal folder (Kaggle layout) and returns a summary of what it holds.

    Raises FileExistsError when ``out_dir`` already holds a data set and ``overwrite`` is False
    (overwrite removes only the files and folders this function writes).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"image counts must be >= 0, got n_train={n_train}, n_test={n_test}")
    out_dir = os.fspath(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    names = image_names(seed, n_train, n_test)
    jobs = [(out_dir, seed, "train", i, names["train"][i]) for i in range(n_train)]
    jobs += [(out_dir, seed, "test", i, names["test"][i]) for i in range(n_test)]

    results = _run_jobs(jobs, num_workers, progress)
    rles: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for (_, _, split, _, name), image_rles in zip(jobs, results):
        rles[split][name] = image_rles

    write_submission(os.path.join(out_dir, "train.csv"), rles["train"], layout="post")
    write_submission(os.path.join(out_dir, "sample_submission.csv"),
                     {name: ["1 1"] * NUM_CLASSES for name in rles["test"]}, layout="competition")
    write_submission(os.path.join(out_dir, "test_truth.csv"), rles["test"], layout="competition")

    summary: dict[str, Any] = {"out_dir": out_dir, "seed": seed, "n_train": n_train, "n_test": n_test}
    for split in SPLITS:
        per_image = list(rles[split].values())
        summary[f"{split}_defect_free"] = sum(not any(r) for r in per_image)
        summary[f"{split}_masks_per_class"] = [sum(bool(r[c]) for r in per_image) for c in range(NUM_CLASSES)]
    return summary


def render_sample(seed: int, split: str, index: int) -> Sample:
    """Generates image ``index`` of ``split`` for ``seed`` (what make_dataset writes, before JPEG)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    image, valid = _surface(rng)
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)  # 0 = no defect, c + 1 = class c
    for cls in _plan_classes(rng):
        _add_class(rng, image, labels, valid, cls)
    gray = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    masks = labels[..., None] == np.arange(1, NUM_CLASSES + 1, dtype=np.uint8)
    return Sample(gray, masks)


def image_names(seed: int, n_train: int, n_test: int) -> dict[str, list[str]]:
    """Unique Kaggle-style names ("<9 hex digits>.jpg"): the first n_train go to train, the rest to test.

    Train names do not depend on n_test (one stream of names, split in order).
    """
    rng = np.random.default_rng([seed, len(SPLITS)])
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n_train + n_test:
        for value in rng.integers(0, 16 ** 9, size=n_train + n_test - len(names)):
            name = f"{int(value):09x}.jpg"
            if name not in seen:
                seen.add(name)
                names.append(name)
    return {"train": names[:n_train], "test": names[n_train:]}


# ---------------------------------------------------------------------------------------------
# Writing


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    owned = ["train_images", "test_images", "train.csv", "sample_submission.csv", "test_truth.csv"]
    present = [p for p in owned if os.path.exists(os.path.join(out_dir, p))]
    if present and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a data set ({', '.join(present)}); "
                              "pass overwrite=True (--overwrite) to replace it")
    for p in present:
        path = os.path.join(out_dir, p)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for split in SPLITS:
        os.makedirs(os.path.join(out_dir, f"{split}_images"))


def _run_jobs(jobs: list[tuple], num_workers: int, progress: bool) -> list[list[str]]:
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="img", desc="synthetic")
    results: list[list[str]] = []
    if num_workers <= 1 or len(jobs) < 2:
        for job in jobs:
            results.append(_write_image(job))
            if bar is not None:
                bar.update()
    else:
        # spawn: the parent may hold JAX threads, which fork does not copy safely.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            for image_rles in pool.map(_write_image, jobs, chunksize=8):
                results.append(image_rles)
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    return results


def _write_image(job: tuple) -> list[str]:
    out_dir, seed, split, index, name = job
    sample = render_sample(seed, split, index)
    path = os.path.join(out_dir, f"{split}_images", name)
    bgr = cv2.merge([sample.image] * 3)
    if not cv2.imwrite(path, bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {path}")
    return [rle_encode(sample.masks[..., c]) for c in range(NUM_CLASSES)]


# ---------------------------------------------------------------------------------------------
# Surface


def _surface(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """A bare steel frame (float32, 0..255) and the x range [lo, hi) that shows steel."""
    h, w = HEIGHT, WIDTH
    base = rng.uniform(70.0, 115.0)
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)
    # Uneven lighting: a slow wave along the sheet and a gentle gradient across it.
    light_x = 1.0 + rng.uniform(0.03, 0.12) * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * x + rng.uniform(0, 2 * np.pi))
    light_y = 1.0 + rng.uniform(-0.08, 0.08) * (y - 0.5)
    image = base * light_y[:, None] * light_x[None, :]
    # Rolling marks: noise stretched along the rolling direction (mostly along the image height,
    # sometimes along its length), plus a finer, shorter set.
    vertical = rng.random() < 0.7
    image += _streaks(rng, vertical, rng.uniform(3.0, 8.0), stretch=int(rng.integers(16, 64)))
    image += _streaks(rng, vertical, rng.uniform(1.5, 4.0), stretch=4)
    image += rng.standard_normal((h, w), dtype=np.float32) * np.float32(rng.uniform(2.0, 6.0))
    lo, hi = 0, w
    if rng.random() < 0.15:  # frame runs past the sheet edge: a black band on one side
        band = int(rng.integers(60, 500))
        edge = np.clip((np.arange(w, dtype=np.float32) - band) / rng.uniform(4.0, 20.0) + 0.5, 0.0, 1.0)
        if rng.random() < 0.5:
            lo = band + 30
        else:
            edge = edge[::-1]
            hi = w - band - 30
        dark = rng.uniform(2.0, 14.0) + rng.standard_normal((h, w), dtype=np.float32) * 2.0
        image = image * edge[None, :] + dark * (1.0 - edge[None, :])
    return image.astype(np.float32), (lo, hi)


def _streaks(rng: np.random.Generator, vertical: bool, amplitude: float, stretch: int) -> np.ndarray:
    """Zero-mean noise stretched ``stretch`` times along one axis (vertical: along the height)."""
    if vertical:
        small = rng.standard_normal((max(HEIGHT // stretch, 2), WIDTH), dtype=np.float32)
    else:
        small = rng.standard_normal((HEIGHT, max(WIDTH // stretch, 2)), dtype=np.float32)
    return cv2.resize(small, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR) * np.float32(amplitude)


# ---------------------------------------------------------------------------------------------
# Defects


def _plan_classes(rng: np.random.Generator) -> list[int]:
    """Classes (0-based) present in one image: none ~47%, one usually, sometimes two."""
    if rng.random() < DEFECT_FREE_P:
        return []
    p = np.asarray(CLASS_P)
    first = int(rng.choice(NUM_CLASSES, p=p / p.sum()))
    if rng.random() >= SECOND_CLASS_P:
        return [first]
    rest = p.copy()
    rest[first] = 0.0
    return [first, int(rng.choice(NUM_CLASSES, p=rest / rest.sum()))]


_MAX_INSTANCES = (3, 2, 3, 2)


def _add_class(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray,
               valid: tuple[int, int], cls: int) -> None:
    """Paints 1..n instances of class ``cls`` onto free surface; tops up until its area is sensible."""
    count = 1 + int(rng.binomial(_MAX_INSTANCES[cls] - 1, 0.3))
    area = 0
    for attempt in range(count + 4):
        if attempt >= count and area >= MIN_CLASS_AREA[cls]:
            break
        region = _place(rng, labels, valid, cls)
        if region is None:
            continue
        (y0, y1, x0, x1), mask = region
        _PAINTERS[cls](rng, image[y0:y1, x0:x1], mask)
        labels[y0:y1, x0:x1][mask] = cls + 1
        area += int(mask.sum())


def _place(rng: np.random.Generator, labels: np.ndarray, valid: tuple[int, int], cls: int):
    """A free defect region: ((y0, y1, x0, x1), bool mask of that box) or None after 8 tries.

    A region that would touch another defect or leave the steel is redrawn, so classes never
    overlap and labels never fall on the black band.
    """
    lo, hi = valid
    for _ in range(8):
        points = _SHAPES[cls](rng)  # polygon around (0, 0), float (n, 2) as (x, y)
        cx = rng.uniform(lo, hi)
        cy = rng.uniform(0, HEIGHT)
        points = np.rint(points + [cx, cy]).astype(np.int32)
        x0, y0 = np.maximum(points.min(0), [lo, 0])
        x1, y1 = np.minimum(points.max(0) + 1, [hi, HEIGHT])
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        box = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(box, [points - [x0, y0]], 1)
        mask = box.astype(bool)
        if mask.sum() < MIN_CLASS_AREA[cls] // 2:
            continue
        # keep a 6 px gap to other defects
        gy0, gy1, gx0, gx1 = max(y0 - 6, 0), min(y1 + 6, HEIGHT), max(x0 - 6, 0), min(x1 + 6, WIDTH)
        if labels[gy0:gy1, gx0:gx1].any():
            grown = cv2.dilate(np.pad(box, ((y0 - gy0, gy1 - y1), (x0 - gx0, gx1 - x1))),
                               np.ones((13, 13), np.uint8))
            if (labels[gy0:gy1, gx0:gx1][grown.astype(bool)] > 0).any():
                continue
        return (int(y0), int(y1), int(x0), int(x1)), mask
    return None


def _blob(rng: np.random.Generator, rx: float, ry: float, n: int, jitter: float = 0.25,
          angle: float = 0.0) -> np.ndarray:
    """An irregular polygon around (0, 0): n vertices on a jittered, rotated ellipse."""
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(1.0 - jitter, 1.0 + jitter / 2, n)
    pts = np.stack([rx * r * np.cos(t), ry * r * np.sin(t)], axis=1)
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _shape_pits(rng):
    return _blob(rng, rng.uniform(22, 70), rng.uniform(18, 60), int(rng.integers(7, 13)))


def _shape_scratch(rng):
    # A thin band, mostly across the sheet (near vertical), labelled 12-24 px wide.
    half_len = rng.uniform(45, 130)
    half_wid = rng.uniform(6, 12)
    angle = np.pi / 2 + rng.uniform(-0.5, 0.5)
    return _blob(rng, half_len, half_wid, 10, jitter=0.1, angle=angle)


def _shape_streak(rng):
    if rng.random() < 0.55:  # long streak along the sheet
        return _blob(rng, rng.uniform(120, 450), rng.uniform(12, 40), int(rng.integers(10, 18)),
                     jitter=0.2, angle=rng.uniform(-0.08, 0.08))
    return _blob(rng, rng.uniform(50, 160), rng.uniform(30, 100), int(rng.integers(8, 14)),
                 angle=rng.uniform(-0.5, 0.5))


def _shape_dark(rng):
    return _blob(rng, rng.uniform(55, 170), rng.uniform(45, 120), int(rng.integers(8, 14)), jitter=0.3)


def _soft(mask: np.ndarray, width: int) -> np.ndarray:
    """Alpha in [0, 1] that is 0 outside the mask and rises to 1 within ``width`` px of its edge."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    return np.clip(dist / max(width, 1), 0.0, 1.0).astype(np.float32)


def _paint_pits(rng, crop: np.ndarray, mask: np.ndarray) -> None:
    h, w = mask.shape
    layer = np.zeros((h, w), np.float32)
    n = max(int(mask.sum() / rng.uniform(35, 70)), 12)
    ys, xs = np.nonzero(mask)
    pick = rng.integers(0, ys.size, n)
    sign = -1.0 if rng.random() < 0.7 else 1.0
    for y, x, r, v in zip(ys[pick], xs[pick], rng.integers(1, 4, n), rng.uniform(45, 95, n)):
        cv2.circle(layer, (int(x), int(y)), int(r), float(sign * v), -1, lineType=cv2.LINE_AA)
    crop += (layer - 8.0) * _soft(mask, 4)


def _paint_scratch(rng, crop: np.ndarray, mask: np.ndarray) -> None:
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    # Draw the scratch along the band's principal axis.
    pts = np.stack([xs, ys], 1).astype(np.float32)
    mean = pts.mean(0)
    _, vecs = np.linalg.eigh(np.cov((pts - mean).T))
    axis = vecs[:, -1]
    proj = (pts - mean) @ axis
    a = mean + axis * proj.min() * 0.95
    b = mean + axis * proj.max() * 0.95
    layer = np.zeros((h, w), np.float32)
    value = rng.uniform(70, 120) * (1.0 if rng.random() < 0.6 else -1.0)
    cv2.line(layer, tuple(int(v) for v in a), tuple(int(v) for v in b), float(value),
             int(rng.integers(2, 5)), lineType=cv2.LINE_AA)
    layer = cv2.GaussianBlur(layer, (0, 0), 1.0)
    crop += (layer - 10.0) * _soft(mask, 3)


def _paint_streak(rng, crop: np.ndarray, mask: np.ndarray) -> None:
    h, w = mask.shape
    # Scratch-like lines along the sheet plus a brightness shift; bright or dark.
    lines = rng.standard_normal((h, max(w // 40, 2)), dtype=np.float32)
    lines = cv2.resize(lines, (w, h), interpolation=cv2.INTER_LINEAR) * np.float32(rng.uniform(18, 30))
    grain = rng.standard_normal((h, w), dtype=np.float32) * np.float32(rng.uniform(5, 10))
    shift = rng.uniform(18, 50) * (1.0 if rng.random() < 0.55 else -1.0)
    crop += (shift + lines + grain) * _soft(mask, 6)


def _paint_dark(rng, crop: np.ndarray, mask: np.ndarray) -> None:
    h, w = mask.shape
    mottle = rng.standard_normal((max(h // 12, 2), max(w // 12, 2)), dtype=np.float32)
    mottle = cv2.resize(mottle, (w, h), interpolation=cv2.INTER_CUBIC)
    factor = rng.uniform(0.3, 0.55) + 0.08 * mottle
    alpha = _soft(mask, 10)
    crop[...] = crop * (1.0 - alpha * (1.0 - factor)) + alpha * mottle * 6.0


_SHAPES = (_shape_pits, _shape_scratch, _shape_streak, _shape_dark)
_PAINTERS = (_paint_pits, _paint_scratch, _paint_streak, _paint_dark)
