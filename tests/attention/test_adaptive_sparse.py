"""The selected core of nsa / moba / compressed (`attention.adaptive_sparse.selected_attention`), key-block major:
its transposed lists (`block_entries`) against a numpy oracle, one selection per query head over shared key/value
heads (MoBA under GQA) against the dense reference on repeated keys (values and gradients, padding, dropout), and
its compiled memory growing linearly with the length (no [L, L] and no [L, blocks] buffer). The layers' own tests
(test_nsa, test_moba, test_compressed and the contract suite) compare the form through the layers.
Tolerances (float32): 2e-5 absolute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import adaptive_sparse as core

ATOL = 2e-5


def _oracle(block_idx_LxN: np.ndarray, num_blocks: int, chunk: int):
  """Per step: (block, the queries that chose it in query order, padded with L to `chunk`)."""
  l = block_idx_LxN.shape[0]
  steps = []
  for j in range(num_blocks):
    queries = [t for t in range(l) if j in block_idx_LxN[t]]
    for start in range(0, len(queries), chunk):
      part = queries[start:start + chunk]
      steps.append((j, part + [l] * (chunk - len(part))))
  return steps


@pytest.mark.parametrize("chunk", [1, 3])
def test_block_entries_are_the_transposed_selection(chunk):
  rng = np.random.default_rng(0)
  l, n, nb = 11, 3, 5
  idx = np.stack([rng.permutation(nb)[:n] for _ in range(l)])
  idx[rng.random((l, n)) < 0.2] = -1  # unused slots (a causal query with fewer reachable blocks)
  slot_q, step_blk, used = jax.jit(core.block_entries, static_argnums=(1, 2))(jnp.asarray(idx, jnp.int32), nb, chunk)
  expected = _oracle(idx, nb, chunk)
  assert int(used) == len(expected)
  assert slot_q.shape[0] == -(-(l * n + nb * (chunk - 1)) // chunk) * chunk  # the static O(L·N) bound
  got = [(int(step_blk[s]), [int(x) for x in slot_q[s * chunk:(s + 1) * chunk]]) for s in range(int(used))]
  assert got == expected
  assert (np.asarray(slot_q[int(used) * chunk:]) == l).all()  # the rest is padding


def test_per_head_selection_reads_the_shared_key_value_heads():
  """MoBA selects per query head; with 4 query heads over 2 key/value heads the keys are not repeated: equal to the
  reference on repeated keys (same dropout counters: query head h of group x is batch * H + h either way)."""
  b, l, h, hkv, d, bs, s = 2, 13, 4, 2, 8, 4, 16
  keys = jax.random.split(jax.random.key(3), 5)
  q = jax.random.normal(keys[0], (b, l, h, d))
  k, v = jax.random.normal(keys[1], (b, s, hkv, d)), jax.random.normal(keys[2], (b, s, hkv, d))
  idx = core.top_blocks(jax.random.normal(keys[3], (b, l, h, s // bs)), 2)
  real = jnp.arange(s)[None, :] < jnp.array([[s - 5], [s]])
  w = jax.random.normal(keys[4], q.shape)
  common = dict(block_size=bs, causal=True, key_mask_BxS=real, scale=d ** -0.5, dropout_rate=0.1,
                dropout_rng=jax.random.key(1))

  @jax.jit
  def both(q, k, v):
    def shared(q, k, v):
      return jnp.sum(core.selected_attention(q, k, v, idx, implementation="xla", **common) * w)

    def repeated(q, k, v):
      rk, rv = jnp.repeat(k, h // hkv, axis=2), jnp.repeat(v, h // hkv, axis=2)
      return jnp.sum(core.selected_attention(q, rk, rv, idx, implementation="reference", **common) * w)

    return [jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v) for f in (shared, repeated)]

  (l_x, g_x), (l_r, g_r) = both(q, k, v)
  np.testing.assert_allclose(l_x, l_r, atol=ATOL, rtol=1e-5)
  for a, r in zip(g_x, g_r):
    np.testing.assert_allclose(a, r, atol=ATOL)
  assert float(jnp.abs(g_r[1]).sum()) > 0


def test_compiled_memory_grows_linearly_with_the_length():
  """Forward + backward of the block-major form at L and 4L (a fixed number of selected blocks per query): temporary
  memory grows 4x (here 4.00x), not 16x (an [L, L] buffer) nor more than 4.2x (flex's form, with its per-token
  [L, L / block] selection bitmap, grows 4.45x at these shapes)."""
  def temp(length):
    b, h, d, bs, n = 1, 2, 16, 16, 2
    q = jax.ShapeDtypeStruct((b, length, h, d), jnp.float32)
    idx = jax.ShapeDtypeStruct((b, length, h, n), jnp.int32)

    def loss(q, idx):
      return jnp.sum(core.selected_attention(q, q, q, idx, block_size=bs, causal=True, key_mask_BxS=None,
                                             scale=0.25, implementation="xla"))

    return jax.jit(jax.grad(loss)).lower(q, idx).compile().memory_analysis().temp_size_in_bytes

  small, large = temp(1024), temp(4096)
  assert large < 4.2 * small, (small, large)


def test_flex_form_takes_a_selection_per_query_head_too():
  """The flex form (tpu/cuda's default) with MoBA's per-head selection over shared key/value heads equals the
  block-major form (values; its XLA form on this CPU)."""
  b, l, h, hkv, d, bs = 1, 12, 4, 2, 8, 4
  keys = jax.random.split(jax.random.key(4), 3)
  q, k = jax.random.normal(keys[0], (b, l, h, d)), jax.random.normal(keys[1], (b, l, hkv, d))
  idx = core.top_blocks(jax.random.normal(keys[2], (b, l, h, l // bs)), 2)
  common = dict(block_size=bs, causal=False, key_mask_BxS=None, scale=0.3, q_tile=4)
  run = jax.jit(lambda q, k: [core.selected_attention(q, k, k, idx, implementation=i, **common) for i in ("flex", "xla")])
  flex_out, xla_out = run(q, k)
  np.testing.assert_allclose(flex_out, xla_out, atol=ATOL)


def test_causal_segments_of_summary_attention_equal_the_reference():
  """Causal summary attention (nsa's compressed branch, compressed, moba's coarse output) splits the queries into
  `CAUSAL_SEGMENTS` segments over the summary keys each one's last query sees: the segments against a numpy oracle,
  and values, gradients and `probs_fn`'s reductions against the unsegmented reference (key padding, dropout, an
  offset, a segment that sees no key at all)."""
  b, l, h, hkv, d, chunk = 2, 61, 4, 2, 8, 4
  k_pos = np.arange(9, dtype=np.int32) * 7 + 13  # 9 summary keys, the first visible from position 13 on
  segments = core.causal_segments(l, chunk, 0, k_pos)
  assert len(segments) == core.CAUSAL_SEGMENTS and segments[0][0] == 0 and segments[-1][1] == l
  for start, stop, n in segments:
    assert n == max(1, int((k_pos <= stop - 1).sum()))  # every key its last query sees, no more
  assert segments[0][2] == 1  # the first segment (queries 0..15) sees no summary key
  assert core.causal_segments(l, chunk, jnp.int32(0), k_pos) is None  # traced offset: not segmented
  assert core.causal_segments(l, 16, 0, k_pos) is None  # fewer than 2 chunks per segment
  keys = jax.random.split(jax.random.key(5), 5)
  q = jax.random.normal(keys[0], (b, l, h, d))
  k, v = jax.random.normal(keys[1], (b, 9, hkv, d)), jax.random.normal(keys[2], (b, 9, hkv, d))
  valid = jnp.arange(9)[None, :] < jnp.array([[7], [9]])
  w = jax.random.normal(keys[3], q.shape)
  probs_fn = lambda p, q_pos: jnp.einsum("bxgcs,s->bcx", p, jnp.arange(9.0)) + q_pos[None, :, None]  # noqa: E731

  def run(impl, q, k, v):
    out, red = core.summary_attention(q, k, v, k_pos_S=k_pos, key_valid_BxS=valid, causal=True, scale=0.3,
                                      dropout_rate=0.2, dropout_seed=jnp.int32(11), query_chunk=chunk,
                                      probs_fn=probs_fn, implementation=impl)
    return jnp.sum(out * w), (out, red)

  grads = jax.jit(lambda q, k, v: [jax.value_and_grad(lambda *a, impl=impl: run(impl, *a), argnums=(0, 1, 2),
                                                      has_aux=True)(q, k, v) for impl in ("xla", "reference")])
  ((_, (out, red)), g), ((_, (out_r, red_r)), g_r) = grads(q, k, v)
  np.testing.assert_allclose(out, out_r, atol=ATOL)
  np.testing.assert_allclose(red, red_r, atol=1e-4)
  for a, r in zip(g, g_r):
    np.testing.assert_allclose(a, r, atol=ATOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_summary_and_window_in_one_chunk_loop_equal_the_weighted_references(causal):
  """nsa's compressed and window branches share one chunk loop (`summary_and_window_attention`); causal, it runs in
  causal segments, each with only the band of keys its window reaches. Values, the `probs_fn` reductions and the
  gradients (queries, both key sets, the mixing weights) against the weighted sum of the two dense references (key
  padding, dropout with a seed per branch, a window crossing the segment edges)."""
  b, l, h, hkv, d, chunk, window, s = 2, 61, 4, 2, 8, 4, 6, 64
  k_pos = np.arange(9, dtype=np.int32) * 7 + 13
  if causal:
    assert core.causal_segments(l, chunk, 0, k_pos) is not None  # the segmented path is the one under test
  keys = jax.random.split(jax.random.key(6), 8)
  q = jax.random.normal(keys[0], (b, l, h, d))
  kc, vc = jax.random.normal(keys[1], (b, 9, hkv, d)), jax.random.normal(keys[2], (b, 9, hkv, d))
  k, v = jax.random.normal(keys[3], (b, s, hkv, d)), jax.random.normal(keys[4], (b, s, hkv, d))
  weights = jax.random.uniform(keys[5], (b, l, h, 2))
  valid = jnp.arange(9)[None, :] < jnp.array([[7], [9]])
  real = jnp.arange(s)[None, :] < jnp.array([[50], [s]])
  w = jax.random.normal(keys[6], q.shape)
  probs_fn = lambda p, q_pos: jnp.einsum("bxgcs,s->bcx", p, jnp.arange(9.0)) + q_pos[None, :, None]  # noqa: E731
  common = dict(causal=causal, scale=0.3, dropout_rate=0.2, query_chunk=chunk)

  def fused(q, kc, vc, k, v, weights):
    out, red = core.summary_and_window_attention(
        q, weights, dict(k=kc, v=vc, k_pos_S=k_pos, key_valid_BxS=valid, dropout_seed=jnp.int32(3)),
        dict(k=k, v=v, window=window, key_mask_BxS=real, dropout_seed=jnp.int32(4)), probs_fn=probs_fn, **common)
    return jnp.sum(out * w), (out, red)

  def reference(q, kc, vc, k, v, weights):
    far, red = core.summary_attention(q, kc, vc, k_pos_S=k_pos, key_valid_BxS=valid, dropout_seed=jnp.int32(3),
                                      probs_fn=probs_fn, implementation="reference", **common)
    near = core.window_attention(q, k, v, window=window, key_mask_BxS=real, dropout_seed=jnp.int32(4),
                                 implementation="reference", **common)
    out = weights[..., 0:1] * far + weights[..., 1:2] * near
    return jnp.sum(out * w), (out, red)

  grads = jax.jit(lambda *a: [jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True)(*a)
                              for f in (fused, reference)])
  ((_, (out, red)), g), ((_, (out_r, red_r)), g_r) = grads(q, kc, vc, k, v, weights)
  np.testing.assert_allclose(out, out_r, atol=ATOL)
  np.testing.assert_allclose(red, red_r, atol=1e-4)
  for a, r in zip(g, g_r):
    np.testing.assert_allclose(a, r, atol=ATOL)
  assert float(jnp.abs(g_r[3]).sum()) > 0 and float(jnp.abs(g_r[5]).sum()) > 0
