"""Every severjax-vs-reference comparison in one command: one table, optionally one JSON file.

    python benchmarks/run_all.py [--quick] [--json out.json] [--repeats 5] [--only models postprocess ...]

Rows (median of ``--repeats`` timed calls after a warm-up of at least ``harness.WARMUP_S`` seconds a side; each
side's calls back to back, as a training or prediction loop makes them - see ``harness.time_pair`` for why not
alternated; compile times apart):

* ``forward``: FPN/efficientnet-b5 at 256x416 and Unet/se_resnext50_32x4d at 256x448, batch 2, eval mode,
  against the segmentation_models_pytorch model of the same arch/encoder; FLOPs from XLA's cost analysis,
  achieved GFLOP/s of both and the share of the CPU's peak (``bench_flops.machine_peak``).
* ``train step``: the same models and crops, batch 2: ``severjax.train.steps.train_steps`` under ``jit``, in calls of
  ``config.steps_per_call`` steps as the trainer runs them (1 with huge pages, see ``severjax.ops.hostmem``),
  against as many steps of forward + 0.6 BCE + 0.4 soft Dice + backward + two-group RAdam in PyTorch; times
  are per step. Memory: XLA's memory analysis of the compiled step (arguments + outputs - donated aliases +
  temporaries) and the resident-memory rise of one step for both (``harness.peak_rss``).
* ``full image TTA``: one 256x1600 image, identity + horizontal flip, sigmoid, flip undone, views averaged
  (``severjax.predict.ensemble.tta_probabilities``) against the same in PyTorch.
* ``postprocess+RLE``: per image, what ``predict_images`` does after the model, from probabilities already on
  the device: the jit half (``postprocess_for_rle``) + the host half (``finish_rles``: components, min areas,
  RLE text) against its numpy/scipy reference (``reference_postprocess``) + the Kaggle-kernel ``mask2rle``;
  with and without small-component removal. Outputs are checked equal.
* ``rle``: encode/decode of a 256x1600 mask (blobs) against the Kaggle-kernel numpy functions.
* ``pipeline``: training-batch images/s per grain worker (0 = in-process) against the original's per-image
  work in one process (JPEG + RLE + augmentation), from ``bench_pipeline``.

``--quick`` keeps the FPN-b5 model rows (forward, train step), post-processing, RLE and the in-process
pipeline. Compiling the two train steps is most of a run's time (run lengths: docs/performance.md,
"Benchmarks"). Torch's OpenMP threads are made passive (``OMP_WAIT_POLICY=PASSIVE``): threads spinning on a
shared CPU slow the reference down.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

import bench_flops  # noqa: E402
import harness  # noqa: E402
from harness import Result  # noqa: E402

# name -> (config file, bench_flops.MODELS key)
MODEL_CONFIGS = {"fpn-b5": "b5_fpn.py", "unet-sx50": "sx50_unet.py"}
GROUPS = ("models", "tta", "postprocess", "rle", "pipeline")


def main(argv=None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer items (FPN-b5 only, in-process pipeline)")
    parser.add_argument("--json", default=None, help="write the rows and the machine description here")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per item (median reported)")
    parser.add_argument("--batch", type=int, default=2, help="images a forward / train step")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODEL_CONFIGS),
                        help="models to time (default: both; --quick: fpn-b5)")
    parser.add_argument("--only", nargs="+", default=list(GROUPS), choices=GROUPS, help="item groups to run")
    parser.add_argument("--ref_threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--torch_memory_probe", default=None, metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_memory_probe:  # internal: run by torch_step_peak_rss in a fresh process
        print(json.dumps({"peak_rss": _torch_memory_probe(args.torch_memory_probe, args.batch)}))
        return []
    if args.repeats < 5:
        print(f"note: --repeats {args.repeats} < 5: medians of fewer calls are noisy", flush=True)
    models = args.models or (["fpn-b5"] if args.quick else list(MODEL_CONFIGS))
    harness.torch_setup(args.ref_threads)
    _quiet_libraries()
    peak = bench_flops.machine_peak()
    start = time.perf_counter()
    print(f"machine: {harness.machine_info()}", flush=True)
    print(f"peak: {peak.flops_per_s / 1e9:.0f} GFLOP/s = {peak.how}", flush=True)

    rows: list[Result] = []

    def add(new_rows: Iterable[Result]) -> None:
        for row in new_rows:  # each row is printed as soon as it is measured
            rows.append(row)
            harness.print_table([row])
            print(f"[{time.perf_counter() - start:.0f} s]", flush=True)

    if "models" in args.only:
        for name in models:
            add(model_rows(name, args.batch, args.repeats, peak))
    if "tta" in args.only:
        for name in models if not args.quick else []:
            add(tta_rows(name, args.repeats, peak))
    if "postprocess" in args.only:
        add(postprocess_rows(args.repeats))
    if "rle" in args.only:
        add(rle_rows(max(args.repeats, 10)))
    if "pipeline" in args.only:
        add(pipeline_rows([0] if args.quick else [0, 1, 2]))

    total = time.perf_counter() - start
    cpu = _cpu_seconds()
    print(f"\n=== all rows ({total:.0f} s wall, {cpu:.0f} s CPU incl. children; jax/ref < 1: severjax faster; "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores) ===")
    harness.print_table(rows)
    if args.json:
        harness.write_json(rows, args.json, seconds=total, cpu_seconds=cpu, quick=args.quick, repeats=args.repeats,
                           peak_gflops=peak.flops_per_s / 1e9, peak_how=peak.how)
        print(f"wrote {args.json}")
    return rows


# ------------------------------------------------------------------------------------------------ models


def model_rows(name: str, batch: int, repeats: int, peak: bench_flops.PeakEstimate) -> Iterator[Result]:
    """Forward and train-step rows of one model at its config's crop, JAX against SMP/PyTorch."""
    import jax

    config = load_config(MODEL_CONFIGS[name])
    arch, encoder, crop, _ = bench_flops.MODELS[name]
    label = f"{arch}/{encoder} b{batch} {crop[0]}x{crop[1]}"
    rng = np.random.default_rng(0)
    image = rng.normal(size=(batch, *crop, 1)).astype(np.float32)
    mask = (rng.random((batch, *crop, 4)) < 0.05).astype(np.float32)

    # forward (eval mode)
    _, variables, x, compiled, compile_s = bench_flops.jax_forward(name, batch)
    flops = bench_flops.xla_flops(compiled)
    jax_t, ref_t = harness.time_pair(lambda: compiled(variables, x), bench_flops.torch_forward(name, image),
                                     repeats=repeats)
    forward = Result.from_timings(f"forward {label}", jax_t, ref_t, unit="batch",
                                  **bench_flops.flops_extra(flops, jax_t, ref_t, peak))
    forward.compile_s = compile_s
    yield forward
    del variables, x, compiled
    gc.collect()

    # train step: calls of config.steps_per_call steps (the trainer's), as many PyTorch steps a call
    jax_call, step_program, step_compile_s, k = harness.jax_train_call(config, image, mask)
    jax_mem = xla_peak_bytes(step_program)
    del step_program
    torch_call = harness.repeat_calls(torch_train_step(config, name, image, mask), k)
    jax_t, ref_t = harness.time_pair(jax_call, torch_call, repeats=repeats)
    jax_rss, _ = harness.peak_rss(jax_call)
    del torch_call
    gc.collect()
    ref_rss = torch_step_peak_rss(name, batch)
    step = Result.from_timings(f"train step {label}", jax_t, ref_t, unit="step", per=k, steps_per_call=k,
                               xla_peak_mib=jax_mem / 2**20, jax_rss_mib=jax_rss / 2**20, ref_rss_mib=ref_rss / 2**20,
                               images_per_s=batch * k / jax_t.median, ref_images_per_s=batch * k / ref_t.median)
    step.compile_s = step_compile_s
    yield step
    del jax_call
    gc.collect()
    jax.clear_caches()


