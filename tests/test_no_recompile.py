"""After the first train calls and the first prediction batch, later calls and batches compile nothing.

A listener on JAX's backend-compile event counts every XLA compilation. The train loop body is the
trainer's own (``make_task`` -> pmapped ``train_steps`` with donated state, ``stack_batches``,
``step_keys``, host copies of the metrics), fed fresh host batches as the input pipeline would, in calls
of 2 steps and of 1 (the trainer's two programs); the prediction loop is ``Ensemble`` (TTA,
post-processing with component removal) over uint8 batches, then host RLE. The model is a tiny conv net
with severjax's BatchNorm2d: the loops do not depend on it. A recompilation per call (a dtype or
weak-type drift in the state, a Python scalar turned into a new constant, a shape change) would show up
as compiles after the first calls.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils

from severjax import config as config_lib
from severjax import optim
from severjax.models.layers import BatchNorm2d
from severjax.train import segmentation, steps
from severjax.train.state import TrainState, host_variables, replicate_state
from severjax.train.tasks import make_task

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CROP = (32, 64)
BATCH = 2


@contextlib.contextmanager
def count_compiles():
    """Yields a list that collects the duration of every XLA backend compile inside the block."""
    events: list[float] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


class TinyEncoder(nn.Module):
    """conv + severjax BatchNorm2d (running statistics in ``batch_stats``) + ReLU."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.relu(BatchNorm2d(name="bn")(nn.Conv(8, (3, 3), name="conv")(x), train))


class TinySegmenter(nn.Module):
    """``encoder`` (the optimizer's encoder group) + dropout + 1x1 head: 4-class logits.

    The loop code under test does not depend on the model; a tiny one keeps compiles to seconds.
    """

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = TinyEncoder(name="encoder")(x, train)
        h = nn.Dropout(0.1, deterministic=not train)(h)
        return nn.Conv(4, (1, 1), name="head")(h).astype(jnp.float32)


def _config():
    config = config_lib.get_config()
    config.batch_size = BATCH * jax.local_device_count()
    config.data.crop = CROP
    config.optim.flat_epochs = 1
    config.epochs = 3
    return config


def _host_batch(seed: int, n: int) -> dict[str, np.ndarray]:
    """What the input pipeline yields: fresh float32 numpy arrays every step."""
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, *CROP, 1)).astype(np.float32),
            "mask": (rng.random((n, *CROP, 4)) < 0.1).astype(np.float32)}


def test_train_steps_after_the_first_compile_nothing():
    config = _config()
    model = TinySegmenter()
    tx, schedules = optim.create_optimizer(config.optim, steps_per_epoch=2, epochs=config.epochs)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *CROP, 1)), train=False)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                    batch_stats=variables["batch_stats"],
                                    rng=jax.random.key_data(jax.random.key(1)))
    task = make_task(config, schedules)
    p_train_steps = jax.pmap(functools.partial(steps.train_steps, step_fn=task.train_step), axis_name=steps.AXIS,
                             in_axes=(0, 0, None), donate_argnums=(0,))
    base_key = jax.random.wrap_key_data(np.asarray(state.rng))
    p_state = replicate_state(state)  # as train_and_evaluate lays out the initial state

    def loop_body(p_state, step, n):  # train_and_evaluate's per-call work: n steps in one call
        batches = steps.stack_batches([_host_batch(step + i, config.batch_size) for i in range(n)])
        p_state, metrics = p_train_steps(p_state, batches, steps.step_keys(base_key, step, n))
        host = jax.device_get(jax_utils.unreplicate(metrics))
        assert host["loss"].shape == (n,) and np.all(np.isfinite(host["loss"]))
        return p_state

    with count_compiles() as first:  # the two programs the trainer uses: steps_per_call steps, and 1
        p_state = loop_body(p_state, 0, 2)
        p_state = loop_body(p_state, 2, 1)
    assert first, "the compile listener saw no compilation at all: the event name changed?"
    with count_compiles() as later:
        for step in (3, 5, 7):  # crosses the flat -> decay schedule boundary at step 2
            p_state = loop_body(p_state, step, 2)
        p_state = loop_body(p_state, 9, 1)
    assert not later, f"{len(later)} compilation(s) after the first train calls ({sum(later):.1f} s)"
    assert int(jax_utils.unreplicate(p_state.step)) == 10

    # evaluation batches (weights mark padding) and the export copy compile once too
    p_eval_step = jax.pmap(task.eval_step, axis_name=steps.AXIS)

    def eval_batch(seed):  # host batches: evaluate() shards them
        batch = _host_batch(100 + seed, config.batch_size)
        batch["weight"] = np.ones(config.batch_size, np.float32)
        return batch

    segmentation.evaluate(p_eval_step, p_state, [eval_batch(0)])
    host_variables(p_state)
    with count_compiles() as later:
        val = segmentation.evaluate(p_eval_step, p_state, [eval_batch(1), eval_batch(2)])
        host_variables(p_state)
    assert not later, f"{len(later)} compilation(s) in later evaluations"
    assert val["images"] == 2 * config.batch_size


def test_prediction_batches_after_the_first_compile_nothing():
    from severjax.predict.ensemble import Ensemble, Member
    from severjax.predict.postprocess import PostprocessConfig, finish_rles

    module = TinySegmenter()
    variables = jax.device_put(module.init(jax.random.key(0), jnp.zeros((1, *CROP, 1)), train=False))
    spec = {"arch": "unet", "encoder": "tiny", "classes": 4, "in_channels": 1}
    members = [Member("tiny", module, variables, spec, 0.3439, 0.196)]
    ensemble = Ensemble(members, tta="w", postprocess=PostprocessConfig(min_area=(20, 20, 20, 20),
                                                                        min_component=4))
    rng = np.random.default_rng(0)

    def batch():
        images = rng.integers(0, 256, size=(BATCH, *CROP, 1), dtype=np.uint8)
        runs, _ = ensemble(images)
        return finish_rles(runs).rles

    def probabilities():  # the --save_probs path: averaged probabilities, then the same post-processing
        probs, _ = ensemble.probabilities(rng.integers(0, 256, size=(BATCH, *CROP, 1), dtype=np.uint8))
        return np.asarray(probs)

    with count_compiles() as first:
        rles = batch()
        probabilities()
    assert first and len(rles) == BATCH and all(len(r) == 4 for r in rles)
    with count_compiles() as later:
        for _ in range(3):
            batch()
            probabilities()
    assert not later, f"{len(later)} compilation(s) after the first prediction batch ({sum(later):.1f} s)"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
