"""The sparse variants (local, sparse_transformer, longformer, bigbird): layer contract, the attended pattern equals
the layout, non-causal variants refuse causal=True, option errors, and a short ListOps run lowers the loss."""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import sparse_layouts
from configs import common
from kernels.block_sparse import block_sparse_attention, expand_layout
from lra.training import train_and_evaluate
from lra.training.metric_writers import read_metrics
from tests.attention import contract
from tests.attention.test_sparse_layouts import (old_bigbird_layout, old_default_stride, old_fixed_layout,
                                                 old_local_layout, old_longformer_layout, old_strided_layout)
from tests.conftest import tiny_listops_config

SPARSE = ("bigbird", "local", "longformer", "sparse_transformer")


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """Tiny programs: XLA's optimizer costs more than running them (as in the contract suite)."""
  try:
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
  except (AttributeError, KeyError, ValueError):
    yield
    return
  yield
  jax.config.update("jax_disable_most_optimizations", previous)

def test_longformer_with_global_blocks_cannot_be_causal_and_says_why():
  with pytest.raises(ValueError, match="cannot be causal.*global tokens see and are seen by every position"):
    contract.init_layer("longformer", jnp.ones((1, 8, 16)), causal=True, num_heads=2, block_size=4, window=1,
                        num_global_blocks=1)