def xla_peak_bytes(compiled) -> int:
    """Arguments + outputs - donated (aliased) buffers + temporaries of a compiled XLA program."""
    m = compiled.memory_analysis()
    if m is None:
        raise ValueError("this backend gives no memory analysis")
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def torch_train_step(config, name: str, image: np.ndarray, mask: np.ndarray) -> Callable[[], Any]:
    """One PyTorch training step of the SMP model: forward, 0.6 BCE + 0.4 soft Dice, backward, RAdam with
    decoupled weight decay in two groups (encoder / decoder learning rates and decays of the config)."""
    harness.torch_setup()
    return harness.torch_train_step(bench_flops.smp_model(name, dropout=config.model.dropout), config, image, mask)


def torch_step_peak_rss(name: str, batch: int) -> int:
    """Peak resident-memory rise of one PyTorch train step (the second), measured in a fresh process.

    In this process glibc keeps freed memory from earlier steps, so a step's RSS rise reads ~0. The probe
    process fixes ``MALLOC_MMAP_THRESHOLD_`` so that large buffers are mapped and unmapped each step, as
    XLA's are, and ``harness.peak_rss`` sees the step's real peak.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 17), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch_memory_probe", name,
                           "--batch", str(batch)], env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode:
        raise RuntimeError(f"torch memory probe for {name} failed:\n{proc.stderr[-3000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss"])


def _torch_memory_probe(name: str, batch: int) -> int:
    harness.torch_setup()
    config = load_config(MODEL_CONFIGS[name])
    crop = bench_flops.MODELS[name][2]
    rng = np.random.default_rng(0)
    image = rng.normal(size=(batch, *crop, 1)).astype(np.float32)
    mask = (rng.random((batch, *crop, 4)) < 0.05).astype(np.float32)
    step = torch_train_step(config, name, image, mask)
    step()  # the first step allocates the gradients and the optimizer state
    peak, _ = harness.peak_rss(step)
    return peak


# --------------------------------------------------------------------------------------- full-image TTA


def tta_rows(name: str, repeats: int, peak: bench_flops.PeakEstimate) -> list[Result]:
    """One 256x1600 image with flip-W TTA (2 views): severjax's predict forward against PyTorch."""
    import jax
    import jax.numpy as jnp

    from severjax.predict.ensemble import tta_probabilities

    arch, encoder, _, kw = bench_flops.MODELS[name]
    from severjax.models import create_model
    from severjax.train.state import init_variables

    module = create_model(arch, encoder, classes=4, in_channels=1, **kw)
    x = np.random.default_rng(0).normal(size=(1, 256, 1600, 1)).astype(np.float32)
    variables = jax.device_put(init_variables(module, jax.random.key(0), jnp.asarray(x)))
    xd = jax.device_put(x)
    start = time.perf_counter()
    compiled = jax.jit(lambda v, x: tta_probabilities(module, v, x, "w")).lower(variables, xd).compile()
    compile_s = time.perf_counter() - start
    flops = bench_flops.xla_flops(compiled)

    torch = harness.torch_setup()
    model = bench_flops.smp_model(name).eval()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def reference():
        with torch.inference_mode():
            views = torch.cat([xt, torch.flip(xt, dims=[3])])
            probs = torch.sigmoid(model(views))
            return (probs[:1] + torch.flip(probs[1:], dims=[3])) / 2

    jax_t, ref_t = harness.time_pair(lambda: compiled(variables, xd), reference, repeats=repeats)
    row = Result.from_timings(f"full image TTA-w {arch}/{encoder} 256x1600", jax_t, ref_t, unit="image",
                              **bench_flops.flops_extra(flops, jax_t, ref_t, peak))
    row.compile_s = compile_s
    del variables, compiled, model
    gc.collect()
    jax.clear_caches()
    return [row]


