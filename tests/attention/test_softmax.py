"""Softmax attention: values against a plain numpy reference, implementations agree, the layer contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from kernels.softmax import softmax_attention
from tests.attention import contract

# Every implementation accumulates in float32; bfloat16 inputs/outputs round to ~3 significant digits.
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def numpy_attention(q, k, v, key_mask=None, causal=False):
  """Loops-and-numpy softmax attention, independent of the code under test."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, lq, h, d = q.shape
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      s = q[bi, :, hi] @ k[bi, :, hi].T / np.sqrt(d)
      allowed = np.ones_like(s, bool)
      if key_mask is not None:
        allowed &= key_mask[bi][None, :]
      if causal:
        allowed &= np.tril(np.ones_like(s, bool))
      s = np.where(allowed, s, -np.inf)
      p = np.exp(s - s.max(axis=-1, keepdims=True))
      p /= p.sum(axis=-1, keepdims=True)
      out[bi, :, hi] = p @ v[bi, :, hi]
  return out


def _qkv(dtype=jnp.float32, shape=(2, 11, 3, 8)):
  keys = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(k, shape, dtype) for k in keys]


@pytest.mark.parametrize("implementation", ["reference", "xla", None])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_against_numpy(implementation, causal, dtype):
  q, k, v = _qkv(dtype)
  key_mask = np.arange(11)[None, :] < np.array([[8], [11]])
  got = softmax_attention(q, k, v, key_mask=jnp.asarray(key_mask), causal=causal,
                          implementation=implementation)
  want = numpy_attention(q, k, v, key_mask, causal)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), want, **TOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_agree_across_implementations(causal):
  q, k, v = _qkv()
  mask = jnp.arange(11)[None, :] < jnp.array([[6], [11]])
  ct = jax.random.normal(jax.random.key(1), q.shape)

  def loss(impl):
    return lambda q, k, v: jnp.sum(softmax_attention(q, k, v, key_mask=mask, causal=causal, implementation=impl) * ct)

  want = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, **TOL[jnp.float32])


def test_unknown_implementation():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="unknown softmax_attention implementation 'triton'"):
    softmax_attention(q, k, v, implementation="triton")
  with pytest.raises(ValueError, match="unknown softmax implementation"):
    attention.build("softmax", implementation="triton").init(jax.random.key(0), jnp.ones((1, 4, 8)))


def test_layer_matches_numpy_through_its_projections():
  x = jax.random.normal(jax.random.key(3), (2, 7, 16))
  mask = jnp.arange(7)[None, :] < jnp.array([[5], [7]])
  layer, variables = contract.init_layer("softmax", x, num_heads=4, qkv_dim=16, implementation="reference")
  p = variables["params"]
  proj = lambda name: np.einsum("blf,fhd->blhd", x, p[name]["kernel"]) + p[name]["bias"]  # noqa: E731
  y = numpy_attention(proj("query"), proj("key"), proj("value"), np.asarray(mask))
  want = np.einsum("blhd,hdf->blf", y, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(layer.apply(variables, x, mask=mask), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_contract_of_each_implementation(implementation):
  # The contract suite runs the default (None); the explicit implementations are other code paths.
  contract.check_layer("softmax", num_heads=2, implementation=implementation)
  contract.check_causal("softmax", num_heads=2, implementation=implementation)
  contract.check_decode("softmax", num_heads=2, qkv_dim=16, implementation=implementation)


def test_decode_requires_causal_and_single_steps():
  x = jnp.ones((1, 5, 8))
  with pytest.raises(ValueError, match="decode=True requires causal=True"):
    attention.build("softmax", decode=True, num_heads=2).init(jax.random.key(0), x)
  layer = attention.build("softmax", decode=True, causal=True, num_heads=2)
  variables = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="one position per call"):
    layer.apply(variables, x[:, :2], mutable=["cache"])


def test_dropout_needs_rng_and_changes_output():
  x = jax.random.normal(jax.random.key(3), (1, 6, 8))
  layer, variables = contract.init_layer("softmax", x, num_heads=2, dropout_rate=0.5)
  y_eval = jax.jit(lambda x: layer.apply(variables, x))(x)  # compiled: an eager call traces every backend's branch
  y_train = jax.jit(lambda x: layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(4)}))(x)
  assert not np.allclose(y_eval, y_train)
  np.testing.assert_allclose(jax.jit(lambda x: layer.apply(variables, x, deterministic=True))(x), y_eval)


def test_bad_shapes_name_the_values():
  layer = attention.build("softmax", num_heads=3)
  with pytest.raises(ValueError, match="qkv_dim=8 must be a multiple of num_heads=3"):
    layer.init(jax.random.key(0), jnp.ones((1, 4, 8)))
  layer = attention.build("softmax", num_heads=2)
  with pytest.raises(ValueError, match=r"mask must have shape"):
    layer.init(jax.random.key(0), jnp.ones((1, 4, 8)), mask=jnp.ones((1, 5), bool))
