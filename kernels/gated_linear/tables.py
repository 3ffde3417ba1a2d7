"""Static parameters and tiling constraints of the gated linear-attention kernels (the op folder's "tables" module),
shared by the TPU and GPU kernel modules, which never import each other."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kernels import platform
from kernels.platform import Backend

LANES = 128  # TPU lane width: per-row scalars (the cumulative log-decays) travel lane-broadcast, [C, 128]
DEFAULT_TPU_CHUNK = 128  # the MXU width
DEFAULT_GPU_CHUNK = 64  # the wgmma rows of one warpgroup
GPU_VALUE_BLOCK = 64  # the value-dimension block one GPU program owns (its state is [K, 64])
GPU_DIMS = (64, 128)  # swizzled wgmma operands; the [K, 64] float32 state lives in one warpgroup's registers
GPU_SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block


@dataclasses.dataclass(frozen=True)
class KernelParams:
  """Static parameters of one kernel call (hashable: the custom_vjp's nondiff argument)."""

  chunk: int
  backend: Backend
  interpret: object


def default_chunk(backend: Backend) -> int:
  return DEFAULT_TPU_CHUNK if backend == "tpu" else DEFAULT_GPU_CHUNK


def sub_chunk(chunk: int) -> int:
  """Rows of one sub-chunk of the TPU kernel with a decay per dimension (`pallas_tpu.forward_per_dim`): 16, or 8
  (the sublane tile) for chunks that 16 does not divide or that are no longer than 16; `chunk` is a multiple of 8."""
  return 16 if chunk % 16 == 0 and chunk > 16 else 8


def gpu_smem_bytes(chunk: int, key_dim: int, itemsize: int) -> int:
  """Shared memory of one GPU program (`pallas_gpu.forward`): double-buffered q, k^T and value tiles, the cumulative
  decays twice, the state copy, the `[C, C]` scores, the decayed values, the output tile and five barrier pairs (the
  figure Mosaic GPU's lowering reports, to within its alignment)."""
  w = GPU_VALUE_BLOCK
  tiles = 2 * (2 * chunk * key_dim + chunk * w) + key_dim * w + chunk * chunk + 2 * chunk * w
  return tiles * itemsize + 2 * 2 * chunk * 4 + 5 * 2 * 8


def check_supported(q_shape, v_shape, log_decay_shape, dtype, chunk: int, backend: Backend, *, segment_ids: bool,
                    initial_state: bool, return_state: bool) -> None:
  """Raises ValueError naming what the backend's kernel cannot serve (the XLA form serves every call)."""
  if len(log_decay_shape) == 4 and backend == "gpu":
    raise ValueError("a decay per key dimension (GLA) has no Mosaic GPU kernel yet: only a decay per head "
                     "(RetNet, Mamba-2); the TPU kernel takes both")
  if segment_ids or initial_state or return_state:
    raise ValueError("segment_ids / initial_state / return_state are served by the XLA form only")
  dims = (("key dim", q_shape[-1]), ("value dim", v_shape[-1]))
  if backend == "tpu":
    if chunk % 8:
      raise ValueError(f"{chunk=} must be a multiple of 8 on TPU (sublane tiling of the [chunk, dim] blocks)")
    for name, dim in dims:
      if dim > LANES and dim % LANES:
        raise ValueError(f"{name}={dim} must be <= {LANES} or a multiple of {LANES} on TPU")
    return
  reason = platform.mosaic_gpu_dtype_reason(dtype)
  if reason:
    raise ValueError(reason)
  if chunk % 64:
    raise ValueError(f"{chunk=} must be a multiple of 64 on GPU (wgmma tiles of one warpgroup)")
  for name, dim in dims:  # the backward pass swaps the roles of the key and value dims: both are wgmma operands
    if dim not in GPU_DIMS:
      raise ValueError(f"{name}={dim} must be 64 or 128 on GPU (swizzled wgmma operands; the backward kernels run "
                       f"with the key and value dims swapped)")
  need = gpu_smem_bytes(chunk, max(q_shape[-1], v_shape[-1]), jnp.dtype(dtype).itemsize)
  if need > GPU_SMEM_BYTES:
    raise ValueError(f"{chunk=} needs {need} bytes of shared memory with these head dims (at most {GPU_SMEM_BYTES} "
                     f"on Hopper): use chunk_size=64")


__all__ = ["DEFAULT_GPU_CHUNK", "DEFAULT_TPU_CHUNK", "GPU_DIMS", "GPU_SMEM_BYTES", "GPU_VALUE_BLOCK", "KernelParams",
           "LANES", "check_supported", "default_chunk", "gpu_smem_bytes", "sub_chunk"]
