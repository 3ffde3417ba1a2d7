"""kernels.sliding_window: the chunked xla form against the dense reference (values and gradients), padded keys, and
the route each call takes (inputs no longer than the window take the dense path: the module docstring)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.sliding_window import plan, sliding_window_attention, sliding_window_attention_xla

# Longer than the window: the chunked XLA form serves "xla" and None; several chunks, and one window plus one token.
LONG = [(37, 8), (17, 16)]
SHORT = [(16, 16), (5, 8)]  # no longer than the window: every implementation takes the dense path


def _inputs(length):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(key, (2, length, 2, 8)) for key in (k1, k2, k3, k4))
  key_mask = jnp.arange(length)[None, :] < jnp.array([[length], [length - 3]])
  return q, k, v, ct, key_mask


def _value_and_grads(fn, ct):
  def f(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out * ct), out
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))


def _dense(fn, q, k, v, length: int) -> bool:
  """Whether tracing `fn` builds a tensor with two dimensions of the sequence length (the reference's `[L, L]`
  scores; the chunked form's tensors are `[.., chunks, window, 2 or 3 windows]`)."""
  jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
  return any(sum(int(d) == length for d in shape.split(",")) >= 2 for shape in re.findall(r"\[([\d,]+)\]", jaxpr))


def _assert_close(got, want):
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length,window", LONG)
def test_xla_matches_reference(causal, length, window):
  q, k, v, ct, key_mask = _inputs(length)
  call = lambda implementation: lambda q, k, v: sliding_window_attention(  # noqa: E731
      q, k, v, window=window, causal=causal, key_mask=key_mask, implementation=implementation)
  assert _dense(call("reference"), q, k, v, length)
  assert not _dense(call("xla"), q, k, v, length) and not _dense(call(None), q, k, v, length)
  (_, want), want_grads = _value_and_grads(call("reference"), ct)(q, k, v)
  (_, got), got_grads = _value_and_grads(call("xla"), ct)(q, k, v)
  _assert_close((got, *got_grads), (want, *want_grads))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length,window", SHORT)
def test_short_inputs_take_the_dense_path_and_the_chunked_form_still_matches(causal, length, window):
  """The dispatch sends a length <= window to the dense form (one window covers it; the chunked form would pad it to a
  whole window and score two); the chunked form itself, called directly, still equals it there."""
  q, k, v, ct, key_mask = _inputs(length)
  kw = dict(window=window, causal=causal, key_mask=key_mask)
  assert _dense(lambda q, k, v: sliding_window_attention(q, k, v, implementation="xla", **kw), q, k, v, length)
  (_, want), want_grads = _value_and_grads(
      lambda q, k, v: sliding_window_attention(q, k, v, implementation="reference", **kw), ct)(q, k, v)
  (_, got), got_grads = _value_and_grads(lambda q, k, v: sliding_window_attention_xla(q, k, v, **kw), ct)(q, k, v)
  _assert_close((got, *got_grads), (want, *want_grads))


def test_errors():
  x = jnp.ones((1, 8, 1, 4))
  with pytest.raises(ValueError, match="unknown sliding_window_attention implementation 'pallas'"):
    sliding_window_attention(x, x, x, window=2, causal=True, implementation="pallas")
  with pytest.raises(ValueError, match="window must be >= 1, got window=0"):
    sliding_window_attention(x, x, x, window=0, causal=True)


def test_the_plan_names_the_form_and_why():
  x = jnp.ones((1, 8, 1, 4))
  assert plan(x, window=8, causal=True).form == "reference"  # no longer than the window: dense
  assert plan(x, window=3, causal=False).form == "xla"
  assert plan(x, window=3, causal=False, implementation="reference").why == "implementation='reference'"
