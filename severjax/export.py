"""The exported-model format: what training writes and prediction, weight conversion and ``init_weights`` read.

An exported model is a folder holding ``variables/`` (an orbax checkpoint of ``{"params", "batch_stats"}``,
host arrays) and ``model.json`` (the ``create_model`` keyword arguments plus ``normalize``, the
``{"mean", "std"}`` the model was trained with). ``model.json`` is written last, so a folder that has it
is complete. A training workdir holds two: ``model_best/`` and ``model_last/``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"
WORKDIR_MODELS = ("model_best", "model_last")  # in the order a workdir is resolved
# The original solution's input normalisation (its std is really the variance of the images; the
# training configs keep it for fidelity).
DEFAULT_NORMALIZE = {"mean": 0.3439, "std": 0.0383}


def save_model(directory: str, variables: Mapping[str, Any], model_spec: Mapping[str, Any]) -> str:
    """Writes an exported model (host numpy copies of ``variables`` + ``model.json``); returns its path.

    Overwrites an existing export at ``directory``: ``model.json`` is removed first and written last, so a
    folder holding ``model.json`` is always complete.
    """
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, MODEL_JSON)
    if os.path.exists(json_path):
        os.remove(json_path)
    _save_variables(directory, variables)
    _write_spec(json_path, model_spec)
    return directory


def load_model(path: str):
    """Loads an exported model or a training workdir's best (else last) model.

    Returns ``(module, variables, model_spec)``; ``variables`` are host numpy trees.
    """
    import orbax.checkpoint as ocp

    from severjax.models import create_model

    model_dir = resolve_model_dir(path)
    with open(os.path.join(model_dir, MODEL_JSON)) as f:
        spec = json.load(f)
    build = {k: v for k, v in spec.items() if k not in ("normalize", "meta")}
    module = create_model(**build)
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(os.path.join(model_dir, VARIABLES_DIR))
    variables = jax.tree_util.tree_map(np.asarray, variables)
    return module, dict(variables), spec


def resolve_model_dir(path: str) -> str:
    """The exported-model folder for ``path`` as an absolute path (orbax refuses relative ones): the folder
    itself, or a training workdir's best, else last, model."""
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


def export_model(directory: str, variables: Mapping[str, Any], model_spec: Mapping[str, Any]) -> str:
    """``save_model`` for training loops, where every process must call it (orbax synchronises them).

    One process: exactly ``save_model``. Several: the orbax save runs on all (it writes from the primary
    host) and only process 0 touches ``model.json``, so processes never race on it.
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
    _save_variables(directory, variables)
    if chief:
        _write_spec(json_path, model_spec)
    multihost_utils.sync_global_devices(f"severjax_export_end:{directory}")
    return directory


def _save_variables(directory: str, variables: Mapping[str, Any]) -> None:
    import orbax.checkpoint as ocp

    host = jax.tree_util.tree_map(np.asarray, dict(variables))
    host.setdefault("batch_stats", {})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, VARIABLES_DIR), host, force=True)


def _write_spec(json_path: str, model_spec: Mapping[str, Any]) -> None:
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(model_spec), f, indent=2, sort_keys=True)
    os.replace(tmp, json_path)
