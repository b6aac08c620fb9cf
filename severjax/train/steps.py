"""Several optimizer steps in one device call, and the host batches and keys they take.

The trainer ``pmap``s every step over the local devices along one axis, :data:`AXIS`. A call runs
``n`` steps (``config.steps_per_call``, resolved by :func:`severjax.ops.policy.steps_per_call`), unrolled
into one program; :func:`call_length` cuts calls so that they never straddle an epoch end or a
checkpoint, and :func:`step_keys` gives every step the same key however the steps are grouped, so a
resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# The pmap axis of the local devices, in every train, evaluation and statistics step.
AXIS = "batch"


def train_steps(state: Any, batches: Mapping[str, jax.Array], rngs: jax.Array, *, step_fn: Callable
                ) -> tuple[Any, dict[str, jax.Array]]:
    """``n`` optimizer steps in one program: ``step_fn`` on ``batches[k]`` with key ``rngs[k]``, in order.

    ``batches`` holds ``(n, b, ...)`` arrays (:func:`stack_batches`) and ``rngs`` ``n`` keys; the metrics
    come back stacked, ``(n,)`` each. The loop is unrolled at trace time (``n`` is static) rather than
    run by ``lax.scan``: inside a ``while`` body XLA:CPU leaves the decoder's kernel-gradient convolutions
    on a slow generic path. Why several steps a call pay on a CPU: docs/performance.md, "Steps a call".
    """
    metrics = []
    for k in range(rngs.shape[0]):
        state, m = step_fn(state, jax.tree_util.tree_map(lambda x: x[k], batches), rngs[k])
        metrics.append(m)
    return state, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *metrics)


def call_length(step: int, steps_per_call: int, periods: Iterable[int], total_steps: int) -> int:
    """How many steps the call starting after ``step`` steps runs: ``steps_per_call``, or 1 where a full
    call would cross a multiple of one of ``periods`` (epoch ends, checkpoints) or ``total_steps``.

    Calls then never straddle a point where the loop evaluates or saves, and a resumed run (which
    starts at such a point) cuts its calls exactly where the uninterrupted run did. The tail before a
    boundary runs single steps, so only two programs (``steps_per_call`` steps and 1) ever compile.
    """
    limit = total_steps - step
    for period in periods:
        limit = min(limit, period - step % period)
    return steps_per_call if steps_per_call <= limit else 1


def shard_batch(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reshapes host-local ``(b, ...)`` arrays to ``(local_devices, b // local_devices, ...)``."""
    n = jax.local_device_count()
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.shape[0] % n:
            raise ValueError(f"batch[{key!r}] holds {value.shape[0]} images, not a multiple of the "
                             f"{n} local device(s)")
        out[key] = value.reshape((n, value.shape[0] // n) + value.shape[1:])
    return out


def stack_batches(batches: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Host batches of one call -> ``(local_devices, n, b // local_devices, ...)`` arrays (:func:`shard_batch`
    of each, stacked on a new axis 1 so that ``pmap`` hands each device its ``(n, ...)`` share)."""
    sharded = [shard_batch(batch) for batch in batches]
    return {key: np.stack([b[key] for b in sharded], axis=1) for key in sharded[0]}


def step_keys(base_key: jax.Array, step: int, n: int) -> jax.Array:
    """The keys of steps ``step .. step + n - 1``: ``fold_in(base_key, s)`` each, so they do not depend on
    how the steps are grouped into calls."""
    return jnp.stack([jax.random.fold_in(base_key, s) for s in range(step, step + n)])


def params_finite(params: Any) -> jax.Array:
    """1.0 when every parameter is finite, else 0.0 (the loop refuses to go on or save otherwise)."""
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(params)]
    return jnp.all(jnp.stack(leaves)).astype(jnp.float32) if leaves else jnp.float32(1.0)
