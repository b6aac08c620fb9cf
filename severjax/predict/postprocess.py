"""Post-processing: a batch of class probabilities -> the boolean defect masks that get submitted.

``postprocess`` does every step in one jit-compiled function, in this order:

1. threshold: a pixel is a candidate for class c where ``p_c > thresholds[c]``;
2. one class per pixel: among the candidate classes keep the most probable (ties: the lower class);
   the original solution "kept the highest prediction per pixel";
3. optional: remove connected components smaller than ``min_component`` pixels (8-connectivity by
   default, as ``cv2.connectedComponents`` and ``scipy.ndimage.label(structure=ones((3, 3)))``; 4 on request);
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
small-component removal by joining runs that touch in neighbouring columns (on CPU, where labelling the
pixels with XLA costs ~20 ms an image; accelerators label on the device), the minimum areas, the Kaggle
text of the whole batch at once (``severjax.data.rle.format_runs``) and, on request, the masks.

CPU note: XLA reduces a 0/1 mask over (H, W) far faster in 16-bit integers than in 32-bit ones (measured
~0.5 vs ~15 ms an image), so areas are counted in two stages: uint16 over H (at most 65535 rows), then
int32 over W. The most probable class is picked by a running maximum over the classes rather than an
``argmax`` over a -inf-masked copy (~4x faster, same ties: the lower class).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from severjax.data.rle import format_runs, rle_encode

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

    ``components_on_host`` (default: on CPU) leaves small-component removal and with it the minimum areas to
    the host, where runs make it cheap; a dilation always runs on the device, after both.
    """
    if components_on_host is None:
        components_on_host = jax.default_backend() == "cpu"
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
    key, col, top, bottom = _vertical_runs(_columns(labels), planes, w, c)
    if runs.min_component > 1:
        big = _run_component_sizes(key, col, top, bottom, w, h, runs.connectivity) >= runs.min_component
        key, col, top, bottom = key[big], col[big], top[big], bottom[big]
    areas = np.bincount(key, weights=bottom - top, minlength=b * c).astype(np.int64)
    keep = areas.astype(np.float32) >= minimum.reshape(-1)
    kept = keep[key]
    key, col, top, bottom = key[kept], col[kept], top[kept], bottom[kept]
    areas = np.where(keep, areas, 0).astype(np.int32).reshape(b, c)
    texts = _rle_texts(key, col * h + top, col * h + bottom, b * c)
    rles = [texts[i * c:(i + 1) * c] for i in range(b)]
    masks = _runs_to_masks(key, col, top, bottom, (b, h, w, c)) if keep_masks else None
    return RleResult(rles, areas, masks)


def masks_to_rles(masks: np.ndarray, areas: np.ndarray) -> list[list[str]]:
    """Kaggle RLE strings ``[[rle per class] per image]`` of masks ``(B, H, W, C)``; only non-empty ones are encoded."""
    masks = np.asarray(masks)
    areas = np.asarray(areas)
    return [[rle_encode(masks[b, :, :, c]) if areas[b, c] else "" for c in range(masks.shape[-1])]
            for b in range(masks.shape[0])]


