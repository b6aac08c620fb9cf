"""Training: ``python -m severjax.train --config=configs/X.py --workdir=DIR [--config.key=value ...]``.

One pure step ``train_step(state, batch, rng) -> (state, metrics)`` pmapped over the local devices
(axis ``"batch"``): gradients ``pmean``'d, BatchNorm statistics ``pmean``'d after the step, one dropout
key a device; ``train_steps`` runs ``config.steps_per_call`` of them in one device call (3 on a CPU without
huge pages, else 1).
Every ``config.checkpoint_every`` steps and at each epoch end the train state, the input pipeline's
position and the loop's bookkeeping go to an orbax ``CheckpointManager`` in
``<workdir>/checkpoints`` (the latest ``keep_checkpoints`` plus the best by validation score); a
restart with the same workdir resumes exactly. Inference exports go to ``<workdir>/model_best`` (each
new best validation score) and ``<workdir>/model_last`` (the end). Validation (each
``config.eval_every_epochs``) thresholds probabilities at 0.5 and averages the per-image, per-class
Dice; with ``config.bn_recalibration_batches`` the BatchNorm running statistics are first replaced by
exact ones ("precise BN"), which short runs need (EfficientNet's BatchNorm momentum is 0.01).
A non-finite loss, gradient or parameter stops the run before anything of that state is saved.

Multi-host: pass ``--coordinator_address --num_processes --process_id`` (or run where
``jax.distributed.initialize()`` detects the cluster, or set ``JAX_COORDINATOR_ADDRESS``); every
process reads its own shard of each global batch, feeds its local devices and checkpoints its own
input position.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import jax_utils
from flax.training import train_state

from severjax import checkpoint as ckpt_lib
from severjax import hostmem, losses, optim
from severjax.metrics import dice_per_image_class

AXIS = "batch"
ARCHS = ("unet", "fpn", "classifier")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config.steps_per_call = 0: steps a call by backend. CPU without huge pages: 3 (see train_steps: the
# scratch buffer's page faults); CPU with them (severjax.hostmem, FPN-b5 at batch 2: 0.69 s a step at 1 against
# 0.79 s at 3) and accelerators: 1 (a longer program compiles longer; no gain measured there, no GPU here).
AUTO_STEPS_PER_CALL = {"cpu": 3}
CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
KAGGLE_HINT = (
    "download the Kaggle data with `kaggle competitions download -c severstal-steel-defect-detection`, "
    "unzip it so that the folder holds train.csv and train_images/ (and test_images/), and pass "
    "--config.data.dir=<that folder> (or try configs/quickstart.py, which trains on synthetic data)"
)


class TrainState(train_state.TrainState):
    """flax's TrainState plus the BatchNorm statistics and the run's base dropout key (raw key data)."""

    batch_stats: Any = None
    rng: Any = None


# ------------------------------------------------------------------------------------- entry


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``<workdir>/checkpoints`` if any), evaluates each epoch, exports models.

    Returns a summary: ``step``, ``score_name`` (what selects the best model: ``dice_mean``, or for the
    classifier ``auc_mean``, see ``make_task``), ``best_val_score``, ``best_step``, ``val`` (the last evaluation),
    ``stopped`` ("done" or "early_stop").
    """
    validate_config(config)
    from severjax.data import pipeline  # the input pipeline (grain + TFDS) is only needed here

    workdir = os.path.abspath(workdir)
    is_chief = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_chief:
        save_config(config, workdir)

    builder = pipeline.prepare_data(config)
    train_data = pipeline.train_loader(config, process_index=jax.process_index(),
                                       process_count=jax.process_count(), seed=config.seed, builder=builder)
    steps_per_epoch = config.steps_per_epoch or _steps_per_epoch(train_data.num_records, config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    model, model_spec = build_model(config)
    tx, schedules = optim.create_optimizer(config.optim, steps_per_epoch=steps_per_epoch,
                                           epochs=config.epochs)
    state = create_train_state(config, model, tx)
    manager = create_checkpoint_manager(os.path.join(workdir, "checkpoints"), config)
    loader = iter(train_data)  # infinite; its get_state()/set_state() position goes into checkpoints
    meta = {"best_val_score": None, "best_step": None, "epochs_since_best": 0, "val": None}
    if manager.latest_step() is not None:
        state, meta = restore_checkpoint(manager, state, loader)
    start_step = int(state.step)
    if config.early_stop_epochs and meta["epochs_since_best"] >= config.early_stop_epochs:
        start_step = total_steps = int(state.step)  # a restarted run that had already stopped early

    task = make_task(config, schedules)
    steps_per_call = resolve_steps_per_call(config.steps_per_call)
    p_train_steps = jax.pmap(functools.partial(train_steps, step_fn=task.train_step), axis_name=AXIS,
                             in_axes=(0, 0, None), donate_argnums=(0,))
    p_eval_step = jax.pmap(task.eval_step, axis_name=AXIS)
    p_stats_step = jax.pmap(batch_norm_statistics_step, axis_name=AXIS, in_axes=(0, 0, None))
    base_key = jax.random.wrap_key_data(np.asarray(state.rng))
    p_state = replicate_state(state)
    del state

    logger = MetricLogger(workdir, enabled=is_chief)
    if is_chief and config.progress_bar:
        print(f"{jax.device_count()} {jax.default_backend()} device(s), {steps_per_call} step(s) a call, "
              f"{hostmem.huge_pages_status()}", file=sys.stderr, flush=True)
    bar = _progress_bar(config, total_steps, start_step, enabled=is_chief)
    summary = {"step": start_step, "stopped": "early_stop" if start_step == total_steps and meta[
        "epochs_since_best"] >= max(config.early_stop_epochs, 1) else "done"}
    pending = None  # (first step, device metrics) of the call dispatched last, checked one call later
    history: list[dict[str, float]] = []
    try:
        step = start_step
        while step < total_steps:
            n = call_length(step, steps_per_call, (steps_per_epoch, config.checkpoint_every), total_steps)
            p_state, metrics = p_train_steps(p_state, stack_batches([next(loader) for _ in range(n)]),
                                             step_keys(base_key, step, n))
            if pending is not None:
                history += _check_finite(*pending, manager)
            pending = (step, metrics)
            done = step + n
            bar.update(n)
            epoch_end = done % steps_per_epoch == 0
            if done // config.log_every > (done - n) // config.log_every or epoch_end or done == total_steps:
                history += _check_finite(*pending, manager)
                pending = None
                scalars = logger.train(done, history)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
                history = []
            checkpoint_metrics = None
            if epoch_end and ((done // steps_per_epoch) % config.eval_every_epochs == 0 or done == total_steps):
                if config.bn_recalibration_batches and jax.tree_util.tree_leaves(p_state.batch_stats):
                    # a fixed stream (seed + 1) apart from the training one, so resuming stays exact
                    calibration = pipeline.train_loader(
                        config, process_index=jax.process_index(), process_count=jax.process_count(),
                        seed=config.seed + 1, builder=builder)
                    p_state = recalibrate_batch_norm(
                        p_stats_step, p_state, itertools.islice(iter(calibration), config.bn_recalibration_batches),
                        jax.random.fold_in(jax.random.fold_in(base_key, done), 1))
                val = task.evaluate(p_eval_step, p_state, pipeline.val_batches(
                    config, process_index=jax.process_index(), process_count=jax.process_count(),
                    builder=builder))
                logger.val(done, val)
                score = task.score(val)
                meta["val"] = val
                checkpoint_metrics = {"val_score": score}
                if meta["best_val_score"] is None or score > meta["best_val_score"]:
                    meta.update(best_val_score=score, best_step=done, epochs_since_best=0)
                    ckpt_lib.export_model(os.path.join(workdir, "model_best"),
                                          host_variables(p_state), model_spec)
                else:
                    meta["epochs_since_best"] += config.eval_every_epochs
            if checkpoint_metrics is not None or done % config.checkpoint_every == 0 or done == total_steps:
                if pending is not None:
                    history += _check_finite(*pending, manager)
                    pending = None
                save_checkpoint(manager, done, p_state, loader, meta, checkpoint_metrics)
            if config.early_stop_epochs and meta["epochs_since_best"] >= config.early_stop_epochs:
                summary["stopped"] = "early_stop"  # this epoch end was just evaluated and saved
                break
            step = done
        summary["step"] = int(jax_utils.unreplicate(p_state.step))
        ckpt_lib.export_model(os.path.join(workdir, "model_last"), host_variables(p_state), model_spec)
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
        logger.close()
    summary.update(score_name=task.score_name, best_val_score=meta["best_val_score"], best_step=meta["best_step"],
                   val=meta["val"])
    return summary


# ---------------------------------------------------------------------------------- the steps


class Task(NamedTuple):
    """What differs between segmentation and classifier training: steps, evaluation, model score."""

    train_step: Callable  # (state, batch, rng) -> (state, metrics), under pmap
    eval_step: Callable  # (state, batch) -> device outputs, under pmap
    evaluate: Callable  # (p_eval_step, p_state, host batches) -> dict of figures
    score_name: str  # the figure of ``evaluate`` that selects the best model (higher is better)
    # Used when ``score_name`` is NaN because it is undefined on this validation split (a classifier's
    # ROC AUC when no class has both positive and negative images). Whether it is defined depends on
    # the split's labels only, so one run never compares the two figures with each other.
    fallback_name: str | None = None

    def score(self, val: Mapping[str, Any]) -> float:
        value = float(val[self.score_name])
        if np.isnan(value) and self.fallback_name is not None:
            value = float(val[self.fallback_name])
        if not np.isfinite(value):
            raise FloatingPointError(f"validation {self.score_name} is {value}: {val}")
        return value


def make_task(config: ml_collections.ConfigDict, schedules: Mapping[str, optax.Schedule]) -> Task:
    """Segmentation (unet/fpn: BCE + Dice, best by val Dice) or classifier (BCE, best by val ROC AUC).

    The classifier is picked by the mean ROC AUC over the classes where it is defined, not by accuracy:
    with rare classes the accuracy at 0.5 sits at the majority baseline for many evaluations and would
    pin the best model to the first one. Accuracy stands in only where no class's AUC is defined.
    """
    if config.model.arch == "classifier":
        from severjax import classify

        return Task(functools.partial(classify.train_step, schedules=schedules,
                                      bce_weight=float(config.loss.bce_weight)), classify.eval_step,
                    functools.partial(classify.evaluate, shard=shard_batch), "auc_mean", "accuracy_mean")
    return Task(functools.partial(train_step, loss_config=dict(config.loss), schedules=schedules),
                eval_step, evaluate, "dice_mean")


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               loss_config: Mapping[str, float], schedules: Mapping[str, optax.Schedule] | None = None,
               axis_name: str | None = AXIS) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on this device's share of the global batch (call under ``pmap``).

    ``rng`` is the step's key, the same on every device; each device folds in its index for dropout.
    With ``axis_name=None`` it is a plain single-device step (for ``jit``).
    """
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            rngs={"dropout": rng}, mutable=["batch_stats"])
        terms = losses.bce_dice_loss(logits, batch["mask"], bce_weight=loss_config["bce_weight"],
                                     dice_weight=loss_config["dice_weight"], eps=loss_config["dice_eps"],
                                     axis_name=axis_name)
        return terms.loss, (terms, updates.get("batch_stats", {}))

    (_, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    new_state = state.apply_gradients(grads=grads)
    if axis_name is not None:
        batch_stats = jax.lax.pmean(batch_stats, axis_name)
    new_state = new_state.replace(batch_stats=batch_stats)
    metrics = {"loss": terms.loss, "bce": terms.bce, "dice_loss": terms.dice_loss,
               "grad_norm": optax.global_norm(grads)}
    if axis_name is not None:
        metrics = jax.lax.pmean(metrics, axis_name)
    metrics["params_finite"] = params_finite(new_state.params)
    for group, schedule in (schedules or {}).items():
        metrics[f"lr_{group}"] = schedule(state.step)
    return new_state, metrics


def train_steps(state: TrainState, batches: Mapping[str, jax.Array], rngs: jax.Array, *, step_fn: Callable
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    """``n`` optimizer steps in one program: ``step_fn`` on ``batches[k]`` with key ``rngs[k]``, in order.

    ``batches`` holds ``(n, b, ...)`` arrays (``stack_batches``) and ``rngs`` ``n`` keys; the metrics come
    back stacked, ``(n,)`` each. The loop is unrolled at trace time (``n`` is static): inside a ``while``
    body (``lax.scan``) XLA:CPU left the decoder's kernel-gradient convolutions on a slow generic path
    (the FPN-b5 step took 8 s instead of 1 s).

    Why more than one step a call (``config.steps_per_call``): XLA:CPU allocates an executable's whole
    scratch buffer (1.5 GB for an FPN-b5 step at batch 2) afresh at each call, and the kernel faults
    every page of it in again; one call of ``n`` steps shares one buffer (380k -> 148k page faults a
    step at ``n = 3``). Measured on 2 CPU cores, batch 2: FPN-b5 1.02 s a step at ``n = 1``, 0.86 s at
    2, 0.81 s at 3; Unet-SE-ResNeXt50 1.22 s at 1, 1.16 s at 2.
    """
    metrics = []
    for k in range(rngs.shape[0]):
        state, m = step_fn(state, jax.tree_util.tree_map(lambda x: x[k], batches), rngs[k])
        metrics.append(m)
    return state, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *metrics)


def resolve_steps_per_call(value: int, backend: str | None = None, huge_pages: bool | None = None) -> int:
    """``config.steps_per_call``, with 0 meaning :data:`AUTO_STEPS_PER_CALL` of the backend, or 1 where
    malloc hands out huge pages (``huge_pages``, default :func:`severjax.hostmem.huge_pages_on`): the faults
    that several steps a call amortise are then gone, and one step a call is the faster."""
    if value:
        return int(value)
    if huge_pages is None:
        huge_pages = hostmem.huge_pages_on()
    return 1 if huge_pages else AUTO_STEPS_PER_CALL.get(backend or jax.default_backend(), 1)


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


def stack_batches(batches: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Host batches of one call -> ``(local_devices, n, b // local_devices, ...)`` arrays (``shard_batch``
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


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], axis_name: str | None = AXIS
              ) -> dict[str, jax.Array]:
    """Per-class Dice sums (probabilities thresholded at 0.5) weighted by ``batch["weight"]``.

    Padding images carry weight 0. Returns ``{"dice_sum": (C,), "count": ()}`` summed over devices.
    The original thresholded the logits at 0.5 (probability 0.62) by mistake; this uses probabilities.
    """
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            batch["image"], train=False)
    pred = jax.nn.sigmoid(logits.astype(jnp.float32)) > 0.5
    dice = dice_per_image_class(pred, batch["mask"] > 0.5)
    weight = batch["weight"].astype(jnp.float32)
    out = {"dice_sum": jnp.sum(dice * weight[:, None], axis=0), "count": jnp.sum(weight)}
    return jax.lax.psum(out, axis_name) if axis_name is not None else out


def evaluate(p_eval_step: Callable, p_state: TrainState, batches: Iterable[Mapping[str, np.ndarray]]
             ) -> dict[str, Any]:
    """Runs the pmapped eval step over host-local batches; returns per-class and mean Dice."""
    dice_sum, count = None, 0.0
    for batch in batches:
        out = jax.device_get(jax_utils.unreplicate(p_eval_step(p_state, shard_batch(batch))))
        dice_sum = out["dice_sum"] if dice_sum is None else dice_sum + out["dice_sum"]
        count += float(out["count"])
    if not count:
        raise ValueError("validation produced no images (check config.data.val_fraction / limit_val)")
    per_class = [float(v) for v in np.asarray(dice_sum, np.float64) / count]
    return {"dice": per_class, "dice_mean": float(np.mean(per_class)), "images": int(round(count))}


def batch_norm_statistics_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
                               axis_name: str | None = AXIS) -> Any:
    """This batch's BatchNorm statistics, in the layout of ``state.batch_stats`` (call under ``pmap``).

    A train-mode forward updates each running statistic ``r`` to ``(1 - m) * r + m * s`` for the
    batch statistic ``s`` and the layer's momentum ``m``, whatever ``m`` is: two forwards, from
    ``r = 0`` and ``r = 1``, give ``m * s`` and ``1 - m + m * s``, hence ``m`` and ``s``. The running
    statistics never enter a train-mode forward, so both are exact.
    """
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def updated(fill):
        start = jax.tree_util.tree_map(lambda r: jnp.full_like(r, fill), state.batch_stats)
        _, out = state.apply_fn({"params": state.params, "batch_stats": start}, batch["image"], train=True,
                                rngs={"dropout": rng}, mutable=["batch_stats"])
        return out["batch_stats"]

    from_zero, from_one = updated(0.0), updated(1.0)
    stats = jax.tree_util.tree_map(lambda z, o: z / (1.0 - (o - z)), from_zero, from_one)
    return jax.lax.pmean(stats, axis_name) if axis_name is not None else stats


def recalibrate_batch_norm(p_stats_step: Callable, p_state: TrainState, batches: Iterable[Mapping[str, np.ndarray]],
                           rng: jax.Array) -> TrainState:
    """"Precise BN": running statistics := the mean over ``batches`` of their batch statistics.

    With the original's BatchNorm momentum (0.01 in EfficientNet) the running statistics lag the
    weights by hundreds of steps; short runs evaluate and export far better with exact ones.
    """
    total, count = None, 0
    for i, batch in enumerate(batches):
        stats = p_stats_step(p_state, shard_batch(batch), jax.random.fold_in(rng, i))
        total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
        count += 1
    if not count:
        raise ValueError("batch-norm recalibration got no batches")
    mean = jax.tree_util.tree_map(lambda t: np.asarray(t[0]) / count, jax.device_get(total))
    return p_state.replace(batch_stats=replicate_state(mean))


# ------------------------------------------------------------------------------ model & state


def build_model(config: ml_collections.ConfigDict):
    """``(module, model_spec)``: the module to train and the spec ``model.json`` of its exports holds."""
    from severjax.models import create_model

    spec = {"arch": config.model.arch, "encoder": config.model.encoder, "classes": config.model.classes,
            "in_channels": config.model.in_channels, "dropout": config.model.dropout,
            "first_conv": config.model.first_conv}
    if config.model.arch == "fpn":
        spec["decoder_merge_policy"] = config.model.decoder_merge_policy
    model = create_model(**spec, dtype=DTYPES[config.model.dtype])
    spec["normalize"] = {"mean": float(config.data.mean), "std": float(config.data.std)}
    return model, spec


def create_train_state(config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation
                       ) -> TrainState:
    """Initialises (or loads ``config.init_weights`` into) the model and the optimizer state."""
    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    h, w = config.data.crop
    shape = (1, h, w, config.model.in_channels)
    variables = _init_variables(model, init_key, jnp.zeros(shape, jnp.float32))
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    if config.init_weights:
        variables = load_init_weights(config.init_weights, variables)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"],
                             rng=jax.random.key_data(dropout_key))


def _init_variables(model, key: jax.Array, x: jax.Array) -> Mapping[str, Any]:
    """``model.init`` compiled once; on CPU without XLA's expensive passes (its many random ops took
    minutes to optimise for a program that runs once)."""
    lowered = jax.jit(functools.partial(model.init, train=False)).lower(key, x)
    options = CPU_FAST_COMPILE if jax.default_backend() == "cpu" else None
    return lowered.compile(compiler_options=options)(key, x)


def load_init_weights(path: str, like: Mapping[str, Any]) -> dict[str, Any]:
    """Loads an exported model's variables, checking they fit the model being trained."""
    _, loaded, _ = ckpt_lib.load_model(path)
    loaded = {"params": loaded["params"], "batch_stats": loaded.get("batch_stats", {})}
    want = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(like)}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
    problems = [f"{k}: missing" for k in sorted(set(want) - set(got))]
    problems += [f"{k}: unexpected" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: shape {got[k]} != {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    if problems:
        raise ValueError(f"config.init_weights={path!r} does not fit the configured model: "
                         + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))
    return jax.tree_util.tree_map(lambda v, ref: jnp.asarray(v, ref.dtype), loaded, like)


def replicate_state(tree: Any) -> Any:
    """Copies ``tree`` to every local device exactly as the pmapped steps' outputs are laid out.

    ``flax.jax_utils.replicate`` shards over another mesh axis, so the second step would see new
    input shardings and compile the whole train step again; an identity ``pmap`` over the same axis
    gives the steps' own layout.
    """
    n = jax.local_device_count()
    stacked = jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)),
                                     jax.device_get(tree))
    return jax.pmap(lambda x: x, axis_name=AXIS)(stacked)


