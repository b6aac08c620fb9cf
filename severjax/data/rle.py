"""Kaggle run-length encoding of masks: the one home of RLE text.

Pixels are numbered from 1, top to bottom then left to right (column-major); an RLE string is
space-separated "start length" pairs in increasing order; "" is the empty mask. Both directions are
vectorised with numpy (no Python loop over pixels or runs).

- ``rle_encode`` / ``rle_decode`` / ``parse_runs``: one mask <-> one string (``parse_runs`` checks a string
  without building the mask);
- ``masks_to_rles``: a batch of ``(B, H, W, C)`` masks -> ``[[rle per class] per image]``;
- ``runs_to_rles``: many masks given as vertical runs (what ``severjax.predict.postprocess.finish_rles``
  holds) -> their strings in one pass, through ``format_runs``, which writes the numbers of many masks at once;
- ``rle_dice``: the competition's Dice of two RLE strings (empty/empty scores 1).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

KAGGLE_SHAPE = (256, 1600)


def rle_encode(mask: np.ndarray) -> str:
    """Encodes a 2-D boolean mask as a Kaggle RLE string ("" when empty)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode needs a 2-D mask, got shape {mask.shape}")
    height, width = mask.shape
    padded = np.zeros(height * width + 2, dtype=bool)
    padded[1:-1] = np.ravel(mask.T if mask.dtype == bool else mask.T != 0)  # column-major pixel order
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + 1  # 1-indexed starts, then 1-indexed ends + 1
    if edges.size == 0:
        return ""
    edges[1::2] -= edges[::2]  # ends -> lengths
    return format_runs(edges, [edges.size])[0]


def rle_decode(rle: str, shape: tuple[int, int] = KAGGLE_SHAPE) -> np.ndarray:
    """Decodes a Kaggle RLE string into a boolean mask of ``shape``.

    Raises ValueError naming the fault: non-numeric text, an odd count of numbers, a start < 1 or a
    length < 1, a run past the end of the image, runs that overlap or are out of order.
    """
    height, width = shape
    starts, lengths = parse_runs(rle, shape)
    if starts.size == 0:
        return np.zeros(shape, dtype=bool)
    # Vectorised fill in O(defect pixels): the flat index of every covered pixel, run by run.
    offsets = np.repeat(starts - 1 - (np.cumsum(lengths) - lengths), lengths)
    flat = np.zeros(height * width, dtype=bool)
    flat[offsets + np.arange(offsets.size)] = True
    return flat.reshape((width, height)).T


