"""Additive (Bahdanau / concat) and multiplicative (Luong dot / general) attention against plain references written
here, values and gradients, each form; ALiBi against an explicit bias; the additive intermediate's memory.

Tolerances: float32 1e-5 (values) and 1e-4 (gradients); the references use the same float32 math in another order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import positions
from tests.attention import contract

B, L, F, H = 2, 7, 12, 2
D = F // H


def _dense(p, x):
  """DenseGeneral F -> [H, D] (kernel [F, H, D], bias [H, D])."""
  return jnp.einsum("blf,fhd->blhd", x, p["kernel"]) + p["bias"]


def reference(name: str, options: dict, params: dict, x, mask, causal: bool, bias=None):
  """The layer written out per score formula: softmax over allowed keys (no chunking, no cache)."""
  q, k, v = (_dense(params[n], x) for n in ("query", "key", "value"))
  form = options.get("form")
  if name == "additive":
    if form == "concat":
      w_q, w_k = params["w_a"][:, :D], params["w_a"][:, D:]
    else:
      w_q, w_k = params["w_a"], params["u_a"]
    qa = jnp.einsum("blhd,hda->blha", q, w_q)
    ka = jnp.einsum("bshd,hda->bsha", k, w_k)
    hidden = jnp.tanh(qa[:, :, None] + ka[:, None])  # [B, L, S, H, A]
    scores = jnp.einsum("blsha,ha->bhls", hidden, params["v_a"])
  elif form == "general":
    scores = jnp.einsum("blhd,hde,bshe->bhls", q, params["w_a"], k)
  else:
    scores = jnp.einsum("blhd,bshd->bhls", q, k)
  if bias is not None:
    scores = scores + bias
  allowed = np.ones((1, 1, L, L), bool) if mask is None else np.asarray(mask)[:, None, None, :]
  if causal:
    allowed = allowed & np.tril(np.ones((L, L), bool))
  weights = jax.nn.softmax(jnp.where(allowed, scores, -1e30), axis=-1)
  y = jnp.einsum("bhls,bshd->blhd", weights, v)
  return jnp.einsum("blhd,hdf->blf", y, params["out"]["kernel"]) + params["out"]["bias"]


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """Tiny layers: compile with few optimizations (as the contract suite)."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


CASES = [("additive", {"form": "bahdanau", "attention_dim": 5, "chunk_size": 3}),
         ("additive", {"form": "concat", "attention_dim": 4, "chunk_size": 2}),
         ("multiplicative", {"form": "dot"}),
         ("multiplicative", {"form": "general"})]


# Every form with padding; causal for one form of each variant (the mask code is shared).
@pytest.mark.parametrize("name,options,causal",
                         [(n, o, False) for n, o in CASES] + [(*CASES[0], True), (*CASES[3], True)], ids=str)
