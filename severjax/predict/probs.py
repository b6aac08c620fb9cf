"""The saved-probabilities file: an ensemble's probabilities kept for tuning the post-processing.

``severjax-predict --save_probs FILE`` writes one (``ProbsWriter``), ``severjax-tune --probs FILE`` reads it
(``read_saved_probs``). It is an ``.npz`` (a zip of ``.npy`` members) holding

- ``probs``: uint8 ``(N, H, W, C)`` = ``round(255 p)`` (``quantize_probs``: 1/255 resolution, 4x smaller
  than float32), written image by image and read back in chunks, so neither side holds all of it;
- ``image_ids``: ``(N,)`` strings, in prediction order;
- ``valid``: bool ``(N,)``, False for images that failed to load (their probs are zeros);
- ``class_probs``: float32 ``(N, C)``, only when classifiers took part.
"""

from __future__ import annotations

import os
import zipfile
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from severjax.data.kaggle import KAGGLE_SHAPE


@jax.jit
def quantize_probs(probs):
    """uint8 ``round(255 p)`` of probabilities in [0, 1] (values outside are clipped): what the file stores."""
    return jnp.round(jnp.clip(probs, 0.0, 1.0) * 255.0).astype(jnp.uint8)


class ProbsWriter:
    """Streams quantised probabilities to an ``.npz`` (the format above) without holding them in memory.

    ``num_images`` is announced up front (the ``.npy`` header holds the shape); the file is written under
    a temporary name (``tmp``) and renamed by ``close``.
    """

    def __init__(self, path: str, num_images: int, shape=KAGGLE_SHAPE, classes: int = 4):
        self.path, self.tmp = path, path + ".tmp"
        self.item_shape = (*shape, classes)
        self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open("probs.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (num_images, *self.item_shape)}
        np.lib.format.write_array_header_2_0(self._member, header)
        self.num_images, self.ids, self.valid, self.class_probs = num_images, [], [], []

    def write(self, image_id: str, probs_u8: np.ndarray | None, class_probs: np.ndarray | None = None) -> None:
        """Appends one image (``probs_u8`` None: a failed image, stored as zeros and ``valid=False``)."""
        if len(self.ids) >= self.num_images:
            raise ValueError(f"{self.path}: more than the announced {self.num_images} images")
        data = np.zeros(self.item_shape, np.uint8) if probs_u8 is None else np.asarray(probs_u8, np.uint8)
        if data.shape != self.item_shape:
            raise ValueError(f"{self.path}: probabilities of {image_id} are {data.shape}, expected {self.item_shape}")
        self._member.write(np.ascontiguousarray(data).tobytes())
        self.ids.append(image_id)
        self.valid.append(probs_u8 is not None)
        self.class_probs.append(class_probs)

    def abort(self) -> None:
        """Drops the partial file (after a failure); the target path is left as it was."""
        for part in (self._member, self._zip):
            try:
                part.close()
            except (OSError, ValueError):  # a half-written member: its file goes anyway
                pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def close(self) -> None:
        """Finishes the file; fewer images than announced is an error (the partial file is removed)."""
        self._member.close()
        try:
            if len(self.ids) != self.num_images:
                raise ValueError(f"{self.path}: {len(self.ids)} images written, {self.num_images} announced")
            self._save("image_ids", np.asarray(self.ids))
            self._save("valid", np.asarray(self.valid, bool))
            if any(c is not None for c in self.class_probs):
                classes = self.item_shape[-1]
                self._save("class_probs", np.stack([np.full(classes, np.nan, np.float32) if c is None
                                                    else np.asarray(c, np.float32) for c in self.class_probs]))
            self._zip.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self._zip.close()
            os.remove(self.tmp)
            raise

    def _save(self, name: str, array: np.ndarray) -> None:
        with self._zip.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, array, allow_pickle=False)


class SavedProbs(NamedTuple):
    """A saved-probabilities file's small arrays and the shape ``(N, H, W, C)`` of its ``probs``."""

    image_ids: np.ndarray
    valid: np.ndarray
    class_probs: np.ndarray | None
    shape: tuple[int, ...]


def read_saved_probs(path: str) -> tuple[SavedProbs, Callable[[int], Iterator[np.ndarray]]]:
    """Opens a ``ProbsWriter`` file: its small arrays, and ``chunks(n)`` streaming ``probs`` n images at a time."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"probabilities file {path} does not exist")
    with np.load(path, allow_pickle=False) as npz:
        missing = {"image_ids", "valid", "probs"} - set(npz.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: not written by severjax-predict --save_probs")
        ids, valid = npz["image_ids"], npz["valid"]
        class_probs = npz["class_probs"] if "class_probs" in npz.files else None
    with zipfile.ZipFile(path) as zf, zf.open("probs.npy") as f:
        shape, _, dtype = _read_header(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[0] != len(ids):
        raise ValueError(f"{path}: probs.npy is {dtype} {shape}, expected uint8 ({len(ids)}, H, W, C)")

    def chunks(n: int) -> Iterator[np.ndarray]:
        item = int(np.prod(shape[1:]))
        with zipfile.ZipFile(path) as zf, zf.open("probs.npy") as f:
            _read_header(f)
            for start in range(0, shape[0], n):
                count = min(n, shape[0] - start)
                data = f.read(item * count)
                if len(data) != item * count:
                    raise ValueError(f"{path}: probs.npy is truncated at image {start}")
                yield np.frombuffer(data, np.uint8).reshape(count, *shape[1:])

    return SavedProbs(ids, valid, class_probs, tuple(shape)), chunks


def _read_header(f):
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)
