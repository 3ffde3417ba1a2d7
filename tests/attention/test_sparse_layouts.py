"""Block layouts: allowed blocks per row as the papers count them, global rows/columns, BigBird's seeded randomness."""

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
