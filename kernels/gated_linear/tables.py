"""Static parameters and tiling constraints of the gated linear-attention kernels (the op folder's "tables" module)."""

from __future__ import annotations

import dataclasses

from kernels.platform import Backend

LANES = 128  # TPU lane width: per-row scalars (the cumulative log-decays) travel lane-broadcast, [C, 128]
DEFAULT_TPU_CHUNK = 128  # the MXU width


@dataclasses.dataclass(frozen=True)
class KernelParams:
  """Static parameters of one kernel call (hashable: the custom_vjp's nondiff argument)."""

  chunk: int
  backend: Backend
  interpret: object


def check_supported(q_shape, v_shape, log_decay_shape, chunk: int, backend: Backend, *, segment_ids: bool,
                    initial_state: bool, return_state: bool) -> None:
  """Raises ValueError naming what the backend's kernel cannot serve (the XLA form serves every call)."""
  if backend == "gpu":
    raise ValueError("no Mosaic GPU kernel for gated linear attention yet (the chunked XLA form runs on cuda)")
  if len(log_decay_shape) == 4:
    raise ValueError("a decay per key dimension (GLA) has no Pallas kernel yet: only a decay per head "
                     "(RetNet, Mamba-2)")
  if segment_ids or initial_state or return_state:
    raise ValueError("segment_ids / initial_state / return_state are served by the XLA form only")
  if chunk % 8:
    raise ValueError(f"{chunk=} must be a multiple of 8 on TPU (sublane tiling of the [chunk, dim] blocks)")
  for name, dim in (("key dim", q_shape[-1]), ("value dim", v_shape[-1])):
    if dim > LANES and dim % LANES:
      raise ValueError(f"{name}={dim} must be <= {LANES} or a multiple of {LANES} on TPU")


__all__ = ["DEFAULT_TPU_CHUNK", "KernelParams", "LANES", "check_supported"]
