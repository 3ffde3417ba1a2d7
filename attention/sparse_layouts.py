"""The fixed sparse patterns as flex mask functions, and their block layouts derived from them.

Each `*_mask` returns `mask_mod(b, h, q_idx, kv_idx) -> bool` for `kernels.flex.flex_attention`: a token-level mask
that is constant on `block_size x block_size` blocks (plus `kv <= q` when causal), so with the flex tile equal to
`block_size` every tile is empty or full (partial only on a causal diagonal): the kernels do no mask work. All sizes
count blocks, as in the papers' block-sparse implementations: a token window `w` is `w // block_size` blocks. With
`qb = q_idx // block_size`, `kb = kv_idx // block_size` and `d = qb - kb`:

  local              `|d| <= window // 2` (odd window; `window=1`: block-diagonal); causal `0 <= d < window`
  strided (Child)    `|d| < stride or d % stride == 0`; causal also `kv <= q`
  fixed (Child)      `qb // stride == kb // stride or kb % stride >= stride - c`; causal also `kv <= q`
  longformer         the local window on the grid `d % dilation_h == 0` spread `dilation_h` times wider, or
                     `qb < g or kb < g` (`g` global blocks); causal (g = 0) `0 <= d < window * dilation_h`
  bigbird            local window or global blocks, or `random[h, qb, kb]`: per head, `num_random_blocks` key
                     blocks per non-global row drawn on the host from `seed` (numpy), as before

The `*_layout` functions are the same masks at one token per block (`block_size=1`) evaluated on the N x N block
grid: bool `[heads or 1, N, N]`, entry `[h, i, j]` = query block `i` may attend to key block `j` (for
`kernels.block_sparse_attention`, the halo exchange and plots). Patterns wider than the sequence are clipped to it.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attention.ranges import Constraint, Integer

MaskMod = Callable[..., object]


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {name}={value}")


def _bidirectional_windows(causal: bool) -> Integer | None:
  return None if causal else Integer(1, odd=True)


# A centred window is the block and (window - 1) / 2 blocks on each side, so a bidirectional one is odd: declared by
# the layers (`option_constraints`) and checked by the gate when the layer is built, not by the masks at every trace.
BIDIRECTIONAL_WINDOW = Constraint(
    "window", ("causal",), _bidirectional_windows,
    why="a bidirectional window is the block and (window - 1) / 2 blocks on each side; use an odd window, or "
        "causal=True")
# The fixed pattern's `c` summary blocks lie inside each chunk of `stride` blocks (a stride of None is chosen >= c).
SUMMARY_BLOCKS = Constraint(
    "c", ("stride", "pattern"),
    lambda stride, pattern: Integer(1, stride) if pattern == "fixed" and isinstance(stride, int) else None,
    why="the fixed pattern's c summary blocks lie inside each chunk of stride blocks; use c <= stride")


def _check_window(window: int, causal: bool) -> None:
  """For the `*_layout` entry points (plots, tests), which no gate precedes; a layer's window passed the gate."""
  _check_positive(window=window)
  if BIDIRECTIONAL_WINDOW.violated({"window": window, "causal": causal}):
    raise ValueError(f"a bidirectional window must be odd (the block itself and (window - 1) / 2 on each side), "
                     f"got window={window}")


def _div(x, n: int):
  """`x // n` for the non-negative index arrays of a mask_mod, as a truncating `lax.div`: jnp's floor division
  adds a `sign`, whose Mosaic TPU lowering asks for the TPU's generation (so a step exported for TPU from a CPU
  host failed in the kernel)."""
  x = jnp.asarray(x)
  return jax.lax.div(x, jnp.asarray(n, x.dtype))


def _multiple_of(d, n: int):
  """`d % n == 0` for any sign of d (a truncating `lax.rem` is 0 exactly where the floor modulo is)."""
  d = jnp.asarray(d)
  return jax.lax.rem(d, jnp.asarray(n, d.dtype)) == 0


def _blocks(q_idx, kv_idx, block_size: int):
  qb, kb = _div(q_idx, block_size), _div(kv_idx, block_size)
  return qb, kb, qb - kb


