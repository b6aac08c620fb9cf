"""Streaming prediction: images read by a background thread, batch by batch, through an ensemble.

``stream_batches`` reads images one bounded queue of batches ahead, so memory stays flat whatever the
number of images; ``predict_images`` drives the whole loop: the device works on batch k (the ensemble and
the device half of post-processing) while the host finishes batch k - 1 (``finish_rles``: RLE text, areas,
masks on request), one ``ImageResult`` an image.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import numpy as np

from severjax.data.kaggle import KAGGLE_SHAPE, load_image
from severjax.predict.ensemble import Ensemble
from severjax.predict.postprocess import finish_rles, postprocess_for_rle
from severjax.predict.probs import quantize_probs


class Batch(NamedTuple):
    """A batch as read: ``images`` uint8 ``(batch_size, H, W, 1)``, zero-padded past the good images;
    ``entries``: ``(image_id, error)`` in reading order, error None for the good images, which fill
    ``images`` in that order."""

    entries: list[tuple[str, str | None]]
    images: np.ndarray


class ImageResult(NamedTuple):
    """One image's prediction: four RLE strings (empty on error), areas, classifier probs, masks, probs."""

    image_id: str
    rles: list[str]
    areas: np.ndarray | None
    class_probs: np.ndarray | None
    error: str | None
    masks: np.ndarray | None = None  # bool (H, W, C), with keep_masks
    probs: np.ndarray | None = None  # uint8 (H, W, C) = round(255 p), with keep_probs


def stream_batches(paths: Sequence[str], batch_size: int, *, skip_bad: bool = False, prefetch: int = 2,
                   shape=KAGGLE_SHAPE, loader: Callable[..., np.ndarray] = load_image) -> Iterator[Batch]:
    """Yields fixed-size batches of images read by a background thread ``prefetch`` batches ahead.

    A bad image (unreadable, wrong size) raises its error, naming the file, unless ``skip_bad``: then it is
    an entry with its error message and the run goes on. Every batch is zero-padded to ``batch_size`` so
    the compiled functions see one shape.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    slots: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader():
        try:
            for start in range(0, len(paths), batch_size):
                images = np.zeros((batch_size, *shape, 1), np.uint8)
                entries, good = [], 0
                for path in paths[start:start + batch_size]:
                    image_id = os.path.basename(path)
                    try:
                        images[good] = loader(path, shape)
                    except Exception as err:  # noqa: BLE001 - reported (skip_bad) or re-raised below
                        if not skip_bad:
                            raise
                        entries.append((image_id, f"{type(err).__name__}: {err}"))
                        continue
                    entries.append((image_id, None))
                    good += 1
                if not put(Batch(entries, images)):
                    return
            put(None)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises
            put(err)

    thread = threading.Thread(target=reader, name="severjax-image-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def predict_images(ensemble: Ensemble, paths: Sequence[str], batch_size: int, *, skip_bad: bool = False,
                   keep_masks: bool = False, keep_probs: bool = False, prefetch: int = 2) -> Iterator[ImageResult]:
    """Predicts the images of ``paths`` in order, one result an image (bad ones carry their error, with
    ``skip_bad``). The device works on batch k while the host encodes batch k-1 (jax dispatch is async)."""
    pending = None
    for batch in stream_batches(paths, batch_size, skip_bad=skip_bad, prefetch=prefetch):
        if keep_probs:
            probs, class_probs = ensemble.probabilities(batch.images)
            outputs = (postprocess_for_rle(probs, ensemble.postprocess_config, class_probs), class_probs,
                       quantize_probs(probs))
        else:
            outputs = (*ensemble(batch.images), None)
        if pending is not None:
            yield from _host_results(*pending, keep_masks)
        pending = (batch, outputs)
    if pending is not None:
        yield from _host_results(*pending, keep_masks)


def _host_results(batch: Batch, outputs, keep_masks: bool) -> Iterator[ImageResult]:
    """The host half of one batch (``finish_rles`` over its good images): one ``ImageResult`` an entry, in
    reading order; ``outputs`` is ``(RunLabels, class probs or None, quantised probs or None)``."""
    runs, class_probs, probs = outputs
    n = sum(error is None for _, error in batch.entries)
    rles, areas, masks = finish_rles(jax.tree.map(lambda x: x[:n], runs), keep_masks)
    class_probs = None if class_probs is None else np.asarray(class_probs[:n])
    probs = None if probs is None else np.asarray(probs[:n])
    slot = 0
    for image_id, error in batch.entries:
        if error is not None:
            yield ImageResult(image_id, [""] * areas.shape[-1], None, None, error)
            continue
        yield ImageResult(image_id, rles[slot], areas[slot], None if class_probs is None else class_probs[slot], None,
                          masks[slot] if keep_masks else None,
                          None if probs is None else probs[slot])
        slot += 1