def host_variables(p_state: TrainState) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of the replicated state as host numpy (device 0's copy)."""
    state = jax.device_get(jax_utils.unreplicate(p_state))
    return {"params": state.params, "batch_stats": state.batch_stats}


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


# --------------------------------------------------------------------------------- checkpoints


def create_checkpoint_manager(directory: str, config: ml_collections.ConfigDict):
    """Orbax manager keeping the latest ``config.keep_checkpoints`` plus the best by validation score."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as policies

    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=config.keep_checkpoints),
        policies.BestN(get_metric_fn=lambda m: m["val_score"], reverse=False, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=("state", "loader", "meta"),
                                 item_handlers={"loader": ckpt_lib.LoaderStateHandler()})


def save_checkpoint(manager, step: int, p_state: TrainState, loader, meta: Mapping[str, Any],
                    metrics: Mapping[str, float] | None) -> None:
    """Saves the train state (host copy), the loader position and the loop bookkeeping at ``step``."""
    import orbax.checkpoint as ocp

    state = jax.device_get(jax_utils.unreplicate(p_state))
    manager.save(step, metrics=dict(metrics) if metrics else None, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_tree(state)),
        loader=ckpt_lib.LoaderStateSave(loader.get_state()),
        meta=ocp.args.JsonSave(dict(meta)),
    ))


def restore_checkpoint(manager, state: TrainState, loader) -> tuple[TrainState, dict[str, Any]]:
    """Restores the latest checkpoint into ``state``'s structure and ``loader``; returns (state, meta)."""
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    target = jax.tree_util.tree_map(np.asarray, _state_tree(state))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        loader=ckpt_lib.LoaderStateRestore(),
        meta=ocp.args.JsonRestore(),
    ))
    tree = restored["state"]
    loader.set_state(restored["loader"])
    state = state.replace(step=jnp.asarray(tree["step"]), params=tree["params"],
                          batch_stats=tree["batch_stats"], opt_state=tree["opt_state"], rng=tree["rng"])
    return state, dict(restored["meta"])


