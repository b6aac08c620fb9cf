"""Shared timing helpers for the benchmarks: one way to time, one table, one JSON format.

``time_fn(fn, *args)`` calls ``fn`` once (timed apart: for a jit function that is the compile), then
``warmup - 1`` more untimed calls (and more until ``warmup_s`` seconds of them, see ``WARMUP_S``), then
``repeats`` timed calls, blocking on JAX outputs each time; it returns
a ``Timing`` (median, min, max, quartiles, first call, median process CPU time). ``time_pair`` times two
callables, each side's calls back to back (or alternately, ``interleave=True``). ``torch_setup()`` gives the
PyTorch reference every core of the machine. ``Result`` is one row of the side-by-side table (``ratio = jax_s / ref_s``: below 1
means severjax is faster; ``cpu_ratio`` the same for CPU seconds); ``print_table`` and ``write_json`` show and
store rows. ``peak_rss`` measures a call's peak resident memory above the memory in use before it (Linux:
resets ``VmHWM`` through ``/proc/self/clear_refs``).

On a machine shared with other jobs the wall-time ratio swings with how each runtime's threads get
scheduled (we saw the same forward read 0.6x and 2.4x within an hour at load 13 on 2 cores); the CPU-time
ratio stayed within ~10%. Read ``cpu j/r`` there, ``jax/ref`` on an idle machine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

# Seconds of untimed calls before the timed ones, on top of the ``warmup`` count: a side's first calls after
# its compile run slow, with high system time, while its process takes its memory (on this project's 2-core
# VMs, whose balloon hands free memory back to the host). Measured, Unet-sx50 forward, batch 2, 20 calls after
# the compile: JAX 286, 227, 223, 260, 260, 247, 222, 222, 209 ms with 44-124 ms of system time each, then
# 188-195 ms with 0-22 ms from the 10th call (~2.5 s) on; PyTorch, first in its process, 250-417 ms over its
# first 8 calls, then 221-246 ms. Two warm-up calls left both sides' forward medians in that phase.
WARMUP_S = 3.0


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: ``median`` of the timed calls, their ``min``/``max``/quartiles, and the first call."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    first: float  # the first call alone: compile + run for a jit function
    samples: tuple[float, ...]
    cpu: float = float("nan")  # median process CPU seconds (all threads) of the timed calls

    @property
    def spread(self) -> str:
        """``min-max`` of the timed calls, in the unit ``format_seconds`` picks for the median."""
        return f"{format_seconds(self.min)}-{format_seconds(self.max)}"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "samples": list(self.samples)}


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1, warmup_s: float = WARMUP_S,
            **kwargs: Any) -> Timing:
    """Times ``fn(*args, **kwargs)``: first call apart, ``warmup - 1`` more untimed (and more until
    ``warmup_s`` seconds of them), then ``repeats`` timed.

    JAX outputs are waited for (``jax.block_until_ready``) inside each timed call, so asynchronous dispatch
    is not mistaken for speed. PyTorch on CPU runs synchronously. ``cpu`` is the process CPU time of a call
    (every thread): on a shared, loaded machine it moves less than the wall time.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least one timed call")
    if warmup < 1:
        raise ValueError(f"warmup={warmup}: the first call is always a warm-up (it compiles jit functions)")
    start = time.perf_counter()
    block(fn(*args, **kwargs))
    first = time.perf_counter() - start
    (samples,), (cpu,) = run_timed([lambda: fn(*args, **kwargs)], warmup - 1, repeats, interleave=False,
                                   warmup_s=warmup_s)
    return _timing(samples, first, cpu)