def test_values_and_gradients_match_the_reference(name, options, causal):
  x = jax.random.normal(jax.random.key(0), (B, L, F))
  mask = None if causal else jnp.arange(L)[None] < jnp.array([[5], [L]])
  layer = attention.build(name, num_heads=H, causal=causal, **options)
  variables = layer.init(jax.random.key(1), x)
  cotangent = jax.random.normal(jax.random.key(2), (B, L, F))
  if mask is not None:
    cotangent = cotangent * mask[..., None]  # outputs at padded queries are not specified

  def loss_layer(params, x):
    return jnp.sum(layer.apply({"params": params}, x, mask=mask) * cotangent)

  def loss_ref(params, x):
    return jnp.sum(reference(name, options, params, x, mask, causal) * cotangent)

  got, got_grads = jax.jit(jax.value_and_grad(loss_layer, argnums=(0, 1)))(variables["params"], x)
  want, want_grads = jax.jit(jax.value_and_grad(loss_ref, argnums=(0, 1)))(variables["params"], x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,options", CASES, ids=str)
def test_alibi_equals_an_explicit_bias(name, options):
  x = jax.random.normal(jax.random.key(3), (B, L, F))
  layer = attention.build(name, num_heads=H, causal=True, positions="alibi", **options)
  variables = layer.init(jax.random.key(4), x)
  slopes = np.asarray(positions.alibi_slopes(H))
  i, j = np.arange(L)[:, None], np.arange(L)[None, :]
  bias = -slopes[None, :, None, None] * np.abs(i - j)[None, None]  # written out, not through positions.alibi_bias
  want = reference(name, options, variables["params"], x, None, True, bias=bias)
  np.testing.assert_allclose(layer.apply(variables, x), want, rtol=1e-5, atol=1e-5)
  plain = attention.build(name, num_heads=H, causal=True, **options).apply(variables, x)
  assert not np.allclose(plain, want, atol=1e-3), "the bias should change the output"


def test_alibi_slopes_are_the_papers():
  np.testing.assert_allclose(positions.alibi_slopes(8), [2.0 ** -(h + 1) for h in range(8)])
  np.testing.assert_allclose(positions.alibi_slopes(4), [2.0 ** (-2 * (h + 1)) for h in range(4)])
  # Not a power of two: the 4 slopes of n=4, then every other slope of n=8.
  np.testing.assert_allclose(positions.alibi_slopes(6), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1,
                                                         2.0 ** -3])


@pytest.mark.parametrize("name,options", [CASES[0], CASES[2]], ids=str)
def test_decode_with_alibi_equals_parallel(name, options):
  contract.check_decode_equals_parallel(name, num_heads=H, positions="alibi", **options)


def test_chunk_size_does_not_change_values():
  x = jax.random.normal(jax.random.key(5), (B, L, F))
  layer = attention.build("additive", num_heads=H, chunk_size=1)
  variables = layer.init(jax.random.key(6), x)
  whole = jax.jit(attention.build("additive", num_heads=H, chunk_size=1000).apply)(variables, x)
  np.testing.assert_allclose(jax.jit(layer.apply)(variables, x), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,options", [("additive", {}), ("multiplicative", {"form": "general"})])
def test_rope_is_refused_naming_both(name, options):
  with pytest.raises(ValueError, match=f"attention {name} cannot take pos_encoding='rope'"):
    attention.build(name, num_heads=H, positions="rope", **options)  # the gate refuses it when the layer is built


def test_bfloat16_follows_float32():
  x = jax.random.normal(jax.random.key(7), (B, L, F))
  for name, options in (CASES[0], CASES[3]):
    layer = attention.build(name, num_heads=H, **options)
    variables = layer.init(jax.random.key(8), x)
    y32 = jax.jit(layer.apply)(variables, x)
    y16 = jax.jit(attention.build(name, num_heads=H, dtype="bfloat16", **options).apply)(variables,
                                                                                       x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.1, rtol=0.1)


def test_additive_layer_at_4k_never_holds_the_whole_intermediate():
  """Compiled memory of value-and-grad at 4,096 tokens stays far below the [L, S, A] intermediate (2 GiB here)."""
  length, features, dim = 4096, 16, 32
  layer = attention.build("additive", num_heads=1, attention_dim=dim, chunk_size=128)
  x = jax.ShapeDtypeStruct((1, length, features), jnp.float32)
  variables = jax.eval_shape(layer.init, jax.random.key(0), x)

  def loss(variables, x):
    return jnp.sum(layer.apply(variables, x))

  whole = length * length * dim * 4
  jax.config.update("jax_disable_most_optimizations", False)  # the memory a real step would have
  try:
    compiled = jax.jit(jax.value_and_grad(loss)).lower(variables, x).compile()
  finally:
    jax.config.update("jax_disable_most_optimizations", True)
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < whole / 4, f"{temp / 2**20:.0f} MiB of temporaries vs {whole / 2**20:.0f} MiB for the intermediate"
