"""Block masks: which (query tile, key tile) pairs the flex kernels visit, as traced int32 tile tables.

THE CONTRACT (shared by `kernels.flex`, the `flex` layer and the content-adaptive variants that build selections
inside `jit`). A `BlockMask` is a pytree (its arrays are leaves, so it passes through `jit`, `scan` and `shard_map`;
the tiling and the mask function are static aux data). Every (query tile i, key tile j) pair is
  empty    never visited, forward or backward;
  full     every element allowed: no mask work at all (only key padding, if any);
  partial  `mask_mod(b, h, q_idx, kv_idx)` is applied on the tile's elements: a pure index function is evaluated
           on the tile's index arrays inside the kernel; a mask closing over arrays (document ids, a traced top-k
           selection, a prefix length) is evaluated in the XLA program on each listed partial tile's index grid
           and handed to the kernels as that tile's bitmap (`partial_bitmaps`).
Tables (int32; `B'` is 1 or the batch, `Hm` is 1, the key/value heads `Hkv` or the query heads `H`; query head `h`
reads table row `h * Hm // H`, so `Hm = Hkv` shares one selection across a GQA group, as NSA does):
  kv_num_full    [B', Hm, Tq]       how many full key tiles query tile i visits
  kv_full_idx    [B', Hm, Tq, Kf]   their key tile indices, increasing, first `kv_num_full` entries real
  kv_num_partial [B', Hm, Tq]       likewise for partial key tiles
  kv_partial_idx [B', Hm, Tq, Kp]
  q_num_full     [B', Hm, Tk]       the transpose, for the dK/dV pass: query tiles that see key tile j fully
  q_full_idx     [B', Hm, Tk, Qf]
  q_num_partial  [B', Hm, Tk]
  q_partial_idx  [B', Hm, Tk, Qp]
Query heads that share a table row share its verdicts (and its partial-tile bitmaps): a mask telling those heads
apart needs per-query-head tables (`create_block_mask` makes them; a `block_mask_from_indices` caller picks `Hm`).
`Tq = ceil(q_len / q_block)`, `Tk = ceil(kv_len / kv_block)`. Entries past a row's count repeat its last real entry
(0 for an empty row): a kernel pipeline then keeps that tile resident and issues no copy for padding steps, which
skip their compute. Widths are at least 1. Keys at or past `kv_len` never count (a tile over the end is partial only
if the mask is partial inside the real keys: the kernels mask the overhang by position). The size is
O(visited tiles), never O(L^2) elements.

Builders:
  `create_block_mask`   host (numpy) tables from a mask function, cached per (function, shapes, tiles): the mask is
                        evaluated a chunk of query tiles at a time (jitted, vectorized), so 64K tokens need memory for
                        one chunk plus the tile classification, and the list widths are the real maxima;
  `create_block_mask_traced`  the same inside `jit` for masks that depend on data (document ids, prefix lengths);
                        list widths are static bounds (`kv_width`, `q_width`; default every tile);
  `block_mask_from_indices`   from a per-query-tile selection of key tiles (top-k inside the step, as NSA/MoBA do):
                        the transposed lists are built in the graph.

Partial-tile bitmaps (`partial_bitmaps`, for masks closing over arrays): bfloat16 `[B'·Hm·Tq·Kp, q_block, kv_block]`
(0 allowed, -inf masked), entry `row * Kp + p` for list slot p of table row `row = (b' * Hm + hm) * Tq + i`: laid out
like `kv_partial_idx`, so their size is that list's static size times a tile, 2 bytes an element (host tables: the
real widest row; traced tables: the static width bound, so a bound `kv_width` / a selection's K also bounds this
memory), never a `[L, L]` array unless the width bound is every key tile. `q_partial_pos [B', Hm, Tk, Qp]` gives the
dK/dV pass, per entry of the transposed lists, the bitmap of the same (query tile, key tile) pair.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels.common import keep_threshold
from kernels.platform import Backend, mosaic_gpu_dtype_reason

MaskMod = Callable[..., jax.Array]
EMPTY, PARTIAL, FULL = 0, 1, 2

# Mask elements evaluated per chunk (the builders' peak memory is a few bytes times this).
_CHUNK_ELEMENTS = 1 << 24

logger = logging.getLogger("kernels")
_warned_bounds: set = set()


def _warn_trusted_bound(where: str, name: str, width: int, tiles: int) -> None:
  """Logs once per (builder, option, width, tiles) that a list bound narrower than the tiles is trusted: traced
  tables cannot be checked when the program is built, and a row over its bound loses tiles (wrong values)."""
  if width >= tiles or (where, name, width, tiles) in _warned_bounds:
    return
  _warned_bounds.add((where, name, width, tiles))
  logger.warning("%s: %s=%d (of %d tiles) is trusted as a true bound: a row with more visited tiles keeps its first "
                 "%d and computes wrong values (not checked: the tables are traced); pass %s=None for the exact "
                 "default", where, name, width, tiles, width, name)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["kv_num_full", "kv_full_idx", "kv_num_partial", "kv_partial_idx", "q_num_full",
                                "q_full_idx", "q_num_partial", "q_partial_idx"],
                   meta_fields=["q_block", "kv_block", "q_len", "kv_len", "mask_mod"])
@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Tile tables of a mask (see the module docstring for every field's shape and meaning)."""

  kv_num_full: jax.Array
  kv_full_idx: jax.Array
  kv_num_partial: jax.Array
  kv_partial_idx: jax.Array
  q_num_full: jax.Array
  q_full_idx: jax.Array
  q_num_partial: jax.Array
  q_partial_idx: jax.Array
  q_block: int
  kv_block: int
  q_len: int
  kv_len: int
  mask_mod: MaskMod | None = None

  @property
  def num_q_tiles(self) -> int:
    return -(-self.q_len // self.q_block)

  @property
  def num_kv_tiles(self) -> int:
    return -(-self.kv_len // self.kv_block)

  @property
  def batch(self) -> int:
    return self.kv_num_full.shape[0]

  @property
  def heads(self) -> int:
    return self.kv_num_full.shape[1]

  def visited_fraction(self) -> float:
    """Visited tiles / all tiles, averaged over the table's rows (host: needs concrete tables)."""
    visited = np.asarray(self.kv_num_full).sum() + np.asarray(self.kv_num_partial).sum()
    return float(visited) / (self.batch * self.heads * self.num_q_tiles * self.num_kv_tiles)

  def partial_fraction(self) -> float:
    """Partial tiles / visited tiles (host)."""
    partial = float(np.asarray(self.kv_num_partial).sum())
    return partial / max(partial + float(np.asarray(self.kv_num_full).sum()), 1.0)

  def to_dense(self) -> jax.Array:
    """int8 `[B', Hm, Tq, Tk]` classification (EMPTY, PARTIAL, FULL) rebuilt from the forward lists (tests,
    the reference)."""
    tk = self.num_kv_tiles
    full = _lists_to_dense(self.kv_num_full, self.kv_full_idx, tk)
    part = _lists_to_dense(self.kv_num_partial, self.kv_partial_idx, tk)
    return jnp.where(full, FULL, jnp.where(part, PARTIAL, EMPTY)).astype(jnp.int8)


def _lists_to_dense(num_BxHxR, idx_BxHxRxK, cols: int) -> jax.Array:
  k = idx_BxHxRxK.shape[-1]
  valid = jnp.arange(k) < jnp.asarray(num_BxHxR)[..., None]
  hit = (jnp.asarray(idx_BxHxRxK)[..., None] == jnp.arange(cols)) & valid[..., None]
  return hit.any(axis=-2)


def tile_sizes(block_size) -> tuple[int, int]:
  """`block_size` (an int, or a (q_block, kv_block) pair) -> (q_block, kv_block), validated."""
  pair = tuple(block_size) if isinstance(block_size, (tuple, list)) else (block_size, block_size)
  if len(pair) != 2 or not all(isinstance(x, (int, np.integer)) and x >= 1 for x in pair):
    raise ValueError(f"block_size must be a positive int or a (q_block, kv_block) pair of them, got {block_size=}")
  return int(pair[0]), int(pair[1])


# ----------------------------------------------------------------------------------------------------------------------
# Classification: the mask evaluated a chunk of query tiles at a time.


def mask_broadcast_dims(mask_mod: MaskMod, batch: int, heads: int) -> tuple[int, int]:
  """(B', Hm): whether `mask_mod` uses its batch and head arguments, read from the shape of its output when `b` is
  `[B, 1, 1, 1]` and `h` is `[1, H, 1, 1]` (a mask that ignores `b` broadcasts to 1 there)."""
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
  out = jax.eval_shape(mask_mod, i32(batch, 1, 1, 1), i32(1, heads, 1, 1), i32(1, 1, 1, 1), i32(1, 1, 1, 1))
  shape = (1,) * (4 - len(out.shape)) + tuple(out.shape)
  if len(shape) != 4 or shape[0] not in (1, batch) or shape[1] not in (1, heads) or shape[2:] != (1, 1):
    raise ValueError(f"mask_mod(b, h, q_idx, kv_idx) must broadcast its index arguments; with b [{batch},1,1,1] and "
                     f"h [1,{heads},1,1] it returned shape {tuple(out.shape)}")
  if jnp.dtype(out.dtype) != jnp.bool_:
    raise ValueError(f"mask_mod must return bool, got dtype {out.dtype}")
  return shape[0], shape[1]


def classify(mask_mod: MaskMod | None, batch: int, heads: int, q_len: int, kv_len: int, q_block: int,
             kv_block: int) -> jax.Array:
  """int8 `[B', Hm, Tq, Tk]`: EMPTY / PARTIAL / FULL per tile pair (jnp; traceable). Keys at or past `kv_len` and
  queries at or past `q_len` are not part of any tile's verdict."""
  tq, tk = -(-q_len // q_block), -(-kv_len // kv_block)
  if mask_mod is None:
    return jnp.full((1, 1, tq, tk), FULL, jnp.int8)
  b_dim, h_dim = mask_broadcast_dims(mask_mod, batch, heads)
  rows = max(1, min(tq, _CHUNK_ELEMENTS // max(1, b_dim * h_dim * q_block * tk * kv_block)))
  chunks = -(-tq // rows)
  b = jnp.arange(b_dim, dtype=jnp.int32)[:, None, None, None]
  h = jnp.arange(h_dim, dtype=jnp.int32)[None, :, None, None]
  kv = jnp.arange(tk * kv_block, dtype=jnp.int32)
  kv_real = (kv < kv_len)[None, None, None, :]
  kv_cols = jnp.clip(kv_len - jnp.arange(tk) * kv_block, 0, kv_block)

  def chunk(c):
    q = c * rows * q_block + jnp.arange(rows * q_block, dtype=jnp.int32)
    allowed = jnp.broadcast_to(mask_mod(b, h, q[None, None, :, None], kv[None, None, None, :]),
                               (b_dim, h_dim, q.size, kv.size))
    real = allowed & (q < q_len)[None, None, :, None] & kv_real
    # One integer reduction, contiguous axis first (bools reduced over strided axes are several times slower on CPU).
    n = real.astype(jnp.int32).reshape(b_dim, h_dim, rows, q_block, tk, kv_block).sum(-1).sum(3)
    q_rows = jnp.clip(q_len - (c * rows + jnp.arange(rows)) * q_block, 0, q_block)[:, None]
    total = q_rows * kv_cols[None, :]  # real elements per tile
    return jnp.where((n == total) & (n > 0), FULL, jnp.where(n > 0, PARTIAL, EMPTY)).astype(jnp.int8)

  out = jax.lax.map(chunk, jnp.arange(chunks, dtype=jnp.int32))  # [chunks, B', Hm, rows, Tk]
  out = jnp.moveaxis(out, 0, 2).reshape(b_dim, h_dim, chunks * rows, tk)
  return out[:, :, :tq]


@functools.lru_cache(maxsize=None)
def _jitted_classify(mask_mod, batch, heads, q_len, kv_len, q_block, kv_block):
  return jax.jit(lambda: classify(mask_mod, batch, heads, q_len, kv_len, q_block, kv_block))


# ----------------------------------------------------------------------------------------------------------------------
# Lists from a classification.


def _np_lists(hit_BxHxRxC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(counts [B, H, R], idx [B, H, R, W]) of a bool grid: columns in increasing order, padding repeats the last."""
  counts = hit_BxHxRxC.sum(-1).astype(np.int32)
  width = max(int(counts.max(initial=0)), 1)
  order = np.argsort(~hit_BxHxRxC, axis=-1, kind="stable")[..., :width]
  last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
  idx = np.where(np.arange(width) < counts[..., None], order, np.where(counts[..., None] > 0, last, 0))
  return counts, idx.astype(np.int32)


def _jnp_lists(hit_BxHxRxC: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """Traced `_np_lists` at a static width (a row with more hits than `width` keeps its first `width`)."""
  cols = hit_BxHxRxC.shape[-1]
  width = max(1, min(int(width), cols))
  counts = jnp.minimum(hit_BxHxRxC.sum(-1), width).astype(jnp.int32)
  # Hits first in increasing column order: sort keys (0 for a hit, 1 otherwise) * cols + column.
  key = jnp.where(hit_BxHxRxC, 0, cols) + jnp.arange(cols, dtype=jnp.int32)
  order = jnp.sort(key, axis=-1)[..., :width] % cols
  last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  idx = jnp.where(jnp.arange(width) < counts[..., None], order, jnp.where(counts[..., None] > 0, last, 0))
  return counts, idx.astype(jnp.int32)


def _from_classes(classes, q_block, kv_block, q_len, kv_len, mask_mod, lists, widths) -> BlockMask:
  full, part = classes == FULL, classes == PARTIAL
  t = lambda x: jnp.swapaxes(x, -1, -2) if isinstance(x, jax.Array) else np.swapaxes(x, -1, -2)  # noqa: E731
  kf, kp, qf, qp = widths
  kv_num_full, kv_full_idx = lists(full, kf)
  kv_num_partial, kv_partial_idx = lists(part, kp)
  q_num_full, q_full_idx = lists(t(full), qf)
  q_num_partial, q_partial_idx = lists(t(part), qp)
  return BlockMask(kv_num_full, kv_full_idx, kv_num_partial, kv_partial_idx, q_num_full, q_full_idx, q_num_partial,
                   q_partial_idx, q_block=q_block, kv_block=kv_block, q_len=q_len, kv_len=kv_len, mask_mod=mask_mod)


def _check_sizes(batch, heads, q_len, kv_len):
  for name, value in (("batch", batch), ("heads", heads), ("q_len", q_len), ("kv_len", kv_len)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


@functools.lru_cache(maxsize=64)
def _create_cached(mask_mod, batch, heads, q_len, kv_len, q_block, kv_block) -> BlockMask:
  with jax.ensure_compile_time_eval():  # host tables even when called while a step is being traced
    classes = np.asarray(_jitted_classify(mask_mod, batch, heads, q_len, kv_len, q_block, kv_block)())
  return _from_classes(classes, q_block, kv_block, q_len, kv_len, mask_mod, lambda hit, _: _np_lists(hit),
                       (None,) * 4)


def create_block_mask(mask_mod: MaskMod | None, batch: int | None, heads: int | None, q_len: int, kv_len: int,
                      block_size=128) -> BlockMask:
  """Host-built (numpy) `BlockMask` of `mask_mod(b, h, q_idx, kv_idx) -> bool` (None: every key allowed), cached per
  (mask_mod, shapes, tiles): a static pattern is classified once per process. `batch` / `heads` None mean 1 (the mask
  must not use that argument then); the tables keep a batch or head axis only where the mask uses it.
  `block_size`: int or (q_block, kv_block)."""
  q_block, kv_block = tile_sizes(block_size)
  batch, heads = batch or 1, heads or 1
  _check_sizes(batch, heads, q_len, kv_len)
  if isinstance(mask_mod, jax.core.Tracer) or not (mask_mod is None or callable(mask_mod)):
    raise ValueError(f"mask_mod must be a function (b, h, q_idx, kv_idx) -> bool or None, got {mask_mod!r}")
  return _create_cached(mask_mod, int(batch), int(heads), int(q_len), int(kv_len), q_block, kv_block)


def create_block_mask_traced(mask_mod: MaskMod | None, batch: int | None, heads: int | None, q_len: int, kv_len: int,
                             block_size=128, *, kv_width: int | None = None,
                             q_width: int | None = None) -> BlockMask:
  """`create_block_mask` inside the traced program, for masks that close over data (document ids, prefix lengths).
  List widths are static: `kv_width` bounds the full and the partial key tiles of any query tile (default every key
  tile), `q_width` the query tiles of any key tile (default every query tile). A row with more tiles than its bound
  keeps its first ones (wrong results), so a bound must be a true bound: a bound narrower than the tiles is logged
  once as trusted (it cannot be checked while the tables are traced)."""
  q_block, kv_block = tile_sizes(block_size)
  batch, heads = batch or 1, heads or 1
  _check_sizes(batch, heads, q_len, kv_len)
  classes = classify(mask_mod, batch, heads, q_len, kv_len, q_block, kv_block)
  tq, tk = classes.shape[-2:]
  kv_w, q_w = kv_width or tk, q_width or tq
  _warn_trusted_bound("create_block_mask_traced", "kv_width", kv_w, tk)
  _warn_trusted_bound("create_block_mask_traced", "q_width", q_w, tq)
  return _from_classes(classes, q_block, kv_block, q_len, kv_len, mask_mod, _jnp_lists, (kv_w, kv_w, q_w, q_w))


def block_mask_from_indices(kv_idx, kv_count=None, *, q_len: int, kv_len: int, block_size, mask_mod=None,
                            full=None, valid=None, q_width: int | None = None) -> BlockMask:
  """A `BlockMask` from a per-query-tile selection of key tiles, built in the graph (top-k block selection).

  kv_idx: int `[B', Hm, Tq, K]` selected key tiles (duplicates allowed: counted once; order free).
  kv_count: int `[B', Hm, Tq]`: the first `kv_count` entries are real; or `valid`: bool `[B', Hm, Tq, K]`.
    Neither: all K are real.
  mask_mod: applied on the selected tiles (element-level masking inside them, e.g. causality, or each token's own
    selection by a closure over the traced selection: the kernels then read its partial-tile bitmaps); the query
    heads sharing a table row (Hm) must share it. None: the selected tiles are wholly attended.
  full: optional bool `[B', Hm, Tq, K]` marking selected tiles the caller knows to be wholly allowed by `mask_mod`
    (e.g. key tiles before the query tile under causality): they skip the mask work. Without it every selected tile
    is partial when `mask_mod` is given, full otherwise.
  q_width: static bound on the query tiles selecting one key tile (default every query tile).
  """
  q_block, kv_block = tile_sizes(block_size)
  kv_idx = jnp.asarray(kv_idx).astype(jnp.int32)
  if kv_idx.ndim != 4:
    raise ValueError(f"kv_idx must be [batch or 1, heads, q_tiles, k], got shape {kv_idx.shape}")
  tq, tk = -(-q_len // q_block), -(-kv_len // kv_block)
  if kv_idx.shape[2] != tq:
    raise ValueError(f"kv_idx has {kv_idx.shape[2]} query tiles; q_len={q_len} with q_block={q_block} has {tq}")
  k = kv_idx.shape[-1]
  if valid is None:
    valid = jnp.ones(kv_idx.shape, bool) if kv_count is None else jnp.arange(k) < jnp.asarray(kv_count)[..., None]
  valid = jnp.asarray(valid, bool) & (kv_idx >= 0) & (kv_idx < tk)
  # Scatter into a [B', Hm, Tq, Tk + 1] grid (column Tk absorbs the unselected entries): O(tiles), not O(tiles * K).
  b_dim, h_dim = kv_idx.shape[:2]
  at = (jnp.arange(b_dim)[:, None, None, None], jnp.arange(h_dim)[None, :, None, None],
        jnp.arange(tq)[None, None, :, None])
  grid = lambda keep: jnp.zeros((b_dim, h_dim, tq, tk + 1), bool).at[  # noqa: E731
      (*at, jnp.where(keep, kv_idx, tk))].set(True)[..., :tk]
  selected = grid(valid)
  if mask_mod is None:
    fullgrid = selected
  elif full is None:
    fullgrid = jnp.zeros_like(selected)
  else:
    fullgrid = grid(valid & jnp.asarray(full, bool))
  classes = jnp.where(fullgrid, FULL, jnp.where(selected, PARTIAL, EMPTY)).astype(jnp.int8)
  q_w = q_width or tq
  _warn_trusted_bound("block_mask_from_indices", "q_width", q_w, tq)
  return _from_classes(classes, q_block, kv_block, q_len, kv_len, mask_mod, _jnp_lists, (k, k, q_w, q_w))


def layout_mask_mod(layout_HxNxN: np.ndarray, block_size: int, causal: bool) -> MaskMod:
  """The token-level mask of a block layout: `layout[h, q_idx // block_size, kv_idx // block_size]` (and `kv_idx <=
  q_idx` when causal); `layout` bool `[1 or heads, N, N]`. It closes over the layout (a host constant), so the kernels
  take its partial tiles as bitmaps."""
  layout = np.asarray(layout_HxNxN, bool)
  shared = layout.shape[0] == 1

  def mask_mod(b, h, q_idx, kv_idx):
    del b
    table = jnp.asarray(layout)
    q_blk, kv_blk = jnp.asarray(q_idx) // block_size, jnp.asarray(kv_idx) // block_size
    allowed = table[0][q_blk, kv_blk] if shared else table[jnp.asarray(h), q_blk, kv_blk]
    return allowed & (jnp.asarray(kv_idx) <= jnp.asarray(q_idx)) if causal else allowed

  return mask_mod


@functools.lru_cache(maxsize=64)
def _layout_cached(layout_bytes: bytes, shape: tuple[int, ...], block_size: int, q_block: int, kv_block: int,
                   causal: bool) -> BlockMask:
  layout = np.frombuffer(layout_bytes, dtype=np.bool_).reshape(shape)
  heads, n = shape[0], shape[1]
  length = n * block_size
  g = int(np.gcd.reduce([block_size, q_block, kv_block]))  # cells of g x g tokens: uniform in layout and tiles
  r = block_size // g
  cells = np.repeat(np.repeat(layout, r, axis=1), r, axis=2).astype(np.int8) * FULL  # [H, L/g, L/g]
  if causal:  # a cell below the diagonal is wholly allowed, one on it partially, one above not at all
    a = np.arange(n * r)
    cells = np.where(a[None, None, :] < a[None, :, None], cells, np.where(
        a[None, None, :] == a[None, :, None], np.minimum(cells, PARTIAL) if g > 1 else cells, EMPTY)).astype(np.int8)
  tq, tk = -(-length // q_block), -(-length // kv_block)
  rq, rk = q_block // g, kv_block // g
  # Cells past the length (a tile over the end) are ignored: -1 never decides a tile's verdict.
  padded = np.full((heads, tq * rq, tk * rk), -1, np.int8)
  padded[:, :n * r, :n * r] = cells
  tiles = padded.reshape(heads, tq, rq, tk, rk)
  real = tiles >= 0
  full = np.all(np.where(real, tiles == FULL, True), axis=(2, 4))
  any_allowed = np.any(real & (tiles > EMPTY), axis=(2, 4))
  classes = np.where(any_allowed & full, FULL, np.where(any_allowed, PARTIAL, EMPTY)).astype(np.int8)[None]
  inside = block_size % q_block == 0 and block_size % kv_block == 0
  # Tiles inside one layout block are partial only on the causal diagonal: the pure index causal mask (evaluated in
  # the kernels) masks them exactly. Tiles spanning several blocks mask the layout inside them (bitmaps).
  if not (classes == PARTIAL).any():
    mask_mod = None
  elif inside:
    mask_mod = _causal
  else:
    mask_mod = layout_mask_mod(layout, block_size, causal)
  return _from_classes(classes, q_block, kv_block, length, length, mask_mod, lambda hit, _: _np_lists(hit),
                       (None,) * 4)


def _causal(b, h, q_idx, kv_idx):
  del b, h
  return kv_idx <= q_idx


def block_mask_from_layout(layout_HxNxN, block_size: int, tiles, causal: bool = False) -> BlockMask:
  """The host `BlockMask` of a block layout (`kernels.block_sparse_attention`'s: bool `[1 or heads, N, N]` over
  `N * block_size` tokens, causal optional) at kernel `tiles` (int or (q_block, kv_block); tiles may lie inside
  layout blocks or span several), classified from the layout at block granularity (no `[L, L]` evaluation), cached
  per layout. Its `mask_mod`: None without partial tiles, the causal index mask when the only partial tiles are
  causal diagonal ones inside a layout block, else `layout_mask_mod` (the kernels read those tiles as bitmaps)."""
  q_block, kv_block = tile_sizes(tiles)
  layout = np.ascontiguousarray(np.asarray(layout_HxNxN, bool))
  if layout.ndim != 3 or layout.shape[1] != layout.shape[2]:
    raise ValueError(f"layout must be bool [heads or 1, N, N], got shape {layout.shape}")
  return _layout_cached(layout.tobytes(), layout.shape, int(block_size), q_block, kv_block, bool(causal))


# ----------------------------------------------------------------------------------------------------------------------
# Partial-tile bitmaps: masks closing over arrays, evaluated in the XLA program for the kernels.


def dense_classes(bm: BlockMask) -> np.ndarray:
  """Host `to_dense`: int8 `[B', Hm, Tq, Tk]` (EMPTY, PARTIAL, FULL) of concrete tables, in numpy (no staged ops
  while a step is traced) and O(tiles) memory (`to_dense` compares every list slot with every key tile)."""
  tk = bm.num_kv_tiles
  out = np.full(np.shape(bm.kv_num_full) + (tk + 1,), EMPTY, np.int8)
  for num, idx, verdict in ((bm.kv_num_partial, bm.kv_partial_idx, PARTIAL), (bm.kv_num_full, bm.kv_full_idx, FULL)):
    num, idx = np.asarray(num), np.asarray(idx)
    cols = np.where(np.arange(idx.shape[-1]) < num[..., None], idx, tk)  # unused slots land in column Tk
    np.put_along_axis(out, cols, verdict, axis=-1)
  out[..., tk] = EMPTY
  return out[..., :tk]


def coarsen_q(bm: BlockMask, factor: int) -> tuple[BlockMask, np.ndarray]:
  """(coarse block mask, fine classes): the same tables over query tiles `factor` times taller (host tables only).
  A coarse pair is visited when any of its fine pairs is and full when every one over real queries is; the fine
  classes, int8 `[B', Hm, Tq', factor, Tk]` (rows past the last query tile EMPTY), let a partial coarse pair keep
  each fine pair's verdict: elements of an EMPTY fine pair stay masked, a FULL one needs no mask work, a PARTIAL one
  evaluates `mask_mod`, so the coarse form is exact for any block mask, including one whose tiles are not derived
  from its mask function (a selection). For forms whose per-step cost dominates small tiles (the XLA form on CPU)."""
  if isinstance(bm.kv_num_full, jax.core.Tracer):
    raise ValueError("coarsen_q needs host (concrete) tables; traced tables keep their tiles")
  fine = dense_classes(bm)
  b, h, tq, tk = fine.shape
  tc = -(-tq // factor)
  padded = np.full((b, h, tc * factor, tk), EMPTY, np.int8)
  padded[:, :, :tq] = fine
  groups = padded.reshape(b, h, tc, factor, tk)
  real = (np.arange(tc * factor) < tq).reshape(tc, factor)[None, None, :, :, None]
  visited = (groups != EMPTY).any(axis=3)
  full = ((groups == FULL) | ~real).all(axis=3) & visited
  classes = np.where(full, FULL, np.where(visited, PARTIAL, EMPTY)).astype(np.int8)
  coarse = _from_classes(classes, bm.q_block * factor, bm.kv_block, bm.q_len, bm.kv_len, bm.mask_mod,
                         lambda hit, _: _np_lists(hit), (None,) * 4)
  return coarse, groups


def bitmap_bytes(bm: BlockMask) -> int:
  """Bytes of `partial_bitmaps(bm, ...)`: the partial lists' static size times a tile, bfloat16."""
  return 2 * int(np.prod(np.shape(bm.kv_partial_idx))) * bm.q_block * bm.kv_block


def broadcast_batch(bm: BlockMask, batch: int) -> BlockMask:
  """`bm` with its tables repeated over the batch (a closed-over mask differing per example on batch-shared tables:
  each example then gets its own bitmaps)."""
  if bm.batch == batch:
    return bm
  fields = {f: jnp.broadcast_to(jnp.asarray(getattr(bm, f)), (batch, *np.shape(getattr(bm, f))[1:]))
            for f in ("kv_num_full", "kv_full_idx", "kv_num_partial", "kv_partial_idx", "q_num_full", "q_full_idx",
                      "q_num_partial", "q_partial_idx")}
  return dataclasses.replace(bm, **fields)


def partial_bitmaps(bm: BlockMask, mask_mod: MaskMod, heads: int) -> tuple[jax.Array, jax.Array]:
  """(bitmaps bfloat16 `[B'·Hm·Tq·Kp, q_block, kv_block]`, `q_partial_pos` int32 `[B', Hm, Tk, Qp]`): `mask_mod` on
  the index grid of every slot of the partial lists (0 allowed, -inf masked; slots past a row's count hold whatever
  their repeated tile gives and are never read), evaluated in the XLA program (traced closures welcome), at table
  row (b', hm)'s batch b' and its first query head `hm * heads // Hm`; and, per entry of the transposed partial lists,
  the flat bitmap index of its (query tile, key tile) pair, so the dK/dV pass reads the forward's bitmaps."""
  b_dim, h_dim, tq, kp = np.shape(bm.kv_partial_idx)
  tk = bm.num_kv_tiles
  bq, bkv = bm.q_block, bm.kv_block
  pidx = jnp.asarray(bm.kv_partial_idx, jnp.int32)
  i32 = lambda n: jnp.arange(n, dtype=jnp.int32)  # noqa: E731
  b = i32(b_dim)[:, None, None, None, None, None]
  h = (i32(h_dim) * (heads // h_dim))[None, :, None, None, None, None]
  q_idx = (i32(tq)[:, None, None, None] * bq + i32(bq)[None, None, :, None])[None, None]
  kv_idx = (pidx[..., None, None] * bkv + i32(bkv)[None, None, None, None, None, :])
  allowed = jnp.broadcast_to(jnp.asarray(mask_mod(b, h, q_idx, kv_idx), bool), (b_dim, h_dim, tq, kp, bq, bkv))
  bits = jnp.where(allowed, 0.0, -jnp.inf).astype(jnp.bfloat16).reshape(b_dim * h_dim * tq * kp, bq, bkv)
  # Flat bitmap index per (b', hm, i, j) of the listed partial pairs, then read at the transposed lists' pairs.
  valid = i32(kp) < jnp.asarray(bm.kv_num_partial, jnp.int32)[..., None]
  flat = i32(b_dim * h_dim * tq * kp).reshape(b_dim, h_dim, tq, kp)
  at = (i32(b_dim)[:, None, None, None], i32(h_dim)[None, :, None, None], i32(tq)[None, None, :, None])
  grid = jnp.zeros((b_dim, h_dim, tq, tk + 1), jnp.int32).at[(*at, jnp.where(valid, pidx, tk))].set(flat)
  q_rows = jnp.asarray(bm.q_partial_idx, jnp.int32)  # [B', Hm, Tk, Qp]
  pos = grid[i32(b_dim)[:, None, None, None], i32(h_dim)[None, :, None, None], q_rows,
             i32(tk)[None, None, :, None]]
  return bits, pos.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------------
# The kernels' static call description and each backend's constraints (shared by pallas, pallas_tpu, pallas_gpu).

TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class FlexStatic:
  """Everything static about one kernel call (rides through custom_vjp as a non-differentiable argument)."""

  q_block: int
  kv_block: int
  q_tiles: int
  kv_tiles: int
  heads: int  # query heads H
  kv_heads: int
  group_per_program: int  # gp: query heads sharing one program (and one K/V tile load)
  table_batch: int  # B'
  table_heads: int  # Hm
  scale: float
  rate: float
  has_key_tiles: bool
  mask_mod: object = dataclasses.field(compare=False, hash=False)
  score_mod: object = dataclasses.field(compare=False, hash=False)
  mods_key: tuple = ()  # identity of mask_mod / score_mod for hashing
  backend: Backend = "tpu"
  interpret: object = False
  has_bitmaps: bool = False  # partial tiles masked by `partial_bitmaps` (mask_mod closes over arrays), not mask_mod

  @property
  def programs(self) -> int:  # program heads: H // gp
    return self.heads // self.group_per_program

  @property
  def keep_threshold(self) -> int:
    return keep_threshold(self.rate)


def heads_per_program(heads: int, kv_heads: int, table_heads: int) -> int:
  """All query heads of a GQA group share one program (K/V loaded once per group) when they share a table row."""
  return heads // kv_heads if table_heads <= kv_heads else 1


# Scalar-prefetched tables per kernel call. Not measured on hardware (no TPU here): a guard so an oversized table set
# is named instead of failing to compile; large sequences want larger tiles or bounded traced lists.
TPU_SMEM_TABLE_BYTES = 1024 * 1024
GPU_SMEM_BYTES = 220 * 1024  # of the 227 KiB a Hopper block may use, some left for barriers and statistics


def gpu_reason(bq: int, bkv: int, d: int, dtype, bitmaps: bool = False) -> str | None:
  reason = mosaic_gpu_dtype_reason(dtype)
  if reason:
    return reason
  for name, value in (("q_block", bq), ("kv_block", bkv)):
    if value % 64 or value > 256:
      return f"{name}={value} must be a multiple of 64 and at most 256 on GPU (wgmma tiles of one warpgroup)"
  if d % 64 or d > 128:
    return f"head_dim={d} must be 64 or 128 on GPU (128-byte swizzled wgmma operands)"
  item = jnp.dtype(dtype).itemsize
  # The dK/dV kernel holds the most: its K and V tiles, Q, Q^T, dO, dO^T double-buffered, P and dS (and, for a mask
  # closing over arrays, the double-buffered bfloat16 bitmap tiles).
  smem = item * (2 * bkv * d + 8 * bq * d + 2 * bkv * bq) + 4 * (bkv + 4 * bq) + (4 * bkv * bq if bitmaps else 0)
  if smem > GPU_SMEM_BYTES:
    return (f"tiles {bq}x{bkv} with head_dim={d} need {smem // 1024} KiB of shared memory in the dK/dV kernel "
            f"(at most {GPU_SMEM_BYTES // 1024}); use block_size=64 on GPU")
  return None


def check_supported(q_shape, k_shape, dtype, bm: BlockMask, backend: Backend, bitmaps: bool = False) -> str | None:
  """Why `backend`'s kernels cannot serve this call, or None. `bitmaps`: the partial tiles come as bitmaps (a mask
  closing over arrays)."""
  if backend == "gpu":
    return gpu_reason(bm.q_block, bm.kv_block, q_shape[-1], dtype, bitmaps)
  bq, bkv, d = bm.q_block, bm.kv_block, q_shape[-1]
  if bq % 8:
    return f"q_block={bq} must be a multiple of 8 on TPU (sublane tiling); use block_size 128 or implementation='xla'"
  for name, value in (("kv_block", bkv), ("head_dim", d)):
    if value > TPU_LANES and value % TPU_LANES:
      return f"{name}={value} must be at most {TPU_LANES} or a multiple of it on TPU (lane tiling)"
  dkv_tables = (bm.q_num_full, bm.q_full_idx, bm.q_num_partial, bm.q_partial_idx) + ((bm.q_partial_idx,) if bitmaps
                                                                                   else ())
  for name, tables in (("forward/dQ", (bm.kv_num_full, bm.kv_full_idx, bm.kv_num_partial, bm.kv_partial_idx)),
                       ("dK/dV", dkv_tables)):
    size = 4 * sum(int(np.prod(np.shape(x))) for x in tables)
    if size > TPU_SMEM_TABLE_BYTES:
      return (f"the {name} tile tables take {size // 1024} KiB of scalar memory (at most "
              f"{TPU_SMEM_TABLE_BYTES // 1024} KiB are prefetched per kernel): use larger tiles or bound the lists "
              f"(kv_width / q_width of the traced builders)")
  gp = heads_per_program(q_shape[2], k_shape[2], bm.heads)
  if gp > 1 and bq & (bq - 1):
    return f"q_block={bq} must be a power of two when {gp} query heads share a program (rows split by a shift)"
  return None


def table_widths(st: FlexStatic, tables) -> tuple[int, int, int, int]:
  """(Kf, Kp, Qf, Qp) of the flattened tables."""
  rows_q = st.table_batch * st.table_heads * st.q_tiles
  rows_k = st.table_batch * st.table_heads * st.kv_tiles
  return (tables[1].size // rows_q, tables[3].size // rows_q, tables[5].size // rows_k, tables[7].size // rows_k)


__all__ = ["BlockMask", "EMPTY", "FULL", "FlexStatic", "bitmap_bytes", "broadcast_batch", "coarsen_q", "dense_classes", "partial_bitmaps", "GPU_SMEM_BYTES", "PARTIAL", "TPU_LANES", "TPU_SMEM_TABLE_BYTES", "block_mask_from_indices", "block_mask_from_layout", "gpu_reason",
           "check_supported", "classify", "create_block_mask", "create_block_mask_traced", "heads_per_program",
           "layout_mask_mod", "mask_broadcast_dims", "table_widths", "tile_sizes"]
