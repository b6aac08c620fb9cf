"""Watching a run: TensorBoard scalars, the progress bar, the start-up line, and the finite checks that stop it.

A non-finite loss, gradient or parameter stops the run before anything of that state is saved.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import jax_utils

from severjax.ops import hostmem, policy


class MetricLogger:
    """TensorBoard scalars (tensorboardX) in ``<workdir>/tensorboard``, written by the chief process only."""

    def __init__(self, workdir: str, enabled: bool):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._last = (time.perf_counter(), None)

    def train(self, step: int, history: list[dict[str, float]]) -> dict[str, float]:
        """Logs the mean of the per-step metrics since the last call (+ steps/s); returns it."""
        scalars = {k: float(np.mean([h[k] for h in history])) for k in history[-1]}
        now, last_step = time.perf_counter(), self._last[1]
        if last_step is not None and step > last_step:
            scalars["steps_per_sec"] = (step - last_step) / max(now - self._last[0], 1e-9)
        self._last = (now, step)
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(f"train/{key}", value, step)
        return scalars

    def val(self, step: int, val: Mapping[str, Any]) -> None:
        """Logs every figure of an evaluation; per-class lists as ``<name>_class<c>`` (1-based)."""
        if self._writer is None:
            return
        for key, value in val.items():
            if isinstance(value, (list, tuple)):
                for c, v in enumerate(value):
                    self._writer.add_scalar(f"val/{key}_class{c + 1}", v, step)
            else:
                self._writer.add_scalar(f"val/{key}", value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over the run's steps (a no-op bar when not ``enabled``)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled)


def print_startup(steps_per_call: int) -> None:
    """One line on stderr: the devices, the steps a call and the host's huge-page state."""
    print(f"{jax.device_count()} {policy.backend()} device(s), {steps_per_call} step(s) a call, "
          f"{hostmem.huge_pages_status()}", file=sys.stderr, flush=True)


def check_finite(step: int, metrics: Mapping[str, jax.Array], last_checkpoint: Callable[[], int | None]
                 ) -> list[dict[str, float]]:
    """Host copies of the metrics of one call (steps ``step + 1 ..``, stacked, replicated); raises
    ``FloatingPointError`` at the first step with a non-finite loss, gradient or parameter, naming it and
    ``last_checkpoint()``, the step a restart would resume from."""
    stacked = jax.device_get(jax_utils.unreplicate(metrics))
    out = []
    for k in range(len(stacked["loss"])):
        host = {key: float(value[k]) for key, value in stacked.items()}
        bad = {key: host[key] for key in ("loss", "grad_norm") if not np.isfinite(host[key])}
        if host.get("params_finite", 1.0) != 1.0:
            bad["params"] = "non-finite after the update"
        if bad:
            raise FloatingPointError(
                f"non-finite {bad} at step {step + k + 1}: stopping without saving this state; the last good "
                f"checkpoint is step {last_checkpoint()} (lower the learning rate or enable "
                f"config.optim.clip_norm, then restart with the same workdir)")
        out.append(host)
    return out
