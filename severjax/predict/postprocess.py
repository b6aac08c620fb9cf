"""Post-processing: a batch of class probabilities -> the boolean defect masks that get submitted.

``postprocess`` does every step in one jit-compiled function, in this order:

1. threshold: a pixel is a candidate for class c where ``p_c > thresholds[c]``;
2. one class per pixel: among the candidate classes keep the most probable (ties: the lower class);
   the original solution "kept the highest prediction per pixel";
3. optional: remove connected components smaller than ``min_component`` pixels (8-connectivity by
   default, as ``cv2.connectedComponents`` and ``scipy.ndimage.label(structure=ones((3, 3)))``; 4 on request;
   ``severjax.predict.components``);
4. minimum area: a class with fewer than ``min_area[c]`` pixels left in an image is wiped. With
   classifier probabilities ``p`` (one per image and class) the minimum is gated,
   ``min_area = t0 * c - t0 * (c - 1) * p`` with ``t0 = min_area[c]`` and ``c = c_factor``: a confident
   classifier (p = 1) keeps ``t0``, a doubtful one (p = 0) asks for ``c`` times as many pixels;
5. optional ``dilate x dilate`` dilation (odd size, centred, as ``cv2.dilate``/``scipy``): grown pixels only
   fill pixels no class holds; where two classes grow into the same pixel the more probable one wins.

``reference_postprocess`` is the same pipeline in plain numpy/scipy, the yardstick of the tests and of
the benchmarks.

For a submission the work is split where it is cheapest (``postprocess_for_rle`` then ``finish_rles``):
the device does the per-pixel steps and hands over one uint8 plane an image - the class of each pixel
(``RunLabels``), 4x smaller than the four boolean masks; the host reads that plane column by column (the
RLE order) as vertical runs of one class and does the rest on the runs, O(runs) rather than O(pixels):
small-component removal by joining runs that touch in neighbouring columns (where
``severjax.ops.policy`` puts small components on the host: CPU), the minimum areas, the Kaggle text of
the whole batch at once (``severjax.data.rle.runs_to_rles``) and, on request, the masks.

On CPU, XLA reduces a 0/1 mask over (H, W) far faster in 16-bit integers than in 32-bit ones, so areas are
counted in two stages: uint16 over H (at most 65535 rows), then int32 over W; and the most probable class
is picked by a running maximum over the classes rather than an ``argmax`` over a -inf-masked copy (same
ties: the lower class). Both are in docs/performance.md, "Post-processing and RLE".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from severjax.data.rle import runs_to_rles
from severjax.ops import policy
from severjax.predict.components import (plane_columns, remove_small_components, run_component_sizes, run_pixels,
                                         vertical_runs)

DEFAULT_THRESHOLDS = (0.5, 0.5, 0.5, 0.5)
DEFAULT_MIN_AREA = (600, 600, 1000, 2000)
DEFAULT_C_FACTOR = 5.0


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    """Static post-processing settings (hashable: jit specialises on them).

    thresholds: per-class probability thresholds (strictly greater passes).
    min_area: per-class minimum pixel count; a class with fewer pixels in an image is wiped.
    min_component: connected components with fewer pixels are removed first (0 = off).
    connectivity: 8 (default, cv2/scipy-with-ones((3,3))) or 4, for ``min_component``.
    dilate: odd kernel size of a final ``dilate x dilate`` dilation (0 or 1 = off).
    c_factor: classifier gating factor ``c`` of ``min_area = t0*c - t0*(c-1)*p`` (used when classifier
        probabilities are passed).
    one_class_per_pixel: keep only the most probable of the classes above threshold at each pixel.
    """

    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    min_area: tuple[int, ...] = DEFAULT_MIN_AREA
    min_component: int = 0
    connectivity: int = 8
    dilate: int = 0
    c_factor: float = DEFAULT_C_FACTOR
    one_class_per_pixel: bool = True

    def __post_init__(self):
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        object.__setattr__(self, "min_area", tuple(int(a) for a in self.min_area))
        if not 0 < len(self.thresholds) < 256:
            raise ValueError(f"thresholds {self.thresholds}: 1 to 255 classes (class ids are uint8)")
        if len(self.thresholds) != len(self.min_area):
            raise ValueError(f"thresholds {self.thresholds} and min_area {self.min_area} must have one value a class")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds {self.thresholds} must lie in [0, 1]")
        if any(a < 0 for a in self.min_area):
            raise ValueError(f"min_area {self.min_area} must be >= 0")
        if self.min_component < 0:
            raise ValueError(f"min_component {self.min_component} must be >= 0")
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity {self.connectivity} must be 4 or 8")
        if self.dilate < 0 or (self.dilate > 1 and self.dilate % 2 == 0):
            raise ValueError(f"dilate {self.dilate} must be 0 (off) or an odd kernel size")
        if self.c_factor < 1.0:
            raise ValueError(f"c_factor {self.c_factor} must be >= 1 (1 = no gating)")

    @property
    def num_classes(self) -> int:
        return len(self.thresholds)


def postprocess(probs, config: PostprocessConfig = PostprocessConfig(), class_probs=None):
    """Masks bool ``(B, H, W, C)`` from probabilities ``(B, H, W, C)`` (and classifier probabilities ``(B, C)``)."""
    return _postprocess_hwc(probs, class_probs, config=config)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["labels", "minimum"],
                   meta_fields=["min_component", "connectivity"])
@dataclasses.dataclass(frozen=True)
class RunLabels:
    """The device half of the submission post-processing (``postprocess_for_rle``), for ``finish_rles``.

    labels: uint8 ``(B, P, H + 1, W)``. With one class per pixel ``P = 1``: 0 background, ``k + 1`` class k;
        otherwise ``P = C`` planes of 0/1, plane k for class k. The last row is 0: read column by column
        (the RLE order) it closes every column, so a run of the plane never wraps into the next column.
    minimum: float32 ``(B, C)``: the minimum areas still to apply (0 where the device already did).
    min_component, connectivity: the small-component removal still to do on the host (0: none).
    """

    labels: jax.Array
    minimum: jax.Array
    min_component: int = 0
    connectivity: int = 8


class RleResult(NamedTuple):
    """``finish_rles``' output: RLE strings ``[[per class] per image]``, int32 areas ``(B, C)`` of the
    submitted masks, and the bool masks ``(B, H, W, C)`` themselves when asked for (else None)."""

    rles: list[list[str]]
    areas: np.ndarray
    masks: np.ndarray | None


def postprocess_for_rle(probs, config: PostprocessConfig = PostprocessConfig(), class_probs=None, *,
                        components_on_host: bool | None = None) -> RunLabels:
    """The device steps of ``postprocess`` for a submission: ``RunLabels`` for ``finish_rles`` (which gives
    the same masks as ``postprocess``, as RLE). Traceable: call it inside a larger jit.

    ``components_on_host`` (default: where ``policy.choose("small_components")`` says "host") leaves
    small-component removal and with it the minimum areas to the host, where runs make it cheap; a dilation
    always runs on the device, after both.
    """
    if components_on_host is None:
        components_on_host = policy.choose("small_components") == "host"
    return _postprocess_for_rle(probs, class_probs, config=config, components_on_host=bool(components_on_host))


def finish_rles(runs: RunLabels, keep_masks: bool = False) -> RleResult:
    """The host steps after ``postprocess_for_rle``: component removal and minimum areas where still to do,
    then the Kaggle RLE of every (image, class), one vectorised pass over the batch's runs."""
    labels = np.asarray(runs.labels)
    minimum = np.asarray(runs.minimum, np.float32)
    b, planes, rows, w = labels.shape
    h, c = rows - 1, minimum.shape[-1]
    if minimum.shape != (b, c) or labels.dtype != np.uint8:
        raise ValueError(f"RunLabels: labels must be uint8 (B, P, H + 1, W) and minimum (B, C), got "
                         f"{labels.dtype} {labels.shape} and {minimum.shape}")
    key, col, top, bottom = vertical_runs(plane_columns(labels), planes, w, c)
    if runs.min_component > 1:
        big = run_component_sizes(key, col, top, bottom, w, h, runs.connectivity) >= runs.min_component
        key, col, top, bottom = key[big], col[big], top[big], bottom[big]
    areas = np.bincount(key, weights=bottom - top, minlength=b * c).astype(np.int64)
    keep = areas.astype(np.float32) >= minimum.reshape(-1)
    kept = keep[key]
    key, col, top, bottom = key[kept], col[kept], top[kept], bottom[kept]
    areas = np.where(keep, areas, 0).astype(np.int32).reshape(b, c)
    texts = runs_to_rles(key, col * h + top, col * h + bottom, b * c)
    rles = [texts[i * c:(i + 1) * c] for i in range(b)]
    masks = _runs_to_masks(key, col, top, bottom, (b, h, w, c)) if keep_masks else None
    return RleResult(rles, areas, masks)


