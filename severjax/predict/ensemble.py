"""Ensembles: N exported models (+ optional classifiers) -> averaged probabilities -> post-processed masks.

``load_members`` reads exported models or training workdirs (``severjax.checkpoint.load_model``); archs and
encoders may differ, and each member normalises the uint8 images with its own ``model.json`` values.
``Ensemble`` runs one jit-compiled forward a member (all TTA views in one batch, flips undone, view
probabilities averaged; compiled once per architecture, TTA and shape, so members of one architecture
share it), folds each member's result into a running accumulator (a small jit), and finishes the average
and post-processes in one more jit: no more than one batch of probabilities is alive at a time.

TTA views: ``none``; ``w`` (identity + horizontal flip, the original's choice); ``h`` (identity + vertical
flip); ``hw`` (identity, both single flips and the double flip). Views are averaged by their mean.
Members are averaged by ``mean`` (the original's choice), ``rms`` (sqrt of the weighted mean of squares:
it cost the original first place, 0.90876 -> 0.90259 private) or ``geo`` (weighted geometric mean).
Classifiers (``arch="classifier"``, ``(B, 4)`` logits) are averaged by the mean of their probabilities
and gate the minimum areas (see ``postprocess``).

``stream_batches`` reads images in a background thread, one bounded queue of batches ahead, so memory
stays flat whatever the number of images; ``predict_images`` drives the whole loop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import threading
import zipfile
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from severjax.checkpoint import load_model
from severjax.data.kaggle import KAGGLE_SHAPE, load_image
from severjax.predict.postprocess import PostprocessConfig, finish_rles, postprocess_for_rle

log = logging.getLogger(__name__)

TTA_MODES = ("none", "w", "h", "hw")
AVERAGES = ("mean", "rms", "geo")
# The original models' normalisation (configs/common.py), used for a spec without "normalize".
DEFAULT_NORMALIZE = {"mean": 0.3439, "std": 0.0383}
_TINY = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True)
class Member:
    """One loaded model: its module, device variables, spec and normalisation."""

    path: str
    module: Any
    variables: Any
    spec: Mapping[str, Any]
    mean: float
    std: float

    @property
    def arch(self) -> str:
        return self.spec["arch"]

    @property
    def in_channels(self) -> int:
        return int(self.spec.get("in_channels", 1))


def load_members(paths: Sequence[str], classifier: bool = False) -> list[Member]:
    """Loads exported models or training workdirs; segmentation models unless ``classifier``.

    Errors name the path: missing checkpoints, a classifier given as a segmentation model (or the reverse),
    a class count other than the others'.
    """
    members = []
    for path in paths:
        module, variables, spec = load_model(path)
        is_classifier = spec.get("arch") == "classifier"
        if is_classifier != classifier:
            want = "a classifier (arch 'classifier')" if classifier else "a segmentation model (arch unet/fpn)"
            raise ValueError(f"checkpoint {path!r} is arch {spec.get('arch')!r}, expected {want}")
        norm = spec.get("normalize")
        if norm is None:
            log.warning("checkpoint %s has no 'normalize' in model.json: using the original's %s", path,
                        DEFAULT_NORMALIZE)
            norm = DEFAULT_NORMALIZE
        if float(norm["std"]) <= 0:
            raise ValueError(f"checkpoint {path!r}: normalize std {norm['std']} must be > 0")
        variables = jax.device_put({"params": variables["params"], "batch_stats": variables.get("batch_stats", {})})
        members.append(Member(path, module, variables, spec, float(norm["mean"]), float(norm["std"])))
    classes = {int(m.spec.get("classes", 4)) for m in members}
    if len(classes) > 1:
        raise ValueError("models disagree on the class count: "
                         + ", ".join(f"{m.path}: {m.spec.get('classes', 4)}" for m in members))
    return members


class Ensemble:
    """Callable over uint8 image batches ``(B, H, W, 1)``: returns the device half of post-processing and
    the class probabilities.

    ``probabilities(images)`` gives the averaged segmentation probabilities ``(B, H, W, C)`` and the classifier
    probabilities ``(B, C)`` (or None) before post-processing; ``__call__`` adds post-processing and returns
    ``(RunLabels, class_probs or None)`` on the device; ``finish_rles`` turns the first into RLE strings, areas
    and (on request) masks on the host (see ``postprocess_for_rle``).
    """

    def __init__(self, members: Sequence[Member], *, tta: str = "w", average: str = "mean",
                 weights: Sequence[float] | None = None, classifiers: Sequence[Member] = (),
                 postprocess: PostprocessConfig = PostprocessConfig()):
        if not members:
            raise ValueError("an ensemble needs at least one segmentation model")
        if tta not in TTA_MODES:
            raise ValueError(f"unknown TTA {tta!r}: use one of {TTA_MODES}")
        if average not in AVERAGES:
            raise ValueError(f"unknown average {average!r}: use one of {AVERAGES}")
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} weight(s) for {len(members)} model(s): give one weight a model")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights {weights} must be >= 0 with a positive sum")
        self.members, self.classifiers = list(members), list(classifiers)
        self.tta, self.average, self.postprocess_config = tta, average, postprocess
        self.weights = [w / sum(weights) for w in weights]

    def probabilities(self, images):
        """Averaged probabilities ``(B, H, W, C)`` float32 and classifier probabilities ``(B, C)`` or None."""
        return _finish(self._accumulate(images), self._classify(images), average=self.average)

    def __call__(self, images):
        return _finish_and_postprocess(self._accumulate(images), self._classify(images), average=self.average,
                                       config=self.postprocess_config)

    def _accumulate(self, images):
        images = jnp.asarray(images)
        _check_images(images)
        acc = None
        for member, weight in zip(self.members, self.weights):
            acc = _accumulate(acc, member_probabilities(member, images, self.tta), jnp.float32(weight),
                              average=self.average)
        return acc

    def _classify(self, images):
        if not self.classifiers:
            return None
        acc = None
        for member in self.classifiers:
            acc = _accumulate(acc, member_probabilities(member, jnp.asarray(images), self.tta),
                              jnp.float32(1.0 / len(self.classifiers)), average="mean")
        return acc


def member_probabilities(member: Member, images, tta: str):
    """One member's TTA-averaged probabilities of uint8 images: ``(B, H, W, C)`` or, for classifiers, ``(B, C)``.

    Compiled once per (module, TTA, shape): members that share an architecture share the compiled code.
    """
    # albumentations' Normalize(max_pixel_value=255), exactly as in training: (x - 255 mean) / (255 std).
    shift, scale = np.float32(member.mean * 255.0), np.float32(1.0 / (member.std * 255.0))
    return _member_probabilities(member.variables, images, shift, scale, module=member.module, tta=tta,
                                 in_channels=member.in_channels)


def tta_probabilities(module, variables, x, tta: str):
    """Mean over the TTA views of ``sigmoid(module(view))``, each view's flip undone (spatial outputs only)."""
    flips = {"none": ((),), "w": ((), (2,)), "h": ((), (1,)), "hw": ((), (2,), (1,), (1, 2))}[tta]
    views = jnp.concatenate([jnp.flip(x, axis) if axis else x for axis in flips], axis=0)
    probs = jax.nn.sigmoid(module.apply(variables, views, train=False).astype(jnp.float32))
    parts = jnp.split(probs, len(flips), axis=0)
    if probs.ndim == 4:
        parts = [jnp.flip(p, axis) if axis else p for p, axis in zip(parts, flips)]
    return sum(parts) / len(parts)


