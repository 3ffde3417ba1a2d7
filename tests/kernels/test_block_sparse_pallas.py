"""kernels.block_sparse.pallas (the driver over pallas_tpu / pallas_gpu): the Pallas kernels against the dense
reference (values and gradients), run on CPU in interpret mode: the TPU kernels with `interpret=True` (and once under
the TPU interpreter's race detector), the Mosaic GPU kernels under the GPU interpreter. Plus the host-side index tables, tile validation and dispatch.

Shapes are small (interpret mode executes every grid step through callbacks or a while loop on CPU); lowering at
realistic sizes is `test_lowering.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from kernels import block_sparse_attention
from kernels.block_sparse import block_sparse_attention_reference, dropout_seed
from kernels.block_sparse.pallas import block_sparse_attention_pallas
from kernels.block_sparse.tables import BlockSizes, check_supported, kernel_tiles
from kernels.block_sparse.tables import make_tables, tile_bits, tile_layout

# float32: kernel and reference both accumulate in float32 and differ in summation order (online softmax, tile
# order). bfloat16: the probabilities fed to the second matmul are rounded to bfloat16 in the kernel but not in
# the reference, and outputs/gradients are bfloat16 (8 mantissa bits): about 1% of the magnitudes (which are O(1)).
TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
GRAD_TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-4), jnp.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def _qkv(shape, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  return [jax.random.normal(key, shape, dtype) for key in keys]


def _random_layout(heads, n, seed, density=0.5):
  layout = np.random.default_rng(seed).random((heads, n, n)) < density
  layout[0, n // 2] = False  # a query block that sees nothing
  layout[-1, 0, 0] = True  # and one that sees something
  return layout


def _compare(length, block_size, layout, head_dim, causal, masked, dtype, *, backend="tpu", interpret=True,
             block_sizes=None, batch=2, heads=2, dropout=0.0):
  q, k, v, ct = _qkv((batch, length, heads, head_dim), dtype, seed=length + head_dim)
  key_mask = None
  if masked:  # row 0 loses the last block_size + 3 keys (a partial tile and a whole one), row 1 keeps all
    key_mask = jnp.arange(length)[None, :] < jnp.array([[length - block_size - 3]] + [[length]] * (batch - 1))

  seed = dropout_seed(jax.random.key(11)) if dropout else None
  drop = dict(dropout_rate=dropout, dropout_seed=seed)

  def fwd(impl):
    if impl == "reference":
      return lambda q, k, v: block_sparse_attention_reference(q, k, v, layout, block_size=block_size, causal=causal,
                                                              key_mask=key_mask, **drop)
    tiles = kernel_tiles(q.shape, dtype, block_size, block_sizes, backend)  # the entry's plan for the driver
    return lambda q, k, v: block_sparse_attention_pallas(q, k, v, layout, block_size=block_size, causal=causal,
                                                         key_mask=key_mask, tiles=tiles, backend=backend,
                                                         interpret=interpret, **drop)

  def value_and_grads(q, k, v):
    def loss(impl):
      def f(q, k, v):
        out = fwd(impl)(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32)), out
      return f
    return [jax.value_and_grad(loss(impl), argnums=(0, 1, 2), has_aux=True)(q, k, v)
            for impl in ("reference", "kernel")]

  # One compiled program for both backends: run eagerly, the GPU interpreter's driver compiled each small op on its
  # own (about 150 compilations, twice the time); its io_callbacks run inside the jitted program just as well.
  ((_, want), want_grads), ((_, got), got_grads) = jax.jit(value_and_grads)(q, k, v)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[dtype])
  for g, w in zip(got_grads, want_grads):
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **GRAD_TOL[dtype])


TPU_GRID = [  # (length, block_size, block_sizes, head_dim, layout heads, causal, key_mask, dtype, layout, dropout)
    (64, 16, None, 32, 2, True, True, jnp.float32, "random", 0.0),
    (64, 16, BlockSizes(block_q=8, block_kv=16), 64, 1, True, False, jnp.float32, "random", 0.0),  # q tiles per block
    (96, 32, BlockSizes(block_q=32, block_kv=16), 128, 2, False, True, jnp.float32, "random", 0.0),  # kv tiles
    (128, 32, None, 64, 1, True, True, jnp.bfloat16, "random", 0.0),
    (64, 16, None, 128, 2, False, False, jnp.bfloat16, "random", 0.0),
    # Global rows and columns (first and last blocks): a dense group and a sparse group per kernel; dropout on.
    (128, 8, None, 32, 2, False, True, jnp.float32, "global", 0.25),
    (64, 8, None, 32, 1, True, True, jnp.float32, "random", 0.25),
]


def _layout(kind, heads, n, seed):
  if kind == "random":
    return _random_layout(heads, n, seed)
  layout = np.random.default_rng(seed).random((heads, n, n)) < 0.1
  layout |= np.eye(n, dtype=bool)[None]
  for g in (0, 1, n - 1):
    layout[:, g, :] = True
    layout[:, :, g] = True
  return layout


@pytest.mark.parametrize("length,block_size,block_sizes,head_dim,layout_heads,causal,masked,dtype,kind,dropout",
                         TPU_GRID)
def test_tpu_kernels_in_interpret_mode_match_reference(length, block_size, block_sizes, head_dim, layout_heads,
                                                       causal, masked, dtype, kind, dropout):
  layout = _layout(kind, layout_heads, length // block_size, seed=length + head_dim)
  if kind == "global":  # the grid really splits: a global row no longer widens the sparse rows' lists
    tables = make_tables(layout, block_size, 8, 8, causal)
    assert len(tables.kv_groups) == 2 and len(tables.q_groups) == 2
    assert tables.kv_groups[0].width < tables.num_kv_tiles // 2
  _compare(length, block_size, layout, head_dim, causal, masked, dtype, block_sizes=block_sizes, dropout=dropout)


GPU_GRID = [  # Mosaic GPU kernels: bfloat16, tiles and head_dim multiples of 64
    (192, 64, 64, 2, True, True, "random", 0.0),
    (128, 128, 128, 1, False, False, "random", 0.0),  # a 128-token layout block refined to 64-token tiles
    (256, 64, 64, 1, False, True, "global", 0.25),  # dense and sparse groups, dropout regenerated in the backward
    # 64-token tiles over 32-token layout blocks (the registry default of local/longformer/sparse_transformer): the
    # kernels mask blocks inside a tile; 224 tokens are padded to 256 inside. Global rows/columns, causal, dropout.
    (224, 32, 64, 2, True, True, "global", 0.25),
    (192, 16, 64, 1, False, True, "random", 0.0),  # 4 x 4 layout blocks per tile
]


@pytest.mark.parametrize("length,block_size,head_dim,layout_heads,causal,masked,kind,dropout", GPU_GRID)
def test_gpu_kernels_in_gpu_interpret_mode_match_reference(length, block_size, head_dim, layout_heads, causal,
                                                           masked, kind, dropout):
  layout = _layout(kind, layout_heads, length // block_size, seed=length)
  _compare(length, block_size, layout, head_dim, causal, masked, jnp.bfloat16, backend="gpu", batch=1,
           heads=layout_heads, dropout=dropout)


def test_empty_layout_and_fully_masked_rows_give_zero_with_zero_gradients():
  q, k, v, _ = _qkv((2, 32, 2, 32), jnp.float32)
  layout = np.stack([np.zeros((2, 2), bool), np.ones((2, 2), bool)])  # head 0 sees nothing at all
  key_mask = jnp.array([[False] * 32, [True] * 32])  # batch row 0 has no real key at all

  @jax.jit
  def value_and_grads(q, k, v):
    f = lambda q, k, v: block_sparse_attention(q, k, v, layout, block_size=16, causal=True,  # noqa: E731
                                               key_mask=key_mask, implementation="interpret")
    return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)

  out, grads = value_and_grads(q, k, v)
  out, grads = np.asarray(out), [np.asarray(g) for g in grads]
  np.testing.assert_array_equal(out[:, :, 0], 0.0)
  np.testing.assert_array_equal(out[0], 0.0)
  assert np.abs(out[1, :, 1]).sum() > 0
  for g in grads:  # nothing of head 0 or of batch row 0 reaches the output
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[:, :, 0], 0.0)
    np.testing.assert_array_equal(g[0], 0.0)


def test_tpu_kernels_are_race_free_under_the_tpu_interpreter():
  """The TPU interpreter simulates DMAs, the pipeline and two cores sharing the "parallel" grid axes."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # noqa: PLC0415
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  q, k, v, _ = _qkv((1, 32, 1, 32), jnp.float32)
  layout = np.array([[[True, False], [True, True]]])
  key_mask = jnp.arange(32)[None, :] < 29
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
  tiles = kernel_tiles(q.shape, q.dtype, 16, None, "tpu")
  f = lambda q, k, v: block_sparse_attention_pallas(q, k, v, layout, block_size=16, causal=True,  # noqa: E731
                                                     key_mask=key_mask, tiles=tiles, interpret=params)
  # Jitted: the interpreter's callbacks (DMAs, race bookkeeping) run when the program does; eagerly, the driver's
  # small ops compiled one by one (68 compilations).
  got, grads = jax.block_until_ready(jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))(
      q, k, v))
  assert not tpu_interpreter.races.races_found
  want = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(block_sparse_attention_reference(
      *a, layout, block_size=16, causal=True, key_mask=key_mask) ** 2), argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(got, want[0], rtol=1e-5)
  for g, w in zip(grads, want[1]):
    np.testing.assert_allclose(g, w, **GRAD_TOL[jnp.float32])