def mask_areas(masks):
    """Pixel count of each (image, class) of bool ``(B, H, W, C)`` masks: int32 ``(B, C)`` (see the CPU note)."""
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
    (ties: the lower class) - a running maximum, cheaper on CPU than an argmax over a masked copy."""
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


COMPONENT_METHODS = ("host", "per_plane", "all")


def remove_small_components(masks, min_size: int, connectivity: int, method: str | None = None):
    """Drops connected components (per image and class) of bool ``(B, H, W, C)`` smaller than ``min_size`` pixels.

    ``method``: ``"all"`` labels every (image, class) plane at once on the device (the default on
    accelerators); ``"per_plane"`` goes plane by plane (``lax.map``), skipping empty planes with ``lax.cond``;
    ``"host"`` (the default on CPU) hands the planes to a host callback that labels runs of pixels down the
    columns and clears the small components' pixels (``_host_remove_small_components``: ~5x faster than
    XLA's pixel labelling on CPU). All give the same masks.
    """
    if method is None:
        method = "host" if jax.default_backend() == "cpu" else "all"
    if method not in COMPONENT_METHODS:
        raise ValueError(f"unknown component method {method!r}: use one of {COMPONENT_METHODS}")
    b, h, w, c = masks.shape
    planes = jnp.transpose(masks, (0, 3, 1, 2))  # (B, C, H, W): one labelling problem per plane
    if method == "host":
        keep = jax.pure_callback(functools.partial(_host_remove_small_components, min_size=min_size,
                                                   connectivity=connectivity),
                                 jax.ShapeDtypeStruct(planes.shape, jnp.bool_), planes)
    elif method == "per_plane":
        def one(plane):
            return jax.lax.cond(jnp.any(plane),
                                lambda p: p & (component_sizes(p[None], connectivity)[0] >= min_size),
                                lambda p: p, plane)

        keep = jax.lax.map(one, planes.reshape(b * c, h, w)).reshape(b, c, h, w)
    else:
        keep = planes & (component_sizes(planes, connectivity) >= min_size)
    return jnp.transpose(keep, (0, 2, 3, 1))


def component_sizes(planes, connectivity: int = 8):
    """Pixel count of each foreground pixel's connected component (0 on background), int32 like ``planes``.

    ``planes`` is boolean ``(..., H, W)``; each plane is labelled on its own. See ``_label_graph``.
    With 8-connectivity the graph's nodes are 2x2 pixel blocks (the pixels of a block all touch each
    other, so they share a component: 4x fewer nodes for the costly gathers); with 4-connectivity they
    are pixels.
    """
    nodes, counts, edges, expand = _component_graph(planes, connectivity)
    labels, _ = _label_graph(nodes, edges)
    total = labels.size
    flat = labels.reshape(-1)
    sizes = jnp.zeros(total + 1, jnp.int32).at[flat].add(counts.reshape(-1))  # background -> sentinel slot
    return jnp.where(planes, expand(sizes[flat].reshape(labels.shape)), 0)


def label_components(planes, connectivity: int = 8):
    """Pixel-level component labels of boolean ``(..., H, W)`` planes: background -1, else the node id
    of the component's first graph node (equal ids = same component; ids are not consecutive)."""
    nodes, _, edges, expand = _component_graph(planes, connectivity)
    labels, _ = _label_graph(nodes, edges)
    return jnp.where(planes, expand(labels), -1)


# Forward directions (row step, column step); each edge is also walked backwards.
_DIRECTIONS = {4: ((0, 1), (1, 0)), 8: ((0, 1), (1, 0), (1, 1), (1, -1))}


def _component_graph(planes, connectivity: int):
    """Nodes (bool grid), pixel counts per node, forward edges ``{(di, dj): bool grid}``, node->pixel map."""
    if connectivity == 4:
        edges = {d: planes & _shift(planes, *d, False) for d in _DIRECTIONS[4]}
        return planes, planes.astype(jnp.int32), edges, lambda x: x
    h, w = planes.shape[-2:]
    pad = [(0, 0)] * (planes.ndim - 2) + [(0, h % 2), (0, w % 2)]
    p = jnp.pad(planes, pad)
    tl, tr, bl, br = p[..., 0::2, 0::2], p[..., 0::2, 1::2], p[..., 1::2, 0::2], p[..., 1::2, 1::2]
    nodes = tl | tr | bl | br
    counts = tl.astype(jnp.int32) + tr + bl + br
    edges = {
        (0, 1): (tr | br) & _shift(tl | bl, 0, 1, False),  # right column meets the next block's left column
        (1, 0): (bl | br) & _shift(tl | tr, 1, 0, False),  # bottom row meets the next block's top row
        (1, 1): br & _shift(tl, 1, 1, False),  # corners only touch diagonally
        (1, -1): bl & _shift(tr, 1, -1, False),
    }

    def expand(x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=-2), 2, axis=-1)
        return x[..., :h, :w]

    return nodes, counts, edges, expand


