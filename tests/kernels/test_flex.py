"""kernels.flex: block-mask tables (classification counts derived by hand, traced and from-indices builders), and the
XLA form against the dense reference on the full index grid (values and gradients) for the built-in mask and score
functions, causal and not, lengths that are not a multiple of the tile, key padding, rows with no allowed key,
dropout, GQA, a traced document mask and a learned relative bias's gradient.

Tolerances: float32 forms differ only in summation order (online softmax over tiles): 1e-5 absolute on O(1) values.
bfloat16 inputs: matmul operands rounded to bfloat16 in both forms, the weights fed to the second matmul rounded in
the XLA form only, outputs bfloat16 (8 mantissa bits): 2e-2 on values, 5e-2 on gradients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import flex
from kernels.common import dropout_seed
from kernels.flex import tables

TOL = {jnp.float32: dict(atol=1e-5, rtol=1e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
GRAD_TOL = {jnp.float32: dict(atol=2e-5, rtol=1e-4), jnp.bfloat16: dict(atol=5e-2, rtol=5e-2)}

B, H, HKV, D = 2, 4, 2, 8


def _qkv(lq, lk, dtype=jnp.float32, heads=H, kv_heads=HKV, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, lq, heads, D), dtype)
  k = jax.random.normal(ks[1], (B, lk, kv_heads, D), dtype)
  v = jax.random.normal(ks[2], (B, lk, kv_heads, D), dtype)
  ct = jax.random.normal(ks[3], (B, lq, heads, D), jnp.float32)
  return q, k, v, ct


def _values_and_grads(impls, q, k, v, ct, **options):
  """[(out, grads)] per implementation, all in one compiled program (one compilation instead of one each)."""
  def run(q, k, v):
    def loss(impl):
      def f(q, k, v):
        out = flex.flex_attention(q, k, v, implementation=impl, **options)
        return jnp.sum(out.astype(jnp.float32) * ct), out
      return f
    return [jax.value_and_grad(loss(impl), argnums=(0, 1, 2), has_aux=True)(q, k, v) for impl in impls]
  return [(out, grads) for (_, out), grads in jax.jit(run)(q, k, v)]


def _assert_close(a, b, dtype=jnp.float32, grads=False):
  tol = (GRAD_TOL if grads else TOL)[dtype]
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def _compare(lq, lk, dtype=jnp.float32, impl="xla", **options):
  q, k, v, ct = _qkv(lq, lk, dtype)
  (out_r, g_r), (out_x, g_x) = _values_and_grads(("reference", impl), q, k, v, ct, **options)
  _assert_close(out_x, out_r, dtype)
  for a, b in zip(g_x, g_r):
    assert np.isfinite(np.asarray(a, np.float32)).all()
    _assert_close(a, b, dtype, grads=True)
  return out_r


window = lambda b, h, i, j: jnp.abs(i - j) < 10  # noqa: E731
per_head = lambda b, h, i, j: (j <= i) & ((h % 2 == 0) | (i - j < 7))  # noqa: E731  (tables per query head)
late_start = lambda b, h, i, j: (j <= i) & (i >= 5)  # noqa: E731  (rows 0..4 see nothing)
# Tile kinds: "full" every tile full (no mask), "causal" full, partial and empty, "window" partial and empty only.
CASES = {  # softcap runs in the cross-attention case, ALiBi at other head counts in test_t5_buckets_and_alibi_slopes
    "full": dict(),
    "causal": dict(mask_mod=flex.causal),
    "window": dict(mask_mod=window),
    "per_head_causal_alibi": dict(mask_mod=per_head, score_mod=flex.alibi(H)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_xla_equals_reference(name):
  """40 tokens in 16-token tiles (the last tile overhangs), key padding on batch row 0, dropout off."""
  key_mask = jnp.arange(40)[None, :] < jnp.array([[33], [40]])
  _compare(40, 40, block_size=16, key_mask=key_mask, **CASES[name])


def test_xla_cross_attention_and_uneven_tiles():
  _compare(24, 56, block_size=(8, 16), mask_mod=lambda b, h, i, j: j < 2 * i + 3, score_mod=flex.softcap(3.0))


def test_rows_without_keys_output_zero_with_finite_gradients():
  key_mask = jnp.array([[False] * 32, [True] * 32])  # batch row 0: no real key at all
  out = _compare(32, 32, block_size=8, mask_mod=late_start, key_mask=key_mask)
  assert float(jnp.abs(out[0]).max()) == 0.0
  assert float(jnp.abs(out[1, :5]).max()) == 0.0 and float(jnp.abs(out[1, 5:]).max()) > 0.0


def test_dropout_equals_the_reference_mask():
  q, k, v, ct = _qkv(40, 40)
  options = dict(mask_mod=flex.causal, block_size=16, dropout_rate=0.3, dropout_rng=jax.random.key(7))
  (out_r, g_r), (out_x, g_x) = _values_and_grads(("reference", "xla"), q, k, v, ct, **options)
  _assert_close(out_x, out_r)
  for a, b in zip(g_x, g_r):
    _assert_close(a, b, grads=True)
  no_drop = jax.jit(lambda q, k, v: flex.flex_attention(q, k, v, mask_mod=flex.causal, block_size=16,
                                                        implementation="reference"))(q, k, v)
  assert float(jnp.abs(out_r - no_drop).max()) > 1e-2  # dropout did act


def test_bfloat16():
  _compare(40, 40, jnp.bfloat16, block_size=16, mask_mod=window, score_mod=flex.alibi(H))


def test_gqa_equals_repeated_key_value_heads():
  q, k, v, ct = _qkv(32, 32, kv_heads=1)
  options = dict(mask_mod=flex.causal, block_size=8)
  rep = lambda x: jnp.repeat(x, H, axis=2)  # noqa: E731

  def loss(impl, q, k, v):
    out = flex.flex_attention(q, k, v, implementation=impl, **options)
    return jnp.sum(out * ct), out

  # Against the reference without groups (one key/value head per query head): independent of how either groups.
  # Both in one compiled program.
  ((_, out), (dq, dk, dv)), ((_, out_r), (dq_r, dk_r, dv_r)) = jax.jit(lambda q, k, v: [
      jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2), has_aux=True)(q, *kv)
      for impl, kv in (("xla", (k, v)), ("reference", (rep(k), rep(v))))])(q, k, v)
  _assert_close(out, out_r)
  _assert_close(dq, dq_r, grads=True)
  _assert_close(dk, dk_r.sum(axis=2, keepdims=True), grads=True)
  _assert_close(dv, dv_r.sum(axis=2, keepdims=True), grads=True)


def test_learned_relative_bias_gradient():
  q, k, v, ct = _qkv(40, 40)
  table = jax.random.normal(jax.random.key(3), (16, H))

  def loss(table, impl):
    score_mod = flex.relative_position_bias(table, bidirectional=True, max_distance=20)
    out = flex.flex_attention(q, k, v, mask_mod=window, score_mod=score_mod, block_size=16, implementation=impl)
    return jnp.sum(out * ct)

  g_r, g_x = jax.jit(lambda t: [jax.grad(loss)(t, impl) for impl in ("reference", "xla")])(table)  # one program
  assert float(jnp.abs(g_r).max()) > 1e-2
  _assert_close(g_x, g_r, grads=True)


def test_t5_buckets_and_alibi_slopes():
  from attention.positions import alibi_slopes  # noqa: PLC0415  (the layers' slopes: the same numbers)
  head_counts = (1, 3, 4, 6, 8)

  # One compiled program for every head count and the buckets (eagerly, each small op compiled per shape: ~8x
  # the CPU time).
  @jax.jit
  def slopes_and_buckets(rel):
    slopes = [flex.alibi(h)(jnp.zeros((1, h, 1, 1)), 0, jnp.arange(h)[None, :, None, None], 1, 0)
              for h in head_counts]
    return slopes, flex.t5_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)

  rel = jnp.array([-200, -20, -9, -8, -1, 0, 1, 7, 8, 100, 1000])
  slopes, buckets = slopes_and_buckets(rel)
  for heads, got in zip(head_counts, slopes):
    np.testing.assert_allclose(-np.asarray(got).reshape(-1), alibi_slopes(heads), rtol=1e-6)
  # Small distances exact (negative kv - q: the first half), the sign in the upper half, logarithmic then clipped.
  np.testing.assert_array_equal(np.asarray(buckets)[[4, 5, 6, 7]], [1, 0, 17, 23])
  assert int(buckets[0]) == 15 and int(buckets[-1]) == 31 and 8 <= int(buckets[2]) <= 9


def _counts(bm):
  dense = np.asarray(bm.to_dense())
  return int((dense == tables.FULL).sum()), int((dense == tables.PARTIAL).sum())


def test_block_mask_counts_causal_window_document():
  # Causal, 8 tiles: 28 below the diagonal full, the 8 diagonal tiles partial.
  bm = flex.create_block_mask(flex.causal, 1, 1, 128, 128, 16)
  assert _counts(bm) == (28, 8)
  np.testing.assert_array_equal(np.asarray(bm.kv_num_full)[0, 0], np.arange(8))
  # Window |i - j| < 16 with 16-token tiles: only the diagonal tile is full, both neighbours partial: 8 + 14.
  bm = flex.create_block_mask(lambda b, h, i, j: jnp.abs(i - j) < 16, 1, 1, 128, 128, 16)
  assert _counts(bm) == (8, 14)
  # Documents [0, 24), [24, 64) in 8-token tiles: doc 0 has tiles 0-2 (full), doc 1 tiles 3-7 (full), no partial.
  # With a boundary inside tile 2 ([0, 20), [20, 64)): tiles {0, 1} and {3..7} full among themselves; tile 2 is
  # partial against every tile (8) and every other tile against it (7).
  for cut, expect in ((24, (3 * 3 + 5 * 5, 0)), (20, (2 * 2 + 5 * 5, 8 + 7))):
    doc = np.asarray(np.arange(64) >= cut, np.int32)
    mask = lambda b, h, i, j, doc=doc: jnp.asarray(doc)[i] == jnp.asarray(doc)[j]  # noqa: E731
    assert _counts(flex.create_block_mask(mask, 1, 1, 64, 64, 8)) == expect, cut


def test_block_mask_transposed_lists_and_broadcast_dims():
  bm = flex.create_block_mask(per_head, 2, H, 40, 40, 8)
  assert bm.kv_num_full.shape == (1, H, 5)  # the mask ignores b: one batch row; uses h: per head
  dense = np.asarray(bm.to_dense())
  t = tables._lists_to_dense(bm.q_num_full, bm.q_full_idx, bm.num_q_tiles)
  np.testing.assert_array_equal(np.swapaxes(np.asarray(t), -1, -2), dense == tables.FULL)
  t = tables._lists_to_dense(bm.q_num_partial, bm.q_partial_idx, bm.num_q_tiles)
  np.testing.assert_array_equal(np.swapaxes(np.asarray(t), -1, -2), dense == tables.PARTIAL)
  # Padding entries repeat the row's last real tile (kernels keep it resident).
  idx, num = np.asarray(bm.kv_full_idx), np.asarray(bm.kv_num_full)
  for row, n in np.ndenumerate(num):
    if n:
      assert (idx[row][n:] == idx[row][n - 1]).all()
  assert flex.create_block_mask(per_head, 2, H, 40, 40, 8) is bm  # cached


def test_traced_document_mask_inside_jit():
  doc = jnp.array([[0] * 10 + [1] * 20 + [2] * 10, [0] * 25 + [1] * 15])
  q, k, v, ct = _qkv(40, 40)

  def loss(q, doc, impl):
    mask = lambda b, h, i, j: (doc[b, i] == doc[b, j]) & (j <= i)  # noqa: E731
    return jnp.sum(flex.flex_attention(q, k, v, mask_mod=mask, block_size=8, implementation=impl) * ct)

  # None: no kernel takes a closure over traced ids; the XLA form runs (as "xla" would), staged outside
  # platform_dependent (its branches cannot hold a custom_vjp closing over tracers). Both in one compiled program.
  (l_r, g_r), (l_x, g_x) = jax.jit(lambda q, doc: [jax.value_and_grad(loss)(q, doc, impl)
                                                   for impl in ("reference", None)])(q, doc)
  _assert_close(l_x, l_r)
  _assert_close(g_x, g_r, grads=True)

  @jax.jit
  def traced_tables(doc):
    mask = lambda b, h, i, j: (doc[b, i] == doc[b, j]) & (j <= i)  # noqa: E731
    return flex.create_block_mask_traced(mask, 2, 1, 40, 40, 8).to_dense()

  host = flex.create_block_mask(lambda b, h, i, j: (doc[b, i] == doc[b, j]) & (j <= i), 2, 1, 40, 40, 8)
  np.testing.assert_array_equal(np.asarray(traced_tables(doc)), np.asarray(host.to_dense()))


def test_traced_list_bounds_narrower_than_the_tiles_are_logged_once(caplog):
  """A traced builder's list bound narrower than the tiles cannot be checked (the counts are traced): it is logged
  once as trusted, naming the option and the exact default; a true bound (the default) logs nothing."""
  doc = jnp.array([[0] * 20 + [1] * 20])
  mask = lambda b, h, i, j: doc[b, i] == doc[b, j]  # noqa: E731
  with caplog.at_level("WARNING", logger="kernels"):
    for _ in range(2):
      jax.eval_shape(lambda: flex.create_block_mask_traced(mask, 1, 1, 40, 40, 8, kv_width=3))
    jax.eval_shape(lambda: flex.create_block_mask_traced(mask, 1, 1, 40, 40, 8))
  lines = [r.getMessage() for r in caplog.records if "trusted" in r.getMessage()]
  assert len(lines) == 1, lines
  assert "kv_width=3 (of 5 tiles)" in lines[0] and "kv_width=None" in lines[0]


def test_block_mask_from_indices_selection():
  """A top-k style selection (duplicates, per key/value head), causal inside the selected tiles."""
  tq = 5
  sel = jnp.array([[[[0, 0, 1], [1, 0, 0], [2, 0, 1], [3, 1, 2], [4, 2, 0]],
                    [[0, 0, 0], [1, 1, 1], [0, 2, 2], [3, 3, 0], [1, 4, 3]]]])  # [1, HKV, Tq, 3]
  bm = jax.jit(lambda s: flex.block_mask_from_indices(s, q_len=40, kv_len=40, block_size=8, mask_mod=flex.causal,
                                                      full=s < jnp.arange(tq)[:, None]))(sel)
  dense = np.asarray(bm.to_dense())
  expect = np.zeros((1, HKV, tq, tq), np.int8)
  for h in range(HKV):
    for i in range(tq):
      for j in np.asarray(sel)[0, h, i]:
        expect[0, h, i, j] = tables.FULL if j < i else tables.PARTIAL
  np.testing.assert_array_equal(dense, expect)
  t = np.asarray(tables._lists_to_dense(bm.q_num_partial, bm.q_partial_idx, tq))
  np.testing.assert_array_equal(np.swapaxes(t, -1, -2), dense == tables.PARTIAL)
  _compare(40, 40, block_mask=bm)


def test_coarsen_q_against_an_oracle():
  """Coarse verdicts over groups of 3 query tiles (the last group overhangs): visited when any fine pair is, full
  when every real one is; the fine verdicts come back unchanged, padded with EMPTY rows."""
  rng = np.random.default_rng(0)
  for _ in range(5):
    classes = rng.integers(0, 3, (2, 3, 7, 6)).astype(np.int8)
    bm = tables._from_classes(classes, 8, 8, 56, 48, None, lambda hit, _: tables._np_lists(hit), (None,) * 4)
    np.testing.assert_array_equal(tables.dense_classes(bm), classes)
    coarse, fine = tables.coarsen_q(bm, 3)
    assert (coarse.q_block, coarse.num_q_tiles) == (24, 3)
    np.testing.assert_array_equal(fine.reshape(2, 3, 9, 6)[:, :, :7], classes)
    assert (fine.reshape(2, 3, 9, 6)[:, :, 7:] == tables.EMPTY).all()
    expect = np.zeros((2, 3, 3, 6), np.int8)
    for g in range(3):
      rows = classes[:, :, 3 * g:3 * g + 3]
      visited = (rows != tables.EMPTY).any(2)
      expect[:, :, g] = np.where((rows == tables.FULL).all(2), tables.FULL, np.where(visited, tables.PARTIAL, 0))
    np.testing.assert_array_equal(tables.dense_classes(coarse), expect)


@pytest.mark.parametrize("steps", ["fine", "coarse"])
def test_xla_step_tiles_equal_reference(monkeypatch, steps):
  """The XLA form walks host tables in taller query tiles when its steps cost more than its tiles
  (`xla._step_plan`), keeping each fine pair's verdict: forced both ways on a mask with full, partial and empty
  tiles plus ALiBi, key padding, dropout and an overhanging last tile; and on a selection whose tiles do not follow
  from its mask function (a coarse step must not attend the fine tiles nobody selected)."""
  from kernels.flex import xla  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(xla, "_STEP_COST", 1e6 if steps == "coarse" else 0.0)
  assert xla._step_plan(flex.create_block_mask(late_start, 1, 1, 72, 72, 16), 1)[0].q_block == (
      128 if steps == "coarse" else 16)
  key_mask = jnp.arange(72)[None, :] < jnp.array([[61], [72]])
  _compare(72, 72, block_size=16, mask_mod=late_start, score_mod=flex.alibi(H), key_mask=key_mask,
           dropout_rate=0.2, dropout_rng=jax.random.key(3))
  sel = jnp.array([[[[0, 0], [1, 0], [0, 1], [3, 1], [1, 4]], [[2, 2], [1, 1], [0, 2], [3, 3], [4, 0]]]])
  for mask_mod in (None, flex.causal):
    _compare(40, 40, block_mask=flex.block_mask_from_indices(sel, q_len=40, kv_len=40, block_size=8,
                                                             mask_mod=mask_mod))


def test_bad_inputs_are_refused_in_one_line():
  q, k, v, _ = _qkv(16, 16, kv_heads=3, heads=4)
  with pytest.raises(ValueError, match="must divide the query heads"):
    flex.flex_attention(q, k, v)
  q, k, v, _ = _qkv(16, 16)
  bm = flex.create_block_mask(flex.causal, 1, 1, 32, 32, 8)
  with pytest.raises(ValueError, match="block_mask was made for q_len=32"):
    flex.flex_attention(q, k, v, block_mask=bm)
  with pytest.raises(ValueError, match="unknown flex_attention implementation"):
    flex.flex_attention(q, k, v, implementation="cuda")
  with pytest.raises(ValueError, match="must return bool"):
    flex.create_block_mask(lambda b, h, i, j: i - j, 1, 1, 16, 16, 8)
