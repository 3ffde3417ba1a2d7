"""kernels.block_sparse_attention's kernel path: the layout as a flex block mask (`tables.kernel_plan`,
`kernels.flex.tables.block_mask_from_layout`) run by flex's Pallas kernels (one kernel family), against the dense
reference (values and gradients), on CPU in interpret mode: the TPU kernels with `interpret=True` (and once under the
TPU interpreter's race detector), the Mosaic GPU kernels under the GPU interpreter (64-token tiles over 32-token
layout blocks: partial tiles masked by bitmaps). Plus the layout's tile classification, tile validation and dispatch.

Shapes are small (interpret mode executes every grid step through callbacks or a while loop on CPU); lowering at
realistic sizes is `test_block_sparse_lowering.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from kernels import block_sparse_attention
from kernels.block_sparse import block_sparse_attention_kernels, block_sparse_attention_reference, dropout_seed
from kernels.block_sparse.tables import BlockSizes, kernel_plan
from kernels.flex.tables import FULL, PARTIAL, EMPTY, block_mask_from_layout, create_block_mask, layout_mask_mod

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

  plan = kernel_plan(q.shape, dtype, layout, block_size, block_sizes, causal, backend)  # the entry's plan
  assert not isinstance(plan, str), plan
  classes = np.asarray(plan.block_mask.to_dense())
  assert {FULL, PARTIAL, EMPTY} <= set(np.unique(classes).tolist()), "every kind of tile"
  assert (classes[:, 0] == EMPTY).all(-1).any(), "a query tile row with no key tile"

  def fwd(impl):
    if impl == "reference":
      return lambda q, k, v: block_sparse_attention_reference(q, k, v, layout, block_size=block_size, causal=causal,
                                                              key_mask=key_mask, **drop)
    return lambda q, k, v: block_sparse_attention_kernels(q, k, v, plan, key_mask=key_mask, backend=backend,
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


# One case per kernel feature the layout path adds to flex's kernels (whose own features, GQA, score_mod, traced
# masks, are `test_flex_pallas.py` / `test_flex_bitmaps.py`); the smallest grids with >= 2 tiles per axis and full,
# partial and empty tiles. The old block-sparse kernels' dense/sparse groups (the "global" layouts) are gone: a global
# layout is one more block mask, and the XLA form's global rows are `test_block_sparse_xla.py`.
TPU_GRID = [  # (length, block_size, block_sizes, head_dim, layout heads, causal, key_mask, dtype, dropout)
    # Tiles inside the layout blocks: 4 x 4, a per-head layout with an empty query block, causal diagonal tiles
    # partial by the index mask, padded keys (a partial and a whole tile), dropout regenerated in the backward.
    (64, 16, None, 32, 2, True, True, jnp.float32, 0.25),
    # Query tiles refining the blocks (8 < 16) and key tiles spanning two blocks (32 > 16): partial tiles read the
    # layout's bitmaps; 48 keys padded to 64 (an overhanging key tile); bfloat16.
    (48, 16, BlockSizes(block_q=8, block_kv=32), 32, 1, False, True, jnp.bfloat16, 0.0),
]


def _layout(heads, n, seed, empty_rows=None):
  """A random layout: head 0's middle query block sees nothing, the last head's last block sees every block and its
  first only itself; `empty_rows`: head 0's query blocks that see nothing instead of the middle one."""
  layout = _random_layout(heads, n, seed)
  layout[-1, -1] = True  # a query block that sees every key block: full tiles, also where tiles span blocks
  layout[-1, 0] = np.arange(n) == 0  # and one that sees only itself: partial tiles where tiles span blocks
  if empty_rows is not None:
    layout[0, n // 2] = np.random.default_rng(seed + 1).random(n) < 0.5  # the default empty row: refilled
    layout[0, list(empty_rows)] = False
  return layout


@pytest.mark.parametrize("length,block_size,block_sizes,head_dim,layout_heads,causal,masked,dtype,dropout",
                         TPU_GRID)
def test_tpu_kernels_in_interpret_mode_match_reference(length, block_size, block_sizes, head_dim, layout_heads,
                                                       causal, masked, dtype, dropout):
  layout = _layout(layout_heads, length // block_size, seed=length + head_dim)
  _compare(length, block_size, layout, head_dim, causal, masked, dtype, block_sizes=block_sizes, dropout=dropout)


def test_gpu_kernels_in_gpu_interpret_mode_match_reference():
  """Mosaic GPU kernels (bfloat16, 64-token tiles, head_dim 128; flex's GPU tests take 64): 64-token tiles over
  32-token layout blocks (the registry default of local/longformer/sparse_transformer), so partial tiles' bitmaps mask
  blocks inside a tile; 96 tokens padded to 128 inside (2 x 2 tiles: the interpreter's time is per tile, 3 x 3 took
  twice as long; the padded query rows are in no tile's verdict, so head 1's lower-left tile is full); two heads with
  their own layouts, head 0's second tile row empty (its one real block sees nothing); causal, padded keys, dropout
  regenerated in the backward."""
  layout = _layout(2, 3, seed=96, empty_rows=(2,))
  _compare(96, 32, layout, 128, True, True, jnp.bfloat16, backend="gpu", batch=1, heads=2, dropout=0.25)


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
  plan = kernel_plan(q.shape, q.dtype, layout, 16, None, True, "tpu")
  f = lambda q, k, v: block_sparse_attention_kernels(q, k, v, plan, key_mask=key_mask,  # noqa: E731
                                                      interpret=params)
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


def test_a_layout_is_a_block_mask_classified_at_block_granularity():
  """Tiles inside a layout block are full or empty, partial only on the causal diagonal (the pure causal index mask,
  evaluated in the kernels); tiles spanning several blocks are partial where their blocks differ (a mask closing over
  the layout: bitmaps). Counts by hand, and equal to `create_block_mask` of the token-level mask."""
  layout = np.array([[[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]]], bool)  # 4 blocks of 32 tokens
  inside = block_mask_from_layout(layout, 32, 16, causal=True)  # 16-token tiles: 2 x 2 per block
  classes = np.asarray(inside.to_dense())[0, 0]
  # Allowed blocks (0,0), (1,0), (1,1), (3,2), (3,3): 5 x 4 tiles; in the 3 allowed diagonal blocks the tile above
  # the diagonal is empty under causality and the 2 on it partial.
  assert (classes == FULL).sum() == 5 * 4 - 3 * 3 and (classes == PARTIAL).sum() == 3 * 2
  assert (classes == EMPTY).sum() == 64 - 5 * 4 + 3
  assert inside.mask_mod(0, 0, 5, 4) and not inside.mask_mod(0, 0, 4, 5)  # the index mask: causal
  spanning = block_mask_from_layout(layout, 32, 64, causal=False)  # 64-token tiles: 2 x 2 blocks each
  np.testing.assert_array_equal(np.asarray(spanning.to_dense())[0, 0], [[PARTIAL, EMPTY], [EMPTY, PARTIAL]])
  for bm, causal, tiles in ((inside, True, 16), (spanning, False, 64)):
    want = create_block_mask(layout_mask_mod(layout, 32, causal), 1, 1, 128, 128, tiles)
    np.testing.assert_array_equal(np.asarray(bm.to_dense()), np.asarray(want.to_dense()))
  assert block_mask_from_layout(np.ones((2, 2, 2), bool), 32, 64).mask_mod is None  # every tile full: no mask


def test_block_sizes_and_backend_constraints_are_validated():
  shape = (1, 128, 2, 64)
  plan = lambda dtype, block_size, sizes, backend, shape=shape: kernel_plan(  # noqa: E731
      shape, dtype, np.ones((1, 128 // block_size, 128 // block_size), bool), block_size, sizes, False, backend)
  assert "block_q=12 must divide the layout block_size=16 or be a multiple of it" in plan(
      jnp.float32, 16, BlockSizes(block_q=12), "tpu")
  assert "block_kv must be a positive integer, got block_kv=0" in plan(jnp.float32, 16, BlockSizes(block_kv=0), "tpu")
  assert "q_block=4 must be a multiple of 8 on TPU" in plan(jnp.float32, 16, BlockSizes(block_q=4), "tpu")
  assert plan(jnp.float32, 64, None, "tpu").tiles == (64, 64)  # largest divisor up to 128
  assert plan(jnp.bfloat16, 128, None, "gpu").tiles == (64, 64)
  assert "q_block=32 must be a multiple of 64" in plan(jnp.bfloat16, 32, BlockSizes(block_q=32, block_kv=32), "gpu")
  assert plan(jnp.bfloat16, 32, None, "gpu").tiles == (64, 64)  # a tile spans 2 x 2 layout blocks
  assert plan(jnp.float32, 32, BlockSizes(block_q=64), "tpu").tiles == (64, 32)  # spanning blocks on TPU too
  assert "head_dim=32 must be 64 or 128 on GPU" in plan(jnp.bfloat16, 64, None, "gpu", shape=(1, 128, 2, 32))
  assert "dtype=float32: the Mosaic GPU kernels take only bfloat16/float16" in plan(jnp.float32, 64, None, "gpu")


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
  """The entry plans each call once per backend (`tables.kernel_plan`); the driver follows the plan and checks
  nothing again, forward or backward."""
  from kernels.block_sparse import block_sparse_attention, tables  # noqa: PLC0415
  checked = []
  real = tables.kernel_plan
  monkeypatch.setattr(tables, "kernel_plan", lambda *a: checked.append(a[-1]) or real(*a))
  spec = jax.ShapeDtypeStruct((1, 16, 1, 8), jnp.float32)  # float32: the GPU plan is a reason, TPU's the tiles
  layout = np.tril(np.ones((1, 2, 2), bool))
  loss = lambda q, k, v: jnp.sum(block_sparse_attention(q, k, v, layout, block_size=8,  # noqa: E731
                                                        causal=True).astype(jnp.float32))
  jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(spec, spec, spec)
  assert sorted(checked) == ["gpu", "tpu"]
