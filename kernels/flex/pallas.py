"""The backend-neutral driver of the flex Pallas kernels (work in progress)."""

from __future__ import annotations

from kernels.flex.tables import BlockMask

TPU_LANES = 128


def check_supported(q_shape, k_shape, dtype, bm: BlockMask, backend: str) -> str | None:
  """Why `backend`'s kernels cannot serve this call, or None."""
  if backend == "gpu":
    return "no Mosaic GPU flex kernel yet (the TPU kernels and the XLA form serve flex)"
  return "the TPU flex kernels are not written yet"
