"""The training loop: ``train_and_evaluate(config, workdir)``.

Each device call runs one or more pmapped optimizer steps (:mod:`severjax.train.steps`) of the task's
pure ``train_step(state, batch, rng) -> (state, metrics)`` (:mod:`severjax.train.tasks`). At each epoch
end (every ``config.eval_every_epochs``) the model is evaluated (after precise BatchNorm statistics with
``config.bn_recalibration_batches``) and a better score is exported to ``<workdir>/model_best``; every
``config.checkpoint_every`` steps and at each evaluation the train state, each process's input position
and the loop's bookkeeping are checkpointed (:mod:`severjax.train.checkpoint`), so a restart in the same
workdir resumes exactly. The end of the run is exported to ``<workdir>/model_last``.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from flax import jax_utils

from severjax import config as config_lib
from severjax import export, optim
from severjax.ops import policy
from severjax.train import batch_norm, checkpoint, monitor
from severjax.train.state import build_model, create_train_state, host_variables, replicate_state
from severjax.train.steps import AXIS, call_length, stack_batches, step_keys, train_steps
from severjax.train.tasks import make_task


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``<workdir>/checkpoints`` if any), evaluates each epoch, exports models.

    Returns a summary: ``step``, ``stopped`` ("done" or "early_stop"), ``score_name`` (what selects the
    best model: ``dice_mean``, or for the classifier ``auc_mean``, see :func:`~severjax.train.tasks.make_task`),
    ``best_val_score``, ``best_step``, ``val`` (the last evaluation).
    """
    config_lib.validate(config)
    from severjax.data import pipeline  # the input pipeline (grain + TFDS) is only needed here

    workdir = os.path.abspath(workdir)
    is_chief = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_chief:
        config_lib.save(config, workdir)

    # data, model, optimizer, state (restored from the latest checkpoint if there is one)
    hosts = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    builder = pipeline.prepare_data(config)
    train_data = pipeline.train_loader(config, seed=config.seed, builder=builder, **hosts)
    steps_per_epoch = config.steps_per_epoch or epoch_length(train_data.num_records, config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    model, model_spec = build_model(config)
    tx, schedules = optim.create_optimizer(config.optim, steps_per_epoch=steps_per_epoch, epochs=config.epochs)
    state = create_train_state(config, model, tx)
    manager = checkpoint.create_manager(os.path.join(workdir, "checkpoints"), config)
    loader = iter(train_data)  # infinite; its get_state()/set_state() position goes into checkpoints
    meta = {"best_val_score": None, "best_step": None, "epochs_since_best": 0, "val": None}
    if manager.latest_step() is not None:
        state, meta = checkpoint.restore(manager, state, loader)
    start_step = int(state.step)
    stopped = "early_stop" if stopped_early(meta["epochs_since_best"], config.early_stop_epochs) else "done"
    if stopped == "early_stop":
        total_steps = start_step  # a restart of a run that had already stopped early

    # the pmapped programs
    task = make_task(config, schedules)
    steps_per_call = policy.steps_per_call(config.steps_per_call)
    p_train_steps = jax.pmap(functools.partial(train_steps, step_fn=task.train_step), axis_name=AXIS,
                             in_axes=(0, 0, None), donate_argnums=(0,))
    p_eval_step = jax.pmap(task.eval_step, axis_name=AXIS)
    p_stats_step = jax.pmap(batch_norm.statistics_step, axis_name=AXIS, in_axes=(0, 0, None))
    base_key = jax.random.wrap_key_data(np.asarray(state.rng))
    p_state = replicate_state(state)
    del state

    logger = monitor.MetricLogger(workdir, enabled=is_chief)
    show_progress = is_chief and config.progress_bar
    if show_progress:
        monitor.print_startup(steps_per_call)
    bar = monitor.progress_bar(total_steps, start_step, enabled=show_progress)
    # (first step, device metrics) of the call dispatched last: checked once the next call is queued, so
    # the host never waits for the device between calls
    pending = None
    history: list[dict[str, float]] = []
    try:
        step = start_step
        while step < total_steps:
            n = call_length(step, steps_per_call, (steps_per_epoch, config.checkpoint_every), total_steps)
            p_state, metrics = p_train_steps(p_state, stack_batches([next(loader) for _ in range(n)]),
                                             step_keys(base_key, step, n))
            if pending is not None:
                history += monitor.check_finite(*pending, manager.latest_step)
            pending = (step, metrics)
            done = step + n
            bar.update(n)

            if time_to_log(done, n, config.log_every, steps_per_epoch, total_steps):
                history += monitor.check_finite(*pending, manager.latest_step)
                pending = None
                scalars = logger.train(done, history)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
                history = []

            checkpoint_metrics = None
            if time_to_evaluate(done, steps_per_epoch, config.eval_every_epochs, total_steps):
                if config.bn_recalibration_batches and jax.tree_util.tree_leaves(p_state.batch_stats):
                    # a fixed stream (seed + 1) apart from the training one, so resuming stays exact
                    calibration = pipeline.train_loader(config, seed=config.seed + 1, builder=builder, **hosts)
                    p_state = batch_norm.recalibrate(
                        p_stats_step, p_state, itertools.islice(iter(calibration), config.bn_recalibration_batches),
                        jax.random.fold_in(jax.random.fold_in(base_key, done), 1))
                val = task.evaluate(p_eval_step, p_state, pipeline.val_batches(config, builder=builder, **hosts))
                logger.val(done, val)
                score = task.score(val)
                meta, best = record_evaluation(meta, val, score, done, config.eval_every_epochs)
                if best:
                    export.export_model(os.path.join(workdir, "model_best"), host_variables(p_state), model_spec)
                checkpoint_metrics = {"val_score": score}

            if checkpoint_metrics is not None or time_to_save(done, config.checkpoint_every, total_steps):
                if pending is not None:
                    history += monitor.check_finite(*pending, manager.latest_step)
                    pending = None
                checkpoint.save(manager, done, p_state, loader, meta, checkpoint_metrics)

            if stopped_early(meta["epochs_since_best"], config.early_stop_epochs):
                stopped = "early_stop"  # this epoch end was just evaluated and saved
                break
            step = done
        final_step = int(jax_utils.unreplicate(p_state.step))
        export.export_model(os.path.join(workdir, "model_last"), host_variables(p_state), model_spec)
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
        logger.close()
    return {"step": final_step, "stopped": stopped, "score_name": task.score_name,
            "best_val_score": meta["best_val_score"], "best_step": meta["best_step"], "val": meta["val"]}


# ------------------------------------------------------------- when to log, evaluate, save, stop


def time_to_log(done: int, n: int, log_every: int, steps_per_epoch: int, total_steps: int) -> bool:
    """Whether the call that ran steps ``done - n + 1 .. done`` ends a logging period: it passed a multiple
    of ``log_every``, or it ends an epoch or the run."""
    return done // log_every > (done - n) // log_every or done % steps_per_epoch == 0 or done == total_steps


def time_to_evaluate(done: int, steps_per_epoch: int, eval_every_epochs: int, total_steps: int) -> bool:
    """Whether ``done`` steps end an epoch that is evaluated: every ``eval_every_epochs``-th, and the last."""
    if done % steps_per_epoch:
        return False
    return (done // steps_per_epoch) % eval_every_epochs == 0 or done == total_steps


def time_to_save(done: int, checkpoint_every: int, total_steps: int) -> bool:
    """Whether ``done`` steps call for a periodic checkpoint (every evaluation saves one too)."""
    return done % checkpoint_every == 0 or done == total_steps


def stopped_early(epochs_since_best: int, early_stop_epochs: int) -> bool:
    """Whether the run stops: ``early_stop_epochs`` (0: never) epochs without a better validation score."""
    return bool(early_stop_epochs) and epochs_since_best >= early_stop_epochs


def record_evaluation(meta: Mapping[str, Any], val: Mapping[str, Any], score: float, step: int,
                      eval_every_epochs: int) -> tuple[dict[str, Any], bool]:
    """The loop's bookkeeping after an evaluation ``val`` scoring ``score`` at ``step``, and whether the
    score is the best so far (higher is better; the first evaluation is the best)."""
    meta = {**meta, "val": val}
    if meta["best_val_score"] is None or score > meta["best_val_score"]:
        return {**meta, "best_val_score": score, "best_step": step, "epochs_since_best": 0}, True
    return {**meta, "epochs_since_best": meta["epochs_since_best"] + eval_every_epochs}, False


def epoch_length(num_records: int, batch_size: int) -> int:
    """Steps an epoch: the full global batches ``num_records`` training images fill."""
    steps = num_records // batch_size
    if steps <= 0:
        raise ValueError(f"{num_records} training images cannot fill one global batch of "
                         f"config.batch_size={batch_size}")
    return steps
