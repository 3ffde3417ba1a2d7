"""kernels.flex Pallas kernels in interpret mode (TPU; and Mosaic GPU under the GPU interpreter, bfloat16) on CPU against the dense reference (values and gradients):
GQA heads sharing a program, per-query-head tables (one program per head, dK/dV summed over the group), score_mod
in the forward and backward, key padding, an overhanging last tile, dropout, and tables built inside `jit` from a
top-k style selection. Shapes are tiny: interpret mode runs every grid step on the CPU.

Tolerance (float32): summation order only, 1e-5 on values, 2e-5 / 1e-4 on gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import flex

B, L, H, HKV, D = 1, 20, 2, 1, 8
TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=2e-5, rtol=1e-4)


def _qkv(seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (B, L, H, D)), jax.random.normal(ks[1], (B, L, HKV, D)),
          jax.random.normal(ks[2], (B, L, HKV, D)), jax.random.normal(ks[3], (B, L, H, D)))


def _both(options_of):
  """Values and gradients of "reference" and "interpret" in one compiled program; `options_of(q)` may build tables
  inside it."""
  q, k, v, ct = _qkv()

  def run(impl):
    def loss(q, k, v):
      out = flex.flex_attention(q, k, v, implementation=impl, **options_of(q))
      return jnp.sum(out * ct), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  return jax.jit(lambda: (run("reference"), run("interpret")))()


def _check(result):
  ((_, out_r), g_r), ((_, out_k), g_k) = result
  np.testing.assert_allclose(out_k, out_r, **TOL)
  for a, b in zip(g_k, g_r):
    np.testing.assert_allclose(a, b, **GRAD_TOL)


per_head = lambda b, h, i, j: (j <= i) & ((h == 0) | (i - j < 5))  # noqa: E731


@pytest.mark.parametrize("case", ["gqa_window_alibi_padding_dropout", "per_head_softcap"])
def test_interpret_kernels_equal_reference(case):
  key_mask = jnp.arange(L)[None, :] < L - 3
  options = {
      "gqa_window_alibi_padding_dropout": dict(
          mask_mod=lambda b, h, i, j: (j <= i) & (i - j < 9), score_mod=flex.alibi(H), key_mask=key_mask,
          block_size=8, dropout_rate=0.2, dropout_rng=jax.random.key(1)),
      "per_head_softcap": dict(mask_mod=per_head, score_mod=flex.softcap(2.0), block_size=8),
  }[case]
  _check(_both(lambda q: options))


def test_interpret_kernels_with_traced_selection():
  """Key tiles chosen inside the program from the data (top-2 tiles by pooled scores, own tile always in)."""
  tq = -(-L // 8)

  def options_of(q):
    pooled = jnp.pad(q[0, :, 0], ((0, tq * 8 - L), (0, 0))).reshape(tq, 8, D).mean(1)
    scores = pooled @ pooled.T + jnp.where(jnp.eye(tq, dtype=bool), 1e9, 0.0)
    sel = jax.lax.top_k(scores, 2)[1][None, None]  # [1, 1, Tq, 2]
    bm = flex.block_mask_from_indices(sel, q_len=L, kv_len=L, block_size=8)
    return dict(block_mask=bm)

  _check(_both(options_of))


def test_gpu_kernels_under_the_gpu_interpreter():
  """bfloat16 (the Mosaic GPU kernels' dtypes), 64-token tiles, 2 query heads on 1 key/value head, a window mask
  with an overhanging last tile, ALiBi, key padding and dropout. Tolerance: bfloat16 outputs and gradients, 2e-2."""
  from kernels.common import dropout_seed  # noqa: PLC0415
  from kernels.flex.pallas import flex_attention_pallas  # noqa: PLC0415
  length, d = 100, 64
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (1, length, 2, d), jnp.bfloat16)
  k, v = (jax.random.normal(key, (1, length, 1, d), jnp.bfloat16) for key in ks[1:3])
  ct = jax.random.normal(ks[3], q.shape)
  mask = lambda b, h, i, j: (j <= i) & (i - j < 70)  # noqa: E731
  bm = flex.create_block_mask(mask, 1, 2, length, length, 64)
  common = dict(score_mod=flex.alibi(2), key_mask=jnp.arange(length)[None, :] < length - 5, dropout_rate=0.1,
                dropout_seed=dropout_seed(jax.random.key(2)))

  def run(kernel):
    def loss(q, k, v):
      if kernel:
        out = flex_attention_pallas(q, k, v, bm, backend="gpu", interpret=True, **common)
      else:
        out = flex.flex_attention_reference(q, k, v, block_mask=bm, **common)
      return jnp.sum(out.astype(jnp.float32) * ct), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  ((_, want), want_g), ((_, got), got_g) = jax.jit(lambda: (run(False), run(True)))()
  tol = dict(atol=2e-2, rtol=2e-2)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
  for g, w in zip(got_g, want_g):
    assert float(jnp.abs(w.astype(jnp.float32)).max()) > 0.1
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **tol)


def test_each_kernel_call_is_checked_once_by_its_plan_and_not_by_the_driver():
  """Issue 36: flex's entry plans a call once (one `check_supported` per backend) and runs `flex_attention_kernel`,
  which does not check again; softmax's and block-sparse's entries and the ring's block function (given the ring's
  plans) reach flex's kernels the same way. The driver's check is patched to fail; tracing only (`eval_shape`)."""
  from unittest import mock  # noqa: PLC0415

  from kernels import block_sparse, softmax  # noqa: PLC0415
  from kernels.flex import pallas as driver  # noqa: PLC0415
  from kernels.softmax import sequence_parallel as ring  # noqa: PLC0415
  x = jax.ShapeDtypeStruct((1, 16, 2, 8), jnp.float32)
  layout = np.tril(np.ones((1, 2, 2), bool))
  # No mask anywhere (no causal): building a masked block mask would compile its classification, the test's cost.
  full = softmax.pallas.plan(x.shape, x.shape, x.dtype, causal=False, alibi_slopes=None)
  block = ring.pallas_block_fn("tpu", interpret=True, plans={False: full})  # the ring's plans (`block_plans`)
  calls = {
      "softmax": lambda q: softmax.softmax_attention(q, q, q, implementation="interpret"),
      "block_sparse": lambda q: block_sparse.block_sparse_attention(q, q, q, layout, block_size=8, causal=True,
                                                                    implementation="interpret"),
      "ring block": lambda q: block(q, q, q, key_mask=None, causal=False, scale=1.0)[0],
  }
  with mock.patch.object(flex, "check_supported", wraps=flex.check_supported) as checks, \
       mock.patch.object(flex, "plan", wraps=flex.plan) as plans, \
       mock.patch.object(driver, "check_supported", side_effect=AssertionError("the driver re-checked")):
    jax.eval_shape(lambda q: flex.flex_attention(q, q, q, block_size=8, implementation="interpret"), x)
    assert plans.call_count == 1
    assert [c.args[4] for c in checks.call_args_list] == ["tpu", "gpu"]  # one check per backend, in the plan
    for name, call in calls.items():
      assert jax.eval_shape(call, x).shape == x.shape, name
  with pytest.raises(ValueError, match="cannot serve this call"):  # a direct caller's function still checks
    driver.flex_attention_pallas(jnp.ones((1, 16, 2, 8)), jnp.ones((1, 16, 2, 8)), jnp.ones((1, 16, 2, 8)),
                                 flex.create_block_mask(None, 1, 1, 16, 16, (12, 16)), backend="tpu")
