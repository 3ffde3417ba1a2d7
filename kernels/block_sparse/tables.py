"""Host-side (numpy) tables built from a static block layout: which query rows are computed densely, which key
columns are global, and the gather / kernel index lists of everything else.

Why: a global (dense) query row is as wide as the sequence. Padding every row's index list to the widest row would
make every row gather every key block (quadratic cost); instead rows are split into a dense group (attention over all
keys, masked by their layout row) and a sparse group gathered at the width of the widest *sparse* row. Which rows are
dense is decided by a cost model (`split_rows`), so any layout gets the cheaper of the two treatments per row, with
the total O(L·K·C + G·C·L) for K sparse blocks per row and G global blocks. The XLA form also takes key columns that
(nearly) every sparse row sees out of the gather into one shared score slab (`xla_plan`), which keeps the gathered
key/value copies at the width of the sparse band.

Also the kernels' plan: the op has no Pallas kernels of its own; a layout is a flex block mask (`kernel_plan`: kernel
tile sizes from `BlockSizes`, the layout classified into empty / full / partial tiles by
`kernels.flex.tables.block_mask_from_layout`, and flex's per-backend constraints).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from kernels.flex.tables import BlockMask, block_mask_from_layout
from kernels.flex.tables import check_supported as flex_check_supported
from kernels.platform import Backend


def expand_layout(layout_HxNxN: np.ndarray, block_size: int) -> np.ndarray:
  """The token-level mask `[H, L, L]` of a block layout."""
  return np.repeat(np.repeat(np.asarray(layout_HxNxN, bool), block_size, axis=1), block_size, axis=2)


def causal_blocks(layout_HxNxN: np.ndarray) -> np.ndarray:
  """The layout without blocks wholly in the future of their row (`j > i`): exact under causal masking."""
  n = layout_HxNxN.shape[-1]
  return np.asarray(layout_HxNxN, bool) & np.tri(n, dtype=bool)[None]


def gather_tables(layout_HxNxN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Index tables of a (sub-)layout: `idx[h, i, :]` lists the key blocks row `i` of head `h` may see, padded to the
  widest row (K columns, at least 1) with block 0; `valid[h, i, k]` marks the real entries."""
  counts_HxN = layout_HxNxN.sum(axis=-1)
  width = max(int(counts_HxN.max(initial=0)), 1)
  # A stable argsort of ~allowed puts the allowed blocks first, in increasing block order.
  order_HxNxN = np.argsort(~layout_HxNxN, axis=-1, kind="stable")
  idx_HxNxK = order_HxNxN[..., :width].astype(np.int32)
  valid_HxNxK = np.arange(width)[None, None, :] < counts_HxN[..., None]
  return np.where(valid_HxNxK, idx_HxNxK, 0).astype(np.int32), valid_HxNxK


