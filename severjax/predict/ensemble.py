"""Ensembles: N exported models (+ optional classifiers) -> averaged probabilities -> post-processed masks.

``load_members`` reads exported models or training workdirs (``severjax.export.load_model``); archs and
encoders may differ, and each member normalises the uint8 images with its own ``model.json`` values.
``Ensemble`` runs one jit-compiled forward a member (all TTA views in one batch, flips undone, view
probabilities averaged; compiled once per architecture, TTA and shape, so members of one architecture
share it), folds each member's result into a running accumulator (a small jit), and finishes the average
and post-processes in one more jit: no more than one batch of probabilities is alive at a time.

TTA views: ``none``; ``w`` (identity + horizontal flip, the original's choice); ``h`` (identity + vertical
flip); ``hw`` (identity, both single flips and the double flip). Views are averaged by their mean.
Members are averaged by ``mean`` (the original's choice), ``rms`` (sqrt of the weighted mean of squares;
the original's private-leaderboard scores with each are in docs/fidelity.md) or ``geo`` (weighted
geometric mean). Classifiers (``arch="classifier"``, ``(B, 4)`` logits) are averaged by the mean of their
probabilities and gate the minimum areas (see ``severjax.predict.postprocess``).

Images reach an ensemble through ``severjax.predict.stream`` (``predict_images``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from severjax.export import DEFAULT_NORMALIZE, load_model
from severjax.predict.postprocess import PostprocessConfig, postprocess_for_rle

log = logging.getLogger(__name__)

TTA_MODES = ("none", "w", "h", "hw")
AVERAGES = ("mean", "rms", "geo")
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