def time_pair(fn_a: Callable[[], Any], fn_b: Callable[[], Any], *, repeats: int = 5, warmup: int = 1,
              interleave: bool = False, warmup_s: float = WARMUP_S) -> tuple[Timing, Timing]:
    """Times two zero-argument callables like ``time_fn``: both first calls (the compiles) first, then each
    side's calls back to back - ``warmup`` untimed (and more until ``warmup_s`` seconds of them), ``repeats``
    timed - a's block, then b's.

    Back to back, because that is how a training or prediction loop calls either side, and because
    alternating charges each side for the other's memory habits. On a VM whose balloon hands free memory
    back to the host (this project's 2-core machines), the scratch buffer XLA frees at the end of a call
    goes back to the host while the other side runs, and the next JAX call pays a host fault per page:
    FPN-b5 train step (batch 2, huge pages on) 0.67-0.68 s right after another call, 1.7-2.1 s after 2.5 s
    idle. ``interleave=True`` alternates the timed calls (a, b, a, b, ...) instead: both sides then see
    the same drift of a shared machine's load.
    """
    if repeats < 1 or warmup < 1:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: both must be >= 1")
    fns = (fn_a, fn_b)
    firsts = []
    for fn in fns:
        start = time.perf_counter()
        block(fn())
        firsts.append(time.perf_counter() - start)
    samples, cpu = run_timed(fns, warmup - 1 if interleave else warmup, repeats, interleave, warmup_s=warmup_s)
    return tuple(_timing(s, f, c) for s, f, c in zip(samples, firsts, cpu))  # type: ignore[return-value]


def run_timed(fns: Sequence[Callable[[], Any]], untimed: int, repeats: int, interleave: bool,
              warmup_s: float = 0.0) -> tuple[list[list[float]], list[list[float]]]:
    """Calls each of ``fns`` ``untimed`` times, then ``repeats`` timed times: each function's calls back to
    back, or with ``interleave`` in rounds (all untimed rounds, then the timed ones: a, b, a, b, ...).
    The untimed calls go on, past ``untimed``, until they took ``warmup_s`` seconds (each function's, back
    to back; all rounds', interleaved).

    Returns the wall and process-CPU seconds of the timed calls, one list per function.
    """
    samples: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]

    def timed(k: int) -> None:
        start, start_cpu = time.perf_counter(), time.process_time()
        block(fns[k]())
        samples[k].append(time.perf_counter() - start)
        cpu[k].append(time.process_time() - start_cpu)

    def warm(calls: Sequence[Callable[[], Any]]) -> None:
        start, done = time.perf_counter(), 0
        while done < untimed or time.perf_counter() - start < warmup_s:
            for fn in calls:
                block(fn())
            done += 1

    if interleave:
        warm(fns)
        for _ in range(repeats):
            for k in range(len(fns)):
                timed(k)
    else:
        for k, fn in enumerate(fns):
            warm([fn])
            for _ in range(repeats):
                timed(k)
    return samples, cpu


def _timing(samples: Sequence[float], first: float, cpu: Sequence[float]) -> Timing:
    q = np.percentile(samples, [25, 75])
    return Timing(statistics.median(samples), min(samples), max(samples), float(q[0]), float(q[1]), first,
                  tuple(samples), statistics.median(cpu))


def block(out: Any) -> Any:
    """Waits for every JAX array in ``out`` (a pytree); anything else passes through."""
    if "jax" in sys.modules:
        import jax

        leaves = [x for x in jax.tree_util.tree_leaves(out) if isinstance(x, jax.Array)]
        if leaves:
            jax.block_until_ready(leaves)
    return out