def mask_areas(masks):
    """Pixel count of each (image, class) of bool ``(B, H, W, C)`` masks: int32 ``(B, C)`` (two stages, see above)."""
    b, h, w, c = masks.shape
    if h > np.iinfo(np.uint16).max:
        return jnp.sum(masks, axis=(1, 2), dtype=jnp.int32)
    per_column = jnp.sum(masks.reshape(b, h, w * c), axis=1, dtype=jnp.uint16)
    return jnp.sum(per_column.astype(jnp.int32).reshape(b, w, c), axis=1)


def gated_min_area(min_area: Sequence[float], class_probs, c_factor: float):
    """``t0*c - t0*(c-1)*p`` per image and class (float32 ``(B, C)``)."""
    t0 = jnp.asarray(min_area, jnp.float32)
    c = jnp.float32(c_factor)
    return t0 * c - t0 * (c - 1.0) * jnp.asarray(class_probs, jnp.float32)


def reference_postprocess(probs: np.ndarray, config: PostprocessConfig = PostprocessConfig(),
                          class_probs: np.ndarray | None = None) -> np.ndarray:
    """The same pipeline in plain numpy/scipy, image by image (the tests' and benchmark's yardstick)."""
    from scipy import ndimage

    probs = np.asarray(probs, np.float32)
    b, h, w, c = probs.shape
    masks = probs > np.asarray(config.thresholds, np.float32)
    if config.one_class_per_pixel:
        masks = _keep_most_probable_np(masks, probs)
    if config.min_component > 1:
        structure = np.ones((3, 3), bool) if config.connectivity == 8 else ndimage.generate_binary_structure(2, 1)
        for i in range(b):
            for k in range(c):
                labels, _ = ndimage.label(masks[i, :, :, k], structure=structure)
                sizes = np.bincount(labels.ravel())
                small = sizes < config.min_component
                small[0] = False
                masks[i, :, :, k] &= ~small[labels]
    if class_probs is None:
        minimum = np.broadcast_to(np.asarray(config.min_area, np.float32), (b, c))
    else:
        t0 = np.asarray(config.min_area, np.float32)
        cf = np.float32(config.c_factor)
        minimum = t0 * cf - t0 * (cf - np.float32(1.0)) * np.asarray(class_probs, np.float32)
    areas = masks.sum(axis=(1, 2))
    masks &= (areas.astype(np.float32) >= minimum)[:, None, None, :]
    if config.dilate > 1:
        structure = np.ones((config.dilate, config.dilate), bool)
        grown = np.stack([np.stack([ndimage.binary_dilation(masks[i, :, :, k], structure=structure)
                                    for k in range(c)], axis=-1) for i in range(b)])
        free = ~masks.any(axis=-1, keepdims=True)
        masks |= _keep_most_probable_np(grown & free, probs)
    return masks