def _state_tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng}


# ------------------------------------------------------------------------------- validation


def validate_config(config: ml_collections.ConfigDict, *, device_count: int | None = None,
                    check_data: bool = True) -> None:
    """Raises ``ValueError`` / ``FileNotFoundError`` naming the key and value at fault.

    Runs before anything compiles: unknown keys (relative to configs/common.py), crops bigger than the
    image or not multiples of 32, global batches not divisible by the device count, missing data.
    """
    device_count = jax.device_count() if device_count is None else device_count
    unknown = _unknown_keys(config, common_defaults())
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}: every key must be defined in "
                         "configs/common.py")
    h_img, w_img = (int(v) for v in config.data.image_shape)
    crop = tuple(config.data.crop)
    if len(crop) != 2 or not all(isinstance(v, (int, np.integer)) for v in crop):
        raise ValueError(f"config.data.crop={crop!r}: expected (height, width) integers")
    if not (0 < crop[0] <= h_img and 0 < crop[1] <= w_img):
        raise ValueError(f"config.data.crop={crop}: must fit inside the {h_img}x{w_img} images")
    if crop[0] % 32 or crop[1] % 32:
        raise ValueError(f"config.data.crop={crop}: both sides must be multiples of 32 (the encoder stride)")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] <= 0 or config[key] % device_count:
            raise ValueError(f"config.{key}={config[key]}: the global batch must be a positive multiple "
                             f"of the device count ({device_count} over {jax.process_count()} process(es))")
    for key in ("epochs", "eval_every_epochs", "checkpoint_every", "keep_checkpoints", "log_every"):
        if config[key] <= 0:
            raise ValueError(f"config.{key}={config[key]}: must be positive")
    for key in ("steps_per_epoch", "early_stop_epochs", "bn_recalibration_batches", "steps_per_call"):
        if config[key] < 0:
            raise ValueError(f"config.{key}={config[key]}: must be >= 0")
    if config.model.arch not in ARCHS:
        raise ValueError(f"config.model.arch={config.model.arch!r}: the trainer trains one of {ARCHS}")
    if config.model.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={config.model.dtype!r}: expected one of {tuple(DTYPES)}")
    if config.optim.schedule not in optim.SCHEDULES:
        raise ValueError(f"config.optim.schedule={config.optim.schedule!r}: expected one of "
                         f"{optim.SCHEDULES}")
    if not 0 <= config.optim.flat_epochs <= config.epochs:
        raise ValueError(f"config.optim.flat_epochs={config.optim.flat_epochs}: must lie in "
                         f"[0, config.epochs={config.epochs}]")
    if config.data.std <= 0:
        raise ValueError(f"config.data.std={config.data.std}: must be positive")
    if config.loss.bce_weight < 0 or config.loss.dice_weight < 0:
        raise ValueError(f"config.loss: bce_weight={config.loss.bce_weight} and dice_weight="
                         f"{config.loss.dice_weight} must be >= 0")
    if config.model.arch == "classifier" and (config.loss.dice_weight != 0 or config.loss.bce_weight <= 0):
        raise ValueError(f"config.loss.dice_weight={config.loss.dice_weight}, bce_weight={config.loss.bce_weight}: "
                         "the classifier's loss is bce_weight * BCE over image labels (there is no mask to "
                         "Dice); set dice_weight=0 and bce_weight > 0")
    if config.init_weights:
        ckpt_lib.resolve_model_dir(config.init_weights)  # raises naming the path
    if check_data:
        check_data_dir(config)