def test_tiles_spanning_layout_blocks_carry_one_bit_per_block_pair():
  # 4 x 4 layout blocks of 32 tokens under 64-token tiles: 2 x 2 tiles of 2 x 2 blocks; bit a * 2 + b for query block
  # a and key block b of a tile.
  layout = np.array([[[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]], bool)
  np.testing.assert_array_equal(tile_layout(layout, 32, 64, 64, causal=False)[0], [[True, False], [False, True]])
  np.testing.assert_array_equal(tile_bits(layout, 32, 64, 64, causal=False)[0], [[0b1101, 0], [0, 0b1000]])
  t = make_tables(layout, block_size=32, block_q=64, block_kv=64, causal=False)
  assert [g.bits.tolist() for g in t.kv_groups] == [[0b1101, 0b1000]]  # the listed tiles' bits, row by row
  assert [g.bits.tolist() for g in t.q_groups] == [[0b1101, 0b1000]]  # the transposed lists keep (query, key) bits
  # Causal drops the future block pairs inside a diagonal tile: block (0, 1) of a full tile.
  full = np.ones((1, 2, 2), bool)
  assert tile_bits(full, 32, 64, 64, causal=True)[0, 0, 0] == 0b1101
  assert make_tables(layout, block_size=32, block_q=32, block_kv=32, causal=False).kv_groups[0].bits is None


def test_tables_list_allowed_tiles_in_order_and_their_transpose():
  layout = np.array([[[True, False, True, False], [False, False, False, False], [True, True, True, True],
                      [False, False, False, True]]])
  t = make_tables(layout, block_size=4, block_q=4, block_kv=4, causal=False)
  assert (t.num_q_tiles, t.num_kv_tiles) == (4, 4)
  # Query tiles: the full row 2 is its own (dense) group; the others are listed at width 2, not 4.
  (sparse, dense) = t.kv_groups
  np.testing.assert_array_equal(sparse.ids, [0, 1, 3])
  assert sparse.width == 2 and dense.width == 4
  np.testing.assert_array_equal(sparse.count, [2, 0, 1])
  # Padding repeats the last listed tile (no new copy); an empty list points at tile 0.
  np.testing.assert_array_equal(sparse.index.reshape(3, 2), [[0, 2], [0, 0], [3, 3]])
  np.testing.assert_array_equal(dense.ids, [2])
  np.testing.assert_array_equal(dense.index, [0, 1, 2, 3])
  # Key tiles (transposed lists): column 2 is seen by rows 0 and 2, column 3 by rows 2 and 3.
  (only,) = t.q_groups
  np.testing.assert_array_equal(only.ids, [0, 1, 2, 3])
  np.testing.assert_array_equal(only.count, [2, 1, 2, 2])
  np.testing.assert_array_equal(only.index.reshape(4, 2), [[0, 2], [2, 2], [0, 2], [2, 3]])

  causal = make_tables(layout, block_size=4, block_q=4, block_kv=4, causal=True)
  counts = {int(i): int(c) for g in causal.kv_groups for i, c in zip(g.ids, g.count)}
  assert counts == {0: 1, 1: 0, 2: 3, 3: 1}  # tile (0, 2) lies wholly in the future, as do (2, 3)

  # Refinement: 8-token blocks in 4-token query tiles and 8-token kv tiles, causal.
  tiles = tile_layout(np.ones((1, 2, 2), bool), block_size=8, block_q=4, block_kv=8, causal=True)
  np.testing.assert_array_equal(tiles[0], [[True, False], [True, False], [True, True], [True, True]])


def test_block_sizes_and_backend_constraints_are_validated():
  shape = (1, 128, 2, 64)
  with pytest.raises(ValueError, match="block_q=12 must divide the layout block_size=16"):
    check_supported(shape, jnp.float32, 16, BlockSizes(block_q=12), "tpu")
  with pytest.raises(ValueError, match="block_kv must be a positive integer, got block_kv=0"):
    check_supported(shape, jnp.float32, 16, BlockSizes(block_kv=0), "tpu")
  with pytest.raises(ValueError, match="block_q=4 must be a multiple of 8 on TPU"):
    check_supported(shape, jnp.float32, 16, BlockSizes(block_q=4), "tpu")
  assert check_supported(shape, jnp.float32, 192, None, "tpu") == (64, 64)  # largest divisor up to 128
  assert check_supported(shape, jnp.bfloat16, 128, None, "gpu") == (64, 64)
  with pytest.raises(ValueError, match="block_q=32 must be a multiple of 64 .* on GPU"):
    check_supported(shape, jnp.bfloat16, 32, BlockSizes(block_q=32, block_kv=32), "gpu")
  assert check_supported(shape, jnp.bfloat16, 32, None, "gpu") == (64, 64)  # a tile spans 2 x 2 layout blocks
  with pytest.raises(ValueError, match="spans 8x8 layout blocks of block_size=8; the GPU kernels mask at most 31"):
    check_supported(shape, jnp.bfloat16, 8, None, "gpu")
  with pytest.raises(ValueError, match="need a power-of-two block_size, got block_size=48"):
    check_supported(shape, jnp.bfloat16, 48, BlockSizes(block_q=192, block_kv=192), "gpu")
  with pytest.raises(ValueError, match="block_q=64 must divide the layout block_size=32$"):
    check_supported(shape, jnp.float32, 32, BlockSizes(block_q=64), "tpu")
  with pytest.raises(ValueError, match="head_dim=32 must be 64 or 128 on GPU"):
    check_supported((1, 128, 2, 32), jnp.bfloat16, 64, None, "gpu")
  with pytest.raises(ValueError, match="dtype=float32: the Mosaic GPU kernels take only bfloat16/float16"):
    check_supported(shape, jnp.float32, 64, None, "gpu")


def _uses_pallas(fn, *args) -> bool:
  """Whether tracing `fn` reaches a Pallas kernel: `pallas_call` (TPU kernels) or `mpmd_map` (Mosaic GPU kernels)."""
  # A fresh function each time: make_jaxpr caches traces per function, and the dispatch happens while tracing.
  jaxpr = str(jax.make_jaxpr(lambda *a: fn(*a))(*args))
  return "pallas_call" in jaxpr or "mpmd_map" in jaxpr


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_layer_implementation_option_reaches_the_kernel(implementation):
  x = jnp.ones((1, 40, 32))
  layer = attention.build("local", num_heads=2, block_size=16, window=3, implementation=implementation)
  params = jax.eval_shape(layer.init, jax.random.key(1), x)
  assert _uses_pallas(layer.apply, params, x) == (implementation == "interpret")


def test_one_plan_per_call(monkeypatch):
  """The entry plans each call once per backend (`tables.kernel_tiles`, `check_supported` inside); the driver follows
  the plan's tiles and checks nothing again, forward or backward."""
  from kernels.block_sparse import block_sparse_attention, tables  # noqa: PLC0415
  checked = []
  real = tables.check_supported
  monkeypatch.setattr(tables, "check_supported", lambda *a: checked.append(a[-1]) or real(*a))
  spec = jax.ShapeDtypeStruct((1, 16, 1, 8), jnp.float32)  # float32: the GPU plan is a reason, TPU's the tiles
  layout = np.tril(np.ones((1, 2, 2), bool))
  loss = lambda q, k, v: jnp.sum(block_sparse_attention(q, k, v, layout, block_size=8,  # noqa: E731
                                                        causal=True).astype(jnp.float32))
  jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(spec, spec, spec)
  assert sorted(checked) == ["gpu", "tpu"]
