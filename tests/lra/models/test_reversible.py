"""Reversible encoder: the recomputing custom VJP gives the gradients of plain autodiff, and activation memory does
not grow with depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lra.models import Encoder, ReversibleBlocks

# Softmax with attention dropout: the recomputation must replay the same dropout and attention keys, the part a
# variant could get wrong (linear attention draws none; its layer inside the stack: the bfloat16 test below).
ATTENTIONS = [{"name": "softmax"}]


def _blocks(attention, num_layers=2, recompute=True, dropout=0.1):
  return ReversibleBlocks(attention_per_layer=(attention,) * num_layers, num_heads=2, qkv_dim=16, mlp_dim=32,
                          dropout_rate=dropout, attention_dropout_rate=dropout, recompute=recompute)


@pytest.mark.parametrize("attention", ATTENTIONS, ids=lambda a: a["name"])
def test_recomputed_gradients_equal_plain_autodiff(attention):
  x = jax.random.normal(jax.random.key(0), (2, 9, 16))
  mask = jnp.arange(9)[None, :] < jnp.array([[6], [9]])
  params = _blocks(attention).init(jax.random.key(1), x, mask, True)["params"]
  rngs = {"dropout": jax.random.key(2), "attention": jax.random.key(3)}

  def loss(recompute):
    def f(params, x):
      y = _blocks(attention, recompute=recompute).apply({"params": params}, x, mask, False, rngs=rngs)
      return jnp.sum(jnp.sin(y))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

  (v1, (gp1, gx1)), (v2, (gp2, gx2)) = loss(True)(params, x), loss(False)(params, x)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  np.testing.assert_allclose(gx1, gx2, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), gp1, gp2)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(gp1)) > 0


def test_encoder_option_trains_and_keeps_padding_contract():
  kw = dict(vocab_size=20, max_length=16, emb_dim=16, num_layers=2, num_heads=2, qkv_dim=16, mlp_dim=32,
            reversible=True, pooling="mean")
  model = Encoder(**kw)
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 1, 20)
  mask = jnp.arange(10)[None, :] < jnp.array([[6], [10]])
  variables = model.init(jax.random.key(1), tokens, mask)
  other = jnp.where(mask, tokens, 3)
  np.testing.assert_allclose(model.apply(variables, tokens, mask), model.apply(variables, other, mask), atol=1e-6)


def test_variants_with_extra_collections_are_rejected():
  x = jnp.ones((1, 4, 16))
  with pytest.raises(ValueError, match="only variables are params.*attention_state"):
    _blocks({"name": "performer", "num_features": 8}).init(jax.random.key(0), x, jnp.ones((1, 4), bool), True)


def _temp_bytes(num_layers, reversible):
  # Small enough to compile in about a second per depth, large enough that activations dominate the temporaries.
  model = Encoder(vocab_size=20, max_length=128, emb_dim=32, num_layers=num_layers, num_heads=2, qkv_dim=32,
                  mlp_dim=128, dropout_rate=0.0, attention_dropout_rate=0.0, reversible=reversible, pooling="mean")
  tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32)
  params = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]

  def loss(p, t):
    return jnp.sum(model.apply({"params": p}, t) ** 2)

  analysis = jax.jit(jax.grad(loss)).lower(params, tokens).compile().memory_analysis()
  # Temporaries minus the parameter-gradient output (which grows with depth in any model).
  return analysis.temp_size_in_bytes


def test_activation_memory_grows_less_than_linearly_with_depth():
  # Three times the depth: a reversible stack keeps about the same temporaries (1.07x here), a plain one 2.4x.
  rev_growth = _temp_bytes(3, True) / _temp_bytes(1, True)
  plain_growth = _temp_bytes(3, False) / _temp_bytes(1, False)
  assert rev_growth < 1.5, rev_growth
  assert plain_growth > 2.0, plain_growth


def test_listops_training_with_reversible_encoder(data_cache, tmp_path):
  from lra.training import train_and_evaluate  # pylint: disable=import-outside-toplevel
  from lra.training.metric_writers import read_metrics  # pylint: disable=import-outside-toplevel
  from tests.conftest import tiny_listops_config  # pylint: disable=import-outside-toplevel
  config = tiny_listops_config(data_cache, num_steps=20, learning_rate=0.02, log_every_steps=5,
                               eval_every_steps=20, checkpoint_every_steps=20)
  config.model.reversible = True
  config.model.dropout_rate = 0.1
  train_and_evaluate(config, tmp_path)
  losses = [r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert losses[-1] < losses[0] - 0.05, losses


def test_bfloat16_reversible_stack_is_finite_with_float32_params():
  x = jax.random.normal(jax.random.key(0), (2, 9, 16)).astype(jnp.bfloat16)
  mask = jnp.arange(9)[None, :] < jnp.array([[6], [9]])
  blocks = ReversibleBlocks(attention_per_layer=({"name": "linear"},) * 2, num_heads=2, qkv_dim=16, mlp_dim=32,
                            dropout_rate=0.0, attention_dropout_rate=0.0, dtype=jnp.bfloat16)
  params = blocks.init(jax.random.key(1), x, mask, True)["params"]
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  loss = lambda p: jnp.sum(blocks.apply({"params": p}, x, mask, True).astype(jnp.float32) ** 2)  # noqa: E731
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert blocks.apply({"params": params}, x, mask, True).dtype == jnp.bfloat16
  assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