# ----------------------------------------------------------------------------------------- post-process


def postprocess_rows(repeats: int, images: int = 8) -> list[Result]:
    """Per-image post-processing + RLE of probability maps on the device (as the model leaves them): jit + host
    finish (the prediction path, ``severjax.predict.stream._host_results``) against numpy/scipy + mask2rle."""
    import jax

    from bench_rle import reference_encode
    from severjax.predict.postprocess import PostprocessConfig, finish_rles, postprocess_for_rle, reference_postprocess

    probs = synthetic_probabilities(images)
    probs_device = jax.device_put(probs)
    rows = []
    for label, config in (("min area", PostprocessConfig()),
                          ("min area + components<150", PostprocessConfig(min_component=150))):
        def ours():
            return finish_rles(postprocess_for_rle(probs_device, config)).rles

        def reference():
            masks = reference_postprocess(probs, config)
            return [[reference_encode(masks[b, :, :, c].astype(np.uint8)) for c in range(masks.shape[-1])]
                    for b in range(masks.shape[0])]

        if ours() != reference():
            raise AssertionError(f"post-processing ({label}): jit and numpy reference RLEs differ")
        jax_t, ref_t = harness.time_pair(ours, reference, repeats=repeats)
        row = Result.from_timings(f"postprocess+RLE ({label}), batch {images}", jax_t, ref_t, unit="image",
                                  per=images, images_per_s=images / jax_t.median)
        rows.append(row)
    return rows


