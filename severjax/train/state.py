"""The train state: building and initialising the model, loading initial weights, replicating over devices."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import jax_utils
from flax.training import train_state

from severjax import export
from severjax.config import DTYPES
from severjax.ops import policy
from severjax.train.steps import AXIS


class TrainState(train_state.TrainState):
    """flax's TrainState plus the BatchNorm statistics and the run's base dropout key (raw key data)."""

    batch_stats: Any = None
    rng: Any = None


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
    variables = init_variables(model, init_key, jnp.zeros(shape, jnp.float32))
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    if config.init_weights:
        variables = load_init_weights(config.init_weights, variables)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"],
                             rng=jax.random.key_data(dropout_key))


def init_variables(model, key: jax.Array, x: jax.Array) -> Mapping[str, Any]:
    """``model.init(key, x, train=False)`` compiled once, with the policy's options for programs that run
    once (:func:`severjax.ops.policy.init_compile_options`; docs/performance.md, "Model initialisation")."""
    lowered = jax.jit(functools.partial(model.init, train=False)).lower(key, x)
    return lowered.compile(compiler_options=policy.init_compile_options())(key, x)


def load_init_weights(path: str, like: Mapping[str, Any]) -> dict[str, Any]:
    """Loads an exported model's variables, checking they fit the model being trained (``like``)."""
    _, loaded, _ = export.load_model(path)
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
