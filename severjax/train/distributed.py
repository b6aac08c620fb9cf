"""Multi-host start-up: ``jax.distributed.initialize`` when the command line or the environment asks.

Pass ``--coordinator_address --num_processes --process_id`` to ``severjax-train``, or run where the
environment describes the cluster (``JAX_COORDINATOR_ADDRESS``, a multi-task SLURM or Open MPI job).
Every process then reads its own shard of each global batch, feeds its local devices and checkpoints its
own input position.
"""

from __future__ import annotations

import os

import jax


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when the arguments or the environment ask; returns whether it did.

    The environment asks through ``JAX_COORDINATOR_ADDRESS`` or a multi-task SLURM / Open MPI job.
    CPU collectives go through gloo (needed for multi-process CPU runs, harmless elsewhere).
    """
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not (explicit or _cluster_in_environment(os.environ)):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def _cluster_in_environment(env) -> bool:
    return bool(env.get("JAX_COORDINATOR_ADDRESS")) or any(
        env.get(k, "1").isdigit() and int(env[k] if k in env else 1) > 1
        for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
