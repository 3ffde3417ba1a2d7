"""kernels.flex Pallas kernels serving masks that close over arrays (document ids, a per-token top-k selection), in
interpret mode on CPU against the dense reference, values and gradients: XLA evaluates the mask on the partial tiles'
index grids (`tables.partial_bitmaps`) and the kernels read each visited partial tile's bitmap, forward, dQ and
dK/dV (through `q_partial_pos`). Everything traced: the ids and the selection are arguments of the jitted program.
The Mosaic GPU kernels read the bitmaps of a mask closing over an array (copied beside the tiles, transposed for
dK/dV) in `test_block_sparse_pallas.py`'s GPU case (a layout's blocks inside 64-token tiles); the bitmaps are made
by XLA the same way for every backend (`partial_bitmaps`, checked here).

Tolerance: float32, summation order only (1e-5 values, 2e-5 / 1e-4 gradients).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import adaptive_sparse
from kernels import flex
from kernels.flex.tables import partial_bitmaps

TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=2e-5, rtol=1e-4)


def _inputs(shape_q, shape_kv, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], shape_q, dtype), jax.random.normal(ks[1], shape_kv, dtype),
          jax.random.normal(ks[2], shape_kv, dtype), jax.random.normal(ks[3], shape_q))


def _value_and_grads(attend, q, k, v, ct, *data):
  def loss(q, k, v, *data):
    out = attend(q, k, v, *data)
    return jnp.sum(out.astype(jnp.float32) * ct), out
  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, *data)


def _assert_close(got, want, tol, grad_tol):
  ((_, out), grads), ((_, out_want), grads_want) = got, want
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_want, np.float32), **tol)
  for g, w in zip(grads, grads_want):
    assert float(jnp.abs(w.astype(jnp.float32)).max()) > 1e-3  # the gradient reaches every input
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **grad_tol)


def test_bitmaps_follow_the_partial_lists_and_the_transposed_positions_find_them():
  """Bitmap entry `row * Kp + p` is the mask on (query tile i, listed key tile); `q_partial_pos` names, for each
  transposed entry (key tile j, query tile i), the forward's entry of (i, j)."""
  ids = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]])
  mask = lambda b, h, i, j: ids[b, i] == ids[b, j]  # noqa: E731
  bm = flex.create_block_mask(mask, 1, 1, 12, 12, 4)
  bits, pos = jax.jit(lambda bm: partial_bitmaps(bm, mask, heads=1))(bm)
  dense = np.asarray(ids[0][:, None] == ids[0][None, :])
  pidx, num = np.asarray(bm.kv_partial_idx)[0, 0], np.asarray(bm.kv_num_partial)[0, 0]
  kp = pidx.shape[-1]
  for i in range(3):
    for p in range(num[i]):
      j = pidx[i, p]
      np.testing.assert_array_equal(np.asarray(bits[i * kp + p]) == 0, dense[4 * i:4 * i + 4, 4 * j:4 * j + 4])
  qidx, qnum = np.asarray(bm.q_partial_idx)[0, 0], np.asarray(bm.q_num_partial)[0, 0]
  for j in range(3):
    for t in range(qnum[j]):
      i = qidx[j, t]
      assert pidx[i, np.asarray(pos)[0, 0, j, t] - i * kp] == j
  assert bits.shape == (3 * kp, 4, 4) and int(num.sum()) > 0


def test_document_mask_with_traced_ids_on_the_tpu_kernels():
  """Per-example document ids (an argument of the jitted step) intersected with causality, batch 2, two query heads
  on one key/value head (the program's heads share a bitmap), two 8-token tiles."""
  b, length, h, d = 2, 16, 2, 8
  q, k, v, ct = _inputs((b, length, h, d), (b, length, 1, d))
  doc = jnp.array([[0] * 5 + [1] * 11, [0] * 3 + [1] * 7 + [2] * 6])

  def attend(impl):
    def fn(q, k, v, doc):
      mask = lambda bb, hh, i, j: (doc[bb, i] == doc[bb, j]) & (j <= i)  # noqa: E731
      return flex.flex_attention(q, k, v, mask_mod=mask, block_size=8, implementation=impl)
    return fn

  got, want = jax.jit(lambda *a: (_value_and_grads(attend("interpret"), q, k, v, ct, *a),
                                  _value_and_grads(attend("reference"), q, k, v, ct, *a)))(doc)
  _assert_close(got, want, TOL, GRAD_TOL)


def test_per_token_selection_on_the_tpu_kernels():
  """NSA/MoBA's selected branch (`adaptive_sparse._selected_flex`): per token, top-2 of four 8-token blocks chosen
  inside the program (own block always in, causal), through the kernels against the dense token-mask reference."""
  b, length, h, hkv, d, bs = 1, 24, 2, 1, 8, 8
  q, k, v, ct = _inputs((b, length, h, d), (b, length, hkv, d))

  def select(q, k):
    pooled = k.reshape(b, length // bs, bs, hkv, d).mean(2)  # [B, Nb, Hkv, D]
    scores = jnp.einsum("blxd,bnxd->blxn", q[:, :, :hkv], pooled)
    own = jnp.arange(length)[:, None] // bs == jnp.arange(length // bs)[None, :]
    future = jnp.arange(length)[:, None] // bs < jnp.arange(length // bs)[None, :]
    scores = jnp.where(own[None, :, None], 1e9, jnp.where(future[None, :, None], -1e9, scores))
    idx = jax.lax.top_k(scores, 2)[1]
    return jnp.where(jnp.take_along_axis(scores, idx, -1) > -1e8, idx, -1)

  common = dict(block_size=bs, causal=True, key_mask_BxS=None, scale=d ** -0.5, q_offset=0, dropout_rate=0.0,
                dropout_rng=None)

  def attend(impl):
    def fn(q, k, v):
      sel = jax.lax.stop_gradient(select(q, k))
      if impl == "reference":
        return adaptive_sparse.selected_attention(q, k, v, sel, implementation="reference", **common)
      return adaptive_sparse._selected_flex(q, k, v, sel, q_tile=8, flex_implementation=impl, **common)  # noqa: SLF001
    return fn

  got, want = jax.jit(lambda: (_value_and_grads(attend("interpret"), q, k, v, ct),
                               _value_and_grads(attend("reference"), q, k, v, ct)))()
  _assert_close(got, want, TOL, GRAD_TOL)


@pytest.mark.parametrize("score_closes", [False, True])
def test_dispatch_serves_mask_closures_and_not_score_closures(score_closes):
  """A mask closing over traced ids no longer sends the call to the XLA form; a score_mod closing over an array
  still does (its gradient), with the reason."""
  q = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
  doc = jnp.zeros((1, 128), jnp.int32)
  mask = lambda b, h, i, j: doc[b, i] == doc[b, j]  # noqa: E731
  score = flex.relative_position_bias(jnp.zeros((8, 2))) if score_closes else None
  reasons = flex.plan(q, q, q, mask_mod=mask, score_mod=score).kernel_reasons
  if score_closes:
    assert all("score_mod closes over arrays" in r for r in reasons.values())
  else:
    assert reasons == {"tpu": None, "gpu": None}