def _keep_most_probable_np(candidates: np.ndarray, probs: np.ndarray) -> np.ndarray:
    best = np.argmax(np.where(candidates, probs, -np.inf), axis=-1)
    return candidates & (best[..., None] == np.arange(probs.shape[-1]))


@functools.partial(jax.jit, static_argnames=("config",))
def _postprocess_hwc(probs, class_probs, *, config: PostprocessConfig):
    return _pipeline(probs, class_probs, config)[0]


@functools.partial(jax.jit, static_argnames=("config", "components_on_host"))
def _postprocess_for_rle(probs, class_probs, *, config: PostprocessConfig, components_on_host: bool) -> RunLabels:
    """Class planes for the host; the whole pipeline first where the device must do more than thresholds."""
    probs = _checked_probs(probs, config)
    host_components = config.min_component > 1 and config.dilate <= 1 and components_on_host
    if config.dilate > 1 or (config.min_component > 1 and not host_components):
        masks, _ = _pipeline(probs, class_probs, config)
        minimum = jnp.zeros((probs.shape[0], config.num_classes), jnp.float32)
        if config.one_class_per_pixel:  # at most one class a pixel, dilation included
            ids = jnp.arange(1, config.num_classes + 1, dtype=jnp.uint8)
            labels = jnp.sum(jnp.where(masks, ids, jnp.uint8(0)), axis=-1, dtype=jnp.uint8)[:, None]
        else:
            labels = jnp.transpose(masks, (0, 3, 1, 2)).astype(jnp.uint8)
    else:
        minimum = _minimum_area(config, class_probs, probs.shape[0])
        if config.one_class_per_pixel:
            labels = _most_probable_class(probs, config.thresholds)[:, None]
        else:
            masks = probs > jnp.asarray(config.thresholds, jnp.float32)
            labels = jnp.transpose(masks, (0, 3, 1, 2)).astype(jnp.uint8)
    labels = jnp.pad(labels, ((0, 0), (0, 0), (0, 1), (0, 0)))
    return RunLabels(labels, minimum, config.min_component if host_components else 0, config.connectivity)


