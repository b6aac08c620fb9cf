"""RLE encode/decode speed: severjax.data.rle against the plain numpy version Kaggle kernels used.

    python benchmarks/bench_rle.py [--repeats 50]

Two 256x1600 masks at ~10% density: defect-like blobs (a few hundred runs) and salt noise (tens of
thousands of runs, the worst case). Prints microseconds per mask and the ratio reference / ours.
"""

from __future__ import annotations

import argparse

import numpy as np

from harness import time_fn  # noqa: E402

from severjax.data.rle import rle_decode, rle_encode  # noqa: E402


def reference_encode(mask: np.ndarray) -> str:
    """The common Kaggle-kernel mask2rle."""
    pixels = mask.T.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def reference_decode(rle: str, shape=(256, 1600)) -> np.ndarray:
    """The common Kaggle-kernel rle2mask: a Python loop over runs."""
    s = rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0::2], s[1::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = 1
    return img.reshape(shape, order="F")


def masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    blobs = np.zeros((256, 1600), bool)
    while blobs.mean() < 0.10:
        r, c = rng.integers(0, 256), rng.integers(0, 1600)
        h, w = rng.integers(10, 60), rng.integers(20, 200)
        blobs[r:r + h, c:c + w] = True
    return {"blobs": blobs, "noise": rng.random((256, 1600)) < 0.10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    print(f"{'mask':8s} {'op':7s} {'runs':>7s} {'ours us':>10s} {'numpy us':>10s} {'ratio':>7s}")
    for name, mask in masks().items():
        rle = rle_encode(mask)
        assert rle == reference_encode(mask.astype(np.uint8))
        assert (rle_decode(rle) == reference_decode(rle).astype(bool)).all()
        n_runs = len(rle.split()) // 2
        for op, ours, ref, arg in (("encode", rle_encode, reference_encode, mask),
                                   ("decode", rle_decode, reference_decode, rle)):
            a, b = (time_fn(fn, arg, repeats=args.repeats).median * 1e6 for fn in (ours, ref))
            print(f"{name:8s} {op:7s} {n_runs:7d} {a:10.0f} {b:10.0f} {b / a:7.2f}x")


if __name__ == "__main__":
    main()
