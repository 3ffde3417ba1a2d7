"""Static parameters and tiling constraints of the delta-rule kernels (the op folder's "tables" module)."""

from __future__ import annotations

import dataclasses

from kernels import platform
from kernels.platform import Backend

LANES = 128  # TPU lane width: a chunk's scalar (its total decay) travels as one [8, 128] tile
SUBLANES = 8
DEFAULT_CHUNKS: dict[Backend, int] = {"tpu": 64, "gpu": 64}  # fla's chunk for the delta rule (the [C, C] UT transform)
GPU_CHUNK = 64  # the wgmma rows of one warpgroup; the shared-memory budget of the backward kernel is sized for it
GPU_VALUE_BLOCK = 64  # the value columns one GPU program owns
GPU_KEY_DIMS = (64, 128)  # swizzled wgmma operands; the backward kernel's shared memory fits K <= 128


@dataclasses.dataclass(frozen=True)
class KernelParams:
  """Static parameters of one kernel call (hashable: the custom_vjp's nondiff argument)."""

  chunk: int
  backend: Backend
  interpret: object


def check_supported(q_shape, v_shape, dtype, chunk: int, backend: Backend, *, segment_ids: bool) -> None:
  """Raises ValueError naming what the backend's kernel cannot serve (the XLA form serves every call). Both kernels
  take an initial state and return the final one."""
  if segment_ids:
    raise ValueError("segment_ids (packed sequences) are served by the XLA form only")
  if backend == "gpu":
    if chunk != GPU_CHUNK:
      raise ValueError(f"{chunk=} must be {GPU_CHUNK} on GPU (the wgmma rows of one warpgroup; chunk_size=64)")
    if q_shape[-1] not in GPU_KEY_DIMS:
      raise ValueError(f"key dim={q_shape[-1]} must be 64 or 128 on GPU (swizzled wgmma operands; the backward "
                       f"kernel's shared memory)")
    if v_shape[-1] % GPU_VALUE_BLOCK:
      raise ValueError(f"value dim={v_shape[-1]} must be a multiple of {GPU_VALUE_BLOCK} on GPU (one program per "
                       f"{GPU_VALUE_BLOCK}-wide value block)")
    reason = platform.mosaic_gpu_dtype_reason(dtype)
    if reason:
      raise ValueError(reason)
    return
  if chunk % SUBLANES:
    raise ValueError(f"{chunk=} must be a multiple of {SUBLANES} on TPU (sublane tiling of the [chunk, dim] blocks)")
  for name, dim in (("key dim", q_shape[-1]), ("value dim", v_shape[-1])):
    if dim > LANES and dim % LANES:
      raise ValueError(f"{name}={dim} must be <= {LANES} or a multiple of {LANES} on TPU")


__all__ = ["DEFAULT_CHUNKS", "GPU_CHUNK", "GPU_KEY_DIMS", "GPU_VALUE_BLOCK", "KernelParams", "LANES", "SUBLANES",
           "check_supported"]