def synthetic_probabilities(images: int, seed: int = 0) -> np.ndarray:
    """Smooth random probability maps ``(images, 256, 1600, 4)`` float32: blobs of defects, ~5-15% per class."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.empty((images, 256, 1600, 4), np.float32)
    for b in range(images):
        for c in range(4):
            coarse = rng.random((16, 100)).astype(np.float32)
            field = cv2.resize(coarse, (1600, 256), interpolation=cv2.INTER_CUBIC)
            out[b, :, :, c] = np.clip(field, 0.0, 1.0) ** (2.0 + c)
    return out


# ----------------------------------------------------------------------------------------------- RLE


def rle_rows(repeats: int) -> list[Result]:
    """RLE encode / decode of a blob mask (~10% defects): severjax.data.rle against the Kaggle kernels'."""
    import bench_rle

    from severjax.data.rle import rle_decode, rle_encode

    mask = bench_rle.masks()["blobs"]
    rle = rle_encode(mask)
    rows = []
    for op, ours, ref, arg in (("encode", rle_encode, bench_rle.reference_encode, mask),
                               ("decode", rle_decode, bench_rle.reference_decode, rle)):
        jax_t, ref_t = harness.time_pair(lambda: ours(arg), lambda: ref(arg), repeats=repeats)
        row = Result.from_timings(f"rle {op} (numpy, no jax) 256x1600 blobs", jax_t, ref_t, unit="mask")
        row.compile_s = None  # nothing compiles
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- pipeline


def pipeline_rows(workers: list[int], images: int = 48, batch: int = 6, batches: int = 6) -> list[Result]:
    """Training-batch seconds per image per worker (grain) against the original's per-process work."""
    import bench_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        setup = bench_pipeline.make_setup(tmp, images, (256, 416), batch)
        reference = bench_pipeline.reference_rate(setup, images)
        for n in workers:
            rate = bench_pipeline.loader_rate(setup, n, batches, warmup=2)
            per_worker = rate / max(n, 1)
            rows.append(Result(f"pipeline train batches, {n} grain worker(s) (per worker)", 1.0 / per_worker,
                               1.0 / reference, unit="image",
                               extra={"images_per_s": rate, "per_worker": per_worker, "ref_per_process": reference}))
    return rows


# -------------------------------------------------------------------------------------------- helpers


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (grain workers, probes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def load_config(filename: str):
    """``get_config()`` of ``configs/<filename>``."""
    from severjax import config

    return config.load(os.path.join(ROOT, "configs", filename))


def _quiet_libraries() -> None:
    """TFDS progress bars and absl INFO lines would bury the table."""
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    try:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    from severjax.ops import hostmem

    hostmem.reexec_with_huge_pages()  # first: it restarts the process
    main()