def _checked_probs(probs, config: PostprocessConfig):
    probs = jnp.asarray(probs, jnp.float32)
    if probs.ndim != 4 or probs.shape[-1] != config.num_classes:
        raise ValueError(f"probabilities must be (B, H, W, {config.num_classes}), got {probs.shape}")
    return probs


def _minimum_area(config: PostprocessConfig, class_probs, batch: int):
    """float32 ``(B, C)``: the plain minimum areas, or the classifier-gated ones."""
    if class_probs is None:
        return jnp.broadcast_to(jnp.asarray(config.min_area, jnp.float32), (batch, config.num_classes))
    if class_probs.shape != (batch, config.num_classes):
        raise ValueError(f"classifier probabilities must be {(batch, config.num_classes)}, got {class_probs.shape}")
    return gated_min_area(config.min_area, class_probs, config.c_factor)


def _pipeline(probs, class_probs, config: PostprocessConfig):
    """The whole post-processing: ``(masks bool (B, H, W, C), areas int32 (B, C))``."""
    probs = _checked_probs(probs, config)
    if config.one_class_per_pixel:
        best = _most_probable_class(probs, config.thresholds)
        masks = best[..., None] == jnp.arange(1, config.num_classes + 1, dtype=jnp.uint8)
    else:
        masks = probs > jnp.asarray(config.thresholds, jnp.float32)
    if config.min_component > 1:
        masks = remove_small_components(masks, config.min_component, config.connectivity)
    areas = mask_areas(masks)
    keep = areas.astype(jnp.float32) >= _minimum_area(config, class_probs, probs.shape[0])
    masks = masks & keep[:, None, None, :]
    if config.dilate > 1:
        masks = _dilate(masks, probs, config.dilate)
        return masks, mask_areas(masks)
    return masks, jnp.where(keep, areas, 0)


def _most_probable_class(probs, thresholds: Sequence[float]):
    """uint8 ``(B, H, W)``: 0 where no class passes its threshold, else 1 + the most probable class that does
    (ties: the lower class), by a running maximum over the classes."""
    best = jnp.zeros(probs.shape[:-1], jnp.uint8)
    top = jnp.full(probs.shape[:-1], -jnp.inf, probs.dtype)
    for k, threshold in enumerate(thresholds):
        p = probs[..., k]
        take = (p > jnp.float32(threshold)) & (p > top)
        best = jnp.where(take, jnp.uint8(k + 1), best)
        top = jnp.where(take, p, top)
    return best


def _keep_most_probable(candidates, probs):
    """Keeps, at each pixel, only the most probable candidate class (ties: the lowest index)."""
    score = jnp.where(candidates, probs, -jnp.inf)
    best = jnp.argmax(score, axis=-1)
    return candidates & (best[..., None] == jnp.arange(probs.shape[-1]))


def _dilate(masks, probs, size: int):
    grown = jax.lax.reduce_window(masks, False, jax.lax.bitwise_or, (1, size, size, 1), (1, 1, 1, 1), "SAME")
    free = ~jnp.any(masks, axis=-1, keepdims=True)
    return masks | _keep_most_probable(grown & free, probs)


def _runs_to_masks(key, col, top, bottom, shape) -> np.ndarray:
    """bool ``(B, H, W, C)`` masks from vertical runs."""
    b, h, w, c = shape
    masks = np.zeros(shape, bool)
    run, row = run_pixels(top, bottom)
    image, cls = np.divmod(key[run], c)
    masks[image, row, col[run], cls] = True
    return masks
