"""Block layouts of the fixed-pattern sparse attentions: pure numpy functions of static sizes.

Each builder returns a bool array `[heads or 1, N, N]` for `kernels.block_sparse_attention`: entry `[h, i, j]` says
whether query block `i` may attend to key block `j` in head `h`. All sizes are counted in blocks (a block is
`block_size` tokens, chosen by the layer): a paper's token-level window `w` or stride `l` corresponds to
`w // block_size` or `l // block_size` blocks here, and its patterns are applied at block granularity. Patterns wider
than the sequence are clipped to it. Causal layouts keep only blocks `j <= i`; the kernel masks the future inside the
diagonal block.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {name}={value}")


def _offsets(num_blocks: int) -> np.ndarray:
  """`[N, N]` signed block distance `i - j` (query minus key)."""
  rows = np.arange(num_blocks)
  return rows[:, None] - rows[None, :]


def _window(num_blocks: int, window: int, causal: bool, dilation: int = 1) -> np.ndarray:
  """`[N, N]` sliding window of `window` blocks: centred (odd window) or the block and `window - 1` before it."""
  distance = _offsets(num_blocks)
  on_grid = distance % dilation == 0
  if causal:
    return on_grid & (distance >= 0) & (distance < window * dilation)
  if window % 2 == 0:
    raise ValueError(f"a bidirectional window must be odd (the block itself and (window - 1) / 2 on each side), "
                     f"got window={window}")
  return on_grid & (np.abs(distance) <= (window // 2) * dilation)


def local_layout(num_blocks: int, *, window: int = 3, causal: bool = False) -> np.ndarray:
  """Local (banded) attention: each block sees `window` blocks around it (`window=1`: block-diagonal, LRA's local
  attention); causal: itself and the `window - 1` blocks before it. `[1, N, N]`."""
  _check_positive(num_blocks=num_blocks, window=window)
  return _window(num_blocks, window, causal)[None]


def default_stride(num_blocks: int) -> int:
  """The Sparse Transformer's default stride in blocks: round(sqrt(num_blocks)), at least 1 (the paper's l ~ sqrt(n),
  which makes a row's ~stride + num_blocks / stride blocks, and the whole layout O(N sqrt N) blocks)."""
  _check_positive(num_blocks=num_blocks)
  return max(1, int(round(float(np.sqrt(num_blocks)))))


def strided_layout(num_blocks: int, *, stride: int, causal: bool = True) -> np.ndarray:
  """Sparse Transformer "strided" (Child et al., 2019), heads merged: A1 = the `stride` previous blocks
  (`i - stride < j <= i`), A2 = every `stride`-th block before (`(i - j) % stride == 0`). Bidirectional: the
  mirrored pattern (`|i - j| < stride` or `(i - j) % stride == 0`). `[1, N, N]`."""
  _check_positive(num_blocks=num_blocks, stride=stride)
  distance = _offsets(num_blocks)
  allowed = (np.abs(distance) < stride) | (distance % stride == 0)
  return (allowed & (distance >= 0) if causal else allowed)[None]


def fixed_layout(num_blocks: int, *, stride: int, c: int, causal: bool = True) -> np.ndarray:
  """Sparse Transformer "fixed", heads merged: A1 = the blocks of the same `stride`-block chunk
  (`floor(j / stride) == floor(i / stride)`), A2 = the `c` summary blocks at the end of every chunk
  (`j % stride >= stride - c`). Causal keeps `j <= i`; bidirectional keeps all summary blocks. `[1, N, N]`."""
  _check_positive(num_blocks=num_blocks, stride=stride, c=c)
  if c > stride:
    raise ValueError(f"c (summary blocks per chunk) must be in [1, stride={stride}], got c={c}")
  blocks = np.arange(num_blocks)
  same_chunk = (blocks[:, None] // stride) == (blocks[None, :] // stride)
  summary = np.broadcast_to((blocks % stride >= stride - c)[None, :], same_chunk.shape)
  allowed = same_chunk | summary
  return (allowed & (_offsets(num_blocks) >= 0) if causal else allowed)[None]


def _add_global(layout_HxNxN: np.ndarray, num_global_blocks: int) -> np.ndarray:
  """Global blocks (the first `num_global_blocks`) see every block and are seen by every block."""
  g = min(num_global_blocks, layout_HxNxN.shape[-1])
  layout_HxNxN = layout_HxNxN.copy()
  layout_HxNxN[:, :g, :] = True
  layout_HxNxN[:, :, :g] = True
  return layout_HxNxN


def longformer_layout(num_blocks: int, *, window: int = 3, num_global_blocks: int = 1,
                      dilation: int | Sequence[int] = 1, causal: bool = False) -> np.ndarray:
  """Longformer (Beltagy et al., 2020): a sliding window of `window` blocks, dilated by `dilation` (an int for all
  heads, or one value per head: the paper dilates a few heads of the upper layers), plus `num_global_blocks` global
  blocks at the start. Causal (the paper's autoregressive models) requires `num_global_blocks=0`.
  `[len(dilation) or 1, N, N]`."""
  dilations = [dilation] if isinstance(dilation, (int, np.integer)) else list(dilation)
  _check_positive(num_blocks=num_blocks, window=window, **{f"dilation[{i}]": d for i, d in enumerate(dilations)})
  if num_global_blocks < 0:
    raise ValueError(f"num_global_blocks must be >= 0, got num_global_blocks={num_global_blocks}")
  if causal and num_global_blocks:
    raise ValueError(f"a causal Longformer cannot have global blocks (got num_global_blocks={num_global_blocks}): "
                     "global tokens see every position")
  layout = np.stack([_window(num_blocks, window, causal, d) for d in dilations])
  return _add_global(layout, num_global_blocks)


def bigbird_layout(num_blocks: int, *, window: int = 3, num_global_blocks: int = 2, num_random_blocks: int = 3,
                   num_heads: int = 1, seed: int | Sequence[int] = 0) -> np.ndarray:
  """BigBird-ITC (Zaheer et al., 2020): a sliding window of `window` blocks, `num_global_blocks` global blocks at the
  start, and per head `num_random_blocks` random key blocks for every other row, drawn without replacement from the
  blocks the row does not already see (fewer when not enough are left). The random blocks come from
  `numpy.random.default_rng(seed)`: the same seed gives the same layout. Bidirectional only. `[num_heads, N, N]`."""
  _check_positive(num_blocks=num_blocks, window=window, num_heads=num_heads)
  if num_global_blocks < 0 or num_random_blocks < 0:
    raise ValueError(f"num_global_blocks and num_random_blocks must be >= 0, got {num_global_blocks=}, "
                     f"{num_random_blocks=}")
  base_NxN = _add_global(_window(num_blocks, window, causal=False)[None], num_global_blocks)[0]
  rng = np.random.default_rng(seed)
  layout = np.repeat(base_NxN[None], num_heads, axis=0)
  g = min(num_global_blocks, num_blocks)
  for h in range(num_heads):
    for i in range(g, num_blocks):
      candidates = np.flatnonzero(~base_NxN[i])
      chosen = rng.choice(candidates, size=min(num_random_blocks, candidates.size), replace=False)
      layout[h, i, chosen] = True
  return layout


__all__ = ["bigbird_layout", "default_stride", "fixed_layout", "local_layout", "longformer_layout", "strided_layout"]
