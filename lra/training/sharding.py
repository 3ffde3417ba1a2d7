"""Device mesh, shardings and multi-host set-up. Data parallel: the batch is sharded over the "data" axis and the
parameters are replicated."""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(mode: str | bool = "auto") -> None:
  """Calls `jax.distributed.initialize()` when asked (True) or, with "auto", when a multi-process launch is
  detected from the environment (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, or several TPU workers).

  A manual launch sets JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process (on
  CPU also JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo).
  """
  if mode is False or mode == "false":
    return
  if mode == "auto":
    tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    multi = any(os.environ.get(k) for k in _CLUSTER_ENV) or "," in tpu_workers
    if os.environ.get("SLURM_NTASKS") == "1":
      multi = False
    if not multi:
      return
  elif mode is not True and mode != "true":
    raise ValueError(f"config.mesh.distributed must be 'auto', True or False, got {mode!r}")
  if jax.distributed.is_initialized():
    return
  # jax reads JAX_COORDINATOR_ADDRESS itself; the process count and id are read here so a plain launch of N local
  # processes (or any launcher that sets them) works where jax's cluster auto-detection does not apply.
  kwargs = {}
  for env, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if os.environ.get(env):
      kwargs[arg] = int(os.environ[env])
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(mesh_config: ml_collections.ConfigDict) -> Mesh:
  """A 1-D mesh over `mesh_config.data` devices (-1 = all devices)."""
  devices = jax.devices()
  n = mesh_config.get("data", -1)
  if n == -1:
    n = len(devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"config.mesh.data={n} must be -1 (all) or between 1 and the {len(devices)} available devices")
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "config.train.batch_size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{what}={batch_size} must be a multiple of the number of data-parallel devices ({n})")


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded along the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