# The contract suite (tests/attention/test_contract.py, whose OPTIONS run local at block 5 / window 3,
# sparse_transformer strided at block 2 / stride 3, longformer with a global block and bigbird at block 5 through its
# padding, causality, dropout, decode and bfloat16 checks on the default implementation) does not run Longformer's
# dilated causal heads or the "fixed" pattern: their causality is checked exactly here (the padding path, the key mask
# beside the mask function, is the same `BlockSparseAttention.__call__` for every pattern).
@pytest.mark.parametrize("name,options", [
    ("local", dict(block_size=3, window=3)),
    ("sparse_transformer", dict(pattern="fixed", block_size=2, stride=3, c=1, causal=True)),
    ("longformer", dict(block_size=2, window=3, num_global_blocks=1, dilation=2, num_dilated_heads=1)),
    ("longformer", dict(block_size=2, window=3, num_global_blocks=0, dilation=2, num_dilated_heads=1, causal=True)),
    ("bigbird", dict(block_size=2, window=1, num_global_blocks=1, num_random_blocks=2)),
])
def test_outputs_depend_exactly_on_the_layout(name, options):
  """d y_i / d x_j != 0 exactly where some head's token-level layout (and causality) lets i see j.

  On flex's XLA form (the same mask function the kernels read; the default dispatch traces the GPU and TPU kernels
  too, forward and backward, 4x the time: the contract suite runs it, tests/kernels compares the forms)."""
  length, block = 13, options["block_size"]  # 13 is not a multiple of any block size used here
  x = jax.random.normal(jax.random.key(0), (1, length, 8))
  layer, variables = contract.init_layer(name, x, num_heads=2, implementation="xla", **options)
  jac = jax.jit(jax.jacrev(lambda x: layer.apply(variables, x)[0]))(x)  # [L, F, 1, L, F]
  dep = np.abs(np.asarray(jac[:, :, 0])).sum(axis=(1, 3)) > 0
  num_blocks = -(-length // block)
  allowed = expand_layout(layer.bind(variables).layout(num_blocks), block).any(axis=0)[:length, :length]
  if options.get("causal"):
    allowed &= np.tril(np.ones((length, length), bool))
  np.testing.assert_array_equal(dep, allowed)
  assert not allowed.all(), "the pattern should be sparse at this size"


@pytest.mark.parametrize("name", SPARSE)
def test_xla_equals_reference(name):
  x = jax.random.normal(jax.random.key(1), (2, 13, 8))
  mask = jnp.arange(13)[None, :] < jnp.array([[9], [13]])
  options = dict(num_heads=2, block_size=3)
  layer, variables = contract.init_layer(name, x, implementation="xla", **options)
  reference = attention.build(name, implementation="reference", **options)
  got = jax.jit(lambda x: layer.apply(variables, x, mask=mask))(x)
  want = jax.jit(lambda x: reference.apply(variables, x, mask=mask))(x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_dropout_applies_to_the_weights_in_training_only():
  x = jax.random.normal(jax.random.key(3), (1, 8, 8))
  layer, variables = contract.init_layer("local", x, num_heads=2, block_size=4, dropout_rate=0.5,
                                         implementation="xla")
  run = jax.jit(lambda x, deterministic: layer.apply(variables, x, deterministic=deterministic,
                                                      rngs={"dropout": jax.random.key(4)}), static_argnums=1)
  evaluation = run(x, True)
  assert not np.allclose(evaluation, run(x, False))
  np.testing.assert_array_equal(evaluation, layer.apply(variables, x))  # evaluation needs no dropout key


def _bigbird_layout_at(name: str, seed: int = 0) -> np.ndarray:
  """The 16-block layout of a BigBird layer named `name` inside a parent module."""
  class Parent(nn.Module):
    @nn.compact
    def __call__(self, x):
      child = attention.build("bigbird", num_heads=2, block_size=2, seed=seed, implementation="xla", name=name)
      child(x)
      return child.layout(16)

  return Parent().init_with_output(jax.random.key(0), jnp.ones((1, 4, 8)))[0]


def test_bigbird_random_blocks_are_fixed_per_layer_and_differ_between_layers():
  first = _bigbird_layout_at("block_0")
  np.testing.assert_array_equal(first, _bigbird_layout_at("block_0"))
  assert not np.array_equal(first, _bigbird_layout_at("block_1"))
  assert not np.array_equal(first, _bigbird_layout_at("block_0", seed=1))


@pytest.mark.parametrize("name,options,match", [
    ("sparse_transformer", dict(pattern="dilated"),
     r"unknown pattern 'dilated'; valid choices: \('strided', 'fixed'\)"),
    ("local", dict(window=2), "window must be odd"),
    ("local", dict(block_size=0), "block_size must be >= 1, got block_size=0"),
    ("local", dict(implementation="pallas"), "implementation=.pallas. cannot run on .*no Pallas kernel"),
    ("local", dict(implementation="triton"), "unknown implementation 'triton'"),
    ("longformer", dict(dilation=2, num_dilated_heads=3), r"num_dilated_heads must be in \[0, 2\] with num_heads=2"),
])
def test_option_errors_name_the_values(name, options, match):
  with pytest.raises(ValueError, match=match):
    contract.init_layer(name, jnp.ones((1, 8, 16)), num_heads=2, **options)


@pytest.mark.parametrize("name", SPARSE)
def test_attention_config_has_typed_defaults(name):
  config = common.attention_config(name)
  assert config.name == name
  for key, value in config.items():
    assert value is not None or key == "implementation", (name, key)
  attention.build(name, **{k: v for k, v in config.to_dict().items() if k != "name"})


def test_listops_training_lowers_the_loss(data_cache, tmp_path):
  """One sparse variant through the trainer: the four share `BlockSparseAttention.__call__` and differ only in their
  mask function (each checked exactly by `test_outputs_depend_exactly_on_the_layout`, built from its typed config by
  `test_attention_config_has_typed_defaults`). BigBird: its random blocks come from the layer's path in the model.
  Small blocks so that a 48-token ListOps sequence really is sparse."""
  config = tiny_listops_config(data_cache, num_steps=20, learning_rate=0.02, log_every_steps=5,
                               eval_every_steps=1000, checkpoint_every_steps=1000, num_eval_batches=1)
  config.model.attention = common.attention_config("bigbird", block_size=8, window=1, num_global_blocks=1,
                                                   num_random_blocks=1)
  train_and_evaluate(config, tmp_path)
  losses = [r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"]
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses


def test_sparse_transformer_stride_defaults_to_the_square_root_of_the_blocks():
  layer = attention.build("sparse_transformer", num_heads=2, block_size=4)
  np.testing.assert_array_equal(layer.layout(64), sparse_layouts.strided_layout(64, stride=8, causal=False))
  set_stride = attention.build("sparse_transformer", num_heads=2, block_size=4, stride=3, causal=True)
  np.testing.assert_array_equal(set_stride.layout(64), sparse_layouts.strided_layout(64, stride=3, causal=True))
  fixed = attention.build("sparse_transformer", num_heads=2, block_size=4, pattern="fixed", c=2)
  np.testing.assert_array_equal(fixed.layout(100), sparse_layouts.fixed_layout(100, stride=10, c=2, causal=False))


# ---- the variants on flex equal today's block-sparse layers (issue 33: the old layouts are the oracle) ---------------

ORACLE_LAYERS = [  # 13 tokens: a partial last block for every block size here; each variant once, causal where it can
    ("local", dict(block_size=4, window=2), True, lambda n: old_local_layout(n, window=2, causal=True)),
    ("sparse_transformer", dict(pattern="strided", block_size=2), True,
     lambda n: old_strided_layout(n, stride=old_default_stride(n))),
    ("sparse_transformer", dict(pattern="fixed", block_size=2, stride=3, c=1), False,
     lambda n: old_fixed_layout(n, stride=3, c=1, causal=False)),
    ("longformer", dict(block_size=2, window=3, num_global_blocks=1, dilation=2, num_dilated_heads=1), False,
     lambda n: old_longformer_layout(n, window=3, num_global_blocks=1, dilation=[1, 2])),
    ("bigbird", dict(block_size=2, window=1, num_global_blocks=1, num_random_blocks=2, seed=3), False,
     lambda n: old_bigbird_layout(n, window=1, num_global_blocks=1, num_random_blocks=2, num_heads=2,
                                  seed=(3, zlib.crc32(b"")))),
]


def _block_sparse_oracle(params, x, mask, layout_fn, block, causal, rng):
  """Today's layer: the old layout through kernels.block_sparse_attention, on the flex layer's parameters."""
  proj = lambda n: jnp.einsum("blf,fhd->blhd", x, params[n]["kernel"]) + params[n]["bias"]  # noqa: E731
  q, k, v = proj("query"), proj("key"), proj("value")
  length = x.shape[1]
  pad = -length % block
  q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
  key_mask = jnp.pad(mask, ((0, 0), (0, pad)))
  y = block_sparse_attention(q, k, v, layout_fn((length + pad) // block), block_size=block, causal=causal,
                             key_mask=key_mask, dropout_rate=0.1, dropout_rng=rng, implementation="xla")
  return jnp.einsum("blhd,hdf->blf", y[:, :length], params["out"]["kernel"]) + params["out"]["bias"]


@pytest.mark.parametrize("name,options,causal,layout_fn", ORACLE_LAYERS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(ORACLE_LAYERS)])
def test_the_flex_layer_equals_the_old_block_sparse_layer(name, options, causal, layout_fn):
  """Values and gradients (inputs and parameters) within 1e-5 in float32, attention dropout on (the same hash)."""
  x = jax.random.normal(jax.random.key(1), (2, 13, 8))
  mask = jnp.arange(13)[None, :] < jnp.array([[9], [13]])
  # Flex's XLA form, the form the default dispatch runs on CPU (tracing the default also traces the GPU and TPU
  # kernels, forward and backward: 4x the time; the contract suite runs the default on every variant).
  layer = attention.build(name, num_heads=2, causal=causal, dropout_rate=0.1, implementation="xla", **options)
  params = jax.jit(layer.init)(jax.random.key(0), x)["params"]
  rng = jax.random.key(5)

  def ours(p, x):
    y = layer.apply({"params": p}, x, mask=mask, deterministic=False, rngs={"dropout": rng})
    return jnp.sum(jnp.sin(y) * mask[..., None])

  # The key the layer draws from its "dropout" stream (its first and only draw in a call).
  key = layer.apply({"params": params}, method=lambda m: m.make_rng("dropout"), rngs={"dropout": rng})

  def theirs(p, x):
    y = _block_sparse_oracle(p, x, mask, layout_fn, options["block_size"], causal, key)
    return jnp.sum(jnp.sin(y) * mask[..., None])

  # Both in one program (one compile).
  (v1, g1), (v2, g2) = jax.jit(lambda p, x: tuple(jax.value_and_grad(f, argnums=(0, 1))(p, x)
                                                   for f in (ours, theirs)))(params, x)
  np.testing.assert_allclose(v1, v2, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
