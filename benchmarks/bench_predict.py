"""Prediction benchmarks, each against its reference measured in the same run; prints ratios.

    python benchmarks/bench_predict.py [--images 16] [--batch_size 4] [--skip_pipeline] [--memory]

1. pipeline: images/s of the whole prediction (read JPEG -> 2-model ensemble, Unet + FPN on
   efficientnet-b0, flip-W TTA -> mean -> post-processing -> RLE) with severjax (predict_images), against the
   same pipeline in PyTorch (SMP models with the same weights) + numpy post-processing + rle_encode.
2. post-processing + RLE: ms per image of the prediction path after the model (probabilities on the device:
   jit ``postprocess_for_rle``, host ``finish_rles``), against the plain numpy/scipy version
   (``reference_postprocess`` + ``rle_encode``), on smooth random probability maps, for the default setting
   and with small-component removal. Target: >= 5x.
3. --memory: peak RSS (ru_maxrss) of ``tools/predict.py`` over N and 10 N images (a few synthetic files
   linked many times) in fresh subprocesses; the two should agree within 10%.

CPU timings on a shared machine are noisy: each figure is the best of ``--repeats`` runs, the two sides
taking turns.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


import numpy as np  # noqa: E402

import harness  # noqa: E402

NORMALIZE = {"mean": 0.3439, "std": 0.196}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16, help="images for the pipeline benchmark (default 16)")
    p.add_argument("--batch_size", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--pp_images", type=int, default=16, help="images for the post-processing benchmark")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats, best kept (default 5)")
    p.add_argument("--skip_pipeline", action="store_true", help="only the post-processing benchmark")
    p.add_argument("--memory", action="store_true", help="also the peak-memory comparison")
    p.add_argument("--memory_images", type=int, default=200, help="N of the memory comparison (N vs 10 N)")
    p.add_argument("--workdir", default=None, help="where to put data and models (default: a temp folder)")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_predict_")
    results = {}
    results.update(bench_postprocess(args.pp_images, args.batch_size * 2, args.repeats))
    if not args.skip_pipeline or args.memory:
        data = _data(workdir, max(args.images, 8))
        if not args.skip_pipeline:
            results.update(bench_pipeline(workdir, data, args.images, args.batch_size, args.repeats))
        if args.memory:
            results.update(bench_memory(workdir, data, args.memory_images, args.batch_size))
    return results


# ------------------------------------------------------------------------------------ post-processing


def bench_postprocess(n_images: int, batch: int, repeats: int) -> dict:
    import jax.numpy as jnp
    from scipy import ndimage

    from severjax.data.rle import rle_encode
    from severjax.predict.postprocess import PostprocessConfig, finish_rles, postprocess_for_rle, reference_postprocess

    rng = np.random.default_rng(0)
    # Smooth blobs; about a third of the (image, class) pairs reach the threshold: maps like a trained model's.
    noise = ndimage.gaussian_filter(rng.standard_normal((batch, 256, 1600, 4)).astype(np.float32),
                                    sigma=(0, 12, 12, 0))
    offset = np.where(rng.random((batch, 1, 1, 4)) < 0.35, 2.0, 8.0).astype(np.float32)
    probs = (1.0 / (1.0 + np.exp(-(2.0 * noise / noise.std() - offset)))).astype(np.float32)
    batches = max(1, n_images // batch)
    results = {}
    for name, config in (("default", PostprocessConfig()),
                         ("components", PostprocessConfig(min_component=150))):
        device_probs = jnp.asarray(probs)

        def run_jax():
            rows = []
            for _ in range(batches):
                rows += finish_rles(postprocess_for_rle(device_probs, config)).rles
            return rows

        def run_numpy():
            rows = []
            for _ in range(batches):
                masks = reference_postprocess(probs, config)
                rows += [[rle_encode(m[..., c]) for c in range(4)] for m in masks]
            return rows

        jax_rows = run_jax()  # compile
        numpy_rows = run_numpy()
        assert jax_rows == numpy_rows, f"{name}: jax and numpy submissions differ"
        t_jax, t_np = (t / (batches * batch) for t in _best_interleaved((run_jax, run_numpy), repeats))
        defects = np.mean([[bool(r) for r in row] for row in jax_rows], axis=0)
        print(f"post-processing + RLE [{name}] ({batches * batch} images, share with defects by class "
              f"{np.round(defects, 2).tolist()}): jax {1e3 * t_jax:.2f} ms/image, numpy {1e3 * t_np:.2f} ms/image, "
              f"speed-up {t_np / t_jax:.1f}x")
        results[f"pp_{name}_jax_ms"], results[f"pp_{name}_numpy_ms"] = 1e3 * t_jax, 1e3 * t_np
        results[f"pp_{name}_ratio"] = t_np / t_jax
    return results


# ------------------------------------------------------------------------------------------- pipeline


def bench_pipeline(workdir: str, data: str, n_images: int, batch: int, repeats: int) -> dict:
    import torch
    import segmentation_models_pytorch as smp

    from severjax.export import save_model
    from severjax.data import kaggle
    from severjax.data.rle import rle_decode, rle_encode
    from severjax.models import create_model
    from severjax.models.convert import convert_smp_state_dict
    from severjax.predict import Ensemble, load_members, predict_images
    from severjax.predict.postprocess import PostprocessConfig, reference_postprocess

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch_models, paths = [], []
    for arch, cls in (("unet", smp.Unet), ("fpn", smp.FPN)):
        tm = cls("efficientnet-b0", encoder_weights=None, in_channels=1, classes=4).eval()
        spec = dict(arch=arch, encoder="efficientnet-b0", classes=4, in_channels=1)
        state = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
        path = os.path.join(workdir, f"model_{arch}")
        save_model(path, convert_smp_state_dict(state, create_model(**spec)), {**spec, "normalize": NORMALIZE})
        torch_models.append(tm)
        paths.append(path)
    names = kaggle.list_images(os.path.join(data, "test_images"))
    image_paths = [os.path.join(data, "test_images", names[i % len(names)]) for i in range(n_images)]
    config = PostprocessConfig()
    ensemble = Ensemble(load_members(paths), tta="w", postprocess=config)

    def run_jax():
        return [r.rles for r in predict_images(ensemble, image_paths, batch)]

    shift, scale = np.float32(NORMALIZE["mean"] * 255), np.float32(1 / (NORMALIZE["std"] * 255))

    def run_torch():
        rows = []
        for start in range(0, len(image_paths), batch):
            images = np.stack([kaggle.load_image(p) for p in image_paths[start:start + batch]])
            x = torch.from_numpy(np.ascontiguousarray(((images.astype(np.float32) - shift) * scale)
                                                      .transpose(0, 3, 1, 2)))
            with torch.no_grad():
                probs = sum((torch.sigmoid(m(x)) + torch.flip(torch.sigmoid(m(torch.flip(x, [3]))), [3])) / 2
                            for m in torch_models) / len(torch_models)
            masks = reference_postprocess(probs.numpy().transpose(0, 2, 3, 1), config)
            rows += [[rle_encode(m[..., c]) for c in range(4)] for m in masks]
        return rows

    t0 = time.perf_counter()
    jax_rows = run_jax()
    compile_s = time.perf_counter() - t0
    torch_rows = run_torch()
    differ = sum(int((rle_decode(a) != rle_decode(b)).sum()) for ra, rb in zip(jax_rows, torch_rows)
                 for a, b in zip(ra, rb) if a != b)
    t_jax, t_torch = _best_interleaved((run_jax, run_torch), repeats)
    print(f"pipeline, 2 models (unet + fpn, efficientnet-b0), flip-W TTA, {n_images} images of 256x1600, batch "
          f"{batch}: severjax {n_images / t_jax:.2f} images/s, pytorch+numpy {n_images / t_torch:.2f} images/s, "
          f"speed-up {t_torch / t_jax:.2f}x (first severjax run with compilation: {compile_s:.1f} s; "
          f"masks differ on {differ} of {4 * 256 * 1600 * n_images} pixels, at float ties)")
    return {"pipeline_jax_img_s": n_images / t_jax, "pipeline_torch_img_s": n_images / t_torch,
            "pipeline_ratio": t_torch / t_jax}


# --------------------------------------------------------------------------------------------- memory


def bench_memory(workdir: str, data: str, n: int, batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    from severjax.export import save_model
    from severjax.models import create_model

    spec = dict(arch="unet", encoder="efficientnet-b0", classes=4, in_channels=1, decoder_channels=[16, 8, 8, 8, 8])
    model = create_model(**spec)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 64, 64, 1))))(jax.random.key(0))
    # A zero last layer with biases: constant masks, so the submission rows (RLE strings, kept in memory
    # for the row order) stay tiny and only the streaming itself is measured. The encoder and decoder
    # still run in full.
    head = dict(variables["params"]["segmentation_head_0"])
    head["kernel"] = jnp.zeros_like(head["kernel"])
    head["bias"] = jnp.asarray([-8.0, -8.0, 8.0, -8.0])
    variables = {"params": {**variables["params"], "segmentation_head_0": head},
                 "batch_stats": variables["batch_stats"]}
    model_dir = save_model(os.path.join(workdir, "model_mem"), variables, {**spec, "normalize": NORMALIZE})
    sources = sorted(os.listdir(os.path.join(data, "test_images")))
    code = ("import resource, sys; from severjax.cli.predict import main; main(sys.argv[1:]); "
            "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peaks = {}
    for count in (n, 10 * n):
        folder = os.path.join(workdir, f"mem_{count}")
        if not os.path.isdir(folder):
            os.makedirs(folder)
            for i in range(count):
                os.symlink(os.path.join(data, "test_images", sources[i % len(sources)]),
                           os.path.join(folder, f"{i:09x}.jpg"))
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", code, "--checkpoint",
                              model_dir, "--images", folder, "--out", os.path.join(workdir, f"mem_{count}.csv"),
                              "--tta", "none", "--batch_size", str(batch), "--quiet"],
                             capture_output=True, text=True, check=True)
        peaks[count] = int(run.stdout.split("maxrss")[-1]) / 1024
        print(f"memory: {count} images -> peak RSS {peaks[count]:.0f} MiB ({time.perf_counter() - t0:.0f} s)")
    ratio = peaks[10 * n] / peaks[n]
    print(f"memory: peak RSS ratio {10 * n} vs {n} images = {ratio:.3f} (target <= 1.10)")
    return {"memory_mib": peaks, "memory_ratio": ratio}


# -------------------------------------------------------------------------------------------- helpers


def _data(workdir: str, n: int) -> str:
    from severjax.data.synthetic import make_dataset

    folder = os.path.join(workdir, "data")
    if not os.path.isfile(os.path.join(folder, "sample_submission.csv")):
        make_dataset(folder, n_train=0, n_test=n, seed=0, overwrite=True)
    return folder


def _best_interleaved(fns, repeats: int) -> list[float]:
    """Best wall time of each function over ``repeats`` rounds, the functions taking turns in each round
    (so that the load of a shared machine hits both sides alike)."""
    samples, _ = harness.run_timed(fns, 0, repeats, interleave=True)
    return [min(s) for s in samples]


if __name__ == "__main__":
    from severjax.ops import hostmem

    hostmem.reexec_with_huge_pages()  # first: it restarts the process
    main()
