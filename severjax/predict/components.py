"""Connected components of boolean masks: sizes, labels and the removal of small ones.

Two ways to the same answer:

- on the device, a grid graph labelled by min-label propagation (``component_sizes``,
  ``label_components``): every (image, class) plane at once, or plane by plane;
- on the host, runs of pixels down the columns (the RLE order) joined into components where they touch
  in neighbouring columns (``vertical_runs``, ``run_component_sizes``): the work grows with the number of
  runs, not of pixels. ``severjax.predict.postprocess.finish_rles`` works on these runs directly.

``remove_small_components`` picks between them through ``severjax.ops.policy`` (op ``small_components``):
the host's runs on CPU, where XLA's pixel labelling is the slow part of post-processing, the device
elsewhere (docs/performance.md, "Post-processing and RLE").
"""

from __future__ import annotations

import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from severjax.ops import policy

# The implementations of small-component removal (policy op "small_components").
COMPONENT_METHODS = policy.CANDIDATES["small_components"]


def remove_small_components(masks, min_size: int, connectivity: int, method: str | None = None):
    """Drops connected components (per image and class) of bool ``(B, H, W, C)`` smaller than ``min_size`` pixels.

    ``method``: ``"all"`` labels every (image, class) plane at once on the device; ``"per_plane"`` goes
    plane by plane (``lax.map``), skipping empty planes with ``lax.cond``; ``"host"`` hands the planes to a
    host callback that labels runs of pixels down the columns and clears the small components' pixels.
    None or ``"auto"``: ``policy.choose("small_components")``. All give the same masks.
    """
    if method is not None and method != "auto" and method not in COMPONENT_METHODS:
        raise ValueError(f"unknown component method {method!r}: use one of {COMPONENT_METHODS} or 'auto'")
    method = policy.choose("small_components", method or "auto")
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


# ------------------------------------------------------------------------------------------ host runs


def plane_columns(labels: np.ndarray) -> np.ndarray:
    """uint8 ``(B * P * W, H + 1)``: every column of every plane of ``labels`` ``(B, P, H + 1, W)`` as a row,
    in the RLE order (cv2's transpose: a cache-friendly copy where numpy's is a strided one)."""
    b, planes, rows, w = labels.shape
    out = np.empty((b * planes, w, rows), np.uint8)
    for i, plane in enumerate(labels.reshape(b * planes, rows, w)):
        cv2.transpose(plane, out[i])
    return out.reshape(b * planes * w, rows)


def vertical_runs(columns: np.ndarray, planes: int, w: int, c: int):
    """Runs of one label down each column: ``(key, col, top, bottom)`` int arrays sorted by key (image * C
    + class), then column, then row; rows ``top`` (first) to ``bottom`` (exclusive).

    ``columns`` come from ``plane_columns`` of uint8 ``(B, P, H + 1, W)`` labels whose last row is 0: one
    plane of class ids (0 background, ``k + 1`` class k) an image (``planes == 1``), or C planes of 0/1.
    """
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


def run_component_sizes(key, col, top, bottom, w: int, h: int, connectivity: int) -> np.ndarray:
    """Pixel count of each run's connected component (runs as ``vertical_runs`` sorts them).

    Two runs of a key touch when they lie in neighbouring columns and their rows overlap (8-connectivity:
    or meet at a corner). In the sort order the runs of the next column that touch run i form one
    contiguous range, found by two sorted searches; the components of that graph come from scipy's
    ``connected_components`` (union-find over the runs, not the pixels).
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


def run_pixels(top: np.ndarray, bottom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel of the runs ``top[i]`` to ``bottom[i]`` (exclusive): ``(run index, row)`` a pixel."""
    length = bottom - top
    run = np.repeat(np.arange(top.size), length)
    row = top[run] + np.arange(run.size) - np.repeat(np.cumsum(length) - length, length)
    return run, row


def _host_remove_small_components(planes: np.ndarray, *, min_size: int, connectivity: int) -> np.ndarray:
    """``remove_small_components`` of bool planes ``(B, C, H, W)`` on the host: runs, their components,
    then the small ones' pixels cleared in a copy (few pixels: the big components stay as they are)."""
    planes = np.asarray(planes)
    b, c, h, w = planes.shape
    padded = np.zeros((b, c, h + 1, w), np.uint8)
    padded[:, :, :h] = planes
    key, col, top, bottom = vertical_runs(plane_columns(padded), c, w, c)
    small = run_component_sizes(key, col, top, bottom, w, h, connectivity) < min_size
    out = planes.copy()
    key, col, top, bottom = key[small], col[small], top[small], bottom[small]
    run, row = run_pixels(top, bottom)
    out.reshape(b * c, h, w)[key[run], row, col[run]] = False
    return out


def _merge_search(a: np.ndarray, queries: np.ndarray, side: str) -> np.ndarray:
    """``np.searchsorted(a, queries, side)`` for sorted ``queries``: a stable sort of both sorted arrays is a
    linear merge (timsort finds the two runs) rather than a binary search a query."""
    both = np.concatenate([a, queries] if side == "right" else [queries, a])  # ties: the first array first
    order = np.argsort(both, kind="stable")
    at = np.flatnonzero(order >= a.size) if side == "right" else np.flatnonzero(order < queries.size)
    return at - np.arange(queries.size)


# ------------------------------------------------------------------------------------ device graph


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