def check_data_dir(config: ml_collections.ConfigDict) -> None:
    """The Kaggle folder must hold train.csv and train_images/, unless a synthetic set is configured."""
    data_dir = os.path.abspath(os.path.expanduser(config.data.dir))
    if config.data.synthetic is not None:
        return  # generated there on first use by the input pipeline
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"config.data.dir={config.data.dir!r}: folder {data_dir} does not exist; "
                                + KAGGLE_HINT)
    missing = [n for n in ("train.csv", "train_images") if not os.path.exists(os.path.join(data_dir, n))]
    if missing:
        raise FileNotFoundError(f"config.data.dir={config.data.dir!r}: {data_dir} lacks {' and '.join(missing)}; "
                                + KAGGLE_HINT)


def common_defaults() -> ml_collections.ConfigDict:
    """configs/common.py's ``get_config()``, from the repository's configs folder."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "common.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: severjax needs its repository's configs/ folder")
    spec = importlib.util.spec_from_file_location("severjax_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _unknown_keys(config: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str = "config") -> list[str]:
    unknown = []
    for key, value in config.items():
        name = f"{prefix}.{key}"
        if key not in defaults:
            unknown.append(name)
        elif isinstance(value, (ml_collections.ConfigDict, dict)) and isinstance(
                defaults[key], (ml_collections.ConfigDict, dict)):
            unknown += _unknown_keys(value, defaults[key], name)
    return unknown


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config as ``config.json`` (and ``config.yaml``) in ``workdir``."""
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(workdir, "config.yaml"), "w") as f:
        f.write(config.to_yaml())


