"""Training: ``train_and_evaluate(config, workdir)``; from the command line ``python -m severjax.train``
(``severjax-train``, see :mod:`severjax.train.__main__`).

Modules, one concept each: ``loop`` (the loop), ``state`` (TrainState, model building and
initialisation, replication over devices), ``steps`` (several optimizer steps a device call, the pmap
axis, host batches and keys), ``tasks`` (what segmentation and classification differ in),
``segmentation`` and ``classification`` (their steps and evaluations), ``batch_norm`` (precise BatchNorm
statistics), ``checkpoint`` (orbax train-state checkpoints), ``monitor`` (TensorBoard, progress, finite
checks), ``distributed`` (multi-host start-up).
"""

from __future__ import annotations

from typing import Any

__all__ = ["train_and_evaluate"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: ``python -m severjax.train`` imports this package before its __main__ restarts the
    # process (severjax.ops.hostmem), and that must not import JAX.
    if name == "train_and_evaluate":
        from severjax.train.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
