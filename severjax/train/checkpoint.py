"""Train-state checkpoints: an orbax ``CheckpointManager`` in ``<workdir>/checkpoints``, save and restore.

A checkpoint at step ``s`` (``checkpoints/<s>/``) holds three items: ``state`` (step, params,
batch_stats, opt_state, rng), ``loader`` (each process's input position, ``process_<i>-of-<n>.json``,
written by :class:`LoaderStateHandler`) and ``meta`` (the loop's bookkeeping: best score and step, epochs
since the best, the last evaluation). Restoring all three resumes a run exactly.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import jax_utils
from orbax.checkpoint import checkpoint_managers

ITEMS = ("state", "loader", "meta")


def create_manager(directory: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """Orbax manager keeping the latest ``config.keep_checkpoints`` plus the best by validation score."""
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=config.keep_checkpoints),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m["val_score"], reverse=False, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS,
                                 item_handlers={"loader": LoaderStateHandler()})


def save(manager: ocp.CheckpointManager, step: int, p_state, loader, meta: Mapping[str, Any],
         metrics: Mapping[str, float] | None) -> None:
    """Saves the train state (host copy of the replicated ``p_state``), the ``loader``'s position
    (``get_state()``) and the loop bookkeeping ``meta`` at ``step``; ``metrics`` rank the best checkpoint."""
    state = jax.device_get(jax_utils.unreplicate(p_state))
    manager.save(step, metrics=dict(metrics) if metrics else None, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_tree(state)),
        loader=LoaderStateSave(loader.get_state()),
        meta=ocp.args.JsonSave(dict(meta)),
    ))


def restore(manager: ocp.CheckpointManager, state, loader) -> tuple[Any, dict[str, Any]]:
    """Restores the latest checkpoint into ``state``'s structure and ``loader`` (``set_state``);
    returns ``(state, meta)``."""
    step = manager.latest_step()
    target = jax.tree_util.tree_map(np.asarray, _state_tree(state))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        loader=LoaderStateRestore(),
        meta=ocp.args.JsonRestore(),
    ))
    tree = restored["state"]
    loader.set_state(restored["loader"])
    state = state.replace(step=jnp.asarray(tree["step"]), params=tree["params"],
                          batch_stats=tree["batch_stats"], opt_state=tree["opt_state"], rng=tree["rng"])
    return state, dict(restored["meta"])


class LoaderStateHandler(ocp.CheckpointHandler):
    """Orbax handler for an input iterator's position: one JSON file per process.

    The state is whatever the iterator's ``get_state()`` returns - JSON-able data (grain
    ``DatasetIterator``) or bytes (grain ``DataLoaderIterator``) - and comes back the same type.
    Each process writes and reads ``process_<i>-of-<n>.json``: every host has its own shard position.
    """

    def save(self, directory, args: "LoaderStateSave") -> None:
        state = args.state
        if isinstance(state, (bytes, bytearray)):
            record = {"format": "bytes_base64", "value": base64.b64encode(bytes(state)).decode("ascii")}
        else:
            record = {"format": "json", "value": state}
        path = os.path.join(os.fspath(directory), _loader_file())
        with open(path, "w") as f:
            json.dump(record, f)

    def restore(self, directory, args: "LoaderStateRestore | None" = None) -> Any:
        path = os.path.join(os.fspath(directory), _loader_file())
        if not os.path.isfile(path):
            present = sorted(os.listdir(os.fspath(directory)))
            raise FileNotFoundError(
                f"{path} is missing (found {present}): this checkpoint was written by a run with a "
                "different number of processes; restart with the same process count")
        with open(path) as f:
            record = json.load(f)
        if record.get("format") == "bytes_base64":
            return base64.b64decode(record["value"])
        if record.get("format") == "json":
            return record["value"]
        raise ValueError(f"{path}: unknown loader-state format {record.get('format')!r}")

    def metadata(self, directory) -> None:
        return None

    def finalize(self, directory) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(LoaderStateHandler, for_save=True)
@dataclasses.dataclass
class LoaderStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(LoaderStateHandler, for_restore=True)
@dataclasses.dataclass
class LoaderStateRestore(ocp.args.CheckpointArgs):
    pass


def _state_tree(state) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng}


def _loader_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"