@functools.partial(jax.jit, static_argnames=("module", "tta", "in_channels"))
def _member_probabilities(variables, images, shift, scale, *, module, tta: str, in_channels: int):
    x = (images.astype(jnp.float32) - shift) * scale
    if in_channels != 1:
        x = jnp.repeat(x, in_channels, axis=-1)
    return tta_probabilities(module, variables, x, tta)


@functools.partial(jax.jit, static_argnames=("average",))
def _accumulate(acc, probs, weight, *, average: str):
    """``acc + weight * f(probs)`` with f the average's transform (identity, square, log)."""
    term = weight * {"mean": probs, "rms": probs * probs, "geo": jnp.log(jnp.maximum(probs, _TINY))}[average]
    return term if acc is None else acc + term


def _finish_values(acc, average: str):
    return {"mean": lambda a: a, "rms": jnp.sqrt, "geo": jnp.exp}[average](acc)


@functools.partial(jax.jit, static_argnames=("average",))
def _finish(acc, class_probs, *, average: str):
    return _finish_values(acc, average), class_probs


@functools.partial(jax.jit, static_argnames=("average", "config"))
def _finish_and_postprocess(acc, class_probs, *, average: str, config: PostprocessConfig):
    return postprocess_for_rle(_finish_values(acc, average), config, class_probs), class_probs


def _check_images(images):
    if images.ndim != 4 or images.shape[-1] != 1 or images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 1), got {images.dtype} {images.shape}")


# ---------------------------------------------------------------------------------------- streaming


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


@jax.jit
def quantize_probs(probs):
    """uint8 ``round(255 p)``: what ``--save_probs`` stores (1/255 resolution, 4x smaller than float32)."""
    return jnp.round(jnp.clip(probs, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def _host_results(batch: Batch, outputs, keep_masks: bool) -> Iterator[ImageResult]:
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


# ------------------------------------------------------------------------------------ saved probabilities


class ProbsWriter:
    """Streams quantised probabilities to an ``.npz`` (for ``tools/tune.py``) without holding them in memory.

    The file holds ``probs`` uint8 ``(N, H, W, C)`` = round(255 p), ``image_ids`` ``(N,)``, ``valid`` bool
    ``(N,)`` (False for images that failed to load, whose probs are zeros) and, with classifiers,
    ``class_probs`` float32 ``(N, C)``. It is written under a temporary name and renamed by ``close``.
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
            raise ValueError(f"{path} lacks {sorted(missing)}: not written by tools/predict.py --save_probs")
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
