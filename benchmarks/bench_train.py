"""Training step speed: severjax (JAX/Flax) against the SMP/PyTorch reference, same model, loss, optimizer.

    python benchmarks/bench_train.py [--config configs/b5_fpn.py] [--batch 2] [--steps 5] [--warmup 2]
                                     [--steps_per_call K] [--dtype float32|bfloat16] [--skip_torch]

Builds the config's model twice - ``severjax.models.create_model`` and the segmentation_models_pytorch
model of the same arch/encoder (random weights) - and times full training steps at the config's crop:
forward, 0.6 * BCE + 0.4 * (1 - soft Dice over the batch), backward, two-group RAdam with decoupled
weight decay (torch: ``torch.optim.RAdam(decoupled_weight_decay=True)``). The JAX side runs as the
trainer does: ``severjax.train.steps.train_steps`` under ``jit`` on one device, ``config.steps_per_call``
steps a call (0 = the trainer's choice, ``severjax.ops.policy.steps_per_call``; the first call, compiling, is
reported apart); the PyTorch side runs as many steps a call. Each side's calls run back to back (warm-up, then the timed
calls), as a training loop makes them; ``--interleave`` alternates the timed calls instead, for a shared
machine whose load drifts (on a VM that hands freed memory back to its host this charges JAX for
PyTorch's turn: see ``harness.time_pair``). Prints images/s (wall) and process CPU time per step of each, and the ratio JAX / PyTorch,
measured in the same run.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from severjax.ops import hostmem  # noqa: E402


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "b5_fpn.py"))
    parser.add_argument("--batch", type=int, default=2, help="images a step (the configs' batch is too big for a CPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed calls of each")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (allocator), at least")
    parser.add_argument("--warmup_s", type=float, default=harness.WARMUP_S,
                        help="seconds of untimed calls first, at least (see harness.WARMUP_S)")
    parser.add_argument("--steps_per_call", type=int, default=None,
                        help="JAX steps a call (default: the config's; 0 = 1, or 3 on a CPU without huge "
                             "pages); PyTorch runs as many")
    parser.add_argument("--dtype", default=None, help="JAX compute dtype (default: the config's)")
    parser.add_argument("--skip_torch", action="store_true", help="time the JAX step only")
    parser.add_argument("--interleave", action="store_true",
                        help="alternate the JAX and PyTorch timed calls (default: each side's back to back)")
    args = parser.parse_args(argv)

    config = _load_config(args.config)
    if args.dtype:
        config.model.dtype = args.dtype
    rng = np.random.default_rng(0)
    h, w = config.data.crop
    image = rng.normal(size=(args.batch, h, w, 1)).astype(np.float32)
    mask = (rng.random((args.batch, h, w, 4)) < 0.05).astype(np.float32)
    print(f"{config.model.arch}/{config.model.encoder} crop {h}x{w} batch {args.batch}, "
          f"{args.steps} timed calls each after {args.warmup} warm-up calls and {args.warmup_s:g} s, "
          + ("JAX and PyTorch calls alternated" if args.interleave else "each side's calls back to back"), flush=True)
    print(hostmem.huge_pages_status(), flush=True)

    jax_call, _, compile_s, k = harness.jax_train_call(config, image, mask, args.steps_per_call)
    print(f"jax: {k} steps a call (severjax.train.train_steps), compiled in {compile_s:.1f} s", flush=True)
    calls = {"jax": lambda: harness.block(jax_call())}
    if not args.skip_torch:
        calls["torch"] = harness.repeat_calls(_torch_step(config, image, mask), k)
    samples, cpu_samples = harness.run_timed(list(calls.values()), args.warmup, args.steps, args.interleave,
                                                 warmup_s=args.warmup_s)
    wall = {name: sum(x) for name, x in zip(calls, samples)}
    cpu = {name: sum(x) for name, x in zip(calls, cpu_samples)}
    results = {}
    steps = args.steps * k
    for name in calls:
        results[f"{name}_images_per_s"] = args.batch * steps / wall[name]
        print(f"{name:5s} : {results[f'{name}_images_per_s']:.3f} images/s ({wall[name] / steps * 1e3:.0f} "
              f"ms/step wall, {cpu[name] / steps * 1e3:.0f} ms/step process CPU)", flush=True)
    if "torch" in calls:
        results["ratio"] = results["jax_images_per_s"] / results["torch_images_per_s"]
        print(f"torch threads {_torch_threads()}, jax dtype {config.model.dtype}")
        print(f"ratio jax/torch (images/s): {results['ratio']:.2f}")
    return results


def _torch_step(config, image, mask):
    """A closure running one PyTorch training step of the SMP model (same loss and optimizer)."""
    import segmentation_models_pytorch as smp

    harness.torch_setup()
    kwargs = dict(encoder_name=config.model.encoder, encoder_weights=None, in_channels=config.model.in_channels,
                  classes=config.model.classes)
    if config.model.arch == "fpn":
        model = smp.FPN(decoder_merge_policy=config.model.decoder_merge_policy,
                        decoder_dropout=config.model.dropout, **kwargs)
    else:
        model = smp.Unet(**kwargs)
    return harness.torch_train_step(model, config, image, mask)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _load_config(path: str):
    from severjax import config

    return config.load(path)


if __name__ == "__main__":
    hostmem.reexec_with_huge_pages()  # first: it restarts the process
    main()
