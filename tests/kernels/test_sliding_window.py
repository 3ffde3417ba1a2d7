"""kernels.sliding_window: the chunked xla form against the dense reference (values and gradients), padded keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.sliding_window import sliding_window_attention


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length,window", [(37, 8), (16, 16), (5, 8)])
def test_xla_matches_reference(causal, length, window):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(key, (2, length, 2, 8)) for key in (k1, k2, k3, k4))
  key_mask = jnp.arange(length)[None, :] < jnp.array([[length], [length - 3]])

  def loss(implementation):
    def f(q, k, v):
      out = sliding_window_attention(q, k, v, window=window, causal=causal, key_mask=key_mask,
                                     implementation=implementation)
      return jnp.sum(out * ct), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  (_, want), want_grads = loss("reference")(q, k, v)
  (_, got), got_grads = loss("xla")(q, k, v)
  for g, w in zip((got, *got_grads), (want, *want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_errors():
  x = jnp.ones((1, 8, 1, 4))
  with pytest.raises(ValueError, match="unknown sliding_window_attention implementation 'pallas'"):
    sliding_window_attention(x, x, x, window=2, causal=True, implementation="pallas")
  with pytest.raises(ValueError, match="window must be >= 1, got window=0"):
    sliding_window_attention(x, x, x, window=0, causal=True)