# ------------------------------------------------------------------------------------ logging


class MetricLogger:
    """TensorBoard scalars (tensorboardX) in ``<workdir>/tensorboard``, chief process only."""

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


def _progress_bar(config, total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=not (enabled and config.progress_bar))


def _check_finite(step: int, metrics: Mapping[str, jax.Array], manager) -> list[dict[str, float]]:
    """Host copies of the metrics of one call (steps ``step + 1 ..``, stacked); stops the run at the first
    step with a non-finite loss, gradient or parameter."""
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
                f"checkpoint is step {manager.latest_step()} (lower the learning rate or enable "
                f"config.optim.clip_norm, then restart with the same workdir)")
        out.append(host)
    return out


def _steps_per_epoch(num_records: int, batch_size: int) -> int:
    steps = num_records // batch_size
    if steps <= 0:
        raise ValueError(f"{num_records} training images cannot fill one global batch of "
                         f"config.batch_size={batch_size}")
    return steps


# ---------------------------------------------------------------------------------------- CLI


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when the flags or the environment ask; returns whether it did.

    The environment asks through ``JAX_COORDINATOR_ADDRESS`` or a multi-task SLURM / Open MPI job.
    CPU collectives go through gloo (needed for multi-process CPU runs, harmless elsewhere).
    """
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    env = os.environ
    from_env = bool(env.get("JAX_COORDINATOR_ADDRESS")) or any(
        env.get(k, "1").isdigit() and int(env[k] if k in env else 1) > 1
        for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    if not (explicit or from_env):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def _main(argv) -> None:
    from absl import flags, logging

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/<run>.py", lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, TensorBoard, exported models")
    flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
    flags.mark_flags_as_required(["config", "workdir"])


def check_overrides(argv: list[str]) -> None:
    """Rejects ``--config.<key>=...`` overrides of keys the config does not define, naming them.

    ml_collections would fail on them with a bare ``AttributeError: 'key'`` while parsing flags.
    """
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    overrides = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if config_arg is None or not overrides:
        return
    path, _, arg = config_arg.partition(":")
    if not os.path.isfile(path):
        raise SystemExit(f"--config={config_arg}: no such config file {path!r}")
    spec = importlib.util.spec_from_file_location("severjax_cli_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for name in overrides:
        node = config
        for part in name.split(".")[1:]:
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
                raise SystemExit(f"--{name}: unknown config key {name!r} (not defined by {path} / "
                                 "configs/common.py)")
            node = node[part]


if __name__ == "__main__":
    from absl import app

    hostmem.reexec_with_huge_pages()  # first: it restarts the process
    check_overrides(sys.argv[1:])
    _define_flags()
    app.run(_main)
