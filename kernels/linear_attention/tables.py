"""Static parameters and tiling constraints of the linear-attention kernels, shared by every backend module (the op
folder's one "tables" module: docs/architecture.md "Functional cores")."""

from __future__ import annotations

import dataclasses

from kernels import platform
from kernels.platform import Backend

LANES = 128  # TPU lane width: per-row scalars travel lane-broadcast, [C, 128], as in jax's TPU attention kernels
# The widest feature map one kernel call takes per backend (None: any). Wider maps are split into blocks of the
# widest width that divides them (`feature_block`); the driver sums the blocks' numerators (`pallas.py`).
MAX_FEATURES: dict[Backend, int | None] = {"tpu": None, "gpu": 128}
GPU_FEATURE_WIDTHS = (128, 64)  # swizzled wgmma operands: 64 or 128 bfloat16 columns


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


def padded_features(features: int, backend: Backend) -> int:
  """Feature width the backend's kernel runs `features` at: on GPU the next multiple of 64 (swizzled wgmma operands),
  the extra features zero (a zero feature adds nothing to `q·k` or `q·z`: based's 273 Taylor features run as 320);
  on TPU `features` itself."""
  if MAX_FEATURES[backend] is None:
    return features
  return -(-features // GPU_FEATURE_WIDTHS[-1]) * GPU_FEATURE_WIDTHS[-1]


def feature_block(features: int, backend: Backend) -> int:
  """Feature width of one kernel call for a (padded, `padded_features`) feature map: `features` itself when the
  backend takes it whole, else the widest of `GPU_FEATURE_WIDTHS` that divides it (so performer's 256 random features
  run as two 128-wide blocks on GPU). Raises ValueError when no width divides it."""
  widest = MAX_FEATURES[backend]
  if widest is None or features in GPU_FEATURE_WIDTHS:
    return features
  for width in GPU_FEATURE_WIDTHS:
    if features % width == 0:
      return width
  raise ValueError(f"features={features} must be 64, 128 or a multiple of 64 on GPU (swizzled wgmma operands; wider "
                   f"feature maps run as blocks of 128 or 64): pad them with zeros (padded_features)")


@dataclasses.dataclass(frozen=True)
class KernelPlan:
  """How one backend's kernels serve one call, decided once by `plan` in the op's entry and followed unchecked by the
  driver (`pallas.linear_attention_pallas`): the chunk, the feature width the kernels run at (`padded_features`) and
  the width of one kernel call (`feature_block`; narrower: feature blocks run as extra heads)."""

  backend: Backend
  chunk: int
  features: int
  block: int


def plan(q_shape, v_shape, dtype, chunk_sizes: ChunkSizes, backend: Backend) -> KernelPlan:
  """The plan of one call on `backend`'s kernels; ValueError naming the value and the constraint when they cannot
  serve it (the reason a dispatch logs, or an explicit `implementation="pallas"` raises)."""
  chunk = chunk_sizes.resolve(backend)
  check_supported(q_shape, v_shape, dtype, chunk, backend)
  features = padded_features(q_shape[-1], backend)
  return KernelPlan(backend=backend, chunk=chunk, features=features, block=feature_block(features, backend))


def check_supported(q_shape, v_shape, dtype, chunk: int, backend: Backend) -> None:
  """Raises ValueError naming the value and the constraint the backend's kernel imposes (any feature count is served:
  on GPU it is zero-padded, `padded_features`)."""
  head_dim = v_shape[-1]
  if backend == "tpu":
    if chunk % 8:
      raise ValueError(f"{chunk=} must be a multiple of 8 on TPU (sublane tiling of the [chunk, dim] blocks)")
    if head_dim > LANES and head_dim % LANES:
      raise ValueError(f"{head_dim=} must be <= {LANES} or a multiple of {LANES} on TPU")
  else:
    if chunk % 64:
      raise ValueError(f"{chunk=} must be a multiple of 64 on GPU (wgmma tiles of one warpgroup)")
    if head_dim not in GPU_FEATURE_WIDTHS:
      raise ValueError(f"{head_dim=} must be 64 or 128 on GPU (swizzled wgmma operands; the state blocks and the "
                       f"double-buffered chunk tiles must fit in registers and shared memory)")
    reason = platform.mosaic_gpu_dtype_reason(dtype)
    if reason:
      raise ValueError(reason)


__all__ = ["ChunkSizes", "GPU_FEATURE_WIDTHS", "KernelParams", "KernelPlan", "LANES", "MAX_FEATURES",
           "check_supported", "feature_block", "padded_features", "plan"]
