"""Achieved FLOP/s of the forward passes against the CPU's peak (and the PyTorch reference's, same FLOPs).

    python benchmarks/bench_flops.py [--models fpn-b5 unet-sx50] [--batch 2] [--repeats 5] [--skip_torch]
                                     [--peak_gflops G]

FLOPs come from XLA's cost analysis of the compiled forward (``compiled.cost_analysis()["flops"]``: a
multiply-add counts 2). Both frameworks compute the same network, so the same count divides the PyTorch
time too. The peak is estimated from ``/proc/cpuinfo``: cores x clock x FP32 FLOPs a cycle a core, where
FLOPs a cycle = 2 (FMA) x SIMD lanes (16 with AVX-512, 8 with AVX2+FMA, 4 otherwise) x 2 FMA pipes, halved
for AMD Zen 4 (family 0x19 with AVX-512), which runs 512-bit work in two 256-bit halves; the clock is the
``cpu MHz`` the kernel reports (the nominal one under a hypervisor; turbo is not counted). So the estimate
can be too low: :func:`machine_peak` also times XLA's own f32 matmul (2048^3) and takes the larger of the two
(on this project's 2-core Zen 5 VM: estimate 332 GFLOP/s, matmul 490-540 measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's OpenMP threads must not spin on a shared CPU

import harness  # noqa: E402

# name -> (arch, encoder, crop, extra create_model kwargs): the crops the original runs trained at.
MODELS = {
    "fpn-b5": ("fpn", "efficientnet-b5", (256, 416), {"decoder_merge_policy": "cat"}),
    "unet-sx50": ("unet", "se_resnext50_32x4d", (256, 448), {}),
    "unet-b5": ("unet", "efficientnet-b5", (256, 384), {}),
    "fpn-sx50": ("fpn", "se_resnext50_32x4d", (256, 416), {"decoder_merge_policy": "cat"}),
}


@dataclasses.dataclass(frozen=True)
class PeakEstimate:
    """Peak FP32 FLOP/s of the machine and how it was estimated."""

    flops_per_s: float
    cores: int
    ghz: float
    flops_per_cycle: int
    how: str


def cpu_peak_flops(cpuinfo_path: str = "/proc/cpuinfo") -> PeakEstimate:
    """Estimates the FP32 peak from ``/proc/cpuinfo`` (see the module docstring); cores = usable CPUs."""
    try:
        with open(cpuinfo_path) as f:
            text = f.read()
    except OSError as err:
        raise OSError(f"{cpuinfo_path}: cannot read the CPU description ({err}); pass --peak_gflops") from err
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = (s.strip() for s in line.split(":", 1))
            fields.setdefault(key, value)
    flags = set(fields.get("flags", "").split())
    if "cpu MHz" not in fields:
        raise ValueError(f"{cpuinfo_path} has no 'cpu MHz' line; pass --peak_gflops")
    ghz = float(fields["cpu MHz"]) / 1000.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if "avx512f" in flags:
        lanes, isa = 16, "AVX-512"
    elif "avx2" in flags and "fma" in flags:
        lanes, isa = 8, "AVX2+FMA"
    else:
        lanes, isa = 4, "SSE"
    pipes = 2
    vendor, family = fields.get("vendor_id", ""), int(fields.get("cpu family", "0") or 0)
    note = ""
    if vendor == "AuthenticAMD" and family == 0x19 and lanes == 16:
        pipes, note = 1, ", halved: AMD Zen 4 runs AVX-512 in two 256-bit halves"
    per_cycle = 2 * lanes * pipes
    how = (f"{cores} cores x {ghz:.2f} GHz (cpu MHz) x {per_cycle} FP32 FLOPs/cycle "
           f"(FMA x {lanes} {isa} lanes x {pipes} pipe(s){note}; {fields.get('model name', '?')}, "
           f"family {family:#x})")
    return PeakEstimate(cores * ghz * 1e9 * per_cycle, cores, ghz, per_cycle, how)


def measured_matmul_flops(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of XLA's f32 ``size``-cubed matmul, best of ``repeats`` after a warm-up: a floor for the peak."""
    import jax
    import jax.numpy as jnp

    a = jax.device_put(np.random.default_rng(0).normal(size=(size, size)).astype(np.float32))
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def machine_peak() -> PeakEstimate:
    """The larger of the ``/proc/cpuinfo`` estimate and the measured matmul rate (the estimate ignores turbo)."""
    estimate = cpu_peak_flops()
    measured = measured_matmul_flops()
    if measured <= estimate.flops_per_s:
        return dataclasses.replace(estimate, how=f"{estimate.how}; XLA matmul measured {measured / 1e9:.0f} GFLOP/s")
    return dataclasses.replace(estimate, flops_per_s=measured, how=(
        f"XLA f32 2048^3 matmul, measured: above the /proc/cpuinfo estimate of {estimate.flops_per_s / 1e9:.0f} "
        f"GFLOP/s ({estimate.how}), whose clock leaves out turbo"))