def torch_setup(threads: int | None = None):
    """Imports torch with ``threads`` (default: every core) intra-op threads; returns the module."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch


def torch_train_step(model, config, image: np.ndarray, mask: np.ndarray) -> Callable[[], Any]:
    """One PyTorch training step of ``model`` (an SMP model, put in train mode): forward, ``config.loss``'s
    BCE + soft Dice over the batch, backward, RAdam with decoupled weight decay in two groups (encoder /
    decoder learning rates and decays of ``config.optim``): the reference for ``severjax.train.segmentation.train_step``."""
    import torch

    model.train()
    encoder = [p for n, p in model.named_parameters() if n.startswith("encoder.")]
    decoder = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    opt = torch.optim.RAdam(
        [{"params": encoder, "lr": config.optim.encoder_lr, "weight_decay": config.optim.encoder_wd},
         {"params": decoder, "lr": config.optim.decoder_lr, "weight_decay": config.optim.decoder_wd}],
        betas=(config.optim.b1, config.optim.b2), eps=config.optim.eps, decoupled_weight_decay=True)
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(np.ascontiguousarray(mask.transpose(0, 3, 1, 2)))
    bce = torch.nn.BCEWithLogitsLoss()
    loss_cfg = config.loss

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        probs = torch.sigmoid(logits)
        dice = (2 * (probs * y).sum() + loss_cfg.dice_eps) / (probs.sum() + y.sum() + loss_cfg.dice_eps)
        loss = loss_cfg.bce_weight * bce(logits, y) + loss_cfg.dice_weight * (1 - dice)
        loss.backward()
        opt.step()
        return loss

    return step


def jax_train_call(config, image: np.ndarray, mask: np.ndarray, steps_per_call: int | None = None
                   ) -> tuple[Callable[[], Any], Any, float, int]:
    """``(call, compiled, compile seconds, steps a call)``: ``call()`` runs ``steps_per_call`` severjax
    training steps in one jit program, as the trainer does (``severjax.train.steps.train_steps``: forward, loss,
    backward, two-group RAdam; default ``config.steps_per_call``, 0 = the backend's choice), each on the
    fixed batch ``image``/``mask``, carrying the donated state from call to call. Divide a call's time by
    the steps a call for the time a step."""
    import jax

    from severjax import optim
    from severjax.ops import policy
    from severjax.train import segmentation, state as state_lib, steps

    k = policy.steps_per_call(config.steps_per_call if steps_per_call is None else steps_per_call)
    model, _ = state_lib.build_model(config)
    tx, schedules = optim.create_optimizer(config.optim, steps_per_epoch=100, epochs=config.epochs)
    state = state_lib.create_train_state(config, model, tx)
    step_fn = functools.partial(segmentation.train_step, loss_config=dict(config.loss), schedules=schedules,
                                axis_name=None)
    fn = jax.jit(functools.partial(steps.train_steps, step_fn=step_fn), donate_argnums=(0,))
    batches = jax.device_put({"image": np.stack([image] * k), "mask": np.stack([mask] * k)})
    keys = steps.step_keys(jax.random.key(0), 0, k)
    start = time.perf_counter()
    compiled = fn.lower(state, batches, keys).compile()
    compile_s = time.perf_counter() - start
    box = [state]

    def call():
        box[0], metrics = compiled(box[0], batches, keys)
        return metrics

    return call, compiled, compile_s, k


def repeat_calls(fn: Callable[[], Any], times: int) -> Callable[[], Any]:
    """A closure calling ``fn`` ``times`` times (the PyTorch step, to match a JAX call of several steps)."""
    def repeated():
        return [fn() for _ in range(times)][-1]

    return repeated


# ------------------------------------------------------------------------------------------- memory


def peak_rss(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """``(bytes, result)``: peak resident memory during ``fn(*args)`` above the resident memory before it.

    Resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) first; raises ``OSError``
    where that is not possible (non-Linux), naming the file.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        raise OSError(f"/proc/self/clear_refs: cannot reset the peak RSS ({err}); peak_rss needs Linux") from err
    before = _proc_status_kib("VmRSS")
    out = block(fn(*args, **kwargs))
    return (_proc_status_kib("VmHWM") - before) * 1024, out


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {key} line")


# --------------------------------------------------------------------------------------------- rows


