"""Device mesh, shardings and multi-host set-up.

The mesh is `("data", "sequence")` with `config.mesh.data * config.mesh.sequence` devices: the batch is sharded over
"data", activations along the length over "sequence" (context parallelism, `kernels.sequence`), parameters are
replicated. Host batches enter row-sharded over "data" (replicated along "sequence": token ids are small); the
encoder's first op shards them along the length. Device order: consecutive devices take consecutive "data" indices,
so the "sequence" axis strides over devices and, with `data` = the devices per host, spans hosts (see
docs/clusters.md for choosing the shape).
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
SEQUENCE_AXIS = "sequence"
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
  """A `("data", "sequence")` mesh over `data * sequence` devices (`data=-1`: all the devices `sequence` leaves)."""
  devices = jax.devices()
  seq = mesh_config.get("sequence", 1)
  if not 1 <= seq <= len(devices) or len(devices) % seq:
    raise ValueError(f"config.mesh.sequence={seq} must divide the {len(devices)} available devices")
  n = mesh_config.get("data", -1)
  if n == -1:
    n = len(devices) // seq
  if not 1 <= n * seq <= len(devices):
    raise ValueError(f"config.mesh.data={n} times config.mesh.sequence={seq} must be at most the {len(devices)} "
                     f"available devices; lower one of them (data=-1 takes all the devices sequence leaves)")
  # devices[s * data + d] at [d, s]: data-parallel neighbours are adjacent devices.
  grid = np.asarray(devices[:n * seq]).reshape(seq, n).T
  return Mesh(grid, (DATA_AXIS, SEQUENCE_AXIS))


def sequence_size(mesh: Mesh) -> int:
  return mesh.shape.get(SEQUENCE_AXIS, 1)


def process_rows(mesh: Mesh) -> tuple[int, int]:
  """`(index, count)`: this process feeds rows `index / count` of each global batch (the data-axis slice its devices
  hold). With the sequence axis spanning processes several processes hold the same rows and feed the same data."""
  data = mesh.shape[DATA_AXIS]
  mine = sorted({d for (d, _), dev in np.ndenumerate(mesh.devices) if dev.process_index == jax.process_index()})
  if not mine:
    raise ValueError(f"process {jax.process_index()} holds no device of the mesh {dict(mesh.shape)}; use all devices")
  size = len(mine)
  if data % size or mine != list(range(mine[0], mine[0] + size)) or mine[0] % size:
    raise ValueError(f"process {jax.process_index()} holds data rows {mine} of {data}: not an even contiguous slice; "
                     f"choose config.mesh.data as a multiple of the devices per process")
  return mine[0] // size, data // size


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "config.train.batch_size") -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(f"{what}={batch_size} must be a multiple of the number of data-parallel devices ({n})")


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded along the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
