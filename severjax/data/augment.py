"""Albumentations train/validation transforms for single-channel steel images.

The train transform follows the original solution: a 50/50 choice between a crop that contains
mask pixels (when the image has any) and a plain random crop; then exactly one of CLAHE, a 3x3
Gaussian blur or a sharpen (chosen in proportion to 0.5/0.3/0.3); random flips; normalisation.
Validation and test images are only normalised.

Randomness is explicit: :func:`apply` takes the ``np.random.Generator`` that grain's
``RandomMapTransform`` hands each record and points every albumentations transform at it, so an
augmented stream is a pure function of (seed, record index) and can be resumed exactly.

Two deliberate differences from the original code, both config-driven:
- Flips are ``HorizontalFlip(p=hflip)`` then ``VerticalFlip(p=vflip)`` (0.5 each). The original's
  ``Flip(p=0.5)`` flipped half the images, each one vertically, horizontally or both.
- ``GaussianBlur(blur_limit=k)`` in albumentations 2 samples sigma; the original (cv2 with sigma 0)
  derived it from the kernel size, so sigma is fixed to OpenCV's rule ``0.3*((k-1)/2 - 1) + 0.8``
  (0.8 for k=3) to reproduce it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np


def train_transform(
    crop: Sequence[int],
    *,
    mean: float,
    std: float,
    crop_nonempty_p: float = 0.5,
    clahe_clip: Sequence[float] = (1.0, 4.0),
    blur: int = 3,
    sharpen_alpha: Sequence[float] = (0.2, 0.3),
    oneof_weights: Sequence[float] = (0.5, 0.3, 0.3),
    hflip: float = 0.5,
    vflip: float = 0.5,
) -> A.Compose:
    """Returns the training transform: crop, one of CLAHE/blur/sharpen, flips, normalise.

    ``crop`` is (height, width); ``oneof_weights`` are the relative weights of CLAHE, blur and
    sharpen. Input: ``image`` uint8 (H, W, 1), ``mask`` uint8 (H, W, C).
    """
    height, width = (int(v) for v in crop)
    if len(oneof_weights) != 3:
        raise ValueError(f"oneof_weights needs 3 weights (clahe, blur, sharpen), got {oneof_weights!r}")
    if blur < 1 or blur % 2 == 0:
        raise ValueError(f"blur must be an odd kernel size >= 1, got {blur!r}")
    clahe_w, blur_w, sharpen_w = (float(w) for w in oneof_weights)
    sigma = 0.3 * ((blur - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for sigmaX=0
    return A.Compose(
        [
            A.OneOf(
                [
                    A.CropNonEmptyMaskIfExists(height, width, p=float(crop_nonempty_p)),
                    A.RandomCrop(height, width, p=1.0 - float(crop_nonempty_p)),
                ],
                p=1.0,
            ),
            A.OneOf(
                [
                    A.CLAHE(clip_limit=tuple(float(c) for c in clahe_clip), tile_grid_size=(8, 8), p=clahe_w),
                    A.GaussianBlur(blur_limit=(blur, blur), sigma_limit=(sigma, sigma), p=blur_w),
                    A.Sharpen(alpha=tuple(float(a) for a in sharpen_alpha), lightness=(0.5, 1.0), p=sharpen_w),
                ],
                p=1.0,
            ),
            A.HorizontalFlip(p=float(hflip)),
            A.VerticalFlip(p=float(vflip)),
            A.Normalize(mean=float(mean), std=float(std), max_pixel_value=255.0),
        ]
    )


def eval_transform(*, mean: float, std: float) -> A.Compose:
    """Returns the validation/test transform: normalisation only, full image."""
    return A.Compose([A.Normalize(mean=float(mean), std=float(std), max_pixel_value=255.0)])


def train_kwargs(config: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`train_transform` from ``config.data`` and ``config.aug`` (plain values)."""
    aug = config.aug
    return dict(
        crop=tuple(int(v) for v in config.data.crop),
        mean=float(config.data.mean),
        std=float(config.data.std),
        crop_nonempty_p=float(aug.crop_nonempty_p),
        clahe_clip=tuple(float(v) for v in aug.clahe_clip),
        blur=int(aug.blur),
        sharpen_alpha=tuple(float(v) for v in aug.sharpen_alpha),
        oneof_weights=tuple(float(v) for v in aug.oneof),
        hflip=float(aug.hflip),
        vflip=float(aug.vflip),
    )


def apply(
    transform: A.Compose, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Applies ``transform`` to (image, mask); returns float32 (h, w, 1) and float32 (h, w, C).

    With ``rng``, every random draw of the transform comes from it (numpy draws directly, Python
    ``random`` draws from a ``random.Random`` seeded by it), so the result depends only on ``rng``.
    Not thread-safe: it re-points the (shared) transform's generators before each call.
    """
    if image.ndim != 3 or image.shape[-1] != 1 or image.dtype != np.uint8:
        raise ValueError(f"augment.apply needs a uint8 (H, W, 1) image, got {image.dtype} {image.shape}")
    if mask.ndim != 3 or mask.shape[:2] != image.shape[:2]:
        raise ValueError(f"augment.apply needs a (H, W, C) mask matching image {image.shape}, got {mask.shape}")
    if rng is not None:
        transform.set_random_state(rng, random.Random(int(rng.integers(0, 2**63 - 1))))
    out = transform(image=image, mask=mask)
    out_image = np.asarray(out["image"], dtype=np.float32)
    if out_image.ndim == 2:  # albumentations may drop a singleton channel
        out_image = out_image[..., None]
    return out_image, np.asarray(out["mask"], dtype=np.float32)
