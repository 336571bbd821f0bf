"""COBLA's data-parallel objective over several processes (hosts) with ``jax.distributed``.

:class:`~coblax.lowrank.objective.NetworkLoss` with ``data_parallel=True`` shards
the objective subset over a 1-D mesh of ``jax.devices()``. After
:func:`initialize` joins this process to a multi-process JAX job,
``jax.devices()`` lists the devices of *every* process, so the same code splits
E(m)'s batches across hosts: each process puts only its own shards on its devices
(``jax.make_array_from_callback``), XLA all-reduces the loss sum and ∂E/∂m, and
every process gets the same E(m) and gradient, equal to the one-device values up
to summation order (tested with two CPU processes: within 1e-6).

The program is multi-controller (SPMD): every process runs the same script on the
same data with the same seeds and takes the same solver steps; only process 0
should write files (``jax.process_index() == 0``). On CPUs the cross-process
collectives use Gloo; on GPUs and TPUs JAX picks NCCL / ICI itself.

Example, two hosts (``host0`` runs the coordinator)::

    # on host0                                   # on host1
    COBLAX_COORDINATOR=host0:12345 \\             COBLAX_COORDINATOR=host0:12345 \\
    COBLAX_NUM_PROCESSES=2 \\                      COBLAX_NUM_PROCESSES=2 \\
    COBLAX_PROCESS_ID=0 python my_solve.py        COBLAX_PROCESS_ID=1 python my_solve.py

where ``my_solve.py`` calls :func:`initialize_from_env` before anything else
touches JAX and then builds ``NetworkLoss(..., data_parallel=True)``.
"""

from __future__ import annotations

import os

import jax

__all__ = ["ENV_VARS", "initialize", "initialize_from_env"]

#: Environment variables read by :func:`initialize_from_env`.
ENV_VARS = ("COBLAX_COORDINATOR", "COBLAX_NUM_PROCESSES", "COBLAX_PROCESS_ID")


def initialize(coordinator_address: str, num_processes: int, process_id: int,
               local_device_ids: list[int] | None = None) -> None:
    """Join this process to a ``jax.distributed`` job; call before any other JAX work.

    Args:
      coordinator_address: ``host:port`` of process 0 (it listens there).
      num_processes: processes in the job (>= 1).
      process_id: this process, 0 .. num_processes - 1.
      local_device_ids: the local devices this process uses (default: all).
    Raises:
      ValueError: an argument out of range or an address without a port.
    """
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator_address must be host:port, got {coordinator_address!r}")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be an int in [0, {num_processes}), got {process_id!r}")
    # CPU processes need a cross-process collective implementation; GPUs / TPUs ignore this
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)


def initialize_from_env() -> bool:
    """:func:`initialize` from ``COBLAX_COORDINATOR`` / ``COBLAX_NUM_PROCESSES`` / ``COBLAX_PROCESS_ID``.

    Returns False (and does nothing) when ``COBLAX_COORDINATOR`` is not set.
    Raises ValueError naming the variable when one is missing or not a number.
    """
    address = os.environ.get("COBLAX_COORDINATOR")
    if not address:
        return False
    values = []
    for name in ENV_VARS[1:]:
        text = os.environ.get(name, "")
        if not text.strip().isdigit():
            raise ValueError(f"{name} must be set to a whole number with COBLAX_COORDINATOR, got {text!r}")
        values.append(int(text))
    initialize(address, values[0], values[1])
    return True
