"""Orthogonal random features without LAPACK: orthogonality, norms, the Haar distribution, the softmax-kernel estimate,
and no custom calls in the compiled draw (the batched LAPACK QR deadlocked XLA:CPU's intra-op pool)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from attention import random_features
from attention.performer import gaussian_orthogonal_random_matrix, softmax_features


def _qr_rows(gaussian_NxDxD: np.ndarray) -> np.ndarray:
  """Reference outside jit: rows of Q^T from numpy's QR of each transpose, signs fixed so diag(R) > 0 (Haar)."""
  out = []
  for g in gaussian_NxDxD.astype(np.float64):
    q, r = np.linalg.qr(g.T)
    out.append((q * np.sign(np.diag(r))).T)
  return np.stack(out)


@pytest.mark.parametrize("dim", [3, 16, 64, 256])
def test_rows_are_orthonormal_and_match_qr(dim):
  gaussian = jax.random.normal(jax.random.key(dim), (2, dim, dim))
  rows = np.asarray(jax.jit(random_features.orthonormalize_rows)(gaussian), np.float64)
  for block in rows:
    np.testing.assert_allclose(block @ block.T, np.eye(dim), atol=5e-6 * np.sqrt(dim))
  # The same rows as the sign-fixed QR of the same matrices: Gram-Schmidt is that factorization.
  np.testing.assert_allclose(rows, _qr_rows(np.asarray(gaussian)), atol=2e-4 * np.sqrt(dim))


def test_fewer_rows_than_dim_and_errors():
  x = jax.random.normal(jax.random.key(0), (5, 8))
  rows = np.asarray(random_features.orthonormalize_rows(x))
  np.testing.assert_allclose(rows @ rows.T, np.eye(5), atol=1e-5)
  with pytest.raises(ValueError, match="num_rows=9"):
    random_features.orthonormalize_rows(jnp.ones((9, 8)))
  with pytest.raises(ValueError, match="num_features=0"):
    random_features.orthogonal_random_matrix(jax.random.key(0), 0, 8)


def test_projection_blocks_orthogonal_with_chi_norms():
  dim, num_features = 16, 40  # two full blocks and a truncated third
  draw = jax.jit(lambda k: gaussian_orthogonal_random_matrix(k, num_features, dim))
  w = np.asarray(draw(jax.random.key(1)), np.float64)
  assert w.shape == (num_features, dim)
  for lo in range(0, num_features, dim):
    block = w[lo:lo + dim]
    gram = block @ block.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4 * dim)
  # Row lengths are chi(dim): compare many draws' squared norms with chi2(dim).
  sq_norms = np.concatenate([np.sum(np.asarray(draw(jax.random.key(s))) ** 2, axis=1) for s in range(50)])
  assert scipy.stats.kstest(sq_norms, scipy.stats.chi2(dim).cdf).pvalue > 1e-3
  # Not the same lengths for every row (the sqrt(dim) scaling): the chi draw is kept.
  assert np.std(sq_norms) > 0.3 * np.sqrt(2 * dim)


def test_iid_path_is_gaussian():
  w = np.asarray(gaussian_orthogonal_random_matrix(jax.random.key(3), 4096, 8, orthogonal=False))
  assert scipy.stats.kstest(w.ravel(), "norm").pvalue > 1e-3
  assert abs(np.mean(w[:, 0] * w[:, 1])) < 0.05  # no orthogonality imposed


def test_distribution_agrees_with_haar_reference():
  """Statistics of many draws against the QR reference on independent Gaussians: entries and traces."""
  dim, draws = 6, 400
  keys = jax.random.split(jax.random.key(7), 2)
  ours = np.asarray(jax.jit(random_features.orthonormalize_rows)(jax.random.normal(keys[0], (draws, dim, dim))))
  reference = _qr_rows(np.asarray(jax.random.normal(keys[1], (draws, dim, dim))))
  # Each entry of a Haar matrix, times sqrt(dim), has the same law; E[q^2] = 1/dim; E[tr Q] = 0, E[tr(Q)^2] = 1.
  assert scipy.stats.ks_2samp(ours[:, 0, :].ravel(), reference[:, 0, :].ravel()).pvalue > 1e-3
  assert scipy.stats.ks_2samp(ours[:, -1, :].ravel(), reference[:, -1, :].ravel()).pvalue > 1e-3
  np.testing.assert_allclose(np.mean(ours ** 2), 1 / dim, rtol=1e-5)
  traces = np.trace(ours, axis1=1, axis2=2)
  assert abs(np.mean(traces)) < 4 / np.sqrt(draws)
  assert abs(np.mean(traces ** 2) - 1.0) < 0.3
  assert scipy.stats.ks_2samp(traces, np.trace(reference, axis1=1, axis2=2)).pvalue > 1e-3


def test_features_estimate_the_softmax_kernel():
  """E[phi(q)·phi(k)] = exp(q·k / sqrt(d)): unshifted positive features of each block of `d` orthogonal rows (and of
  each group of `d` iid rows) estimate the kernel without bias; orthogonal blocks have the smaller mean squared error
  (the point of drawing them)."""
  dim, blocks = 8, 80
  q, k = 0.6 * jax.random.normal(jax.random.key(11), (2, 1, 12, 1, dim))
  exact = np.exp(np.einsum("bld,bld->bl", q[:, :, 0], k[:, :, 0]) / np.sqrt(dim))[0]

  def estimates(orthogonal):
    w = gaussian_orthogonal_random_matrix(jax.random.key(int(orthogonal)), blocks * dim, dim, orthogonal)
    products = np.asarray(softmax_features(q, w, is_query=False) * softmax_features(k, w, is_query=False))[0, :, 0]
    # Features are scaled by 1/sqrt(M): M * products are the per-feature terms; average them per block of dim.
    return (blocks * dim * products).reshape(len(exact), blocks, dim).mean(axis=-1).T  # [blocks, pairs]

  orth, iid = estimates(True), estimates(False)
  for est in (orth, iid):  # unbiased: the mean over blocks is within 4 standard errors of the exact kernel
    standard_error = est.std(axis=0) / np.sqrt(blocks)
    assert np.all(np.abs(est.mean(axis=0) - exact) < 4 * standard_error + 1e-3), (est.mean(axis=0), exact)
  assert np.mean(np.abs(orth.mean(axis=0) / exact - 1)) < 0.1
  assert np.mean((orth - exact) ** 2) < np.mean((iid - exact) ** 2)


def test_compiled_draw_and_performer_step_have_no_custom_calls():
  draw = jax.jit(lambda key: gaussian_orthogonal_random_matrix(key, 48, 16))
  assert "custom_call_target" not in draw.lower(jax.random.key(0)).compile().as_text()

  import attention  # pylint: disable=g-import-not-at-top
  layer = attention.build("performer", num_heads=2, qkv_dim=16, num_features=24, feature_redraw_interval=1)
  x = jnp.ones((2, 8, 16))
  variables = layer.init(jax.random.key(0), x)

  def step(variables, key):
    def loss(params):
      y, state = layer.apply({**variables, "params": params}, x, deterministic=False, rngs={"attention": key},
                             mutable=["attention_state"])
      return jnp.sum(y ** 2), state
    return jax.grad(loss, has_aux=True)(variables["params"])

  hlo = jax.jit(step).lower(variables, jax.random.key(1)).compile().as_text()
  assert "custom_call_target" not in hlo, [line for line in hlo.splitlines() if "custom_call_target" in line][:3]
