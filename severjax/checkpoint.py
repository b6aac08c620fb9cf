"""Checkpoints: exported inference models (and, in training, the full train state).

An exported model is a folder holding ``variables/`` (orbax, ``{"params", "batch_stats"}``) and
``model.json`` (the ``create_model`` kwargs plus optional ``normalize``). Training, prediction and
``tools/convert_weights.py`` all meet on this format.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"
WORKDIR_MODELS = ("model_best", "model_last")


def save_model(directory: str, variables: Mapping[str, Any], model_spec: Mapping[str, Any]) -> str:
    """Writes an exported model (host numpy copies of ``variables`` + ``model.json``); returns its path.

    Overwrites an existing export at ``directory`` atomically enough for our use: the variables are
    written to a fresh orbax folder first, ``model.json`` last, so a folder with ``model.json`` is complete.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, MODEL_JSON)
    if os.path.exists(json_path):
        os.remove(json_path)
    host = jax.tree_util.tree_map(np.asarray, dict(variables))
    host.setdefault("batch_stats", {})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, VARIABLES_DIR), host, force=True)
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(model_spec), f, indent=2, sort_keys=True)
    os.replace(tmp, json_path)
    return directory


def resolve_model_dir(path: str) -> str:
    """Returns the exported-model folder for ``path`` as an absolute path (orbax refuses relative ones): the
    folder itself, or a training workdir's best/last."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, MODEL_JSON)):
        return path
    for name in WORKDIR_MODELS:
        candidate = os.path.join(path, name)
        if os.path.isfile(os.path.join(candidate, MODEL_JSON)):
            return candidate
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    raise FileNotFoundError(
        f"checkpoint {path!r} is neither an exported model (no {MODEL_JSON}) nor a training workdir "
        f"holding {' or '.join(WORKDIR_MODELS)}/{MODEL_JSON}"
    )


def load_model(path: str):
    """Loads an exported model or a training workdir's best (else last) model.

    Returns ``(module, variables, model_spec)``; ``variables`` are host numpy trees.
    """
    from severjax.models import create_model  # local: keep checkpoint importable without the model zoo

    model_dir = resolve_model_dir(path)
    with open(os.path.join(model_dir, MODEL_JSON)) as f:
        spec = json.load(f)
    build = {k: v for k, v in spec.items() if k not in ("normalize", "meta")}
    module = create_model(**build)
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(os.path.join(model_dir, VARIABLES_DIR))
    variables = jax.tree_util.tree_map(np.asarray, variables)
    return module, dict(variables), spec


# ----------------------------------------------------------------------------------------------
# Training: multi-host-safe exports and the input pipeline's position inside orbax checkpoints.


def export_model(directory: str, variables: Mapping[str, Any], model_spec: Mapping[str, Any]) -> str:
    """``save_model`` for training loops: every process must call it (orbax syncs them).

    One process: exactly ``save_model``. Several: the orbax save runs on all (it writes from the
    primary host) and only process 0 touches ``model.json``, so processes never race on it.
    """
    if jax.process_count() == 1:
        return save_model(directory, variables, model_spec)
    from jax.experimental import multihost_utils

    directory = os.path.abspath(directory)
    json_path = os.path.join(directory, MODEL_JSON)
    chief = jax.process_index() == 0
    if chief:
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(json_path):
            os.remove(json_path)
    multihost_utils.sync_global_devices(f"severjax_export_begin:{directory}")
    host = jax.tree_util.tree_map(np.asarray, dict(variables))
    host.setdefault("batch_stats", {})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, VARIABLES_DIR), host, force=True)
    if chief:
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(model_spec), f, indent=2, sort_keys=True)
        os.replace(tmp, json_path)
    multihost_utils.sync_global_devices(f"severjax_export_end:{directory}")
    return directory


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


def _loader_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"
