"""The flash-style XLA form of block-sparse attention (kernels/block_sparse/xla.py): its host plan covers every allowed
block pair exactly once, and values and gradients (custom_vjp, recomputed from the log-sum-exp) equal the dense
reference's with dropout, causal masking, padded keys, global tokens and every kind of piece, in float32 and bfloat16;
the compiled CPU step holds no custom call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import sparse_layouts
from kernels.block_sparse import xla
from kernels.block_sparse.reference import block_sparse_attention_reference
from kernels.block_sparse.tables import causal_blocks
from kernels.common import dropout_seed

# float32: both sides accumulate in float32 and differ in summation order only (online softmax vs one softmax).
# bfloat16: inputs and the weights fed to the matmuls are rounded to bfloat16 on both sides, after different sums.
TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
GRAD_TOL = {jnp.float32: dict(atol=2e-5, rtol=1e-4), jnp.bfloat16: dict(atol=6e-2, rtol=6e-2)}


@pytest.fixture
def small_tiles(monkeypatch):
  """Planner thresholds scaled to test sizes: windows and groups of a few tiny blocks become pieces, and a step holds
  few scores, so the scans walk several tile steps and key steps. The plan cache is cleared around the test."""
  monkeypatch.setattr(xla, "_MIN_WINDOW_KEYS", 0)
  monkeypatch.setattr(xla, "_MIN_GROUP_ROWS", 2)
  monkeypatch.setattr(xla, "_STEP_SCORES", 96)
  monkeypatch.setattr(xla, "_MIN_STEP_KEYS", 4)
  xla._plan_cached.cache_clear()
  yield
  xla._plan_cached.cache_clear()


def _global_layout(heads, n, seed):
  layout = np.random.default_rng(seed).random((heads, n, n)) < 0.15
  layout |= np.eye(n, dtype=bool)[None]
  layout[:, [0, -1], :] = True
  layout[:, :, [0, -1]] = True
  return layout


LAYOUTS = {  # name -> (layout, block_size)
    "random": (np.random.default_rng(0).random((2, 8, 8)) < 0.4, 4),
    "strided": (sparse_layouts.strided_layout(16, stride=4, causal=False), 2),
    "bigbird": (sparse_layouts.bigbird_layout(12, num_heads=2, num_random_blocks=2, seed=1), 2),
    "longformer": (sparse_layouts.longformer_layout(12, window=3, num_global_blocks=1, dilation=[1, 2]), 2),
    "global": (_global_layout(2, 10, seed=3), 2),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_plan_covers_every_allowed_pair_once(small_tiles, name, causal):
  layout, block_size = LAYOUTS[name]
  n = layout.shape[-1]
  want = causal_blocks(layout) if causal else layout
  count = np.zeros((layout.shape[0], n + 1, n + 1), int)
  for piece in xla.plan_pieces(layout, causal, block_size):
    h_idx, p_idx, a_idx, u_idx = np.nonzero(piece.mask)
    k_heads = h_idx if piece.kidx.shape[0] > 1 else 0
    np.add.at(count, (h_idx, piece.qidx[p_idx, a_idx], piece.kidx[k_heads, p_idx, u_idx]), 1)
    assert piece.qidx.shape[0] % piece.tiles == 0 and piece.kidx.shape[-1] % piece.keys == 0
  np.testing.assert_array_equal(count[:, :n, :n], np.broadcast_to(want, count[:, :n, :n].shape).astype(int))
  assert not count[:, n].any() and not count[:, :, n].any(), "padding blocks are never computed"


def test_plan_uses_every_kind_of_piece(small_tiles):
  """The value cases (`CASES`, below) exercise each piece (so a planner change cannot silently drop one from the
  tests)."""
  kinds = {p.name for name, causal, _, _ in CASES
           for p in xla.plan_pieces(LAYOUTS[name][0], causal, LAYOUTS[name][1])}
  assert kinds == {"dense", "slab", "window", "groups", "band"}, kinds


def test_default_plan_of_the_lra_layouts_at_4k():
  """At 4K tokens the Sparse Transformer's wide window and strided columns become tiles (not 32-token block pairs),
  and BigBird keeps global rows dense, global columns in the slab and the rest in the band."""
  xla._plan_cached.cache_clear()
  strided = xla.plan_pieces(sparse_layouts.strided_layout(129, stride=11, causal=False), False, 32)
  assert [p.name for p in strided] == ["window", "groups"]
  assert strided[0].qidx.shape[1] > 1 and strided[1].qidx.shape[1] > 1
  bigbird = xla.plan_pieces(sparse_layouts.bigbird_layout(65, num_heads=4, seed=0), False, 64)
  assert [p.name for p in bigbird] == ["dense", "slab", "band"]


# Every piece kind, causal and not, dropout and not, shared (strided: one head) and per-head layouts, bfloat16 (the
# pieces of each (layout, causal) at these thresholds are listed in the comments).
CASES = [  # (layout name, causal, dropout, dtype)
    ("strided", True, 0.3, jnp.float32),  # dense, window, band
    ("global", True, 0.0, jnp.float32),  # dense, slab, groups, band
    ("longformer", False, 0.3, jnp.float32),  # dense, slab, window, band
    ("random", False, 0.3, jnp.bfloat16),  # dense, groups, band
]


@pytest.mark.parametrize("name,causal,rate,dtype", CASES)
def test_values_and_gradients_match_the_reference(small_tiles, name, causal, rate, dtype):
  layout, block_size = LAYOUTS[name]
  length, heads = layout.shape[-1] * block_size, 2
  keys = jax.random.split(jax.random.key(len(name) + 7 * causal), 4)
  q, k, v = (jax.random.normal(key, (3, length, heads, 8), dtype) for key in keys[:3])
  ct = jax.random.normal(keys[3], q.shape, jnp.float32)
  # Batch row 0: every key is padding (its queries output 0 with finite gradients); row 1: a padded tail.
  key_mask = jnp.arange(length)[None, :] < jnp.array([[0], [length - block_size - 1], [length]])
  seed = dropout_seed(jax.random.key(11))

  @jax.jit
  def value_and_grads(q, k, v):
    def f(q, k, v, fn):
      out = fn(q, k, v, layout, block_size=block_size, causal=causal, key_mask=key_mask, dropout_rate=rate,
               dropout_seed=seed)
      return jnp.sum(out.astype(jnp.float32) * ct), out
    return [jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v, fn)
            for fn in (block_sparse_attention_reference, xla.block_sparse_attention_xla)]

  ((_, want), want_grads), ((_, got), got_grads) = value_and_grads(q, k, v)
  assert got.dtype == dtype
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  np.testing.assert_allclose(f32(got), f32(want), **TOL[dtype])
  np.testing.assert_array_equal(f32(got[0]), 0.0)
  assert np.abs(f32(got[1:])).sum() > 0
  for g, w in zip(got_grads, want_grads):
    assert g.dtype == dtype and np.all(np.isfinite(f32(g)))
    np.testing.assert_allclose(f32(g), f32(w), **GRAD_TOL[dtype])


def test_dropout_mean_over_seeds_is_the_output_without_dropout():
  """Inverted dropout keeps the expectation: averaged over many seeds the output tends to the no-dropout one."""
  layout, block_size = LAYOUTS["global"]
  q, k, v = (jax.random.normal(key, (1, 20, 2, 4)) for key in jax.random.split(jax.random.key(2), 3))

  # One compiled program for both (the no-dropout output run eagerly compiled each of its ops: ~2x the cost).
  @jax.jit
  def mean_over_and_plain(seeds):
    outs = jax.vmap(lambda s: xla.block_sparse_attention_xla(q, k, v, layout, block_size=block_size,
                                                             dropout_rate=0.5, dropout_seed=s))(seeds)
    return outs.mean(0), xla.block_sparse_attention_xla(q, k, v, layout, block_size=block_size)

  mean, plain = mean_over_and_plain(jnp.arange(2000, dtype=jnp.int32))
  # Per entry the dropped-out output has std <= |v|max * ~1 / sqrt(keys); over 2000 seeds the error is ~0.02-0.05.
  np.testing.assert_allclose(mean, plain, atol=0.12)
  assert float(jnp.abs(mean - plain).mean()) < 0.03


def test_compiled_training_gradient_holds_no_custom_call_and_no_score_sized_residual(small_tiles):
  """XLA:CPU runs the compiled forward + backward without library custom calls (LAPACK, FFT: a hang risk when run
  from many threads), and the backward keeps no score-sized buffer between the passes (the form it replaces kept
  the gathered scores): with small steps, compiled temporaries stay well under one copy of the allowed scores."""
  layout = sparse_layouts.strided_layout(64, stride=8, causal=False)
  batch, heads, length, block_size = 1, 2, 64 * 32, 32
  spec = jax.ShapeDtypeStruct((batch, length, heads, 8), jnp.float32)
  seed = jnp.int32(3)

  def loss(q, k, v):
    return jnp.sum(xla.block_sparse_attention_xla(q, k, v, layout, block_size=block_size, dropout_rate=0.1,
                                                  dropout_seed=seed) ** 2)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
  assert "custom-call" not in compiled.as_text()
  allowed_score_bytes = int(layout.sum()) * block_size ** 2 * batch * heads * 4
  assert compiled.memory_analysis().temp_size_in_bytes < 0.5 * allowed_score_bytes
