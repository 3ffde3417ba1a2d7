"""Layer-contract checks shared by every variant's tests (DESIGN.md "Attention layers").

Padding and causality are checked by gradients: an output that must not depend on an input has a zero gradient with
respect to it, whatever the values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import attention


def init_layer(name: str, x: jax.Array, **options):
  layer = attention.build(name, **options)
  variables = layer.init({"params": jax.random.key(0), "attention": jax.random.key(1)}, x)
  return layer, variables


def check_shape(name: str, *, batch=2, length=12, features=16, **options):
  x = jax.random.normal(jax.random.key(2), (batch, length, features))
  layer, variables = init_layer(name, x, **options)
  y = layer.apply(variables, x, rngs={"attention": jax.random.key(3)})
  assert y.shape == x.shape


def check_padding_by_gradient(name: str, *, length=12, features=16, num_real=7, **options):
  """d(outputs at real positions) / d(inputs at padded positions) == 0."""
  x = jax.random.normal(jax.random.key(4), (2, length, features))
  mask = jnp.arange(length)[None, :] < jnp.array([[num_real], [length]])
  layer, variables = init_layer(name, x, **options)
  weights = jax.random.normal(jax.random.key(5), x.shape) * mask[..., None]

  def f(x):
    y = layer.apply(variables, x, mask=mask, rngs={"attention": jax.random.key(6)})
    return jnp.sum(y * weights)

  grad = jax.grad(f)(x)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(grad[0, num_real:]), 0.0)
  # The check can fail: real positions do depend on each other.
  assert np.abs(np.asarray(grad[0, :num_real])).sum() > 0


def check_causal_by_gradient(name: str, *, length=10, features=16, **options):
  """d y_t / d x_s == 0 for every s > t (and some position depends on an earlier one)."""
  x = jax.random.normal(jax.random.key(7), (1, length, features))
  layer, variables = init_layer(name, x, causal=True, **options)

  def f(x):
    return layer.apply(variables, x, rngs={"attention": jax.random.key(8)})[0]

  jac = jax.jacrev(f)(x)[:, :, 0]  # [L_out, F_out, L_in, F_in]
  dep = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # [L_out, L_in]
  future = np.triu(np.ones((length, length), bool), k=1)
  np.testing.assert_array_equal(dep[future], 0.0)
  assert np.tril(dep, -1).sum() > 0, "positions should see earlier positions"


def check_decode_equals_parallel(name: str, *, batch=2, length=9, features=16, atol=1e-5, **options):
  """Stepping one position at a time through the cache equals the parallel causal output."""
  x = jax.random.normal(jax.random.key(9), (batch, length, features))
  parallel_layer, variables = init_layer(name, x, causal=True, **options)
  expected = parallel_layer.apply(variables, x)
  decoder = attention.build(name, causal=True, decode=True, **options)
  cache = decoder.init(jax.random.key(0), x)["cache"]
  # Fixed size: the recurrent family's cache must not grow with the sequence (checked by the caller if needed).
  outputs = []
  for t in range(length):
    y_t, mutated = decoder.apply({**variables, "cache": cache}, x[:, t:t + 1], mutable=["cache"])
    cache = mutated["cache"]
    outputs.append(y_t)
  np.testing.assert_allclose(np.concatenate(outputs, axis=1), expected, atol=atol, rtol=1e-5)
