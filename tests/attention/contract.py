"""Layer-contract checks shared by every variant's tests (docs/architecture.md, "Attention layers").

Padding and causality are checked by gradients: an output that must not depend on an input has a zero gradient with
respect to it, whatever the values. Every check jits what it differentiates: op-by-op execution of the larger layers
is slower than compiling them once. `tests/attention/test_contract.py` runs these checks on every registered variant.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import attention

RNGS = {"params": jax.random.key(0), "attention": jax.random.key(1)}


def init_layer(name: str, x: jax.Array, **options):
  layer = attention.build(name, **options)
  variables = jax.jit(layer.init)(RNGS, x)
  return layer, variables


def _apply(layer, variables, x, **kwargs):
  return layer.apply(variables, x, rngs={"attention": jax.random.key(3)}, **kwargs)


def check_shape(name: str, *, batch=2, length=12, features=16, **options):
  x = jax.random.normal(jax.random.key(2), (batch, length, features))
  layer, variables = init_layer(name, x, **options)
  y = jax.jit(lambda v, x: _apply(layer, v, x))(variables, x)
  assert y.shape == x.shape


def check_padding_by_gradient(name: str, *, length=12, features=16, num_real=7, **options):
  """d(outputs at real positions) / d(inputs at padded positions) == 0."""
  x = jax.random.normal(jax.random.key(4), (2, length, features))
  mask = jnp.arange(length)[None, :] < jnp.array([[num_real], [length]])
  layer, variables = init_layer(name, x, **options)
  weights = jax.random.normal(jax.random.key(5), x.shape) * mask[..., None]

  def f(x):
    return jnp.sum(_apply(layer, variables, x, mask=mask) * weights)

  grad = jax.jit(jax.grad(f))(x)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(grad[0, num_real:]), 0.0)
  # The check can fail: real positions do depend on each other.
  assert np.abs(np.asarray(grad[0, :num_real])).sum() > 0


def check_causal_by_gradient(name: str, *, length=10, features=16, **options):
  """d y_t / d x_s == 0 for every s > t (and some position depends on an earlier one)."""
  x = jax.random.normal(jax.random.key(7), (1, length, features))
  layer, variables = init_layer(name, x, causal=True, **options)

  def f(x):
    return _apply(layer, variables, x)[0].astype(jnp.float32)

  jac = jax.jit(jax.jacrev(f))(x)[:, :, 0]  # [L_out, F_out, L_in, F_in]
  dep = np.abs(np.asarray(jac)).sum(axis=(1, 3))  # [L_out, L_in]
  future = np.triu(np.ones((length, length), bool), k=1)
  np.testing.assert_array_equal(dep[future], 0.0)
  assert np.tril(dep, -1).sum() > 0, "positions should see earlier positions"


def check_not_causal_raises(name: str, *, length=8, features=16, **options):
  """A variant that cannot be causal says so (and why) instead of silently attending to the future."""
  try:
    init_layer(name, jnp.ones((1, length, features)), causal=True, **options)
  except ValueError as e:
    assert "cannot be causal" in str(e), str(e)
  else:
    raise AssertionError(f"{name} declares supports_causal=False but builds with causal=True")


def decode_steps(name: str, variables, x: jax.Array, **options) -> jax.Array:
  """Steps a `decode=True` layer through `x` one position at a time (one jitted step) and joins the outputs."""
  decoder = attention.build(name, causal=True, decode=True, **options)
  cache = jax.jit(decoder.init)(jax.random.key(0), x)["cache"]
  step = jax.jit(lambda cache, x_t: decoder.apply({**variables, "cache": cache}, x_t, mutable=["cache"]))
  outputs = []
  for t in range(x.shape[1]):
    y_t, mutated = step(cache, x[:, t:t + 1])
    cache = mutated["cache"]
    outputs.append(y_t)
  return jnp.concatenate(outputs, axis=1)


def check_decode_equals_parallel(name: str, *, batch=2, length=9, features=16, atol=1e-5, **options):
  """Stepping one position at a time through the cache equals the parallel causal output."""
  x = jax.random.normal(jax.random.key(9), (batch, length, features))
  parallel_layer, variables = init_layer(name, x, causal=True, **options)
  expected = jax.jit(parallel_layer.apply)(variables, x)
  np.testing.assert_allclose(decode_steps(name, variables, x, **options), expected, atol=atol, rtol=1e-5)


def cache_size(name: str, length: int, *, features=16, **options) -> int:
  """Number of elements in the decode cache `init` allocates for a sequence of `length` (shapes only)."""
  decoder = attention.build(name, causal=True, decode=True, **options)
  cache = jax.eval_shape(decoder.init, jax.random.key(0), jnp.ones((1, length, features)))["cache"]
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(cache))


def check_fixed_size_cache(name: str, **options):
  sizes = [cache_size(name, length, **options) for length in (8, 64)]
  assert sizes[0] == sizes[1], f"{name}'s decode cache grows with the sequence: {sizes} elements at lengths 8, 64"


def check_no_decode_raises(name: str, *, length=8, features=16, **options):
  try:
    init_layer(name, jnp.ones((1, length, features)), causal=True, decode=True, **options)
  except ValueError as e:
    assert "decode" in str(e), str(e)
  else:
    raise AssertionError(f"{name} declares supports_decode=False but builds with decode=True")


# Options that do not change a layer's parameters: one initialization serves every check of a configuration.
_PARAMETER_FREE = ("causal", "decode", "dropout_rate", "dtype")
SHARED_LENGTH = 12  # the longest input of the checks below (length-dependent parameters are sized at init)


@functools.lru_cache(maxsize=None)
def _shared_variables(name: str, frozen_options: tuple, features: int):
  layer = attention.build(name, **dict(frozen_options))
  return jax.jit(layer.init)(RNGS, jax.random.normal(jax.random.key(2), (2, SHARED_LENGTH, features)))


def shared_variables(name: str, features: int = 16, **options):
  """The variables of `name(**options)` initialized once per process (on `[2, SHARED_LENGTH, features]`)."""
  kept = tuple(sorted((k, v) for k, v in options.items() if k not in _PARAMETER_FREE))
  return _shared_variables(name, kept, features)


def check_layer(name: str, *, length=11, features=16, num_real=6, dropout_rate=0.1, **options):
  """One compiled training-mode forward and backward under jit: the output shape, padding by gradients (d(real
  outputs) / d(padded inputs) == 0, with attention dropout on), and finite gradients that reach the parameters."""
  x = jax.random.normal(jax.random.key(4), (2, length, features))
  mask = jnp.arange(length)[None, :] < jnp.array([[num_real], [length]])
  layer = attention.build(name, dropout_rate=dropout_rate, **options)
  variables = shared_variables(name, features, **options)
  weights = jax.random.normal(jax.random.key(5), x.shape) * mask[..., None]

  @jax.jit
  @functools.partial(jax.value_and_grad, argnums=(0, 1), has_aux=True)
  def f(params, x):
    y = layer.apply({**variables, "params": params}, x, mask=mask, deterministic=False,
                    rngs={"attention": jax.random.key(1), "dropout": jax.random.key(2)},
                    mutable=[c for c in variables if c != "params"])[0]
    return jnp.sum(y.astype(jnp.float32) * weights), y

  (value, y), (grad_params, grad_x) = f(variables["params"], x)
  assert y.shape == x.shape, f"{name}: output shape {y.shape} != input shape {x.shape}"
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad_params)) and np.all(np.isfinite(grad_x))
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grad_params)) > 0, "no gradient reaches the parameters"
  np.testing.assert_array_equal(np.asarray(grad_x[0, num_real:]), 0.0,
                                err_msg=f"{name}: real outputs depend on padded inputs")
  assert np.abs(np.asarray(grad_x[0, :num_real])).sum() > 0, "real positions should depend on each other"


def check_causal(name: str, *, length=9, features=16, **options):
  """d y_t / d x_s == 0 for every s > t (and some position depends on an earlier one), on the shared parameters."""
  x = jax.random.normal(jax.random.key(7), (1, length, features))
  layer = attention.build(name, causal=True, **options)
  variables = shared_variables(name, features, **options)
  f = lambda x: _apply(layer, variables, x)[0].astype(jnp.float32)  # noqa: E731
  dep = np.abs(np.asarray(jax.jit(jax.jacrev(f))(x)[:, :, 0])).sum(axis=(1, 3))  # [L_out, L_in]
  future = np.triu(np.ones((length, length), bool), k=1)
  np.testing.assert_array_equal(dep[future], 0.0, err_msg=f"{name}: causal outputs depend on later inputs")
  assert np.tril(dep, -1).sum() > 0, "positions should see earlier positions"


def check_decode(name: str, *, batch=2, length=7, features=16, atol=2e-5, **options):
  """Decoding step by step equals the parallel causal output of the same parameters."""
  x = jax.random.normal(jax.random.key(9), (batch, length, features))
  decoder = attention.build(name, causal=True, decode=True, **options)
  parallel = attention.build(name, causal=True, **options)
  variables = shared_variables(name, features, **options)

  @jax.jit
  def prepare(x):  # the parallel output, and the empty cache the decoder allocates for this length
    return parallel.apply(variables, x), decoder.apply(variables, x, mutable=["cache"])[1]["cache"]

  expected, cache = prepare(x)
  step = jax.jit(lambda cache, x_t: decoder.apply({**variables, "cache": cache}, x_t, mutable=["cache"]))
  outputs = []
  for t in range(length):
    y_t, mutated = step(cache, x[:, t:t + 1])
    cache = mutated["cache"]
    outputs.append(y_t)
  np.testing.assert_allclose(np.concatenate(outputs, axis=1), expected, atol=atol, rtol=1e-5,
                             err_msg=f"{name}: decoding differs from the parallel causal output")


def check_bfloat16(name: str, *, length=12, features=16, **options):
  """`dtype="bfloat16"`: the float32 parameter tree, a bfloat16 output that is finite and near the float32 output."""
  x = jax.random.normal(jax.random.key(10), (2, length, features))
  mask = jnp.arange(length)[None, :] < jnp.array([[length - 4], [length]])
  layer32, layer16 = attention.build(name, **options), attention.build(name, dtype="bfloat16", **options)
  variables = shared_variables(name, features, **options)
  shapes16 = jax.eval_shape(layer16.init, RNGS, x.astype(jnp.bfloat16))
  assert jax.tree.structure(shapes16) == jax.tree.structure(variables)
  assert {p.dtype for p in jax.tree.leaves(shapes16["params"])} == {jnp.dtype(jnp.float32)}

  @jax.jit
  def run(x):
    y16 = _apply(layer16, variables, x.astype(jnp.bfloat16), mask=mask)
    return y16, _apply(layer32, variables, x, mask=mask)

  y16, y32 = run(x)
  assert y16.dtype == jnp.bfloat16, f"{name} with dtype='bfloat16' returned {y16.dtype}"
  y16, y32 = np.asarray(y16, np.float32), np.asarray(y32)
  assert np.all(np.isfinite(y16))
  error = np.abs(y16 - y32).mean() / (np.abs(y32).mean() + 1e-6)
  assert error < 0.1, f"{name}: bfloat16 output is {error:.3f} (mean relative) away from float32"