def _label_graph(nodes, edges):
    """Labels a grid graph: each node gets the smallest flat index of its component; background the size.

    Min-label propagation in a ``lax.while_loop``: each round takes the minimum label over a node's
    linked neighbours, hooks the node's current root onto it (scatter-min) and jumps pointers twice, so
    the round count grows roughly with the log of a component's extent rather than with its length.
    Labels only decrease and always point inside the component, so the fixed point is its smallest index.
    Returns ``(labels, rounds)``.
    """
    shape = nodes.shape
    total = nodes.size
    sentinel = jnp.int32(total)
    index = jnp.arange(total, dtype=jnp.int32).reshape(shape)
    labels = jnp.append(jnp.where(nodes, index, sentinel).reshape(-1), sentinel)
    links = [(d, e) for d, e in edges.items()]
    links += [((-d[0], -d[1]), _shift(e, -d[0], -d[1], False)) for d, e in edges.items()]

    def neighbour_min(current):
        grid = current[:total].reshape(shape)
        low = grid
        for (di, dj), linked in links:
            low = jnp.minimum(low, jnp.where(linked, _shift(grid, di, dj, sentinel), sentinel))
        return jnp.append(low.reshape(-1), sentinel)

    def body(state):
        current, _, rounds = state
        low = neighbour_min(current)
        updated = current.at[current].min(low)  # hook each node's root onto its smallest neighbour label
        updated = jnp.minimum(updated, low)
        updated = updated[updated]  # pointer jumping, twice
        updated = updated[updated]
        return updated, jnp.any(updated != current), rounds + 1

    labels, _, rounds = jax.lax.while_loop(lambda s: s[1], body, (labels, jnp.bool_(True), jnp.int32(0)))
    return labels[:total].reshape(shape), rounds


def _shift(x, di: int, dj: int, fill):
    """``y[..., i, j] = x[..., i + di, j + dj]`` (``fill`` outside the grid)."""
    h, w = x.shape[-2:]
    pad = [(0, 0)] * (x.ndim - 2) + [(max(-di, 0), max(di, 0)), (max(-dj, 0), max(dj, 0))]
    y = jnp.pad(x, pad, constant_values=fill)
    i0, j0 = max(di, 0), max(dj, 0)
    return y[..., i0:i0 + h, j0:j0 + w]


# ------------------------------------------------------------------------------------------ host runs


def _columns(labels: np.ndarray) -> np.ndarray:
    """uint8 ``(B * P * W, H + 1)``: every column of every plane as a row, in the RLE order (cv2's
    transpose: ~20x faster than numpy's strided copy)."""
    b, planes, rows, w = labels.shape
    out = np.empty((b * planes, w, rows), np.uint8)
    for i, plane in enumerate(labels.reshape(b * planes, rows, w)):
        cv2.transpose(plane, out[i])
    return out.reshape(b * planes * w, rows)


def _host_remove_small_components(planes: np.ndarray, *, min_size: int, connectivity: int) -> np.ndarray:
    """``remove_small_components`` of bool planes ``(B, C, H, W)`` on the host: runs, their components,
    then the small ones' pixels cleared in a copy (few pixels: the big components stay as they are)."""
    planes = np.asarray(planes)
    b, c, h, w = planes.shape
    padded = np.zeros((b, c, h + 1, w), np.uint8)
    padded[:, :, :h] = planes
    key, col, top, bottom = _vertical_runs(_columns(padded), c, w, c)
    small = _run_component_sizes(key, col, top, bottom, w, h, connectivity) < min_size
    out = planes.copy()
    key, col, top, bottom = key[small], col[small], top[small], bottom[small]
    length = bottom - top
    run = np.repeat(np.arange(key.size), length)
    row = top[run] + np.arange(run.size) - np.repeat(np.cumsum(length) - length, length)
    out.reshape(b * c, h, w)[key[run], row, col[run]] = False
    return out


