"""Model speed on CPU: severjax (JAX/Flax, jit) against SMP 0.6.0 (PyTorch), same weights, same input.

    python benchmarks/bench_models.py [--models fpn:efficientnet-b5 unet:se_resnext50_32x4d] [--batch 2]
                                      [--size 256 416] [--repeats 5] [--warmup 2] [--warmup_s 3] [--threads N]
                                      [--json out.json]

For each model: forward in eval mode (torch under ``inference_mode``), and forward + backward in train mode
(batch-statistics BatchNorm, dropout; loss ``mean(logits**2)``; JAX ``value_and_grad`` with mutable
``batch_stats``, torch ``backward()``). Both sides get the same weights (converted from the torch model)
and every core; the JAX first call (compile) is reported apart. ``jax/ref`` below 1: severjax is faster.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np


import harness  # noqa: E402
from harness import Result, print_table, time_fn, torch_setup, write_json  # noqa: E402
from severjax.ops import hostmem  # noqa: E402

DEFAULT_MODELS = ("fpn:efficientnet-b5", "unet:se_resnext50_32x4d")


def main(argv=None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="arch:encoder pairs")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 416])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the first, at least")
    parser.add_argument("--warmup_s", type=float, default=harness.WARMUP_S,
                        help="seconds of untimed calls, at least (see harness.WARMUP_S: the first calls are slow)")
    parser.add_argument("--dtype", default="float32", help="JAX compute dtype")
    parser.add_argument("--only", choices=("forward", "backward"), default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both sides (torch intra-op; XLA: 1 disables its Eigen thread pool); "
                             "default every core. On a shared, loaded machine 1 gives the steadier comparison")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads == 1:
        if "jax" in sys.modules:
            raise RuntimeError("--threads 1 must be set before jax is imported")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    torch = torch_setup(args.threads)
    import jax

    print(f"batch {args.batch} x {args.size[0]}x{args.size[1]}x1, jax {jax.default_backend()}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats} after {args.warmup} warm-up calls "
          f"and {args.warmup_s:g} s", flush=True)
    print(hostmem.huge_pages_status(), flush=True)
    rows = []
    for spec in args.models:
        arch, encoder = spec.split(":")
        rows += bench_model(torch, arch, encoder, args)
        print_table(rows)
    if args.json:
        write_json(rows, args.json, batch=args.batch, size=args.size, dtype=args.dtype)
    return rows


def bench_model(torch, arch: str, encoder: str, args) -> list[Result]:
    """Rows for one model: forward (eval) and forward+backward (train)."""
    import jax
    import jax.numpy as jnp
    import segmentation_models_pytorch as smp

    from severjax.models import create_model
    from severjax.models.convert import convert_smp_state_dict

    torch.manual_seed(0)
    kw = {"decoder_merge_policy": "cat"} if arch == "fpn" else {}
    tm = {"unet": smp.Unet, "fpn": smp.FPN}[arch](encoder, encoder_weights=None, in_channels=1, classes=4, **kw)
    model = create_model(arch, encoder, in_channels=1, dtype=args.dtype, **kw)
    variables = convert_smp_state_dict({k: v.numpy() for k, v in tm.state_dict().items()}, model)
    variables = jax.device_put(variables)
    x_np = np.random.default_rng(0).normal(size=(args.batch, *args.size, 1)).astype(np.float32)
    x, tx = jnp.asarray(x_np), torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    name = f"{arch}/{encoder}"
    rows = []
    timing = {"repeats": args.repeats, "warmup": args.warmup, "warmup_s": args.warmup_s}

    if args.only in (None, "forward"):
        fwd = jax.jit(functools.partial(model.apply, train=False))
        tm.eval()

        def torch_fwd():
            with torch.inference_mode():
                return tm(tx)

        rows.append(_row(f"{name} forward", time_fn(fwd, variables, x, **timing),
                         time_fn(torch_fwd, **timing)))

    if args.only in (None, "backward"):
        def loss(params, batch_stats, x, key):
            y, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                 rngs={"dropout": key}, mutable=["batch_stats"])
            return jnp.mean(y ** 2), upd

        grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
        key = jax.random.PRNGKey(0)
        tm.train()

        def torch_grad():
            tm.zero_grad(set_to_none=True)
            out = (tm(tx) ** 2).mean()
            out.backward()
            return out

        rows.append(_row(f"{name} fwd+bwd", time_fn(grad, variables["params"], variables["batch_stats"], x, key,
                                                    **timing),
                         time_fn(torch_grad, **timing)))
    return rows


def _row(item, jax_timing, ref_timing) -> Result:
    """A table row; ``cpu`` extras are process CPU seconds a call (steadier than wall time on a shared machine)."""
    return Result.from_timings(item, jax_timing, ref_timing, jax_cpu=jax_timing.cpu, ref_cpu=ref_timing.cpu,
                               cpu_ratio=jax_timing.cpu / ref_timing.cpu if ref_timing.cpu > 0 else float("nan"))


if __name__ == "__main__":
    hostmem.reexec_with_huge_pages()  # first: it restarts the process
    main()
