"""Host-side (numpy) tables built from a static block layout: which query rows are computed densely, which key
columns are global, and the gather / kernel index lists of everything else.

Why: a global (dense) query row is as wide as the sequence. Padding every row's index list to the widest row would
make every row gather every key block (quadratic cost); instead rows are split into a dense group (attention over all
keys, masked by their layout row) and a sparse group gathered at the width of the widest *sparse* row. Which rows are
dense is decided by a cost model (`split_rows`), so any layout gets the cheaper of the two treatments per row, with
the total O(L·K·C + G·C·L) for K sparse blocks per row and G global blocks. The XLA form also takes key columns that
(nearly) every sparse row sees out of the gather into one shared score slab (`xla_plan`), which keeps the gathered
key/value copies at the width of the sparse band.

Also the static description every implementation and both kernel backends share (the op folder's one "tables"
module, see docs/architecture.md "Functional cores"): kernel tile sizes (`BlockSizes`), the static call description
(`KernelStatic`), each backend's constraints (`check_supported`) and the join of per-group kernel outputs
(`merge_groups`), so that `pallas_tpu` and `pallas_gpu` never import each other.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import keep_threshold
from kernels.platform import Backend, mosaic_gpu_dtype_reason

TPU_LANES = 128  # TPU lane width: per-row statistics travel broadcast over one vreg row, as in jax's TPU kernels
# A GPU tile larger than the layout block carries which of its layout blocks are allowed as bits of one int32.
MAX_SUB_BLOCKS = 31


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
# Kernel tables (Pallas TPU and Mosaic GPU).


@dataclasses.dataclass(frozen=True)
class Lists:
  """Index lists of one group of rows (query tiles for forward/dQ, key tiles for dK/dV), flattened for SMEM.

  `ids[r]` is the tile of the group's r-th row; `index[(h * R + r) * width + s]` its s-th listed tile (layout head h),
  `count[h * R + r]` how many there are. Lists are padded to the group's widest row by repeating their last entry (the
  pipeline keeps that block resident: no new copy); padding steps skip their compute. `bits` (same layout as
  `index`; None when tiles lie inside layout blocks) holds each listed tile pair's `tile_bits`.
  """

  ids: np.ndarray
  index: np.ndarray
  count: np.ndarray
  width: int
  bits: np.ndarray | None = None

  @property
  def rows(self) -> int:
    return int(self.ids.size)


def _lists(allowed_HxRxC: np.ndarray, ids: np.ndarray, bits_HxRxC: np.ndarray | None = None) -> Lists:
  counts = allowed_HxRxC.sum(-1).astype(np.int32)
  width = max(int(counts.max(initial=0)), 1)
  order = np.argsort(~allowed_HxRxC, axis=-1, kind="stable")[..., :width]  # allowed first, increasing
  last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
  steps = np.arange(width)
  index = np.where(steps < counts[..., None], order, np.where(counts[..., None] > 0, last, 0))
  bits = None
  if bits_HxRxC is not None:
    bits = np.take_along_axis(bits_HxRxC, index, axis=-1).astype(np.int32).reshape(-1)
  return Lists(ids=ids.astype(np.int32), index=index.astype(np.int32).reshape(-1), count=counts.reshape(-1),
               width=width, bits=bits)


def grouped_lists(allowed_HxRxC: np.ndarray, bits_HxRxC: np.ndarray | None = None) -> tuple[Lists, ...]:
  """The rows of a tile layout in (at most) two groups, sparse first then dense, each listed at its own width: a
  dense row (a global query tile, or for the transposed lists a global key tile) no longer widens every row.
  `bits_HxRxC` (`tile_bits`, rows and columns as `allowed`) rides along with each listed tile."""
  # A dense group still lists only its allowed tiles: its cost per row is the widest row's list. A second kernel call
  # is worth it only when it saves at least a quarter of the grid steps.
  counts = allowed_HxRxC.sum(-1).max(0)
  widest = int(counts.max(initial=0))
  dense, sparse = split_rows(allowed_HxRxC, dense_width=widest)
  split_steps = dense.size * widest + sparse.size * int(counts[sparse].max(initial=0))
  if split_steps > 0.75 * counts.size * widest:
    dense, sparse = dense[:0], np.arange(counts.size)
  return tuple(_lists(allowed_HxRxC[:, ids], ids, None if bits_HxRxC is None else bits_HxRxC[:, ids])
               for ids in (sparse, dense) if ids.size)


def _to_tiles(layout_HxNxN: np.ndarray, block_size: int, block_q: int, block_kv: int) -> np.ndarray:
  """`[H, N * block_size // block_q, N * block_size // block_kv, r, c]`: the layout blocks each tile covers (r x c
  of them when a tile spans several blocks; a tile inside one block repeats that block, r = c = 1)."""
  x = np.asarray(layout_HxNxN, bool)
  if block_q < block_size:
    x = np.repeat(x, block_size // block_q, axis=1)
  if block_kv < block_size:
    x = np.repeat(x, block_size // block_kv, axis=2)
  h, n_q, n_kv = x.shape
  r, c = max(block_q // block_size, 1), max(block_kv // block_size, 1)
  return x.reshape(h, n_q // r, r, n_kv // c, c).transpose(0, 1, 3, 2, 4)


def tile_bits(layout_HxNxN: np.ndarray, block_size: int, block_q: int, block_kv: int, causal: bool) -> np.ndarray:
  """int32 `[H, Tq, Tkv]`: for tiles spanning several layout blocks, bit `a * c + b` set when the tile's a-th query
  block may see its b-th key block (`common.sub_blocks` gives r x c); the kernels mask the others."""
  layout = causal_blocks(layout_HxNxN) if causal else np.asarray(layout_HxNxN, bool)
  blocks = _to_tiles(layout, block_size, block_q, block_kv)
  r, c = blocks.shape[-2:]
  weights = (1 << np.arange(r * c, dtype=np.int64)).reshape(r, c)
  return (blocks * weights).sum(axis=(-2, -1)).astype(np.int32)


def tile_layout(layout_HxNxN: np.ndarray, block_size: int, block_q: int, block_kv: int, causal: bool) -> np.ndarray:
  """The layout refined (or, for tiles spanning several blocks, coarsened: any allowed block) to kernel tiles
  `[H, L // block_q, L // block_kv]`; causal drops tiles wholly in the future."""
  layout = causal_blocks(layout_HxNxN) if causal else layout_HxNxN
  tiles = _to_tiles(layout, block_size, block_q, block_kv).any(axis=(-2, -1))
  if causal:
    q_last = (np.arange(tiles.shape[1]) + 1) * block_q - 1
    kv_first = np.arange(tiles.shape[2]) * block_kv
    tiles = tiles & (kv_first[None, None, :] <= q_last[None, :, None])
  return tiles


@dataclasses.dataclass(frozen=True)
class KernelTables:
  """The kernels' tables of one (layout, tiling, causal) configuration: `kv_groups` (query tile -> key tiles, for the
  forward and dQ kernels) and `q_groups` (key tile -> query tiles, for dK/dV), one kernel call per group."""

  kv_groups: tuple[Lists, ...]
  q_groups: tuple[Lists, ...]
  num_q_tiles: int
  num_kv_tiles: int
  layout_heads: int


@functools.lru_cache(maxsize=64)
def _kernel_tables_cached(layout_bytes: bytes, shape: tuple[int, ...], block_size: int, block_q: int, block_kv: int,
                          causal: bool) -> KernelTables:
  layout = np.frombuffer(layout_bytes, dtype=np.bool_).reshape(shape)
  tiles = tile_layout(layout, block_size, block_q, block_kv, causal)
  bits = None
  if max(block_q, block_kv) > block_size:
    bits = tile_bits(layout, block_size, block_q, block_kv, causal)
  t = lambda x: None if x is None else np.swapaxes(x, 1, 2)  # noqa: E731  (key tiles -> query tiles, for dK/dV)
  return KernelTables(kv_groups=grouped_lists(tiles, bits), q_groups=grouped_lists(t(tiles), t(bits)),
                      num_q_tiles=tiles.shape[1], num_kv_tiles=tiles.shape[2], layout_heads=tiles.shape[0])


def make_tables(layout_HxNxN: np.ndarray, block_size: int, block_q: int, block_kv: int, causal: bool) -> KernelTables:
  """The `KernelTables` of a layout (cached)."""
  layout = np.ascontiguousarray(layout_HxNxN, dtype=np.bool_)
  return _kernel_tables_cached(layout.tobytes(), layout.shape, block_size, block_q, block_kv, bool(causal))


# ----------------------------------------------------------------------------------------------------------------------
# Kernel tiles, the static call description and each backend's constraints (shared by pallas_tpu and pallas_gpu).


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Kernel tile sizes in tokens.

  None picks the backend default: on TPU the largest power-of-two divisor of `block_size` up to 128 (the MXU
  width; a tile lies inside one layout block), on GPU 64 (the wgmma rows of one warpgroup). On GPU a tile may also
  span several layout blocks (`block_size` 16 or 32 with 64-token tiles): the kernels then mask the layout's blocks
  inside each tile (`sub_blocks`), so the 32-token layouts of local, longformer and sparse_transformer run there too.
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
      if block_size % value == 0 or (backend == "gpu" and value % block_size == 0):
        continue
      spans = " or be a multiple of it (a tile spanning whole layout blocks)" if backend == "gpu" else ""
      raise ValueError(f"{name}={value} must divide the layout {block_size=}{spans}")
    rows, cols = sub_blocks(block_size, int(bq), int(bkv))
    if (rows, cols) != (1, 1) and block_size & (block_size - 1):
      # The kernels find a token's block inside a tile by a shift: integer division is not a Mosaic GPU vector op.
      raise ValueError(f"tiles {bq}x{bkv} spanning layout blocks need a power-of-two block_size, got {block_size=}; "
                       f"use block_size 16, 32 or a multiple of the tile, or implementation='xla'")
    if rows * cols > MAX_SUB_BLOCKS:
      raise ValueError(f"a {bq}x{bkv}-token tile spans {rows}x{cols} layout blocks of {block_size=}; the GPU kernels "
                       f"mask at most {MAX_SUB_BLOCKS} per tile: use block_size >= {max(bq, bkv) // 4} (or a "
                       f"multiple of 64), or implementation='xla'")
    return int(bq), int(bkv)


def sub_blocks(block_size: int, block_q: int, block_kv: int) -> tuple[int, int]:
  """How many layout blocks a `block_q x block_kv` tile spans along queries and keys ((1, 1): it lies in one)."""
  return max(block_q // block_size, 1), max(block_kv // block_size, 1)


@dataclasses.dataclass(frozen=True)
class KernelStatic:
  """Everything static about one kernel call (hashable, so it rides through custom_vjp as a non-differentiable
  argument); shared by the TPU and GPU kernel modules. `tables` is a `KernelTables`."""

  tables: object = dataclasses.field(hash=False, compare=False)
  key: tuple  # what identifies `tables`
  block_q: int
  block_kv: int
  causal: bool
  scale: float
  backend: Backend
  interpret: object  # False, True, or a pltpu.InterpretParams / InterpretGPUParams
  dropout_rate: float = 0.0
  heads: int = 1  # query heads (the dropout counter is batch * heads + head)
  layout_block: int = 0  # the layout's block size in tokens
  sub_blocks: tuple[int, int] = (1, 1)  # layout blocks per tile (queries, keys): > 1 masks blocks inside a tile

  @property
  def keep_threshold(self) -> int:
    return keep_threshold(self.dropout_rate)


def _check_tpu(block_size: int, block_q: int, block_kv: int, head_dim: int, dtype) -> None:
  if block_q % 8:
    raise ValueError(f"{block_q=} must be a multiple of 8 on TPU (sublane tiling of the [block_q, head_dim] "
                     f"blocks) and divide the layout {block_size=}; use a block_size with such a divisor, or "
                     f"implementation='xla'")
  for name, value in (("block_kv", block_kv), ("head_dim", head_dim)):
    if value > TPU_LANES and value % TPU_LANES:
      raise ValueError(f"{name}={value} must be at most {TPU_LANES} or a multiple of {TPU_LANES} on TPU (lane "
                       f"tiling); use implementation='xla' otherwise")


def _check_gpu(block_size: int, block_q: int, block_kv: int, head_dim: int, dtype) -> None:
  for name, value in (("block_q", block_q), ("block_kv", block_kv)):
    if value % 64 or value > 256:
      raise ValueError(f"{name}={value} must be a multiple of 64 and at most 256 on GPU (wgmma tiles of one "
                       f"warpgroup)")
  if head_dim % 64 or head_dim > 128:
    raise ValueError(f"{head_dim=} must be 64 or 128 on GPU (128-byte swizzled wgmma operands; the double-buffered "
                     f"tiles of the backward kernels must fit in shared memory)")
  reason = mosaic_gpu_dtype_reason(dtype)
  if reason:
    raise ValueError(reason)


_CHECKS = {"tpu": _check_tpu, "gpu": _check_gpu}


def check_supported(q_shape, dtype, block_size: int, block_sizes: BlockSizes | None,
                    backend: Backend) -> tuple[int, int]:
  """Resolved `(block_q, block_kv)` of `backend`'s kernels for this call; raises ValueError naming the value, the
  constraint the backend imposes and the fix."""
  block_q, block_kv = (block_sizes or BlockSizes()).resolve(block_size, backend)
  _CHECKS[backend](block_size, block_q, block_kv, q_shape[-1], dtype)
  return block_q, block_kv


@dataclasses.dataclass(frozen=True)
class KernelTiles:
  """One backend's plan for a call (decided once in the entry, followed by the driver unchecked): its tiles, the
  length the kernels run at (a multiple of the tiles and the layout block: padded blocks nothing attends to), and the
  layout blocks a tile spans."""

  block_q: int
  block_kv: int
  padded_length: int
  sub_blocks: tuple[int, int]


def kernel_tiles(q_shape, dtype, block_size: int, block_sizes: BlockSizes | None,
                 backend: Backend) -> KernelTiles | str:
  """`backend`'s `KernelTiles` for this call, or the reason (one line: the value, the constraint, the fix) its kernels
  cannot serve it. A tile spans several layout blocks only on GPU (`BlockSizes.resolve` refuses it on TPU)."""
  try:
    block_q, block_kv = check_supported(q_shape, dtype, block_size, block_sizes, backend)
  except ValueError as e:
    return str(e)
  length = q_shape[1]
  unit = math.lcm(block_q, block_kv, block_size)
  return KernelTiles(block_q=block_q, block_kv=block_kv, padded_length=-(-length // unit) * unit,
                     sub_blocks=sub_blocks(block_size, block_q, block_kv))


def merge_groups(parts: list[jax.Array], groups: tuple[Lists, ...], tile: int) -> jax.Array:
  """Joins per-group kernel outputs `[B, H, rows_g * tile, D]` into `[B, H, L, D]` in tile order."""
  order = np.concatenate([g.ids for g in groups])
  out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)
  if np.array_equal(order, np.arange(order.size)):
    return out
  b, h, length, d = out.shape
  tiles = out.reshape(b, h, order.size, tile, d)[:, :, np.argsort(order)]
  return tiles.reshape(b, h, length, d)


__all__ = ["BlockSizes", "KernelStatic", "KernelTables", "KernelTiles", "Lists", "MAX_SUB_BLOCKS", "TPU_LANES",
           "XlaPlan", "causal_blocks", "check_supported", "expand_layout", "gather_tables", "grouped_lists",
           "kernel_tiles", "make_tables", "merge_groups", "split_columns", "split_rows", "sub_blocks", "tile_bits",
           "tile_layout", "xla_plan"]