def _vertical_runs(columns: np.ndarray, planes: int, w: int, c: int):
    """Runs of one label down each column: ``(key, col, top, bottom)`` int arrays sorted by key (image * C
    + class), then column, then row; rows ``top`` (first) to ``bottom`` (exclusive). ``columns`` come from
    ``_columns`` of ``RunLabels.labels``: one plane of class ids an image, or C planes of 0/1."""
    rows = columns.shape[1]
    flat = columns.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat.size and flat[0]:
        change = np.concatenate([[0], change])
    if flat.size < 2**31:
        change = change.astype(np.int32)  # cheaper divisions and sorts below
    # Each change ends a run of the label before it and starts one of the label after it (label 0: none).
    # A stable sort by key (background last) lines up every key's events in pixel order: start, end, ...
    label = np.stack([flat[change - 1], flat[change]], axis=1).reshape(-1)  # change 0 reads a closing 0
    at = np.repeat(change, 2)
    plane = at // (rows * w)
    key = plane * c + label.astype(plane.dtype) - 1 if planes == 1 else plane  # P = C planes are 0/1
    key = np.where(label > 0, key, len(columns) // (w * planes) * c)
    order = np.argsort(key.astype(np.uint16) if key.max(initial=0) < 2**16 else key, kind="stable")
    order = order[:np.count_nonzero(label)]
    key, at = key[order[0::2]], at[order]
    column, top = np.divmod(at[0::2], rows)
    return key, column % w, top, at[1::2] - column * rows


def _run_component_sizes(key, col, top, bottom, w: int, h: int, connectivity: int) -> np.ndarray:
    """Pixel count of each run's connected component (runs as ``_vertical_runs`` sorts them).

    Two runs of a key touch when they lie in neighbouring columns and their rows overlap (8-connectivity:
    or meet at a corner). In the sort order the runs of the next column that touch run i form one
    contiguous range, found by two sorted searches; the components of that graph come from scipy's
    ``connected_components`` (union-find over ~runs nodes, not pixels).
    """
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import connected_components

    n = key.size
    if n == 0:
        return np.zeros(0, np.int64)
    corner = 1 if connectivity == 8 else 0
    span = h + 2  # rows -1 .. h + 1 of a column stay inside its span; w + 1 column slots a key
    dtype = np.int32 if (int(key.max()) + 2) * (w + 1) * span < 2**31 else np.int64
    column = key.astype(dtype) * (w + 1) + col
    first, past = column * span + top, column * span + bottom
    nxt = (column + 1) * span
    lo = _merge_search(past, nxt + top - corner, "right")  # the next column's runs ending below our top
    hi = _merge_search(first, nxt + bottom + corner, "left")  # ... and starting above our bottom
    count = np.maximum(hi - lo, 0)
    ends = np.cumsum(count)
    neighbours = np.repeat(lo - (ends - count), count) + np.arange(ends[-1])  # lo[i] .. hi[i] - 1, run by run
    graph = csr_array((np.ones(neighbours.size, np.int8), neighbours, np.concatenate([[0], ends])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component, weights=bottom - top)
    return sizes[component]


def _merge_search(a: np.ndarray, queries: np.ndarray, side: str) -> np.ndarray:
    """``np.searchsorted(a, queries, side)`` for sorted ``queries``: a stable sort of both sorted arrays is a
    linear merge (timsort finds the two runs), ~3x faster than a binary search a query."""
    both = np.concatenate([a, queries] if side == "right" else [queries, a])  # ties: the first array first
    order = np.argsort(both, kind="stable")
    at = np.flatnonzero(order >= a.size) if side == "right" else np.flatnonzero(order < queries.size)
    return at - np.arange(queries.size)


def _rle_texts(key, start, end, groups: int) -> list[str]:
    """RLE text of each key from its vertical runs (0-indexed column-major pixels ``start`` to ``end``,
    exclusive): a run that ends a column and one that starts the next are one RLE run."""
    if key.size == 0:
        return [""] * groups
    joined = (key[1:] == key[:-1]) & (start[1:] == end[:-1])
    first = np.concatenate([[True], ~joined])
    last = np.concatenate([~joined, [True]])
    starts = start[first] + 1  # 1-indexed
    values = np.stack([starts, end[last] + 1 - starts], axis=1).reshape(-1)
    return format_runs(values, 2 * np.bincount(key[first], minlength=groups))


def _runs_to_masks(key, col, top, bottom, shape) -> np.ndarray:
    """bool ``(B, H, W, C)`` masks from vertical runs."""
    b, h, w, c = shape
    masks = np.zeros(shape, bool)
    length = bottom - top
    run = np.repeat(np.arange(key.size), length)
    row = top[run] + np.arange(run.size) - np.repeat(np.cumsum(length) - length, length)
    image, cls = np.divmod(key[run], c)
    masks[image, row, col[run], cls] = True
    return masks


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
