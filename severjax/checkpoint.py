"""Checkpoints: exported inference models (and, in training, the full train state).

An exported model is a folder holding ``variables/`` (orbax, ``{"params", "batch_stats"}``) and
``model.json`` (the ``create_model`` kwargs plus optional ``normalize``). Training, prediction and
``tools/convert_weights.py`` all meet on this format.
"""

from __future__ import annotations

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
    """Returns the exported-model folder for ``path``: the folder itself, or a training workdir's best/last."""
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