def _window(d, window: int, causal: bool, dilation=1):
  """The band of `window` blocks (centred, or the block and `window - 1` before it) on the grid `d % dilation`."""
  on_grid = _multiple_of(d, dilation)
  if causal:
    return on_grid & (d >= 0) & (d < window * dilation)
  return on_grid & (jnp.abs(d) <= (window // 2) * dilation)


def _causal(mask: MaskMod, causal: bool) -> MaskMod:
  if not causal:
    return mask
  return lambda b, h, q_idx, kv_idx: mask(b, h, q_idx, kv_idx) & (kv_idx <= q_idx)


@functools.lru_cache(maxsize=256)
def local_mask(*, block_size: int, window: int = 3, causal: bool = False) -> MaskMod:
  """Local attention: the band of `window` blocks around each block (causal: the block and `window - 1` before).

  Token mask (B = block_size): `|q//B - kv//B| <= window // 2`; causal `0 <= q//B - kv//B < window` and `kv <= q`:
  a sliding window aligned to blocks (`window=1`: block-diagonal, LRA's local attention)."""
  _check_positive(block_size=block_size)
  _check_positive(window=window)  # odd when bidirectional: the gate's (BIDIRECTIONAL_WINDOW)

  def mask(b, h, q_idx, kv_idx):
    return _window(_blocks(q_idx, kv_idx, block_size)[2], window, causal)
  return _causal(mask, causal)


def default_stride(num_blocks: int) -> int:
  """The Sparse Transformer's default stride in blocks: round(sqrt(num_blocks)), at least 1 (the paper's l ~ sqrt(n),
  which makes a row's ~stride + num_blocks / stride blocks, and the whole layout O(N sqrt N) blocks)."""
  _check_positive(num_blocks=num_blocks)
  return max(1, int(round(float(np.sqrt(num_blocks)))))


@functools.lru_cache(maxsize=256)
def strided_mask(*, block_size: int, stride: int, causal: bool = True) -> MaskMod:
  """Sparse Transformer "strided" (Child et al., 2019), heads merged: A1 = the `stride` previous blocks, A2 = every
  `stride`-th block before; bidirectional: the mirrored pattern.

  Token mask (d = q//B - kv//B): `|d| < stride or d % stride == 0` (an `or_masks` of a block-aligned sliding window
  and a block-dilated one); causal also `kv <= q`."""
  _check_positive(block_size=block_size, stride=stride)

  def mask(b, h, q_idx, kv_idx):
    d = _blocks(q_idx, kv_idx, block_size)[2]
    return (jnp.abs(d) < stride) | _multiple_of(d, stride)
  return _causal(mask, causal)


@functools.lru_cache(maxsize=256)
def fixed_mask(*, block_size: int, stride: int, c: int, causal: bool = True) -> MaskMod:
  """Sparse Transformer "fixed", heads merged: A1 = the blocks of the same `stride`-block chunk, A2 = the `c` summary
  blocks at the end of every chunk; bidirectional keeps every summary block.

  Token mask: `q//(B*stride) == kv//(B*stride)` (a document mask whose documents are chunks of `stride` blocks) or
  `(kv//B) % stride >= stride - c` (summary key columns); causal also `kv <= q`."""
  _check_positive(block_size=block_size, stride=stride, c=c)
  # c <= stride: the gate's (SUMMARY_BLOCKS), and fixed_layout's for direct callers

  def mask(b, h, q_idx, kv_idx):
    qb, kb, _ = _blocks(q_idx, kv_idx, block_size)
    return (_div(qb, stride) == _div(kb, stride)) | (kb - stride * _div(kb, stride) >= stride - c)
  return _causal(mask, causal)


def _per_head(values: Sequence[int], h):
  """`values[h]` as arithmetic on `h` (no closed-over array: a pure index function is evaluated inside the
  kernels; a closure over an array would cost partial-tile bitmaps)."""
  out = values[0]
  for i, value in enumerate(values[1:], start=1):
    if value != values[0]:
      out = jnp.where(h == i, value, out)
  return out


@functools.lru_cache(maxsize=256)
def longformer_mask(*, block_size: int, window: int = 3, num_global_blocks: int = 1,
                    dilation: int | tuple[int, ...] = 1, causal: bool = False) -> MaskMod:
  """Longformer (Beltagy et al., 2020): a sliding window of `window` blocks dilated by `dilation` (an int, or one
  value per head), plus `num_global_blocks` global blocks at the start. Causal requires no global blocks.

  Token mask (d = q//B - kv//B, dil = dilation of head h): `d % dil == 0 and |d| <= (window // 2) * dil` (a
  block-aligned `dilated` mask) or `q < g*B or kv < g*B` (`global_window`'s global tokens); causal (g = 0)
  `d % dil == 0 and 0 <= d < window * dil and kv <= q`."""
  dilations = (dilation,) if isinstance(dilation, (int, np.integer)) else tuple(dilation)
  _check_positive(block_size=block_size, **{f"dilation[{i}]": d for i, d in enumerate(dilations)})
  _check_positive(window=window)  # odd when bidirectional: the gate's (BIDIRECTIONAL_WINDOW)
  if num_global_blocks < 0:
    raise ValueError(f"num_global_blocks must be >= 0, got num_global_blocks={num_global_blocks}")
  if causal and num_global_blocks:
    raise ValueError(f"a causal Longformer cannot have global blocks (got num_global_blocks={num_global_blocks}): "
                     "global tokens see every position")
  g = num_global_blocks

  def mask(b, h, q_idx, kv_idx):
    qb, kb, d = _blocks(q_idx, kv_idx, block_size)
    band = _window(d, window, causal, _per_head(dilations, h))
    return band | (qb < g) | (kb < g) if g else band
  return _causal(mask, causal)


def _evaluate(mask: MaskMod, heads: int, num_blocks: int) -> np.ndarray:
  """`[heads, N, N]` bool: the mask at one token per block."""
  idx = np.arange(num_blocks)
  with jax.ensure_compile_time_eval():  # host values even while a step is being traced
    out = mask(0, np.arange(heads)[:, None, None], idx[None, :, None], idx[None, None, :])
  return np.broadcast_to(np.asarray(out, bool), (heads, num_blocks, num_blocks)).copy()


@functools.lru_cache(maxsize=64)
def _bigbird_random(num_blocks: int, window: int, num_global_blocks: int, num_random_blocks: int, num_heads: int,
                    seed: int | tuple[int, ...]) -> np.ndarray:
  """`[num_heads, N, N]` bool: the random blocks, drawn per head and non-global row without replacement from the
  blocks the row does not already see (fewer when not enough are left), from `numpy.random.default_rng(seed)`."""
  base_NxN = _evaluate(longformer_mask(block_size=1, window=window, num_global_blocks=num_global_blocks), 1,
                       num_blocks)[0]
  rng = np.random.default_rng(seed)
  random_HxNxN = np.zeros((num_heads, num_blocks, num_blocks), bool)
  for h in range(num_heads):
    for i in range(min(num_global_blocks, num_blocks), num_blocks):
      candidates = np.flatnonzero(~base_NxN[i])
      chosen = rng.choice(candidates, size=min(num_random_blocks, candidates.size), replace=False)
      random_HxNxN[h, i, chosen] = True
  random_HxNxN.setflags(write=False)
  return random_HxNxN


@functools.lru_cache(maxsize=64)
def bigbird_mask(num_blocks: int, *, block_size: int, window: int = 3, num_global_blocks: int = 2,
                 num_random_blocks: int = 3, num_heads: int = 1, seed: int | tuple[int, ...] = 0) -> MaskMod:
  """BigBird-ITC (Zaheer et al., 2020) over `num_blocks` blocks: a window of `window` blocks, `num_global_blocks`
  global blocks at the start, and per head the random blocks of `_bigbird_random` (from `seed`: the same seed gives
  the same mask). The random blocks are a host table the function looks up. Bidirectional only.

  Token mask: the bidirectional `longformer_mask` (window, globals) or `random[h, q//B, kv//B]`."""
  _check_positive(num_blocks=num_blocks, block_size=block_size, window=window, num_heads=num_heads)
  if num_global_blocks < 0 or num_random_blocks < 0:
    raise ValueError(f"num_global_blocks and num_random_blocks must be >= 0, got {num_global_blocks=}, "
                     f"{num_random_blocks=}")
  base = longformer_mask(block_size=block_size, window=window, num_global_blocks=num_global_blocks)
  if num_random_blocks == 0:
    return base
  random_HxNxN = _bigbird_random(num_blocks, window, num_global_blocks, num_random_blocks, num_heads, seed)

  def mask(b, h, q_idx, kv_idx):
    qb, kb, _ = _blocks(q_idx, kv_idx, block_size)
    return base(b, h, q_idx, kv_idx) | jnp.asarray(random_HxNxN)[h, qb, kb]
  return mask


def layout_of(mask: MaskMod, heads: int, num_blocks: int) -> np.ndarray:
  """The block layout of a mask built with `block_size=1`: `[heads, N, N]`, or `[1, N, N]` when every head agrees."""
  layout = _evaluate(mask, heads, num_blocks)
  return layout[:1] if (layout == layout[:1]).all() else layout


# ---- block layouts: the masks at one token per block ---------------------------------------------------------------


def _tuple(value):
  return value if isinstance(value, (int, np.integer)) else tuple(value)


def local_layout(num_blocks: int, *, window: int = 3, causal: bool = False) -> np.ndarray:
  """`local_mask` as a `[1, N, N]` block layout."""
  _check_positive(num_blocks=num_blocks)
  _check_window(window, causal)
  return _evaluate(local_mask(block_size=1, window=window, causal=causal), 1, num_blocks)


def strided_layout(num_blocks: int, *, stride: int, causal: bool = True) -> np.ndarray:
  """`strided_mask` as a `[1, N, N]` block layout."""
  _check_positive(num_blocks=num_blocks)
  return _evaluate(strided_mask(block_size=1, stride=stride, causal=causal), 1, num_blocks)


def fixed_layout(num_blocks: int, *, stride: int, c: int, causal: bool = True) -> np.ndarray:
  """`fixed_mask` as a `[1, N, N]` block layout."""
  _check_positive(num_blocks=num_blocks)
  if SUMMARY_BLOCKS.violated({"c": c, "stride": stride, "pattern": "fixed"}):
    raise ValueError(f"c (summary blocks per chunk) must be in [1, stride={stride}], got c={c}")
  return _evaluate(fixed_mask(block_size=1, stride=stride, c=c, causal=causal), 1, num_blocks)


def longformer_layout(num_blocks: int, *, window: int = 3, num_global_blocks: int = 1,
                      dilation: int | Sequence[int] = 1, causal: bool = False) -> np.ndarray:
  """`longformer_mask` as a `[len(dilation) or 1, N, N]` block layout."""
  _check_positive(num_blocks=num_blocks)
  _check_window(window, causal)
  dilation = _tuple(dilation)
  heads = 1 if isinstance(dilation, (int, np.integer)) else len(dilation)
  return _evaluate(longformer_mask(block_size=1, window=window, num_global_blocks=num_global_blocks,
                                   dilation=dilation, causal=causal), heads, num_blocks)


def bigbird_layout(num_blocks: int, *, window: int = 3, num_global_blocks: int = 2, num_random_blocks: int = 3,
                   num_heads: int = 1, seed: int | Sequence[int] = 0) -> np.ndarray:
  """`bigbird_mask` as a `[num_heads, N, N]` block layout."""
  _check_window(window, causal=False)
  return _evaluate(bigbird_mask(num_blocks, block_size=1, window=window, num_global_blocks=num_global_blocks,
                                num_random_blocks=num_random_blocks, num_heads=num_heads, seed=_tuple(seed)),
                   num_heads, num_blocks)


__all__ = ["bigbird_layout", "bigbird_mask", "default_stride", "fixed_layout", "fixed_mask", "layout_of",
           "local_layout", "local_mask", "longformer_layout", "longformer_mask", "strided_layout", "strided_mask"]
