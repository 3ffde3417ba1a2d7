"""Block layouts: allowed blocks per row as the papers count them, global rows/columns, BigBird's seeded randomness."""

from typing import Sequence

import numpy as np
import pytest

from attention import sparse_layouts as sl


def _counts(layout_NxN):
  return layout_NxN.sum(axis=-1)


def test_local_band_counts():
  n, w = 10, 3
  layout = sl.local_layout(n, window=w)
  assert layout.shape == (1, n, n) and layout.dtype == bool
  np.testing.assert_array_equal(_counts(layout[0]), [2] + [3] * (n - 2) + [2])  # clipped at the edges
  np.testing.assert_array_equal(layout[0], layout[0].T)
  np.testing.assert_array_equal(sl.local_layout(n, window=1)[0], np.eye(n, dtype=bool))  # LRA's block-local
  causal = sl.local_layout(n, window=w, causal=True)[0]
  np.testing.assert_array_equal(_counts(causal), np.minimum(np.arange(n) + 1, w))
  assert not np.triu(causal, 1).any()


def test_strided_counts_follow_the_paper():
  # Child et al.: A1 = the previous l positions, A2 = every l-th position before: min(i + 1, l) + floor(i / l).
  n, s = 17, 4
  layout = sl.strided_layout(n, stride=s, causal=True)[0]
  i = np.arange(n)
  np.testing.assert_array_equal(_counts(layout), np.minimum(i + 1, s) + i // s)
  assert not np.triu(layout, 1).any()
  for row in range(n):
    np.testing.assert_array_equal(np.flatnonzero(layout[row]),
                                  sorted(set(range(max(0, row - s + 1), row + 1)) | set(range(row % s, row + 1, s))))
  bidirectional = sl.strided_layout(n, stride=s, causal=False)[0]
  np.testing.assert_array_equal(bidirectional, bidirectional.T)
  np.testing.assert_array_equal(np.tril(bidirectional), layout)


def test_fixed_counts_follow_the_paper():
  # A1 = own chunk of l (up to i when causal), A2 = the last c positions of every chunk.
  n, s, c = 12, 4, 1
  layout = sl.fixed_layout(n, stride=s, c=c, causal=True)[0]
  i = np.arange(n)
  np.testing.assert_array_equal(_counts(layout), i % s + 1 + (i // s) * c)
  bidirectional = sl.fixed_layout(n, stride=s, c=2, causal=False)[0]
  np.testing.assert_array_equal(_counts(bidirectional), np.full(n, s + (n // s - 1) * 2))
  summary = np.flatnonzero(np.arange(n) % s >= s - 2)
  assert bidirectional[:, summary].all()  # every row sees every summary block


def test_longformer_window_and_global():
  n, w, g = 12, 3, 2
  layout = sl.longformer_layout(n, window=w, num_global_blocks=g)
  assert layout.shape == (1, n, n)
  assert layout[0, :g].all() and layout[0, :, :g].all()  # global rows and columns are full
  interior = np.arange(g + 1, n - 1)
  np.testing.assert_array_equal(_counts(layout[0])[interior], w + g)


def test_longformer_dilation_per_head():
  n = 16
  layout = sl.longformer_layout(n, window=3, num_global_blocks=0, dilation=[1, 2, 3])
  assert layout.shape == (3, n, n)
  for h, d in enumerate([1, 2, 3]):
    np.testing.assert_array_equal(np.flatnonzero(layout[h, 8]), [8 - d, 8, 8 + d])
  causal = sl.longformer_layout(n, window=3, num_global_blocks=0, dilation=2, causal=True)[0]
  np.testing.assert_array_equal(np.flatnonzero(causal[8]), [4, 6, 8])


def test_bigbird_counts_global_and_random():
  n, w, g, r, heads = 16, 3, 2, 3, 4
  layout = sl.bigbird_layout(n, window=w, num_global_blocks=g, num_random_blocks=r, num_heads=heads, seed=0)
  assert layout.shape == (heads, n, n)
  assert layout[:, :g].all() and layout[:, :, :g].all()
  # Rows away from the globals and the edges: window + global + random blocks, as in BigBird-ITC.
  interior = np.arange(g + 1, n - 1)
  np.testing.assert_array_equal(_counts(layout)[:, interior], w + g + r)
  window = sl.local_layout(n, window=w)[0]
  assert np.all(layout[:, window])  # the window is always there
  assert not np.array_equal(layout[0], layout[1]), "heads draw their own random blocks"


def test_bigbird_random_blocks_reproducible_from_the_seed():
  make = lambda seed: sl.bigbird_layout(32, num_random_blocks=2, num_heads=2, seed=seed)  # noqa: E731
  np.testing.assert_array_equal(make(7), make(7))
  np.testing.assert_array_equal(make((7, 123)), make((7, 123)))
  assert not np.array_equal(make(7), make(8))


def test_patterns_clip_to_short_sequences():
  assert sl.bigbird_layout(2, num_global_blocks=3, num_random_blocks=5).all()
  assert sl.local_layout(1, window=9).all()
  assert sl.fixed_layout(3, stride=4, c=1).shape == (1, 3, 3)


def test_errors_name_the_values():
  with pytest.raises(ValueError, match="window must be odd.*window=2"):
    sl.local_layout(8, window=2)
  with pytest.raises(ValueError, match="window must be >= 1, got window=0"):
    sl.local_layout(8, window=0, causal=True)
  with pytest.raises(ValueError, match=r"c \(summary blocks per chunk\) must be in \[1, stride=2\], got c=3"):
    sl.fixed_layout(8, stride=2, c=3)
  with pytest.raises(ValueError, match="stride must be >= 1"):
    sl.strided_layout(8, stride=0)
  with pytest.raises(ValueError, match="causal Longformer cannot have global blocks"):
    sl.longformer_layout(8, num_global_blocks=1, causal=True)
  with pytest.raises(ValueError, match=r"dilation\[1\] must be >= 1"):
    sl.longformer_layout(8, dilation=[1, 0])
  with pytest.raises(ValueError, match="num_random_blocks=-1"):
    sl.bigbird_layout(8, num_random_blocks=-1)


def test_default_stride_is_about_the_square_root_of_the_blocks():
  assert [sl.default_stride(n) for n in (1, 2, 16, 64, 100, 256)] == [1, 1, 4, 8, 10, 16]
  # n*sqrt(n): the widest row of the strided layout at the default stride grows like sqrt(N), not like N.
  widths = [sl.strided_layout(n, stride=sl.default_stride(n), causal=False)[0].sum(-1).max() for n in (64, 256)]
  assert widths[1] <= 2.2 * widths[0], widths


# ---- the oracle: the layouts as they were written before they were derived from the mask functions (issue 33) --------
# Kept verbatim (renamed old_*) so the masks are held to today's patterns, block for block, at every size below.

def old_check_positive(**values: int) -> None:
  for name, value in values.items():
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {name}={value}")


def old_offsets(num_blocks: int) -> np.ndarray:
  """`[N, N]` signed block distance `i - j` (query minus key)."""
  rows = np.arange(num_blocks)
  return rows[:, None] - rows[None, :]


def old_window(num_blocks: int, window: int, causal: bool, dilation: int = 1) -> np.ndarray:
  """`[N, N]` sliding window of `window` blocks: centred (odd window) or the block and `window - 1` before it."""
  distance = old_offsets(num_blocks)
  on_grid = distance % dilation == 0
  if causal:
    return on_grid & (distance >= 0) & (distance < window * dilation)
  if window % 2 == 0:
    raise ValueError(f"a bidirectional window must be odd (the block itself and (window - 1) / 2 on each side), "
                     f"got window={window}")
  return on_grid & (np.abs(distance) <= (window // 2) * dilation)


def old_local_layout(num_blocks: int, *, window: int = 3, causal: bool = False) -> np.ndarray:
  """Local (banded) attention: each block sees `window` blocks around it (`window=1`: block-diagonal, LRA's local
  attention); causal: itself and the `window - 1` blocks before it. `[1, N, N]`."""
  old_check_positive(num_blocks=num_blocks, window=window)
  return old_window(num_blocks, window, causal)[None]


def old_default_stride(num_blocks: int) -> int:
  """The Sparse Transformer's default stride in blocks: round(sqrt(num_blocks)), at least 1 (the paper's l ~ sqrt(n),
  which makes a row's ~stride + num_blocks / stride blocks, and the whole layout O(N sqrt N) blocks)."""
  old_check_positive(num_blocks=num_blocks)
  return max(1, int(round(float(np.sqrt(num_blocks)))))


def old_strided_layout(num_blocks: int, *, stride: int, causal: bool = True) -> np.ndarray:
  """Sparse Transformer "strided" (Child et al., 2019), heads merged: A1 = the `stride` previous blocks
  (`i - stride < j <= i`), A2 = every `stride`-th block before (`(i - j) % stride == 0`). Bidirectional: the
  mirrored pattern (`|i - j| < stride` or `(i - j) % stride == 0`). `[1, N, N]`."""
  old_check_positive(num_blocks=num_blocks, stride=stride)
  distance = old_offsets(num_blocks)
  allowed = (np.abs(distance) < stride) | (distance % stride == 0)
  return (allowed & (distance >= 0) if causal else allowed)[None]


def old_fixed_layout(num_blocks: int, *, stride: int, c: int, causal: bool = True) -> np.ndarray:
  """Sparse Transformer "fixed", heads merged: A1 = the blocks of the same `stride`-block chunk
  (`floor(j / stride) == floor(i / stride)`), A2 = the `c` summary blocks at the end of every chunk
  (`j % stride >= stride - c`). Causal keeps `j <= i`; bidirectional keeps all summary blocks. `[1, N, N]`."""
  old_check_positive(num_blocks=num_blocks, stride=stride, c=c)
  if c > stride:
    raise ValueError(f"c (summary blocks per chunk) must be in [1, stride={stride}], got c={c}")
  blocks = np.arange(num_blocks)
  same_chunk = (blocks[:, None] // stride) == (blocks[None, :] // stride)
  summary = np.broadcast_to((blocks % stride >= stride - c)[None, :], same_chunk.shape)
  allowed = same_chunk | summary
  return (allowed & (old_offsets(num_blocks) >= 0) if causal else allowed)[None]


def old_add_global(layout_HxNxN: np.ndarray, num_global_blocks: int) -> np.ndarray:
  """Global blocks (the first `num_global_blocks`) see every block and are seen by every block."""
  g = min(num_global_blocks, layout_HxNxN.shape[-1])
  layout_HxNxN = layout_HxNxN.copy()
  layout_HxNxN[:, :g, :] = True
  layout_HxNxN[:, :, :g] = True
  return layout_HxNxN


def old_longformer_layout(num_blocks: int, *, window: int = 3, num_global_blocks: int = 1,
                      dilation: int | Sequence[int] = 1, causal: bool = False) -> np.ndarray:
  """Longformer (Beltagy et al., 2020): a sliding window of `window` blocks, dilated by `dilation` (an int for all
  heads, or one value per head: the paper dilates a few heads of the upper layers), plus `num_global_blocks` global
  blocks at the start. Causal (the paper's autoregressive models) requires `num_global_blocks=0`.
  `[len(dilation) or 1, N, N]`."""
  dilations = [dilation] if isinstance(dilation, (int, np.integer)) else list(dilation)
  old_check_positive(num_blocks=num_blocks, window=window, **{f"dilation[{i}]": d for i, d in enumerate(dilations)})
  if num_global_blocks < 0:
    raise ValueError(f"num_global_blocks must be >= 0, got num_global_blocks={num_global_blocks}")
  if causal and num_global_blocks:
    raise ValueError(f"a causal Longformer cannot have global blocks (got num_global_blocks={num_global_blocks}): "
                     "global tokens see every position")
  layout = np.stack([old_window(num_blocks, window, causal, d) for d in dilations])
  return old_add_global(layout, num_global_blocks)


def old_bigbird_layout(num_blocks: int, *, window: int = 3, num_global_blocks: int = 2, num_random_blocks: int = 3,
                   num_heads: int = 1, seed: int | Sequence[int] = 0) -> np.ndarray:
  """BigBird-ITC (Zaheer et al., 2020): a sliding window of `window` blocks, `num_global_blocks` global blocks at the
  start, and per head `num_random_blocks` random key blocks for every other row, drawn without replacement from the
  blocks the row does not already see (fewer when not enough are left). The random blocks come from
  `numpy.random.default_rng(seed)`: the same seed gives the same layout. Bidirectional only. `[num_heads, N, N]`."""
  old_check_positive(num_blocks=num_blocks, window=window, num_heads=num_heads)
  if num_global_blocks < 0 or num_random_blocks < 0:
    raise ValueError(f"num_global_blocks and num_random_blocks must be >= 0, got {num_global_blocks=}, "
                     f"{num_random_blocks=}")
  base_NxN = old_add_global(old_window(num_blocks, window, causal=False)[None], num_global_blocks)[0]
  rng = np.random.default_rng(seed)
  layout = np.repeat(base_NxN[None], num_heads, axis=0)
  g = min(num_global_blocks, num_blocks)
  for h in range(num_heads):
    for i in range(g, num_blocks):
      candidates = np.flatnonzero(~base_NxN[i])
      chosen = rng.choice(candidates, size=min(num_random_blocks, candidates.size), replace=False)
      layout[h, i, chosen] = True
  return layout




ORACLE_CASES = [
    ("local", lambda n: sl.local_layout(n, window=3), lambda n: old_local_layout(n, window=3)),
    ("local-1", lambda n: sl.local_layout(n, window=1), lambda n: old_local_layout(n, window=1)),
    ("local-causal", lambda n: sl.local_layout(n, window=4, causal=True),
     lambda n: old_local_layout(n, window=4, causal=True)),
    ("strided", lambda n: sl.strided_layout(n, stride=3, causal=False),
     lambda n: old_strided_layout(n, stride=3, causal=False)),
    ("strided-causal", lambda n: sl.strided_layout(n, stride=sl.default_stride(n)),
     lambda n: old_strided_layout(n, stride=old_default_stride(n))),
    ("fixed", lambda n: sl.fixed_layout(n, stride=4, c=2, causal=False),
     lambda n: old_fixed_layout(n, stride=4, c=2, causal=False)),
    ("fixed-causal", lambda n: sl.fixed_layout(n, stride=3, c=1), lambda n: old_fixed_layout(n, stride=3, c=1)),
    ("longformer", lambda n: sl.longformer_layout(n, window=3, num_global_blocks=2, dilation=[1, 1, 2, 3]),
     lambda n: old_longformer_layout(n, window=3, num_global_blocks=2, dilation=[1, 1, 2, 3])),
    ("longformer-causal", lambda n: sl.longformer_layout(n, window=2, num_global_blocks=0, dilation=2, causal=True),
     lambda n: old_longformer_layout(n, window=2, num_global_blocks=0, dilation=2, causal=True)),
    ("bigbird", lambda n: sl.bigbird_layout(n, window=3, num_global_blocks=1, num_random_blocks=2, num_heads=3,
                                            seed=(7, 123)),
     lambda n: old_bigbird_layout(n, window=3, num_global_blocks=1, num_random_blocks=2, num_heads=3, seed=(7, 123))),
]


@pytest.mark.parametrize("name,new,old", ORACLE_CASES, ids=[c[0] for c in ORACLE_CASES])
def test_layouts_derived_from_the_masks_equal_the_old_layouts(name, new, old):
  for n in (1, 2, 5, 8, 13, 32):
    np.testing.assert_array_equal(new(n), old(n), err_msg=f"{name} at {n} blocks")
