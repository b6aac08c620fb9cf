"""Training step speed: severjax (JAX/Flax) against the SMP/PyTorch reference, same model, loss, optimizer.

    python benchmarks/bench_train.py [--config configs/b5_fpn.py] [--batch 2] [--steps 5] [--warmup 2]
                                     [--dtype float32|bfloat16] [--skip_torch]

Builds the config's model twice - ``severjax.models.create_model`` and the segmentation_models_pytorch
model of the same arch/encoder (random weights) - and times full training steps at the config's crop:
forward, 0.6 * BCE + 0.4 * (1 - soft Dice over the batch), backward, two-group RAdam with decoupled
weight decay (torch: ``torch.optim.RAdam(decoupled_weight_decay=True)``). The JAX step is
``severjax.train.train_step`` under ``jit`` on one device (the first call, compiling, is reported
apart). Timed steps alternate JAX / PyTorch so both see the same machine load. Prints images/s
(wall) and process CPU time per step of each, and the ratio JAX / PyTorch, measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "b5_fpn.py"))
    parser.add_argument("--batch", type=int, default=2, help="images a step (the configs' batch is too big for a CPU)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--dtype", default=None, help="JAX compute dtype (default: the config's)")
    parser.add_argument("--skip_torch", action="store_true", help="time the JAX step only")
    args = parser.parse_args(argv)

    config = _load_config(args.config)
    if args.dtype:
        config.model.dtype = args.dtype
    rng = np.random.default_rng(0)
    h, w = config.data.crop
    image = rng.normal(size=(args.batch, h, w, 1)).astype(np.float32)
    mask = (rng.random((args.batch, h, w, 4)) < 0.05).astype(np.float32)
    print(f"{config.model.arch}/{config.model.encoder} crop {h}x{w} batch {args.batch}, "
          f"{args.steps} timed steps each after {args.warmup} warm-up, JAX and PyTorch steps alternated "
          "so that both see the same machine load", flush=True)

    steps = {"jax": _jax_step(config, image, mask)}
    start = time.perf_counter()
    steps["jax"]()
    print(f"jax first step (compile included): {time.perf_counter() - start:.1f} s", flush=True)
    if not args.skip_torch:
        steps["torch"] = _torch_step(config, image, mask)
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    wall = {name: 0.0 for name in steps}
    cpu = {name: 0.0 for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[name] += time.perf_counter() - w0
            cpu[name] += time.process_time() - c0
    results = {}
    for name in steps:
        results[f"{name}_images_per_s"] = args.batch * args.steps / wall[name]
        print(f"{name:5s} : {results[f'{name}_images_per_s']:.3f} images/s ({wall[name] / args.steps * 1e3:.0f} "
              f"ms/step wall, {cpu[name] / args.steps * 1e3:.0f} ms/step process CPU)", flush=True)
    if "torch" in steps:
        results["ratio"] = results["jax_images_per_s"] / results["torch_images_per_s"]
        print(f"torch threads {_torch_threads()}, jax dtype {config.model.dtype}")
        print(f"ratio jax/torch (images/s): {results['ratio']:.2f}")
    return results


def _jax_step(config, image, mask):
    """A closure running one jitted severjax train step (state carried inside) and waiting for it."""
    import jax

    from severjax import optim, train

    model, _ = train.build_model(config)
    tx, schedules = optim.create_optimizer(config.optim, steps_per_epoch=100, epochs=config.epochs)
    holder = {"state": train.create_train_state(config, model, tx)}
    step = jax.jit(functools.partial(train.train_step, loss_config=dict(config.loss), schedules=schedules,
                                     axis_name=None), donate_argnums=(0,))
    batch = {"image": jax.device_put(image), "mask": jax.device_put(mask)}
    key = jax.random.key(0)

    def run():
        holder["state"], metrics = step(holder["state"], batch, key)
        jax.block_until_ready((holder["state"].params, metrics))

    return run


def _torch_step(config, image, mask):
    """A closure running one PyTorch training step of the SMP model (same loss and optimizer)."""
    import harness
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
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


if __name__ == "__main__":
    main()
