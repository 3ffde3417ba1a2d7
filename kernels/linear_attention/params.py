"""Static parameters and tiling constraints of the linear-attention kernels, shared by every backend module."""

from __future__ import annotations

import dataclasses

from kernels import platform
from kernels.platform import Backend

LANES = 128  # TPU lane width: per-row scalars travel lane-broadcast, [C, 128], as in jax's TPU attention kernels


@dataclasses.dataclass(frozen=True)
class ChunkSizes:
  """`chunk`: positions per chunk (the intra-chunk `[C, C]` block). None picks the backend default: 128 on TPU (the
  MXU width), 64 on GPU (the wgmma rows of one warpgroup)."""

  chunk: int | None = None

  def resolve(self, backend: Backend) -> int:
    chunk = (128 if backend == "tpu" else 64) if self.chunk is None else self.chunk
    if not isinstance(chunk, int) or chunk < 1:
      raise ValueError(f"chunk must be a positive integer, got chunk={chunk}")
    return chunk


@dataclasses.dataclass(frozen=True)
class KernelParams:
  """Static parameters of one kernel call (hashable: the custom_vjp's nondiff argument)."""

  causal: bool
  normalize: bool
  eps: float
  chunk: int
  backend: Backend
  interpret: object


def check_supported(q_shape, v_shape, dtype, chunk: int, backend: Backend) -> None:
  """Raises ValueError naming the value and the constraint the backend's kernel imposes."""
  features, head_dim = q_shape[-1], v_shape[-1]
  if backend == "tpu":
    if chunk % 8:
      raise ValueError(f"{chunk=} must be a multiple of 8 on TPU (sublane tiling of the [chunk, dim] blocks)")
    if head_dim > LANES and head_dim % LANES:
      raise ValueError(f"{head_dim=} must be <= {LANES} or a multiple of {LANES} on TPU")
  else:
    if chunk % 64:
      raise ValueError(f"{chunk=} must be a multiple of 64 on GPU (wgmma tiles of one warpgroup)")
    for name, value in (("features", features), ("head_dim", head_dim)):
      if value % 64 or value > 128:
        raise ValueError(f"{name}={value} must be 64 or 128 on GPU (swizzled wgmma operands; the state blocks and "
                         f"the double-buffered chunk tiles must fit in registers and shared memory)")
    reason = platform.mosaic_gpu_dtype_reason(dtype)
    if reason:
      raise ValueError(reason)


__all__ = ["ChunkSizes", "KernelParams", "LANES", "check_supported"]