def parse_runs(rle: str, shape: tuple[int, int] = KAGGLE_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Parses and checks an RLE string without building the mask: returns (starts, lengths), 1-indexed.

    Cheap enough to validate every row of a CSV; raises the same ValueErrors as ``rle_decode``.
    """
    height, width = shape
    size = height * width
    text = "" if rle is None else str(rle).strip()
    if not text or text.lower() == "nan":
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    tokens = text.split()
    try:
        numbers = np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        bad = next(t for t in tokens if not _is_int(t))
        raise ValueError(f"RLE holds non-numeric text {bad!r}") from None
    if numbers.size % 2:
        raise ValueError(f"RLE has an odd count of numbers ({numbers.size}): it must be 'start length' pairs")
    starts, lengths = numbers[0::2], numbers[1::2]
    if (starts < 1).any():
        i = int(np.argmax(starts < 1))
        raise ValueError(f"RLE run {i} starts at {starts[i]}: starts are 1-indexed and must be >= 1")
    if (lengths < 1).any():
        i = int(np.argmax(lengths < 1))
        raise ValueError(f"RLE run {i} (start {starts[i]}) has length {lengths[i]}: lengths must be >= 1")
    ends = starts + lengths - 1  # inclusive, 1-indexed
    if (ends > size).any():
        i = int(np.argmax(ends > size))
        raise ValueError(
            f"RLE run {i} (start {starts[i]}, length {lengths[i]}) ends at pixel {ends[i]}, "
            f"past the end of a {height}x{width} image ({size} pixels)")
    if starts.size > 1:
        clash = starts[1:] <= ends[:-1]
        if clash.any():
            i = int(np.argmax(clash)) + 1
            what = "is out of order" if starts[i] < starts[i - 1] else "overlaps the run before it"
            raise ValueError(
                f"RLE run {i} (start {starts[i]}) {what} (previous run {starts[i - 1]}..{ends[i - 1]})")
    return starts, lengths


def masks_to_rles(masks: np.ndarray, areas: np.ndarray | None = None) -> list[list[str]]:
    """Kaggle RLE strings ``[[rle per class] per image]`` of bool masks ``(B, H, W, C)``.

    ``areas`` ``(B, C)``, when known, skips the empty masks (their string is "")."""
    masks = np.asarray(masks)
    if masks.ndim != 4:
        raise ValueError(f"masks_to_rles needs (B, H, W, C) masks, got shape {masks.shape}")
    areas = masks.any(axis=(1, 2)) if areas is None else np.asarray(areas)
    return [[rle_encode(masks[b, :, :, c]) if areas[b, c] else "" for c in range(masks.shape[-1])]
            for b in range(masks.shape[0])]


def runs_to_rles(key: np.ndarray, start: np.ndarray, end: np.ndarray, groups: int) -> list[str]:
    """RLE strings of ``groups`` masks given as runs of pixels down the columns.

    Run i belongs to mask ``key[i]`` and covers the 0-indexed column-major pixels ``start[i]`` to ``end[i]``
    (exclusive); runs are sorted by key, then position. A run that ends a column and one of the same mask
    that starts the next column touch in the RLE order: they become one RLE run.
    """
    if key.size == 0:
        return [""] * groups
    joined = (key[1:] == key[:-1]) & (start[1:] == end[:-1])
    first = np.concatenate([[True], ~joined])
    last = np.concatenate([~joined, [True]])
    starts = start[first] + 1  # 1-indexed
    values = np.stack([starts, end[last] + 1 - starts], axis=1).reshape(-1)
    return format_runs(values, 2 * np.bincount(key[first], minlength=groups))


def rle_dice(truth_rle: str, pred_rle: str, shape: tuple[int, int] = KAGGLE_SHAPE) -> float:
    """Dice of two masks given as RLE strings: ``2|P∩T| / (|P| + |T|)``, and 1 when both are empty."""
    if not truth_rle and not pred_rle:
        return 1.0
    if not truth_rle or not pred_rle:
        return 0.0
    t, p = rle_decode(truth_rle, shape), rle_decode(pred_rle, shape)
    return float(2.0 * np.logical_and(t, p).sum() / (t.sum() + p.sum()))


def format_runs(values: np.ndarray, counts: Sequence[int]) -> list[str]:
    """Space-separated decimal text of consecutive groups of ``values`` (group i: the next ``counts[i]``).

    ``values`` are non-negative integers (RLE starts and lengths). One vectorised pass over all groups:
    every number becomes a fixed-width record of digits (three at a time from a 1000-row table) and a
    separator, a table indexed by the digit count says which bytes of a record to keep, and one boolean
    selection writes the text, rather than a ``str`` call a number (docs/performance.md, "Post-processing
    and RLE").
    """
    values = np.asarray(values)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any() or counts.sum() != values.size:
        raise ValueError(f"counts {counts.tolist()} must be >= 0 and add up to the {values.size} values")
    if values.size == 0:
        return [""] * counts.size
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer) or values.min() < 0:
        raise ValueError(f"format_runs needs a 1-D array of non-negative integers, got {values.dtype} "
                         f"{values.shape} with minimum {values.min()}")
    width = len(str(int(values.max())))
    values = values.astype(np.int32 if width < 10 else np.int64)
    groups = -(-width // 3)
    digits = np.ones(values.size, np.int8)
    for power in range(1, width):
        digits += values >= 10**power
    words, rest = [], values
    for g in range(groups):  # lowest three digits first; each word is 3 digit bytes + a junk byte or the space
        rest, three = np.divmod(rest, 1000)
        words.append((_DIGITS_SPACE if g == 0 else _DIGITS_JUNK).take(three))
    records = np.stack(words[::-1], axis=1).view(np.uint8).reshape(values.size, 4 * groups)
    text = records[_keep_bytes(groups).take(digits, axis=0)].tobytes().decode("ascii")
    ends = np.concatenate([[0], np.cumsum(digits.astype(np.int64) + 1)])[np.cumsum(counts)]
    starts = np.concatenate([[0], ends[:-1]])
    return [text[a:b - 1] if b > a else "" for a, b in zip(starts.tolist(), ends.tolist())]


def _digit_words(last: str) -> np.ndarray:
    """1000 uint32 words, each the 4 bytes of i's three digits (leading zeros) and then ``last``."""
    return np.frombuffer("".join(f"{i:03d}{last}" for i in range(1000)).encode("ascii"), np.uint32)


_DIGITS_SPACE, _DIGITS_JUNK = _digit_words(" "), _digit_words("_")


@functools.lru_cache(maxsize=None)
def _keep_bytes(groups: int) -> np.ndarray:
    """bool ``[digit count, byte]``: the bytes of a ``4 * groups``-byte record that hold a number's digits
    (leading zeros and the junk bytes left out) and its trailing space."""
    byte = np.arange(4 * groups)
    digit_rank = (groups - 1 - byte // 4) * 3 + (2 - byte % 4)  # power of ten a byte holds (junk: -1)
    keep = (byte % 4 != 3) & (digit_rank[None, :] < np.arange(3 * groups + 1)[:, None])
    keep[:, -1] = True  # the space after the last group
    return keep


def _is_int(token: str) -> bool:
    try:
        int(token)
        return True
    except ValueError:
        return False