def split_rows(allowed_HxRxC: np.ndarray, band_cost: float = 1.0,
               dense_width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(dense rows, sparse rows), sorted: the split minimizing `dense * W + band_cost * sparse * K_sparse`, where
  `K_sparse` is the widest remaining row (over heads) and `W` the cost of a dense row (`dense_width`; None = all C
  columns). Ties keep rows sparse."""
  rows, cols = allowed_HxRxC.shape[1:]
  counts = allowed_HxRxC.sum(-1).max(0) if rows else np.zeros(0, int)
  order = np.argsort(-counts, kind="stable")
  widths = np.append(counts[order], 0)  # widths[r]: the widest sparse row once the r widest rows are dense
  width = cols if dense_width is None else dense_width
  costs = np.arange(rows + 1) * width + band_cost * (rows - np.arange(rows + 1)) * widths
  num_dense = int(np.argmin(costs))
  return np.sort(order[:num_dense]), np.sort(order[num_dense:])


def split_columns(allowed_HxRxC: np.ndarray, band_cost: float) -> tuple[np.ndarray, np.ndarray]:
  """(global columns, band columns), sorted: the columns seen by the most rows move to a shared slab (cost 1 per
  column) while that lowers `band_cost * K_band + slab width` (K_band: the widest row over the band columns)."""
  cols = allowed_HxRxC.shape[-1]
  if allowed_HxRxC.shape[1] == 0:
    return np.zeros(0, np.int64), np.arange(cols)
  coverage = allowed_HxRxC.sum(axis=(0, 1))
  order = np.argsort(-coverage, kind="stable")
  removed = np.cumsum(allowed_HxRxC[:, :, order], axis=-1)  # [H, R, C]: allowed among the first c+1 in order
  counts = allowed_HxRxC.sum(-1)
  widths = [int(counts.max())] + [int((counts - removed[..., c]).max()) for c in range(cols)]
  costs = band_cost * np.asarray(widths) + np.arange(cols + 1)
  num_global = int(np.argmin(costs))
  return np.sort(order[:num_global]), np.sort(order[num_global:])


@dataclasses.dataclass(frozen=True)
class XlaPlan:
  """How the XLA form computes one (layout, causal) configuration. Block indices throughout.

  dense_rows [Nd]: query blocks attended over all keys (masked by `dense_allowed [H, Nd, N]`).
  sparse_rows [Ns]: the others; `band_idx / band_valid [H, Ns, K]` list their key blocks outside `global_cols`
  (padded to the widest sparse row), `slab_allowed [H, Ns, G]` which of the `global_cols [G]` each row sees.
  """

  dense_rows: np.ndarray
  sparse_rows: np.ndarray
  global_cols: np.ndarray
  dense_allowed: np.ndarray
  band_idx: np.ndarray
  band_valid: np.ndarray
  slab_allowed: np.ndarray

  @property
  def band_width(self) -> int:
    return self.band_idx.shape[-1] if self.band_valid.any() else 0


# A gathered band block costs its scores plus its copied keys and values; a slab or dense block only its scores.
_XLA_BAND_COST = 2.0


@functools.lru_cache(maxsize=128)
def _xla_plan_cached(layout_bytes: bytes, shape: tuple[int, ...], causal: bool) -> XlaPlan:
  layout = np.frombuffer(layout_bytes, dtype=np.bool_).reshape(shape)
  if causal:
    layout = causal_blocks(layout)
  dense_rows, sparse_rows = split_rows(layout, _XLA_BAND_COST)
  sparse = layout[:, sparse_rows]
  global_cols, band_cols = split_columns(sparse, _XLA_BAND_COST)
  band_layout = np.zeros_like(sparse)
  band_layout[:, :, band_cols] = sparse[:, :, band_cols]
  band_idx, band_valid = gather_tables(band_layout)
  return XlaPlan(dense_rows=dense_rows, sparse_rows=sparse_rows, global_cols=global_cols,
                 dense_allowed=layout[:, dense_rows], band_idx=band_idx, band_valid=band_valid,
                 slab_allowed=sparse[:, :, global_cols])


def xla_plan(layout_HxNxN: np.ndarray, causal: bool) -> XlaPlan:
  """The `XlaPlan` of a layout (cached per layout and causal flag)."""
  layout = np.ascontiguousarray(layout_HxNxN, dtype=np.bool_)
  return _xla_plan_cached(layout.tobytes(), layout.shape, bool(causal))


# ----------------------------------------------------------------------------------------------------------------------
# Kernel plans: the layout as a flex block mask at the kernel tiles (the kernels are flex's: one kernel family).


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Kernel tile sizes in tokens.

  None picks the backend default: on TPU the largest power-of-two divisor of `block_size` up to 128 (the MXU
  width; a tile lies inside one layout block), on GPU 64 (the wgmma rows of one warpgroup). A tile may also span
  several layout blocks (`block_size` 16 or 32 with GPU's 64-token tiles): flex's kernels then mask the layout's
  blocks inside each partial tile by its bitmap, so the 32-token layouts of local, longformer and sparse_transformer
  run there too.
  """

  block_q: int | None = None
  block_kv: int | None = None

  def resolve(self, block_size: int, backend: Backend) -> tuple[int, int]:
    default = math.gcd(block_size, 128) if backend == "tpu" else 64
    bq = default if self.block_q is None else self.block_q
    bkv = default if self.block_kv is None else self.block_kv
    for name, value in (("block_q", bq), ("block_kv", bkv)):
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value}")
      if block_size % value and value % block_size:
        raise ValueError(f"{name}={value} must divide the layout {block_size=} or be a multiple of it (a tile "
                         f"spanning whole layout blocks)")
    return int(bq), int(bkv)


@dataclasses.dataclass(frozen=True)
class KernelPlan:
  """One backend's plan for a call (made once in the entry, followed by the driver unchecked): flex's tiles and the
  layout's host block mask at those tiles (`kernels.flex.tables.block_mask_from_layout`). The block mask is fixed by
  the call's layout, block size, causal flag and these tiles, so it takes no part in comparisons (the plan is a
  static argument of `jax.jit`)."""

  tiles: tuple[int, int]
  block_mask: BlockMask = dataclasses.field(compare=False, hash=False, repr=False)
  # Its partial tiles come as bitmaps (tiles spanning several layout blocks): fixed by the same things.
  bitmaps: bool = dataclasses.field(default=False, compare=False, hash=False)


def kernel_plan(q_shape, dtype, layout_HxNxN: np.ndarray, block_size: int, block_sizes: BlockSizes | None,
                causal: bool, backend: Backend) -> KernelPlan | str:
  """`backend`'s `KernelPlan` for this call, or the reason (one line: the value, the constraint, the fix) flex's
  kernels cannot serve it. Tiles inside a layout block mask only the causal diagonal (in the kernels); tiles
  spanning several layout blocks (GPU's 64-token tiles over 16/32-token blocks) take their partial tiles' layout
  mask as bitmaps."""
  try:
    tiles = (block_sizes or BlockSizes()).resolve(block_size, backend)
  except ValueError as e:
    return str(e)
  from kernels.flex.pallas import kernel_tables  # noqa: PLC0415  (the kernel driver, where wanted)
  layout_bm = block_mask_from_layout(layout_HxNxN, block_size, tiles, causal)
  bm, bitmaps = kernel_tables(layout_bm, layout_bm.mask_mod, q_shape[0], q_shape[2])
  reason = flex_check_supported(q_shape, q_shape, dtype, bm, backend, bitmaps)
  return reason if reason is not None else KernelPlan(tiles=tiles, block_mask=bm, bitmaps=bitmaps)


__all__ = ["BlockSizes", "KernelPlan", "XlaPlan", "causal_blocks", "expand_layout", "gather_tables", "kernel_plan",
           "split_columns", "split_rows", "xla_plan"]