def xla_flops(compiled) -> float:
    """FLOPs XLA's cost analysis assigns to a compiled function (``jax.jit(f).lower(...).compile()``)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict a device program
        analysis = analysis[0]
    if not analysis or "flops" not in analysis:
        raise ValueError(f"XLA cost analysis has no 'flops' entry: {analysis!r}")
    return float(analysis["flops"])


def jax_forward(name: str, batch: int, seed: int = 0):
    """``(module, variables, x, compiled forward, compile seconds)`` for a ``MODELS`` entry at its crop."""
    import jax
    import jax.numpy as jnp

    from severjax.models import create_model
    from severjax.train.state import init_variables

    arch, encoder, (h, w), kw = MODELS[name]
    module = create_model(arch, encoder, classes=4, in_channels=1, **kw)
    x = np.random.default_rng(seed).normal(size=(batch, h, w, 1)).astype(np.float32)
    variables = init_variables(module, jax.random.key(seed), jnp.asarray(x[:1]))
    variables = jax.device_put(variables)
    x = jax.device_put(x)
    start = time.perf_counter()
    compiled = jax.jit(lambda v, x: module.apply(v, x, train=False)).lower(variables, x).compile()
    return module, variables, x, compiled, time.perf_counter() - start


def torch_forward(name: str, x: np.ndarray):
    """A no-grad SMP forward of the same arch/encoder (random weights, eval mode) on NHWC ``x``: a callable."""
    torch = harness.torch_setup()
    model = smp_model(name).eval()
    xt = torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))

    def forward():
        with torch.inference_mode():
            return model(xt)

    return forward


def smp_model(name: str, dropout: float | None = None):
    """The segmentation_models_pytorch model of a ``MODELS`` entry (1 input channel, 4 classes, no weights)."""
    import segmentation_models_pytorch as smp

    arch, encoder, _, kw = MODELS[name]
    common = dict(encoder_name=encoder, encoder_weights=None, in_channels=1, classes=4)
    if arch == "fpn":
        return smp.FPN(decoder_merge_policy=kw.get("decoder_merge_policy", "add"),
                       decoder_dropout=0.2 if dropout is None else dropout, **common)
    return smp.Unet(**common)


def measure(name: str, batch: int, repeats: int, peak: PeakEstimate, torch: bool = True) -> harness.Result:
    """One forward row: times, GFLOP, achieved GFLOP/s of both and the share of the peak."""
    _, variables, x, compiled, compile_s = jax_forward(name, batch)
    flops = xla_flops(compiled)
    jax_t = harness.time_fn(compiled, variables, x, repeats=repeats)
    ref_t = harness.time_fn(torch_forward(name, x), repeats=repeats) if torch else None
    arch, encoder, (h, w), _ = MODELS[name]
    row = harness.Result.from_timings(f"forward {arch}/{encoder} b{batch} {h}x{w}", jax_t, ref_t, unit="batch",
                                      **flops_extra(flops, jax_t, ref_t, peak))
    row.compile_s = compile_s
    return row


def flops_extra(flops: float, jax_t: harness.Timing, ref_t: harness.Timing | None, peak: PeakEstimate
                ) -> dict[str, Any]:
    """``gflop``, achieved ``jax_gflops`` / ``ref_gflops`` (median time) and ``jax_peak_pct`` for a row."""
    out = {"gflop": flops / 1e9, "jax_gflops": flops / jax_t.median / 1e9,
           "jax_peak_pct": 100.0 * flops / jax_t.median / peak.flops_per_s}
    if ref_t is not None:
        out["ref_gflops"] = flops / ref_t.median / 1e9
        out["ref_peak_pct"] = 100.0 * flops / ref_t.median / peak.flops_per_s
    return out


def main(argv=None) -> list[harness.Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fpn-b5", "unet-sx50"], choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--peak_gflops", type=float, default=None, help="override the measured/estimated peak")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    peak = machine_peak() if args.peak_gflops is None else PeakEstimate(
        args.peak_gflops * 1e9, os.cpu_count() or 1, 0.0, 0, "given with --peak_gflops")
    print(f"peak estimate: {peak.flops_per_s / 1e9:.0f} GFLOP/s = {peak.how}", flush=True)
    rows = [measure(name, args.batch, args.repeats, peak, torch=not args.skip_torch) for name in args.models]
    harness.print_table(rows)
    if args.json:
        harness.write_json(rows, args.json, peak_gflops=peak.flops_per_s / 1e9, peak_how=peak.how)
    return rows


if __name__ == "__main__":
    from severjax.ops import hostmem

    hostmem.reexec_with_huge_pages()  # first: it restarts the process
    main()
