"""Static parameters and tiling constraints of the delta-rule kernels (the op folder's "tables" module)."""

from __future__ import annotations

import dataclasses

from kernels.platform import Backend

LANES = 128  # TPU lane width: a chunk's scalar (its total decay) travels as one [8, 128] tile
SUBLANES = 8
DEFAULT_TPU_CHUNK = 64  # fla's chunk for the delta rule: the [C, C] UT transform stays small


@dataclasses.dataclass(frozen=True)
class KernelParams:
  """Static parameters of one kernel call (hashable: the custom_vjp's nondiff argument)."""

  chunk: int
  backend: Backend
  interpret: object


def check_supported(q_shape, v_shape, chunk: int, backend: Backend, *, segment_ids: bool, initial_state: bool,
                    return_state: bool) -> None:
  """Raises ValueError naming what the backend's kernel cannot serve (the XLA form serves every call)."""
  if backend == "gpu":
    raise ValueError("no Mosaic GPU kernel for the delta rule yet (the chunked XLA form runs on cuda)")
  if segment_ids or initial_state or return_state:
    raise ValueError("segment_ids / initial_state / return_state are served by the XLA form only")
  if chunk % SUBLANES:
    raise ValueError(f"{chunk=} must be a multiple of {SUBLANES} on TPU (sublane tiling of the [chunk, dim] blocks)")
  for name, dim in (("key dim", q_shape[-1]), ("value dim", v_shape[-1])):
    if dim > LANES and dim % LANES:
      raise ValueError(f"{name}={dim} must be <= {LANES} or a multiple of {LANES} on TPU")


__all__ = ["DEFAULT_TPU_CHUNK", "KernelParams", "LANES", "SUBLANES", "check_supported"]