@dataclasses.dataclass
class Result:
    """One row: an item timed in severjax (``jax_s``) and the reference (``ref_s``), seconds per call.

    ``ratio`` is ``jax_s / ref_s`` (below 1: severjax faster). ``spread`` holds each side's min-max,
    ``compile_s`` the JAX compile time (``from_timings``: the first call, compile + run; callers that
    compile ahead of time set the compile alone). ``unit`` names what a call is ("step", "image", ...);
    ``extra`` carries anything else (FLOP/s, memory, images/s) as plain numbers or strings.
    """

    item: str
    jax_s: float | None
    ref_s: float | None = None
    spread: str = ""
    compile_s: float | None = None
    unit: str = "call"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    jax_cpu_s: float | None = None  # process CPU seconds (every thread) per unit
    ref_cpu_s: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.jax_s is None or self.ref_s is None or self.ref_s <= 0:
            return None
        return self.jax_s / self.ref_s

    @property
    def cpu_ratio(self) -> float | None:
        """``jax_cpu_s / ref_cpu_s``: the work ratio, less sensitive than ``ratio`` to other processes' load."""
        if not self.jax_cpu_s or not self.ref_cpu_s:
            return None
        return self.jax_cpu_s / self.ref_cpu_s

    @classmethod
    def from_timings(cls, item: str, jax: Timing | None, ref: Timing | None = None, *, unit: str = "call",
                     per: float = 1.0, **extra: Any) -> "Result":
        """A row from ``time_fn`` results; ``per`` divides every time (e.g. images a call)."""
        spread = " / ".join(f"{name} {format_seconds(t.min / per)}-{format_seconds(t.max / per)}"
                            for name, t in (("jax", jax), ("ref", ref)) if t is not None)
        return cls(item, None if jax is None else jax.median / per, None if ref is None else ref.median / per,
                   spread, None if jax is None else jax.first, unit, dict(extra),
                   None if jax is None else jax.cpu / per, None if ref is None else ref.cpu / per)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio, "cpu_ratio": self.cpu_ratio}


def print_table(rows: Sequence[Result], file=None) -> None:
    """Prints the rows as an aligned text table: median wall time per ``unit``, ``jax/ref`` (below 1: severjax
    faster), ``cpu j/r`` (the same for process CPU time), each side's min-max, the JAX compile time."""
    file = file or sys.stdout
    header = ("item", "unit", "jax", "ref", "jax/ref", "cpu j/r", "spread (min-max)", "compile", "extra")
    lines = [header]
    for r in rows:
        lines.append((r.item, r.unit, format_seconds(r.jax_s), format_seconds(r.ref_s),
                      "-" if r.ratio is None else f"{r.ratio:.2f}",
                      "-" if r.cpu_ratio is None else f"{r.cpu_ratio:.2f}", r.spread or "-",
                      format_seconds(r.compile_s), _format_extra(r.extra)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for n, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1], file=file)
        if n == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 5, file=file)
    file.flush()


def write_json(rows: Iterable[Result], path: str, **meta: Any) -> None:
    """Writes ``{"machine": ..., "meta": ..., "rows": [...]}`` to ``path`` (folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"machine": machine_info(), "meta": meta, "rows": [r.as_dict() for r in rows]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=_json_default)
        f.write("\n")


def machine_info() -> dict[str, Any]:
    """CPU model, core count, load average, library versions, whether malloc asks for huge pages
    (``severjax.ops.hostmem``) and the severjax commit (``+dirty`` when severjax/ has uncommitted changes): what a
    reader needs to compare runs."""
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "cpu": _cpu_model(), "platform": platform.platform(), "commit": _git_commit()}
    from severjax.ops import hostmem

    info["host_memory"] = hostmem.huge_pages_status()
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    for name in ("jax", "jaxlib", "flax", "torch", "segmentation_models_pytorch"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    return info


def format_seconds(seconds: float | None) -> str:
    """``1.23 s``, ``45.6 ms`` or ``789 us``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def _format_extra(extra: dict[str, Any]) -> str:
    parts = []
    for key, value in extra.items():
        if isinstance(value, float):
            value = f"{value:.3g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "severjax"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
